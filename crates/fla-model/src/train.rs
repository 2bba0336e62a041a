//! The training loop: AdamW with warmup + cosine, clipping, gradient accumulation, metrics
//! as JSONL, a progress line, checkpoints (model, optimizer, data position) written
//! atomically every N steps, and `resume` continuing the same run exactly.
//!
//! The output directory holds `checkpoint/` (the last checkpoint), `metrics.jsonl`,
//! `loss.svg`, and at the end the model itself (config.json, model.safetensors).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use fla_tensor::{read_safetensors, write_atomic, write_safetensors, Error, Result, TensorFile};
use serde_json::{json, Value};

use crate::checkpoint::{load_model, save_model};
use crate::learner::{Learner, OptState, Scorer};
use crate::model::Model;
use crate::optim::learning_rate;
use crate::plot::loss_curve_svg;
use crate::rng::Rng;

/// B sequences of T tokens and a target per position (negative: none).
#[derive(Clone, Debug)]
pub struct Batch {
    pub ids: Vec<usize>,
    pub targets: Vec<i64>,
    pub b: usize,
    pub t: usize,
}

/// A source of training batches; all its randomness comes from `rng`, whose state the
/// checkpoints keep.
pub trait Task {
    fn batch(&mut self, rng: &mut Rng) -> Batch;
}

#[derive(Clone, Debug)]
pub struct TrainArgs {
    pub steps: u64,
    pub lr: f64,
    /// The cosine ends at lr * min_lr_ratio.
    pub min_lr_ratio: f64,
    pub warmup: u64,
    pub weight_decay: f64,
    /// Decay embeddings, norms and biases too (by default only matrices decay).
    pub decay_all: bool,
    /// Largest global gradient norm (0: no clipping).
    pub clip: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub seed: u64,
    /// Steps between checkpoints (0: only at the end).
    pub save_every: u64,
    /// Steps between evaluations (0: only at the end).
    pub eval_every: u64,
    pub out: PathBuf,
    /// Stop (with a checkpoint) after this step, though the schedule runs to `steps`; a
    /// later `resume` goes on from there.
    pub stop_at: Option<u64>,
    /// Print the progress line (to stderr).
    pub progress: bool,
    /// This run writes the files (metrics, checkpoints, the model), evaluates and prints
    /// progress: every one-process run, and rank 0 of a data-parallel one (the other ranks
    /// train in step with it and write nothing).
    pub lead: bool,
}

/// Metrics by name (e.g. "accuracy", "val_loss").
pub type Metrics = Vec<(String, f64)>;

/// Metrics of a model on held-out data.
pub type Evaluate<'a> = dyn FnMut(&mut dyn Scorer) -> Result<Metrics> + 'a;

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.into(),
        source,
    }
}

/// Trains `learner` (continuing, with `resume`, from the checkpoint in `args.out`), saves
/// the model in `args.out` and returns the last evaluation.
pub fn train(
    learner: &mut dyn Learner,
    task: &mut dyn Task,
    evaluate: &mut Evaluate<'_>,
    args: &TrainArgs,
    resume: bool,
) -> Result<Metrics> {
    if args.grad_accum == 0 || args.steps == 0 {
        return Err(Error::Invalid(
            "steps and grad-accum must be at least 1".into(),
        ));
    }
    let lead = args.lead;
    if lead {
        std::fs::create_dir_all(&args.out).map_err(io_err(&args.out))?;
    }
    let metrics_path = args.out.join("metrics.jsonl");
    let mut rng = Rng::new(args.seed);
    let mut tokens = 0u64;
    let mut history: Vec<Value> = Vec::new();
    if resume {
        let state = load_checkpoint(&args.out)?;
        let step = state.opt.step;
        learner.restore(state.model, state.opt)?;
        rng = Rng::new(state.rng);
        tokens = state.tokens;
        // The metrics of steps after the checkpoint are dropped: the run redoes them.
        if lead {
            history = read_metrics(&metrics_path)?
                .into_iter()
                .filter(|r| r["step"].as_u64().is_some_and(|s| s <= step))
                .collect();
        }
    }
    let mut log = if lead {
        write_metrics(&metrics_path, &history)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(io_err(&metrics_path))?;
        Some(file)
    } else {
        None
    };
    learner.plan_micro_batches(args.grad_accum);
    let started = Instant::now();
    let (first, tokens_start) = (learner.steps(), tokens);
    let mut last_eval = Vec::new();
    let tty = std::io::stderr().is_terminal();
    let end = args.stop_at.map_or(args.steps, |s| s.min(args.steps));
    while learner.steps() < end {
        let step = learner.steps();
        let lr = learning_rate(step, args.steps, args.warmup, args.lr, args.min_lr_ratio);
        learner.zero_grads()?;
        let mut loss = 0.0;
        for _ in 0..args.grad_accum {
            let batch = task.batch(&mut rng);
            loss +=
                learner.accumulate(&batch, 1.0 / args.grad_accum as f64)? / args.grad_accum as f64;
            tokens += (batch.b * batch.t) as u64;
        }
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "the loss became {loss} at step {step}; try a lower --lr"
            )));
        }
        let grad_norm = learner.clip_and_step(lr, args.clip)?;
        let done = learner.steps();
        let elapsed = started.elapsed().as_secs_f64();
        let rate = (done - first) as f64 / elapsed.max(1e-9);
        let mut record = json!({
            "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "elapsed_s": elapsed,
        });
        let eval_now = lead
            && (done == args.steps
                || (args.eval_every > 0 && done.is_multiple_of(args.eval_every)));
        if eval_now {
            last_eval = evaluate(learner.scorer())?;
            for (k, v) in &last_eval {
                record[k.as_str()] = json!(v);
            }
        }
        let tok_s = (tokens - tokens_start) as f64 / elapsed.max(1e-9);
        record["tokens_per_s"] = json!(tok_s);
        if let Some(log) = log.as_mut() {
            writeln!(log, "{record}").map_err(io_err(&metrics_path))?;
        }
        history.push(record);
        if args.progress && lead {
            let eta = (args.steps - done) as f64 / rate.max(1e-9);
            let evals: String = last_eval
                .iter()
                .map(|(k, v)| format!(" {k} {v:.4}"))
                .collect();
            let line = format!(
                "step {done}/{} {} loss {loss:.4} lr {lr:.2e} {:.0} tok/s ETA {}{evals}",
                args.steps,
                bar(done, args.steps),
                tok_s,
                duration(eta)
            );
            if tty {
                eprint!("\r{line}\x1b[K");
            } else if eval_now || done.is_multiple_of((args.steps / 20).max(1)) {
                eprintln!("{line}");
            }
        }
        let save_now = (args.save_every > 0 && done.is_multiple_of(args.save_every)) || done == end;
        if save_now && (lead || learner.optimizer_is_collective()) {
            let opt = learner.optimizer()?;
            if lead {
                save_checkpoint(&args.out, &learner.snapshot()?, &opt, rng.state(), tokens)?;
            }
        }
    }
    if !lead {
        return Ok(last_eval);
    }
    if args.progress && tty {
        eprintln!();
    }
    save_model(&learner.snapshot()?, &args.out)?;
    write_atomic(
        &args.out.join("loss.svg"),
        loss_curve_svg(&history).as_bytes(),
    )?;
    Ok(last_eval)
}

