//! `fla op`: read inputs from a safetensors file, run an op, write outputs (and gradients when
//! `do` is present) to another.

use std::path::PathBuf;

use clap::Args;
use fla_cuda::{DType, DeviceChoice, Gpu};
use fla_ops::mamba::{selective_scan_backward, selective_scan_forward, ScanInputs};
use fla_ops::{gla_backward, gla_forward, Form, GateKind, GlaInputs, Options};
use fla_tensor::{read_safetensors, write_safetensors, Error, Real, Result, Tensor, TensorFile};

#[derive(Args)]
pub struct OpArgs {
    /// none | scalar | key | key-bonus | both, or full (the Mamba selective scan)
    #[arg(long)]
    gate: String,
    /// naive | recurrent | chunk | fused-chunk (full takes recurrent only)
    #[arg(long, default_value = "chunk")]
    form: String,
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// auto | cpu | cuda | cuda:N (auto: the GPU when one is usable and runs this op)
    #[arg(long, default_value = "auto")]
    device: String,
    /// Element type of q, k, v on the GPU: f32 or bf16 (gates, states and sums stay f32)
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Offsets of sequences packed along T, e.g. 0,37,100 (needs B = 1)
    #[arg(long, value_delimiter = ',')]
    cu_seqlens: Option<Vec<usize>>,
    #[arg(long, default_value_t = 64)]
    chunk_size: usize,
    /// Arithmetic precision on the CPU: f32, or f64 for reference values (files stay f32)
    #[arg(long, default_value = "f32")]
    precision: String,
}

/// Why the GPU cannot run this call, if it cannot.
fn cuda_unsupported(a: &OpArgs) -> Option<String> {
    if a.gate == "full" {
        Some("the selective scan (gate full) runs on the CPU only".into())
    } else if a.precision != "f32" {
        Some(format!("precision {} runs on the CPU only", a.precision))
    } else if a.form == "naive" {
        Some(
            "form naive runs on the CPU only; the GPU runs chunk, fused-chunk and recurrent".into(),
        )
    } else {
        None
    }
}

pub fn run(a: &OpArgs) -> Result<()> {
    let choice: DeviceChoice = a.device.parse()?;
    let dtype: DType = a.dtype.parse()?;
    let file = read_safetensors(&a.input)?;
    let gpu = match (choice, cuda_unsupported(a)) {
        (DeviceChoice::Cpu, _) | (DeviceChoice::Auto, Some(_)) => None,
        (DeviceChoice::Cuda(_), Some(why)) => {
            return Err(Error::Invalid(format!(
                "--device {}: {why}; use --device cpu",
                a.device
            )))
        }
        (DeviceChoice::Cuda(n), None) => Some(Gpu::new(n)?),
        (DeviceChoice::Auto, None) => Gpu::new(0).ok(),
    };
    let out = match (a.precision.as_str(), &gpu) {
        ("f32", Some(gpu)) => compute_cuda(a, &file, gpu, dtype)?,
        ("f32", None) => compute::<f32>(a, &file)?,
        ("f64", None) => compute::<f64>(a, &file)?,
        (p, _) => {
            return Err(Error::Invalid(format!(
                "unknown precision `{p}` (expected f32 or f64)"
            )))
        }
    };
    write_safetensors(&a.output, &out)?;
    let names: Vec<&str> = out.tensors.keys().map(|s| s.as_str()).collect();
    println!("wrote {} ({})", a.output.display(), names.join(", "));
    Ok(())
}

fn scale(file: &TensorFile) -> Result<Option<f64>> {
    match file.metadata.get("scale") {
        None => Ok(None),
        Some(s) => s
            .trim()
            .parse::<f64>()
            .map(Some)
            .map_err(|_| Error::Invalid(format!("metadata `scale` = `{s}` is not a number"))),
    }
}

/// The tensors of the input file, cast to F.
struct Tensors<'a> {
    a: &'a OpArgs,
    file: &'a TensorFile,
}

impl Tensors<'_> {
    fn get<F: Real>(&self, name: &str) -> Option<Tensor<F>> {
        self.file.tensors.get(name).map(|t| t.cast::<F>())
    }

    fn need<F: Real>(&self, name: &str) -> Result<Tensor<F>> {
        self.get(name).ok_or_else(|| Error::Missing {
            name: name.into(),
            why: format!(
                "the input file {} has no such tensor",
                self.a.input.display()
            ),
        })
    }
}

