//! `fla bench train`: training throughput of a GLA model on the GPU (forward, backward,
//! gradient norm and AdamW per step), tokens per second and device memory; fla's side of the
//! comparison is bench/train_fla.py, run in the same device call. With `--gpus N` the step
//! runs data- or sequence-parallel on GPUs 0..N over NCCL, one thread each.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use fla_cuda::{nccl_ready, new_id, DType, Gpu, NcclGroup};
use fla_model::gpu::{GpuModel, Split};
use fla_model::gpu_data_parallel::GpuParallel;
use fla_model::learner::{GpuLearner, Learner};
use fla_model::train::Batch;
use fla_model::{GlaConfig, Model, Rng};
use fla_tensor::{write_atomic, Error, Result};

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
    /// Train on GPUs 0..N over NCCL, one thread each, the batch (--batch-size x --seq-len,
    /// all ranks together) split over them; with 1, what the ranks' machinery costs alone
    #[arg(long)]
    gpus: Option<usize>,
    /// With --gpus: split every sequence along its tokens instead of the batch
    #[arg(long, requires = "gpus")]
    seq_parallel: bool,
    /// With --gpus: ZeRO-1 (reduce-scatter, the optimizer's shard, the weights' all-gather)
    #[arg(long, requires = "gpus")]
    zero: bool,
    /// With --gpus: MB of f32 gradients per sum over the ranks (more than the model's: one sum
    /// after the whole backward, nothing overlapped)
    #[arg(long, default_value_t = 25, requires = "gpus")]
    bucket_mb: usize,
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

/// What one rank measured.
struct Timed {
    step_secs: f64,
    peak_bytes: usize,
    submit_secs: f64,
    loss: f64,
    profile: Vec<(&'static str, f64)>,
}

/// Random tokens, each sequence's next token its target (none after the last).
fn random_batch(b: usize, t: usize, vocab: usize) -> Batch {
    let mut rng = Rng::new(1);
    let ids: Vec<usize> = (0..b * t).map(|_| rng.below(vocab)).collect();
    let targets = (0..b * t)
        .map(|i| match i % t + 1 < t {
            true => ids[i + 1] as i64,
            false => -100,
        })
        .collect();
    Batch { ids, targets, b, t }
}

/// Two untimed steps, then `steps` timed ones, of `learner` on `batch`.
fn time_steps<L: Learner>(
    learner: &mut L,
    model: impl Fn(&L) -> &GpuModel,
    batch: &Batch,
    steps: usize,
) -> Result<Timed> {
    let step = |l: &mut L| -> Result<f64> {
        l.zero_grads()?;
        let loss = l.accumulate(batch, 1.0)?;
        l.clip_and_step(3e-4, 1.0)?;
        model(l).gpu().synchronize()?;
        Ok(loss)
    };
    for _ in 0..2 {
        step(learner)?;
    }
    let submit0 = model(learner).submit_secs;
    let start = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(learner)?;
    }
    let m = model(learner);
    Ok(Timed {
        step_secs: start.elapsed().as_secs_f64() / steps.max(1) as f64,
        peak_bytes: m.peak_bytes,
        submit_secs: (m.submit_secs - submit0) / steps.max(1) as f64,
        loss,
        profile: m.profile(),
    })
}

