//! `fla bench train`: training throughput of a GLA model on the GPU (forward, backward,
//! gradient norm and AdamW per step), tokens per second and device memory; fla's side of the
//! comparison is bench/train_fla.py, run in the same device call.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use fla_cuda::{new_id, DType, Gpu, NcclGroup};
use fla_model::gpu::{GpuModel, Split, BUCKET_BYTES};
use fla_model::{GlaConfig, Model, Rng};
use fla_tensor::{write_atomic, Result};

#[derive(Args)]
pub struct TrainBenchArgs {
    /// Model config.json (default: fla's GLA 340M shape: hidden 1024, 24 layers, 4 heads,
    /// vocabulary 32000)
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Timed steps (after 2 untimed)
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run each step as the one rank of data-parallel training over NCCL: the gradients'
    /// bucketed sum during the backward, on the communicator's stream (what data parallelism
    /// costs where there is nothing to sum with)
    #[arg(long)]
    nccl: bool,
    /// With --nccl: ZeRO-1 (reduce-scatter, the optimizer's shard, the weights' all-gather)
    #[arg(long, requires = "nccl")]
    zero: bool,
}

/// fla's GLA 340M configuration (fla's configs/gla_340M.json shape).
pub fn gla_340m() -> GlaConfig {
    let mut c = GlaConfig::default();
    c.hidden_size = 1024;
    c.num_hidden_layers = 24;
    c.num_heads = 4;
    c.vocab_size = 32000;
    c.tie_word_embeddings = false;
    c
}

pub fn run(a: &TrainBenchArgs) -> Result<()> {
    let config = match &a.config {
        Some(p) => GlaConfig::from_file(p)?,
        None => gla_340m(),
    };
    let dtype: DType = a.dtype.parse()?;
    let gpu = Gpu::new(0)?;
    let device = gpu.describe();
    let cpu = Model::<f32>::new(config, 0);
    let params = cpu.layout.num_params();
    let mut model = GpuModel::new(gpu, &cpu, dtype)?;
    drop(cpu);
    let how = match (a.nccl, a.zero) {
        (false, _) => "",
        (true, zero) => {
            let group = NcclGroup::new(model.gpu(), 0, 1, new_id()?)?;
            model.distribute(Box::new(group), Split::Batch, BUCKET_BYTES, zero)?;
            if zero {
                ", one NCCL rank with ZeRO-1"
            } else {
                ", one NCCL rank"
            }
        }
    };
    let (b, t) = (a.batch_size, a.seq_len);
    let mut rng = Rng::new(1);
    let vocab = model.config.vocab_size;
    let ids: Vec<usize> = (0..b * t).map(|_| rng.below(vocab)).collect();
    let targets: Vec<i64> = (0..b * t)
        .map(|i| {
            if i % t + 1 < t {
                ids[i + 1] as i64
            } else {
                -100
            }
        })
        .collect();
    let step = |m: &mut GpuModel| -> Result<f64> {
        m.zero_grads()?;
        m.reduce_in_backward();
        let loss = m.accumulate(&ids, b, t, &targets, 1.0)?;
        let norm = m.grad_norm()?;
        m.adamw(3e-4, 0.1, false, (1.0 / norm.max(1e-12)).min(1.0))?;
        m.gpu().synchronize()?;
        Ok(loss)
    };
    for _ in 0..2 {
        step(&mut model)?;
    }
    model.submit_secs = 0.0;
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..a.steps {
        loss = step(&mut model)?;
    }
    let secs = start.elapsed().as_secs_f64() / a.steps.max(1) as f64;
    let tokens_per_s = (b * t) as f64 / secs;
    let gib = model.peak_bytes as f64 / (1u64 << 30) as f64;
    println!(
        "{device}: GLA {:.0}M parameters, batch {b} x {t}, {dtype:?}{how}",
        params as f64 / 1e6
    );
    println!("step {:.1} ms, {tokens_per_s:.0} tokens/s, device memory in use after the forward {gib:.2} GiB, loss {loss:.4}", secs * 1e3);
    println!(
        "host time submitting a step's forward and backward: {:.1} ms",
        model.submit_secs * 1e3 / a.steps.max(1) as f64
    );
    let phases = model.profile();
    if !phases.is_empty() {
        let steps = (a.steps + 2) as f64;
        let total: f64 = phases.iter().map(|p| p.1).sum::<f64>() / steps;
        println!("device time per step by phase (FLA_PROFILE), {total:.1} ms in all:");
        for (name, ms) in &phases {
            println!(
                "  {name:<40} {:>8.2} ms  {:>5.1}%",
                ms / steps,
                100.0 * ms / steps / total
            );
        }
    }
    if let Some(path) = &a.json {
        let rec = format!(
            "{{\"impl\": \"ours\", \"params\": {params}, \"B\": {b}, \"T\": {t}, \"dtype\": \"{dtype:?}\", \"step_ms\": {:.3}, \"tokens_per_s\": {tokens_per_s:.1}, \"memory_gib\": {gib:.3}, \"device\": \"{device}\", \"nccl\": {}, \"zero\": {}}}\n",
            secs * 1e3,
            a.nccl,
            a.zero
        );
        write_atomic(path, rec.as_bytes())?;
    }
    Ok(())
}
