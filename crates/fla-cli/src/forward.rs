//! `fla forward`: run a model directory on `input_ids` and write logits, loss and (with
//! `--grads`) every parameter's gradient, for checking against other implementations.

use std::path::PathBuf;

use clap::Args;
use fla_cuda::DeviceChoice;
use fla_model::checkpoint::load_model;
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
    /// Arithmetic precision: f32, or f64 for reference values (files stay f32)
    #[arg(long, default_value = "f32")]
    precision: String,
    /// auto | cpu | cuda (the model runs on the CPU so far; cuda says so)
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: &ForwardArgs) -> Result<()> {
    cpu_only(&a.device, "fla forward")?;
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
    let out = match a.precision.as_str() {
        "f32" => compute(&load_model::<f32>(&a.model)?, &ids, b, t, a.grads)?,
        "f64" => compute(&load_model::<f64>(&a.model)?, &ids, b, t, a.grads)?,
        p => {
            return Err(Error::Invalid(format!(
                "unknown precision `{p}` (expected f32 or f64)"
            )))
        }
    };
    write_safetensors(&a.output, &out)
}

/// The model runs on the CPU for now: `--device cuda` says so rather than silently using it.
pub fn cpu_only(device: &str, what: &str) -> Result<()> {
    match device.parse::<DeviceChoice>()? {
        DeviceChoice::Cuda(_) => Err(Error::Invalid(format!(
            "--device {device}: {what} runs the model on the CPU only so far; use --device cpu or auto"
        ))),
        _ => Ok(()),
    }
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