pub fn run(a: &TrainBenchArgs) -> Result<()> {
    let config = match &a.config {
        Some(p) => GlaConfig::from_file(p)?,
        None => gla_340m(),
    };
    let dtype: DType = a.dtype.parse()?;
    let cpu = Model::<f32>::new(config, 0);
    let params = cpu.layout.num_params();
    let (b, t) = (a.batch_size, a.seq_len);
    let batch = random_batch(b, t, cpu.config.vocab_size);
    let learner = |gpu: Gpu| -> Result<GpuLearner> {
        Ok(GpuLearner {
            model: GpuModel::new(gpu, &cpu, dtype)?,
            weight_decay: 0.1,
            decay_all: false,
        })
    };
    let (device, timed, how) = match a.gpus {
        None => {
            let gpu = Gpu::new(0)?;
            let device = gpu.describe();
            let mut l = learner(gpu)?;
            let timed = time_steps(&mut l, |l| &l.model, &batch, a.steps)?;
            (device, timed, String::new())
        }
        Some(world) => {
            nccl_ready()?;
            let split = match a.seq_parallel {
                true => Split::Sequence,
                false => Split::Batch,
            };
            let id = new_id()?;
            let rank = |r: usize| -> Result<(String, Timed)> {
                let gpu = Gpu::new(r)?;
                let device = gpu.describe();
                let group = NcclGroup::new(&gpu, r, world, id)?;
                let buckets = a.bucket_mb.max(1) << 20;
                let mut l =
                    GpuParallel::new(learner(gpu)?, Box::new(group), split, buckets, a.zero)?;
                let timed = time_steps(&mut l, |l| &l.learner().model, &batch, a.steps)?;
                Ok((device, timed))
            };
            let mut ranks: Vec<Result<(String, Timed)>> = std::thread::scope(|s| {
                let others: Vec<_> = (1..world).map(|r| s.spawn(move || rank(r))).collect();
                let first = rank(0);
                std::iter::once(first)
                    .chain(others.into_iter().map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(Error::Invalid("a rank panicked".into())))
                    }))
                    .collect()
            });
            let (device, mut timed) = ranks.remove(0)?;
            for r in ranks {
                // The step is the slowest rank's, the memory the largest.
                let (_, other) = r?;
                timed.step_secs = timed.step_secs.max(other.step_secs);
                timed.peak_bytes = timed.peak_bytes.max(other.peak_bytes);
            }
            let how = format!(
                ", {world} GPU{} over NCCL ({}{}, buckets of {} MB)",
                if world == 1 { "" } else { "s" },
                if a.seq_parallel {
                    "sequence-parallel"
                } else {
                    "data-parallel"
                },
                if a.zero { ", ZeRO-1" } else { "" },
                a.bucket_mb
            );
            (device, timed, how)
        }
    };
    let secs = timed.step_secs;
    let tokens_per_s = (b * t) as f64 / secs;
    let gib = timed.peak_bytes as f64 / (1u64 << 30) as f64;
    println!(
        "{device}: GLA {:.0}M parameters, batch {b} x {t}, {dtype:?}{how}",
        params as f64 / 1e6
    );
    println!(
        "step {:.1} ms, {tokens_per_s:.0} tokens/s, device memory in use after the forward {gib:.2} GiB{}, loss {:.4}",
        secs * 1e3,
        if a.gpus.is_some() { " (largest rank)" } else { "" },
        timed.loss
    );
    println!(
        "host time submitting a step's forward and backward: {:.1} ms",
        timed.submit_secs * 1e3
    );
    if !timed.profile.is_empty() {
        let steps = (a.steps + 2) as f64;
        let total: f64 = timed.profile.iter().map(|p| p.1).sum::<f64>() / steps;
        println!("device time per step by phase (FLA_PROFILE), {total:.1} ms in all:");
        for (name, ms) in &timed.profile {
            println!(
                "  {name:<40} {:>8.2} ms  {:>5.1}%",
                ms / steps,
                100.0 * ms / steps / total
            );
        }
    }
    if let Some(path) = &a.json {
        let rec = format!(
            "{{\"impl\": \"ours\", \"params\": {params}, \"B\": {b}, \"T\": {t}, \"dtype\": \"{dtype:?}\", \"step_ms\": {:.3}, \"tokens_per_s\": {tokens_per_s:.1}, \"memory_gib\": {gib:.3}, \"device\": \"{device}\", \"gpus\": {}, \"seq_parallel\": {}, \"zero\": {}}}\n",
            secs * 1e3,
            a.gpus.unwrap_or(0),
            a.seq_parallel,
            a.zero
        );
        write_atomic(path, rec.as_bytes())?;
    }
    Ok(())
}
