//! `fla bench cpu`: each form's forward and forward+backward time on the CPU, next to the
//! rate of one large f32 GEMM measured in the same run (the machine's practical ceiling).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use fla_ops::linalg::{matmul_par, MatRef};
use fla_ops::{gla_backward, gla_forward, Form, GateKind, GlaInputs, Options};
use fla_tensor::{Error, Result, Tensor};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The CPU forms (B=4, H=4, K=V in 64 and 128, T from 256 to 8192).
    Cpu(CpuArgs),
    /// The CUDA kernels at 32768 tokens per batch (bf16; H=16 K=V=128 and H=4 K=256 V=512).
    Cuda(crate::bench_cuda::CudaArgs),
    /// Training throughput of a GLA model on the GPU (default: the 340M shape, 8 x 2048, bf16).
    Train(crate::bench_train::TrainBenchArgs),
    /// Decoding speed of a GLA model on the GPU (default: the 340M shape, batches 1 and 64).
    Generate(crate::bench_generate::GenerateBenchArgs),
}

#[derive(Args)]
pub struct CpuArgs {
    /// Gate kind to time
    #[arg(long, default_value = "key")]
    gate: String,
    /// Only T up to 1024 and K=V=64 (a smoke run)
    #[arg(long)]
    quick: bool,
    /// Head sizes K = V to time (default 64,128)
    #[arg(long, value_delimiter = ',')]
    dims: Option<Vec<usize>>,
    /// Sequence lengths to time (default 256,512,...,8192)
    #[arg(long, value_delimiter = ',')]
    lengths: Option<Vec<usize>>,
    /// Forms to time (default recurrent,chunk,fused-chunk)
    #[arg(long, value_delimiter = ',')]
    forms: Option<Vec<String>>,
    /// Also write the results as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cmd: &BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Cpu(a) => cpu(a),
        BenchCommand::Cuda(a) => crate::bench_cuda::run(a),
        BenchCommand::Train(a) => crate::bench_train::run(a),
        BenchCommand::Generate(a) => crate::bench_generate::run(a),
    }
}

/// The least wall time of `f` over a few runs (at least 3, or 1 s in all).
fn time<T>(mut f: impl FnMut() -> T) -> f64 {
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < 3 || (start.elapsed().as_secs_f64() < 1.0 && runs < 20) {
        let t = Instant::now();
        std::hint::black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

fn gemm_ceiling() -> f64 {
    let n = 2048;
    let a: Vec<f32> = (0..n * n).map(|i| ((i % 17) as f32) * 0.01).collect();
    let b = a.clone();
    let mut c = vec![0f32; n * n];
    let s = time(|| {
        let (ma, mb) = (MatRef::rows(&a, n, n), MatRef::rows(&b, n, n));
        matmul_par(&mut c, n, ma, mb, 1.0, 0.0, gemm::Parallelism::Rayon(0))
    });
    2.0 * (n as f64).powi(3) / s / 1e9
}

/// Random inputs with GLA-like gates, logsigmoid(x)/16.
pub fn inputs(
    gate: GateKind,
    b: usize,
    t: usize,
    h: usize,
    dk: usize,
    dv: usize,
) -> GlaInputs<f32> {
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut tensor = |shape: &[usize], gate: bool| {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                if gate {
                    -(1.0 + (-3.0 * next()).exp()).ln() / 16.0
                } else {
                    next()
                }
            })
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    };
    let mut x = GlaInputs::new(
        tensor(&[b, t, h, dk], false),
        tensor(&[b, t, h, dk], false),
        tensor(&[b, t, h, dv], false),
    );
    match gate {
        GateKind::None => {}
        GateKind::Scalar => x.g = Some(tensor(&[b, t, h], true)),
        _ => x.g = Some(tensor(&[b, t, h, dk], true)),
    }
    if gate == GateKind::Both {
        x.gv = Some(tensor(&[b, t, h, dv], true));
    }
    if gate == GateKind::KeyBonus {
        x.u = Some(tensor(&[h, dk], false));
    }
    x
}