fn gla_inputs<F: Real>(a: &OpArgs, file: &TensorFile) -> Result<GlaInputs<F>> {
    let t = Tensors { a, file };
    let (get, need) = (|n: &str| t.get::<F>(n), |n: &str| t.need::<F>(n));
    Ok(GlaInputs {
        q: need("q")?,
        k: need("k")?,
        v: need("v")?,
        g: get("g"),
        gv: get("gv"),
        u: get("u"),
        h0: get("h0"),
        scale: scale(file)?,
        cu_seqlens: a.cu_seqlens.clone(),
    })
}

/// The op on the GPU (cuda_unsupported has ruled out everything else): the forward, and the
/// backward when the file holds `do`.
fn compute_cuda(a: &OpArgs, file: &TensorFile, gpu: &Gpu, dtype: DType) -> Result<TensorFile> {
    let gate: GateKind = a.gate.parse()?;
    let form: Form = a.form.parse()?;
    let t = Tensors { a, file };
    let x = gla_inputs::<f32>(a, file)?;
    let mut out = TensorFile::default();
    let mut put = |name: &str, t: Option<Tensor<f32>>| {
        if let Some(t) = t {
            out.tensors.insert(name.to_string(), t);
        }
    };
    match t.get::<f32>("do") {
        None => {
            if t.get::<f32>("dht").is_some() {
                return Err(missing_do());
            }
            let y = fla_cuda::gla_forward(gpu, gate, &x, dtype, form)?;
            put("o", Some(y.o));
            put("ht", Some(y.ht));
        }
        Some(d_o) => {
            let dht = t.get::<f32>("dht");
            let (y, g) = fla_cuda::gla_backward(gpu, gate, &x, &d_o, dht.as_ref(), dtype, form)?;
            put("o", Some(y.o));
            put("ht", Some(y.ht));
            for (n, t) in [("dq", g.dq), ("dk", g.dk), ("dv", g.dv)] {
                put(n, Some(t));
            }
            for (n, t) in [("dg", g.dg), ("dgv", g.dgv), ("du", g.du), ("dh0", g.dh0)] {
                put(n, t);
            }
        }
    }
    Ok(out)
}

fn missing_do() -> Error {
    Error::Missing {
        name: "do".into(),
        why: "gradients need `do` (and optionally `dht`); the file has `dht` only".into(),
    }
}

fn compute<F: Real>(a: &OpArgs, file: &TensorFile) -> Result<TensorFile> {
    let t = Tensors { a, file };
    let (get, need) = (|n: &str| t.get::<F>(n), |n: &str| t.need::<F>(n));
    let scale = scale(file)?;
    let mut out = TensorFile::default();
    let mut put = |name: &str, t: Option<Tensor<F>>| {
        if let Some(t) = t {
            out.tensors.insert(name.to_string(), t.cast::<f32>());
        }
    };
    let d_o = get("do");
    if a.gate == "full" {
        if a.form != "recurrent" {
            return Err(Error::Invalid(format!(
                "gate `full` (the selective scan) has only the recurrent form, not `{}`",
                a.form
            )));
        }
        if a.cu_seqlens.is_some() {
            return Err(Error::Invalid(
                "gate `full` does not take --cu-seqlens".into(),
            ));
        }
        let x = ScanInputs {
            q: need("q")?,
            k: need("k")?,
            v: need("v")?,
            delta: need("delta")?,
            a: need("a")?,
            h0: get("h0"),
            scale,
        };
        let (o, ht) = selective_scan_forward(&x)?;
        put("o", Some(o));
        put("ht", Some(ht));
        if let Some(d_o) = d_o {
            let g = selective_scan_backward(&x, &d_o, get("dht").as_ref())?;
            for (n, t) in [
                ("dq", g.dq),
                ("dk", g.dk),
                ("dv", g.dv),
                ("ddelta", g.ddelta),
                ("da", g.da),
            ] {
                put(n, Some(t));
            }
            put("dh0", g.dh0);
        }
        return Ok(out);
    }
    let gate: GateKind = a.gate.parse()?;
    let opts = Options {
        form: a.form.parse::<Form>()?,
        chunk_size: a.chunk_size,
    };
    let x = gla_inputs::<F>(a, file)?;
    let y = gla_forward(gate, &x, &opts)?;
    put("o", Some(y.o));
    put("ht", Some(y.ht));
    if let Some(d_o) = d_o {
        let g = gla_backward(gate, &x, &d_o, get("dht").as_ref(), &opts)?;
        put("dq", Some(g.dq));
        put("dk", Some(g.dk));
        put("dv", Some(g.dv));
        put("dg", g.dg);
        put("dgv", g.dgv);
        put("du", g.du);
        put("dh0", g.dh0);
    } else if get("dht").is_some() {
        return Err(missing_do());
    }
    Ok(out)
}
