//! `fla train`: with no arguments, a small GLA model on the synthetic MQAR task (on the
//! CPU in a few minutes); with `--data`, a language model on text files.

use std::path::PathBuf;

use clap::Args;
use fla_model::mqar::Mqar;
use fla_model::train::{train, TrainArgs};
use fla_model::{GlaConfig, Model};
use fla_tensor::{Error, Result};

use crate::forward::cpu_only;

#[derive(Args)]
pub struct TrainCmd {
    /// Text files to train a language model on (default: the synthetic MQAR task)
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
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
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
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
    /// auto | cpu | cuda (training runs on the CPU so far)
    #[arg(long, default_value = "auto")]
    device: String,
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
    cpu_only(&a.device, "fla train")?;
    if !a.data.is_empty() {
        return Err(Error::Invalid(
            "--data: training on text is not built yet; run fla train without --data for MQAR"
                .into(),
        ));
    }
    let task = Mqar {
        vocab_size: a.mqar_vocab,
        seq_len: a.seq_len,
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
    let args = TrainArgs {
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
        out: out.clone(),
        stop_at: a.stop_at,
        progress: !a.quiet,
    };
    let eval_task = task.clone();
    let mut evaluate = |m: &Model<f32>| {
        let (acc, loss) = eval_task.evaluate(m, 256, 0xE7A1)?;
        Ok(vec![
            ("accuracy".to_string(), acc),
            ("val_loss".to_string(), loss),
        ])
    };
    let mut train_task = task;
    let (_, evals) = train(model, &mut train_task, &mut evaluate, &args, a.resume)?;
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