/// FLOPs of the chunk form as implemented, per token and head (C = chunk, K = V = d):
/// forward 2CK + 2CV + 4KV (scores, apply, inter read, state update); backward
/// 6CK + 6CV + 10KV. Every form's GFLOP/s uses this count, so the rates compare work done.
fn flops(tokens: usize, c: usize, d: usize, backward: bool) -> f64 {
    let (c, d) = (c as f64, d as f64);
    let fwd = 4.0 * c * d + 4.0 * d * d;
    let bwd = 12.0 * c * d + 10.0 * d * d;
    tokens as f64 * if backward { fwd + bwd } else { fwd }
}

fn cpu(a: &CpuArgs) -> Result<()> {
    let gate: GateKind = a.gate.parse()?;
    let threads = rayon::current_num_threads();
    let ceiling = gemm_ceiling();
    let (b, h, c) = (4, 4, 64);
    let dims = a
        .dims
        .clone()
        .unwrap_or(if a.quick { vec![64] } else { vec![64, 128] });
    let lengths = a.lengths.clone().unwrap_or(if a.quick {
        vec![256, 1024]
    } else {
        vec![256, 512, 1024, 2048, 4096, 8192]
    });
    let forms: Vec<Form> = match &a.forms {
        None => vec![Form::Recurrent, Form::Chunk, Form::FusedChunk],
        Some(f) => f.iter().map(|s| s.parse()).collect::<Result<_>>()?,
    };
    let mut table = String::new();
    let mut json = Vec::new();
    writeln!(
        table,
        "fla bench cpu: gate {gate}, B={b} H={h} chunk {c}, f32, {threads} threads"
    )
    .unwrap();
    writeln!(
        table,
        "f32 GEMM ceiling (2048^3, all threads): {ceiling:.1} GFLOP/s"
    )
    .unwrap();
    writeln!(
        table,
        "{:>4} {:>5} {:<12} {:>10} {:>9} {:>8} {:>12} {:>9} {:>8}",
        "K=V", "T", "form", "fwd ms", "GFLOP/s", "%ceil", "fwd+bwd ms", "GFLOP/s", "%ceil"
    )
    .unwrap();
    print!("{table}");
    for &d in &dims {
        for &t in &lengths {
            let x = inputs(gate, b, t, h, d, d);
            let d_o = inputs(GateKind::None, b, t, h, d, d).v;
            for &form in &forms {
                let opts = Options {
                    form,
                    chunk_size: c,
                };
                let fwd = time(|| gla_forward(gate, &x, &opts).unwrap());
                let both = time(|| {
                    let y = gla_forward(gate, &x, &opts).unwrap();
                    (y, gla_backward(gate, &x, &d_o, None, &opts).unwrap())
                });
                let (gf, gb) = (
                    flops(b * t * h, c, d, false) / fwd / 1e9,
                    flops(b * t * h, c, d, true) / both / 1e9,
                );
                let line = format!(
                    "{d:>4} {t:>5} {:<12} {:>10.2} {gf:>9.1} {:>7.1}% {:>12.2} {gb:>9.1} {:>7.1}%\n",
                    form.name(),
                    fwd * 1e3,
                    100.0 * gf / ceiling,
                    both * 1e3,
                    100.0 * gb / ceiling
                );
                print!("{line}");
                table.push_str(&line);
                json.push(format!(
                    "{{\"gate\":\"{gate}\",\"form\":\"{}\",\"B\":{b},\"T\":{t},\"H\":{h},\"K\":{d},\"V\":{d},\"chunk\":{c},\"fwd_ms\":{:.4},\"fwdbwd_ms\":{:.4},\"fwd_gflops\":{gf:.2},\"fwdbwd_gflops\":{gb:.2}}}",
                    form.name(),
                    fwd * 1e3,
                    both * 1e3
                ));
            }
        }
    }
    if let Some(path) = &a.json {
        let body = format!(
            "{{\"device\":\"cpu\",\"threads\":{threads},\"gemm_ceiling_gflops\":{ceiling:.2},\"results\":[\n  {}\n]}}\n",
            json.join(",\n  ")
        );
        fla_tensor::write_atomic(path, body.as_bytes())
            .map_err(|e| Error::Invalid(format!("writing the JSON: {e}")))?;
    }
    Ok(())
}
