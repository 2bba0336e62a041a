//! `fla train`: with no arguments, a small GLA model on the synthetic MQAR task (on the
//! CPU in a few minutes); with `--data`, a language model on text files.

use std::path::{Path, PathBuf};

use std::time::Duration;

use clap::Args;
use fla_model::data_parallel::train_ranks;
use fla_model::dist::{share_id, Launch};
use fla_model::gpu::Split;
use fla_model::gpu_data_parallel::GpuParallel;
use fla_model::mqar::Mqar;
use fla_model::text::{evaluate_lm, Corpus, TextTask, Tokenizer};
use fla_model::train::{train, Evaluate, Metrics, Task, TrainArgs};
use fla_model::{GlaConfig, Model};
use fla_tensor::{Error, Result};

use fla_cuda::{nccl_ready, new_id, DType, DeviceChoice, Gpu, NcclGroup, ID_BYTES};
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
    /// Data-parallel training on GPUs 0..N of this host, one thread each, gradients summed
    /// over NCCL (the batch splits evenly over them). With RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR and MASTER_PORT set instead, this process is one rank of a multi-process run
    #[arg(long)]
    gpus: Option<usize>,
    /// Data-parallel training: shard the optimizer state (AdamW's moments and the f32 master
    /// weights it steps) over the ranks (ZeRO-1)
    #[arg(long)]
    zero: bool,
    /// Several GPUs: split every sequence along its tokens over the ranks instead of the batch
    /// over them (sequence parallelism: the GLA layers pass their states between the ranks)
    #[arg(long)]
    seq_parallel: bool,
    /// Data-parallel training: MB of f32 gradients per all-reduce, each issued as soon as the
    /// backward has finished its gradients
    #[arg(long, default_value_t = 25)]
    bucket_mb: usize,
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
    let evals = fit(a, model, &mut train_task, &mut evaluate, args)?;
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
        lead: true,
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
    let evals = fit(a, model, &mut task, &mut evaluate, train_args(a, &out))?;
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

/// Trains `model` on `task` as the flags and the environment say: on one device; on --gpus N
/// of this host, one thread each; or, with WORLD_SIZE set, as one rank of a multi-process
/// run. Several GPUs run data-parallel over NCCL with NVLink multicast off
/// (NCCL_NVLS_ENABLE=0, docs/DISTRIBUTED.md); rank 0 writes the files.
fn fit<T: Task + Clone + Send>(
    a: &TrainCmd,
    model: Model<f32>,
    task: &mut T,
    evaluate: &mut Evaluate<'_>,
    mut args: TrainArgs,
) -> Result<Metrics> {
    let launch = Launch::from_env()?;
    let world = match (&launch, a.gpus) {
        (None, None) if a.zero || a.seq_parallel => {
            return Err(Error::Invalid(
                "--zero and --seq-parallel split the work over ranks: use them with --gpus or WORLD_SIZE".into(),
            ))
        }
        (None, None) => {
            let mut learner = learner(a, model)?;
            return train(learner.as_mut(), task, evaluate, &args, a.resume);
        }
        (Some(_), Some(_)) => {
            return Err(Error::Invalid(
                "--gpus starts its own ranks: leave it out when WORLD_SIZE is set".into(),
            ))
        }
        (Some(l), None) => l.world_size,
        (None, Some(n)) => n,
    };
    if world == 0 {
        return Err(Error::Invalid("--gpus needs at least one GPU".into()));
    }
    if !matches!(
        a.device.parse::<DeviceChoice>()?,
        DeviceChoice::Auto | DeviceChoice::Cuda(0)
    ) {
        return Err(Error::Invalid(format!(
            "data-parallel training runs on GPUs 0..N (LOCAL_RANK with WORLD_SIZE), not --device {}",
            a.device
        )));
    }
    if let Some(t) = a
        .seq_len
        .filter(|t| a.seq_parallel && !t.is_multiple_of(world))
    {
        return Err(Error::Invalid(format!(
            "--seq-len {t} does not split evenly over {world} GPUs"
        )));
    }
    if !a.seq_parallel && !a.batch_size.is_multiple_of(world) {
        return Err(Error::Invalid(format!(
            "--batch-size {} does not split evenly over {world} GPUs",
            a.batch_size
        )));
    }
    nccl_ready()?; // also turns NVLink multicast off
    if let Some(l) = launch {
        // The communicator's id from rank 0, over TCP at MASTER_ADDR:MASTER_PORT.
        let id = if l.rank == 0 { Some(new_id()?) } else { None };
        let id = share_id(&l, id, Duration::from_secs(120))?;
        args.lead = l.rank == 0;
        args.progress &= args.lead;
        let mut learner = rank_learner(a, &model, l.local_rank, l.rank, world, id)?;
        return train(learner.as_mut(), task, evaluate, &args, a.resume);
    }
    let id = new_id()?;
    let make = |rank: usize| rank_learner(a, &model, rank, rank, world, id);
    // A rank that fails would leave the others waiting in NCCL: the run ends there.
    let fail = |rank: usize, e: &Error| {
        eprintln!("error: rank {rank} of {world}: {e}");
        std::process::exit(1)
    };
    train_ranks(world, &make, task, evaluate, &args, a.resume, &fail)
}

/// Rank `rank` of `world`: `model` on GPU `gpu`, its gradients summed over the communicator
/// `id` names.
fn rank_learner(
    a: &TrainCmd,
    model: &Model<f32>,
    gpu: usize,
    rank: usize,
    world: usize,
    id: [u8; ID_BYTES],
) -> Result<Box<dyn Learner>> {
    let dtype: DType = a.dtype.parse()?;
    let gpu = Gpu::new(gpu)?;
    let name = gpu.describe();
    let group = NcclGroup::new(&gpu, rank, world, id)?;
    let inner = GpuLearner {
        model: GpuModel::new(gpu, model, dtype)?,
        weight_decay: a.weight_decay,
        decay_all: a.decay_all,
    };
    if rank == 0 {
        let each = match a.seq_parallel {
            true => "a segment of every sequence".to_string(),
            false => format!("{} sequences", a.batch_size / world),
        };
        eprintln!(
            "training on {world} GPU{} over NCCL, {each} each ({name} first; {dtype:?} products, f32 master weights{})",
            if world == 1 { "" } else { "s" },
            if a.zero { ", optimizer sharded" } else { "" }
        );
    }
    let bucket_bytes = a.bucket_mb.max(1) << 20;
    let split = match a.seq_parallel {
        true => Split::Sequence,
        false => Split::Batch,
    };
    Ok(Box::new(GpuParallel::new(
        inner,
        Box::new(group),
        split,
        bucket_bytes,
        a.zero,
    )?))
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
