//! `fla train`: with no arguments, a small GLA model on the synthetic MQAR task (on the
//! CPU in a few minutes); with `--data`, a language model on text files.

use std::path::{Path, PathBuf};

use clap::Args;
use fla_model::mqar::Mqar;
use fla_model::text::{evaluate_lm, Corpus, TextTask, Tokenizer};
use fla_model::train::{train, TrainArgs};
use fla_model::{GlaConfig, Model};
use fla_tensor::{Error, Result};

use fla_cuda::{DType, DeviceChoice, Gpu};
use fla_model::gpu::GpuModel;
use fla_model::learner::{CpuLearner, GpuLearner, Learner, Scorer};

#[derive(Args)]
pub struct TrainCmd {
    /// Text files to train a language model on (default: the synthetic MQAR task)
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// tokenizer.json for --data (default: the built-in byte-level tokenizer)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Model config.json (default: a small built-in model sized for the task)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory: checkpoint/, metrics.jsonl, loss.svg and the final model
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value_t = 800)]
    steps: u64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Tokens per sequence (default 64 for MQAR, 256 for text)
    #[arg(long)]
    seq_len: Option<usize>,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Decay embeddings, norms and biases too
    #[arg(long)]
    decay_all: bool,
    /// Largest global gradient norm (0: off)
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Steps between checkpoints (0: at the end only)
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Steps between evaluations (0: at the end only)
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// Stop after this step (writing a checkpoint); --resume continues the same schedule
    #[arg(long)]
    stop_at: Option<u64>,
    /// MQAR: key-value pairs per sequence
    #[arg(long, default_value_t = 8)]
    mqar_pairs: usize,
    /// MQAR: vocabulary (keys in the lower half, values in the upper)
    #[arg(long, default_value_t = 64)]
    mqar_vocab: usize,
    /// auto | cpu | cuda | cuda:N (auto: the GPU when one is usable, else the CPU)
    #[arg(long, default_value = "auto")]
    device: String,
    /// Element type of the GPU's products and activations: bf16 or f32 (master weights,
    /// gradients and optimizer state stay f32)
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// No progress line
    #[arg(long)]
    quiet: bool,
}

/// The built-in model for MQAR: 2 layers of width 64, short convolutions (they let a value
/// see the key before it, which recall needs).
fn mqar_config(vocab: usize) -> GlaConfig {
    let mut c = GlaConfig::default();
    c.hidden_size = 64;
    c.num_hidden_layers = 2;
    c.num_heads = 2;
    c.use_short_conv = true;
    c.vocab_size = vocab;
    c
}

pub fn run(a: &TrainCmd) -> Result<()> {
    if !a.data.is_empty() {
        return run_text(a);
    }
    let task = Mqar {
        vocab_size: a.mqar_vocab,
        seq_len: a.seq_len.unwrap_or(64),
        num_pairs: a.mqar_pairs,
        batch_size: a.batch_size,
    };
    task.check()?;
    let config = match &a.config {
        Some(path) => GlaConfig::from_file(path)?,
        None => mqar_config(a.mqar_vocab),
    };
    if config.vocab_size < a.mqar_vocab {
        return Err(Error::Invalid(format!(
            "the model's vocab_size {} is smaller than the MQAR vocabulary {}",
            config.vocab_size, a.mqar_vocab
        )));
    }
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("runs/mqar"));
    let model = Model::<f32>::new(config, a.seed);
    eprintln!(
        "MQAR: {} pairs, {} tokens per sequence, vocabulary {}; model of {} parameters; chance {:.3}; writing {}",
        task.num_pairs,
        task.seq_len,
        task.vocab_size,
        model.layout.num_params(),
        1.0 / task.num_pairs as f64,
        out.display()
    );
    let args = train_args(a, &out);
    let eval_task = task.clone();
    let mut evaluate = |m: &mut dyn Scorer| {
        let (acc, loss) = eval_task.evaluate(m, 256, 0xE7A1)?;
        Ok(vec![
            ("accuracy".to_string(), acc),
            ("val_loss".to_string(), loss),
        ])
    };
    let mut train_task = task;
    let mut learner = learner(a, model)?;
    let evals = train(
        learner.as_mut(),
        &mut train_task,
        &mut evaluate,
        &args,
        a.resume,
    )?;
    if stopped_early(a, &out, &evals) {
        return Ok(());
    }
    let acc = evals
        .iter()
        .find(|(k, _)| k == "accuracy")
        .map_or(f64::NAN, |e| e.1);
    println!(
        "MQAR accuracy {acc:.3} (chance {:.3}); model saved in {}",
        1.0 / train_task.num_pairs as f64,
        out.display()
    );
    Ok(())
}

