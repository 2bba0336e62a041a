//! `fla eval`, `fla generate` and `fla tokenizer train`: using a trained language model.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use fla_cuda::{DType, DeviceChoice, Gpu};
use fla_model::checkpoint::load_model;
use fla_model::generate::{generate_with, CpuFeed, Feed, GpuFeed};
use fla_model::gpu::GpuModel;
use fla_model::text::{evaluate_lm, train_bpe, Tokenizer};
use fla_model::{Cache, Sampling};
use fla_tensor::{Error, Result};

/// The model on the GPU when `device` asks for it (or is auto and a GPU runs it); None for
/// the CPU.
fn on_device(device: &str, dtype: &str, model: &fla_model::Model<f32>) -> Result<Option<GpuModel>> {
    let dtype: DType = dtype.parse()?;
    let gpu = match device.parse::<DeviceChoice>()? {
        DeviceChoice::Cpu => None,
        DeviceChoice::Cuda(n) => Some(Gpu::new(n)?),
        DeviceChoice::Auto => Gpu::new(0).ok(),
    };
    match gpu.map(|g| GpuModel::new(g, model, dtype)) {
        None => Ok(None),
        Some(Ok(m)) => Ok(Some(m)),
        Some(Err(e)) if device != "auto" => Err(e),
        Some(Err(_)) => Ok(None),
    }
}

/// The tokenizer given, else the model directory's tokenizer.json, else bytes.
fn tokenizer(given: &Option<PathBuf>, model: &std::path::Path) -> Result<Tokenizer> {
    match given {
        Some(p) => Tokenizer::from_file(p),
        None => Tokenizer::for_model(model),
    }
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    model: PathBuf,
    /// Text files, evaluated whole
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// tokenizer.json (default: the model directory's, else byte-level)
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// auto | cpu | cuda | cuda:N (auto: the GPU when one is usable)
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    let mut model = load_model::<f32>(&a.model)?;
    let tok = tokenizer(&a.tokenizer, &a.model)?;
    tok.check_fits(model.config.vocab_size)?;
    let (mut tokens, mut bytes) = (Vec::new(), 0usize);
    for f in &a.data {
        let text = std::fs::read_to_string(f).map_err(|source| Error::Io {
            path: f.clone(),
            source,
        })?;
        tokens.extend(tok.encode(&text)?);
        bytes += text.len();
    }
    let (seq, batch) = (a.seq_len.max(1), a.batch_size);
    let (loss, _) = match on_device(&a.device, "bf16", &model)? {
        Some(mut gpu) => evaluate_lm(&mut gpu, &tokens, seq, batch, usize::MAX)?,
        None => evaluate_lm(&mut model, &tokens, seq, batch, usize::MAX)?,
    };
    // Bits per byte: bits per token times tokens per byte of the text.
    let bpb = loss / std::f64::consts::LN_2 * tokens.len() as f64 / bytes as f64;
    println!(
        "{} tokens ({} bytes): loss {loss:.4} nats/token, perplexity {:.3}, {bpb:.4} bits per byte",
        tokens.len(),
        bytes,
        loss.exp()
    );
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    /// Text to continue
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Token ids to continue, e.g. 1,2,3
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<usize>>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Keep the k most likely tokens (0: all)
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the whole sequence, prompt included, as comma-separated ids on the last line
    #[arg(long)]
    output_ids: bool,
    /// Stop at the config's eos_token_id
    #[arg(long)]
    stop_at_eos: bool,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// auto | cpu | cuda | cuda:N (auto: the GPU when one is usable)
    #[arg(long, default_value = "auto")]
    device: String,
    /// Element type of the GPU's products: bf16 or f32
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

pub fn generate_cmd(a: &GenerateArgs) -> Result<()> {
    let model = load_model::<f32>(&a.model)?;
    let on_gpu = on_device(&a.device, &a.dtype, &model)?;
    let tok = tokenizer(&a.tokenizer, &a.model)?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => {
            tok.check_fits(model.config.vocab_size)?;
            tok.encode(text)?
        }
        (None, Some(ids)) => ids.clone(),
        (None, None) => {
            return Err(Error::Invalid(
                "give --prompt TEXT or --prompt-ids 1,2,3".into(),
            ))
        }
    };
    let sampling = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let eos = a
        .stop_at_eos
        .then_some(model.config.eos_token_id)
        .flatten()
        .map(|e| e as usize);
    if let Some(text) = &a.prompt {
        print!("{text}");
    }
    let started = Instant::now();
    let mut new = Vec::new();
    let mut shown = String::new();
    let mut cpu_feed;
    let mut gpu_feed;
    let feed: &mut dyn Feed = match &on_gpu {
        Some(m) => {
            gpu_feed = GpuFeed {
                model: m,
                cache: None,
            };
            &mut gpu_feed
        }
        None => {
            cpu_feed = CpuFeed {
                model: &model,
                cache: Cache::new(&model, 1),
            };
            &mut cpu_feed
        }
    };
    let out = generate_with(feed, &[prompt], a.max_new_tokens, &sampling, eos, |next| {
        // Stream text: print what decoding the new tokens adds (multi-byte characters may
        // take several tokens to complete).
        new.push(next[0]);
        if let Ok(text) = tok.decode(&new) {
            let fresh = text
                .strip_prefix(shown.as_str())
                .unwrap_or("")
                .trim_end_matches('\u{fffd}');
            if !fresh.is_empty() {
                print!("{fresh}");
                let _ = std::io::stdout().flush();
                shown.push_str(fresh);
            }
        }
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "{} tokens in {secs:.2} s: {:.1} tokens/s",
        new.len(),
        new.len() as f64 / secs.max(1e-9)
    );
    if a.output_ids {
        let ids: Vec<String> = out[0].iter().map(|i| i.to_string()).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Fit a byte-level BPE tokenizer on text files and write tokenizer.json
    Train {
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<PathBuf>,
        #[arg(long, default_value_t = 4096)]
        vocab_size: usize,
        #[arg(long, default_value = "tokenizer.json")]
        output: PathBuf,
    },
}

pub fn tokenizer_cmd(c: &TokenizerCmd) -> Result<()> {
    match c {
        TokenizerCmd::Train {
            data,
            vocab_size,
            output,
        } => {
            train_bpe(data, *vocab_size, output)?;
            let tok = Tokenizer::from_file(output)?;
            println!("{}: {} tokens", output.display(), tok.vocab_size());
            Ok(())
        }
    }
}
