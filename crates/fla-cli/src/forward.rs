//! `fla forward`: run a model directory on `input_ids` and write logits, loss and (with
//! `--grads`) every parameter's gradient, for checking against other implementations.

use std::path::PathBuf;

use clap::Args;
use fla_cuda::{DType, DeviceChoice, Gpu};
use fla_model::checkpoint::load_model;
use fla_model::gpu::GpuModel;
use fla_model::Model;
use fla_tensor::{read_int_tensor, write_safetensors, Error, Real, Result, Tensor, TensorFile};

#[derive(Args)]
pub struct ForwardArgs {
    /// A model directory (config.json and model.safetensors, as fla's save_pretrained writes)
    #[arg(long)]
    model: PathBuf,
    /// A safetensors file with `input_ids` (integers, [B, T]); labels are the inputs
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// Also write `grad.<parameter name>` for every parameter
    #[arg(long)]
    grads: bool,
    /// Arithmetic precision: f32, or f64 for reference values (CPU only; files stay f32)
    #[arg(long, default_value = "f32")]
    precision: String,
    /// auto | cpu | cuda | cuda:N (auto: the CPU, the exact reference; cuda runs the GPU model
    /// in f32)
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: &ForwardArgs) -> Result<()> {
    let device: DeviceChoice = a.device.parse()?;
    let (ids, shape) = read_int_tensor(&a.input, "input_ids")?;
    let [b, t] = shape[..] else {
        return Err(Error::Shape {
            name: "input_ids".into(),
            expected: "[B, T]".into(),
            got: shape,
        });
    };
    if let Some(bad) = ids.iter().find(|&&i| i < 0) {
        return Err(Error::Invalid(format!(
            "input_ids holds a negative id {bad}"
        )));
    }
    let ids: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    let out = match (a.precision.as_str(), device) {
        ("f32", DeviceChoice::Cuda(n)) => compute_gpu(
            load_model::<f32>(&a.model)?,
            Gpu::new(n)?,
            &ids,
            b,
            t,
            a.grads,
        )?,
        ("f64", DeviceChoice::Cuda(_)) => {
            return Err(Error::Invalid(
                "--precision f64 runs on the CPU only; use --device cpu".into(),
            ))
        }
        ("f32", _) => compute(&load_model::<f32>(&a.model)?, &ids, b, t, a.grads)?,
        ("f64", _) => compute(&load_model::<f64>(&a.model)?, &ids, b, t, a.grads)?,
        (p, _) => {
            return Err(Error::Invalid(format!(
                "unknown precision `{p}` (expected f32 or f64)"
            )))
        }
    };
    write_safetensors(&a.output, &out)
}

/// The same outputs from the GPU model in f32.
fn compute_gpu(
    model: Model<f32>,
    gpu: Gpu,
    ids: &[usize],
    b: usize,
    t: usize,
    grads: bool,
) -> Result<TensorFile> {
    let targets = next_token_targets(ids, t);
    let mut m = GpuModel::new(gpu, &model, DType::F32)?;
    let (loss, logits) = m.evaluate(ids, b, t, &targets, true)?;
    let mut file = TensorFile::default();
    let logits = logits.expect("asked for the logits");
    file.tensors.insert(
        "logits".into(),
        Tensor::new(vec![b, t, model.config.vocab_size], logits)?,
    );
    file.tensors
        .insert("loss".into(), Tensor::new(vec![1], vec![loss as f32])?);
    if grads {
        m.loss_and_grads(ids, b, t, &targets)?;
        for (spec, g) in m.layout.specs.iter().zip(m.gradients()?) {
            file.tensors.insert(format!("grad.{}", spec.name), g);
        }
    }
    Ok(file)
}

/// fla's labels: each position's next token, none (-100) at the end of each sequence.
fn next_token_targets(ids: &[usize], t: usize) -> Vec<i64> {
    (0..ids.len())
        .map(|i| {
            if i % t + 1 < t {
                ids[i + 1] as i64
            } else {
                -100
            }
        })
        .collect()
}

fn compute<F: Real>(
    model: &Model<F>,
    ids: &[usize],
    b: usize,
    t: usize,
    grads: bool,
) -> Result<TensorFile> {
    let out = model.lm_loss(ids, b, t, grads)?;
    let mut file = TensorFile::default();
    let logits = out.logits.iter().map(|x| x.to_f64() as f32).collect();
    file.tensors.insert(
        "logits".into(),
        Tensor::new(vec![b, t, model.config.vocab_size], logits)?,
    );
    file.tensors
        .insert("loss".into(), Tensor::new(vec![1], vec![out.loss as f32])?);
    for (spec, g) in model.layout.specs.iter().zip(out.grads.iter().flatten()) {
        file.tensors.insert(format!("grad.{}", spec.name), g.cast());
    }
    Ok(file)
}