fn bar(done: u64, total: u64) -> String {
    let width = 24;
    let fill = (done as usize * width) / total.max(1) as usize;
    format!("[{}{}]", "=".repeat(fill), " ".repeat(width - fill))
}

fn duration(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).map_err(|e| Error::Format {
                path: path.into(),
                message: format!("a line is not JSON ({e})"),
            })
        })
        .collect()
}

fn write_metrics(path: &Path, records: &[Value]) -> Result<()> {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    write_atomic(path, text.as_bytes())
}

struct Checkpoint {
    model: Model<f32>,
    opt: OptState,
    rng: u64,
    tokens: u64,
}

/// Writes `out/checkpoint` whole or not at all: into a temporary directory, then renamed
/// over the old one (kept as `.checkpoint.old` until the new one is in place).
fn save_checkpoint(
    out: &Path,
    model: &Model<f32>,
    opt: &OptState,
    rng: u64,
    tokens: u64,
) -> Result<()> {
    let tmp = out.join(format!(".checkpoint.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    save_model(model, &tmp)?;
    let mut file = TensorFile::default();
    for (spec, (m, v)) in model.layout.specs.iter().zip(opt.m.iter().zip(&opt.v)) {
        file.tensors.insert(format!("m.{}", spec.name), m.clone());
        file.tensors.insert(format!("v.{}", spec.name), v.clone());
    }
    write_safetensors(&tmp.join("optimizer.safetensors"), &file)?;
    let state = json!({"step": opt.step, "rng": rng.to_string(), "tokens": tokens});
    write_atomic(&tmp.join("trainer.json"), format!("{state}\n").as_bytes())?;
    let (dst, old) = (out.join("checkpoint"), out.join(".checkpoint.old"));
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(&dst, &old).map_err(io_err(&dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn load_checkpoint(out: &Path) -> Result<Checkpoint> {
    let mut dir = out.join("checkpoint");
    if !dir.exists() && out.join(".checkpoint.old").exists() {
        dir = out.join(".checkpoint.old"); // interrupted between the two renames
    }
    if !dir.exists() {
        return Err(Error::Invalid(format!(
            "--resume: no checkpoint in {} (start without --resume)",
            out.display()
        )));
    }
    let model = load_model::<f32>(&dir)?;
    let opt_path = dir.join("optimizer.safetensors");
    let mut file = read_safetensors(&opt_path)?.tensors;
    let mut take = |name: String, shape: &[usize]| {
        file.remove(&name)
            .filter(|t| t.shape() == shape)
            .map(|t| t.cast())
            .ok_or_else(|| Error::Format {
                path: opt_path.clone(),
                message: format!("`{name}` is missing or misshapen"),
            })
    };
    let mut m = Vec::new();
    let mut v = Vec::new();
    for spec in &model.layout.specs {
        m.push(take(format!("m.{}", spec.name), &spec.shape)?);
        v.push(take(format!("v.{}", spec.name), &spec.shape)?);
    }
    let state_path = dir.join("trainer.json");
    let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
    let bad = || Error::Format {
        path: state_path.clone(),
        message: "expected {\"step\": N, \"rng\": \"N\", \"tokens\": N}".into(),
    };
    let s: Value = serde_json::from_str(&text).map_err(|_| bad())?;
    Ok(Checkpoint {
        model,
        opt: OptState {
            step: s["step"].as_u64().ok_or_else(bad)?,
            m,
            v,
        },
        rng: s["rng"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(bad)?,
        tokens: s["tokens"].as_u64().ok_or_else(bad)?,
    })
}