fn train_args(a: &TrainCmd, out: &Path) -> TrainArgs {
    TrainArgs {
        steps: a.steps,
        lr: a.lr,
        min_lr_ratio: a.min_lr_ratio,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        decay_all: a.decay_all,
        clip: a.clip,
        grad_accum: a.grad_accum,
        seed: a.seed,
        save_every: a.save_every,
        eval_every: a.eval_every,
        out: out.to_path_buf(),
        stop_at: a.stop_at,
        progress: !a.quiet,
    }
}

/// A language model on text files: the last 5% of each file is validation.
fn run_text(a: &TrainCmd) -> Result<()> {
    let tok = match &a.tokenizer {
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::Bytes,
    };
    let corpus = Corpus::load(&a.data, &tok, 0.05)?;
    let seq_len = a.seq_len.unwrap_or(256);
    let config = match &a.config {
        Some(path) => GlaConfig::from_file(path)?,
        None => text_config(tok.vocab_size()),
    };
    tok.check_fits(config.vocab_size)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("runs/lm"));
    let model = Model::<f32>::new(config, a.seed);
    eprintln!(
        "text: {} training and {} validation tokens ({} tokenizer of {}); model of {} parameters; writing {}",
        corpus.train.len(),
        corpus.val.len(),
        if a.tokenizer.is_some() { "BPE" } else { "byte-level" },
        tok.vocab_size(),
        model.layout.num_params(),
        out.display()
    );
    let mut task = TextTask {
        tokens: &corpus.train,
        seq_len,
        batch_size: a.batch_size,
    };
    task.check()?;
    let val = &corpus.val;
    let bytes_per_token = corpus.val_bytes as f64 / val.len().max(1) as f64;
    let mut evaluate = |m: &mut dyn Scorer| {
        let (loss, _) = evaluate_lm(m, val, seq_len, a.batch_size, 64)?;
        Ok(vec![
            ("val_loss".to_string(), loss),
            ("val_ppl".to_string(), loss.exp()),
            (
                "val_bpb".to_string(),
                loss / std::f64::consts::LN_2 / bytes_per_token,
            ),
        ])
    };
    let mut learner = learner(a, model)?;
    let evals = train(
        learner.as_mut(),
        &mut task,
        &mut evaluate,
        &train_args(a, &out),
        a.resume,
    )?;
    if let Some(p) = &a.tokenizer {
        std::fs::copy(p, out.join("tokenizer.json")).map_err(|source| Error::Io {
            path: p.clone(),
            source,
        })?;
    }
    if stopped_early(a, &out, &evals) {
        return Ok(());
    }
    let get = |k: &str| evals.iter().find(|e| e.0 == k).map_or(f64::NAN, |e| e.1);
    println!(
        "validation loss {:.4}, perplexity {:.2}, {:.3} bits per byte; model saved in {}",
        get("val_loss"),
        get("val_ppl"),
        get("val_bpb"),
        out.display()
    );
    Ok(())
}

/// The built-in language model: 4 layers of width 128.
fn text_config(vocab: usize) -> GlaConfig {
    let mut c = GlaConfig::default();
    c.hidden_size = 128;
    c.num_hidden_layers = 4;
    c.num_heads = 2;
    c.use_short_conv = true;
    c.vocab_size = vocab;
    c
}

/// The model on the device asked for: `auto` takes the GPU when one opens and runs this
/// model, saying so, else the CPU.
fn learner(a: &TrainCmd, model: Model<f32>) -> Result<Box<dyn Learner>> {
    let dtype: DType = a.dtype.parse()?;
    let gpu = match a.device.parse::<DeviceChoice>()? {
        DeviceChoice::Cpu => None,
        DeviceChoice::Cuda(n) => Some(Gpu::new(n)?),
        DeviceChoice::Auto => Gpu::new(0).ok(),
    };
    let cpu = |model| -> Box<dyn Learner> {
        Box::new(CpuLearner::new(model, a.weight_decay, a.decay_all))
    };
    let Some(gpu) = gpu else {
        eprintln!("training on the CPU (f32)");
        return Ok(cpu(model));
    };
    let name = gpu.describe();
    match GpuModel::new(gpu, &model, dtype) {
        Ok(m) => {
            eprintln!("training on {name} ({dtype:?} products, f32 master weights)");
            Ok(Box::new(GpuLearner {
                model: m,
                weight_decay: a.weight_decay,
                decay_all: a.decay_all,
            }))
        }
        Err(e) if a.device == "auto" => {
            eprintln!("training on the CPU: the GPU cannot run this model ({e})");
            Ok(cpu(model))
        }
        Err(e) => Err(e),
    }
}

/// Says where a run stopped by --stop-at stands (no final evaluation ran).
fn stopped_early(a: &TrainCmd, out: &Path, evals: &[(String, f64)]) -> bool {
    match a.stop_at {
        Some(s) if s < a.steps && evals.is_empty() => {
            println!(
                "stopped after step {s} of {}; checkpoint in {} (continue with --resume)",
                a.steps,
                out.display()
            );
            true
        }
        _ => false,
    }
}
