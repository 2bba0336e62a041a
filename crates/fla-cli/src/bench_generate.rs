//! `fla bench generate`: decoding speed of a GLA model on the GPU, tokens per second for
//! batches of prompts (the prompt's chunkwise prefill not counted); fla's side is
//! bench/generate_fla.py in the same device call.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use fla_cuda::{DType, Gpu};
use fla_model::generate::{generate_with, GpuFeed};
use fla_model::gpu::GpuModel;
use fla_model::{GlaConfig, Model, Rng, Sampling};
use fla_tensor::{write_atomic, Result};

use crate::bench_train::gla_340m;

#[derive(Args)]
pub struct GenerateBenchArgs {
    /// Model config.json (default: the GLA 340M shape)
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: &GenerateBenchArgs) -> Result<()> {
    let config = match &a.config {
        Some(p) => GlaConfig::from_file(p)?,
        None => gla_340m(),
    };
    let dtype: DType = a.dtype.parse()?;
    let gpu = Gpu::new(0)?;
    let device = gpu.describe();
    let cpu = Model::<f32>::new(config, 0);
    let model = GpuModel::new(gpu, &cpu, dtype)?;
    drop(cpu);
    let vocab = model.config.vocab_size;
    let mut records = Vec::new();
    println!(
        "{device}: greedy decoding, prompts of {} tokens, {} new tokens, {dtype:?}",
        a.prompt_len, a.new_tokens
    );
    for &b in &a.batches {
        let mut rng = Rng::new(b as u64);
        let prompts: Vec<Vec<usize>> = (0..b)
            .map(|_| (0..a.prompt_len).map(|_| rng.below(vocab)).collect())
            .collect();
        let run = || -> Result<f64> {
            let mut feed = GpuFeed {
                model: &model,
                cache: None,
            };
            let mut first = None;
            generate_with(
                &mut feed,
                &prompts,
                a.new_tokens,
                &Sampling::default(),
                None,
                |_| {
                    first.get_or_insert_with(Instant::now);
                },
            )?;
            let first = first.expect("at least one token");
            // The first token came from the prefill; the rest are decode steps.
            Ok((b * (a.new_tokens - 1)) as f64 / first.elapsed().as_secs_f64())
        };
        run()?; // compiles the kernels
        let tokens_per_s = run()?;
        println!(
            "batch {b:>3}: {tokens_per_s:>10.0} tokens/s ({:.2} ms per step)",
            b as f64 / tokens_per_s * 1e3
        );
        records.push(format!(
            "{{\"impl\": \"ours\", \"B\": {b}, \"prompt\": {}, \"new_tokens\": {}, \"tokens_per_s\": {tokens_per_s:.1}, \"device\": \"{device}\"}}",
            a.prompt_len, a.new_tokens
        ));
    }
    if let Some(path) = &a.json {
        write_atomic(path, format!("[{}]\n", records.join(",\n ")).as_bytes())?;
    }
    Ok(())
}
