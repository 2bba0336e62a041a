//! `fla bench cuda`: our kernels at 32768 tokens per batch, timed with device events. The
//! side-by-side comparison with fla and PyTorch's SDPA, and the floors, are in
//! bench/compare.py, which reads the JSON this writes.

use std::path::PathBuf;

use clap::Args;
use fla_cuda::{gather_in_turn, Buf, DType, Decoder, DeviceGla, Gpu, StepInputs};
use fla_ops::gla::segment;
use fla_ops::{GateKind, GlaInputs};
use fla_tensor::{Error, Result};

use crate::bench::inputs;

#[derive(Args)]
pub struct CudaArgs {
    /// Gate kind to time (key is fla's chunk_gla, scalar its chunk_simple_gla)
    #[arg(long, value_delimiter = ',', default_value = "key,scalar")]
    gates: Vec<String>,
    /// Sequence lengths (B = 32768 / T)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384"
    )]
    lengths: Vec<usize>,
    /// f32 or bf16
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// chunk (states materialised at chunk boundaries, every chunk in parallel) or
    /// fused-chunk (one sweep per sequence); gates on values take fused-chunk either way
    #[arg(long, default_value = "chunk")]
    form: String,
    /// GPU ordinal
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Head configurations HxKxV (default 16x128x128,4x256x512; the GLA 340M model's heads
    /// are 4x128x256)
    #[arg(long, value_delimiter = ',', default_value = "16x128x128,4x256x512")]
    configs: Vec<String>,
    /// Batch sizes of the decode-step rows (key gate, one token per sequence)
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    decode_batches: Vec<usize>,
    /// Also time sequence parallelism over these numbers of ranks (e.g. 2,4): rank r holds
    /// rows [r T/N, (r+1) T/N) of every sequence; the ranks run one after another on this GPU
    /// and the slowest rank's time is reported (all-gathers, here device copies, excluded)
    #[arg(long, value_delimiter = ',')]
    seq_parallel: Vec<usize>,
    /// Also write the records as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
}

const TOKENS: usize = 32768;
/// (H, K, V) from "HxKxV".
fn parse_config(s: &str) -> Result<(usize, usize, usize)> {
    let parts: Vec<usize> = s.split('x').filter_map(|x| x.parse().ok()).collect();
    match parts[..] {
        [h, k, v] if h > 0 => Ok((h, k, v)),
        _ => Err(Error::Invalid(format!(
            "--configs: `{s}` is not HxKxV (e.g. 4x128x256)"
        ))),
    }
}

fn op_name(gate: GateKind) -> &'static str {
    match gate {
        GateKind::Scalar => "chunk_simple_gla",
        GateKind::Key => "chunk_gla",
        GateKind::KeyBonus => "chunk_rwkv6",
        GateKind::None => "chunk_linear_attn",
        GateKind::Both => "chunk_gla_both",
    }
}

pub fn run(a: &CudaArgs) -> Result<()> {
    let gpu = Gpu::new(a.gpu)?;
    let dtype: DType = a.dtype.parse()?;
    let fused = match a.form.as_str() {
        "chunk" => false,
        "fused-chunk" => true,
        f => {
            return Err(Error::Invalid(format!(
                "--form `{f}`: expected chunk or fused-chunk"
            )))
        }
    };
    let gates: Vec<GateKind> = a.gates.iter().map(|g| g.parse()).collect::<Result<_>>()?;
    let configs: Vec<(usize, usize, usize)> = a
        .configs
        .iter()
        .map(|c| parse_config(c))
        .collect::<Result<_>>()?;
    println!(
        "fla bench cuda on {}: {dtype:?}, {} form, {TOKENS} tokens per batch",
        gpu.describe(),
        a.form
    );
    println!(
        "{:<18} {:>3} {:>5} {:>3} {:>4} {:>4} {:>9} {:>10}",
        "op", "B", "T", "H", "K", "V", "fwd ms", "fwdbwd ms"
    );
    let mut records = Vec::new();
    for &gate in &gates {
        for &(h, dk, dv) in &configs {
            for &t in &a.lengths {
                if !TOKENS.is_multiple_of(t) {
                    return Err(Error::Invalid(format!("T={t} does not divide {TOKENS}")));
                }
                let b = TOKENS / t;
                let x = inputs(gate, b, t, h, dk, dv);
                let mut d = DeviceGla::upload(&gpu, gate, &x, dtype)?;
                d.use_fused(fused);
                let fwd = gpu.time_ms(3, 20, || d.forward(&gpu))?;
                // Any do of the right shape times the same: v's data serves.
                let up = d.upstream(&gpu, &x.v, None)?;
                let fwdbwd = gpu.time_ms(3, 20, || {
                    d.forward(&gpu)?;
                    d.backward(&gpu, &up)
                })?;
                let (op, dims) = (op_name(gate), (b, t, h, dk, dv));
                row(&mut records, (op, "ours", op), dims, fwd, fwdbwd);
                drop(d);
                for &world in &a.seq_parallel {
                    let (fwd, fwdbwd) = seq_parallel_ms(&gpu, gate, &x, dtype, world)?;
                    let (imp, label) = (format!("ours-sp{world}"), format!("{op}/sp{world}"));
                    row(&mut records, (op, &imp, &label), dims, fwd, fwdbwd);
                }
            }
        }
    }
    for &(h, dk, dv) in &configs {
        for &b in &a.decode_batches {
            let ms = decode_ms(&gpu, dtype, b, (h, dk, dv))?;
            println!(
                "{:<18} {b:>3} {:>5} {h:>3} {dk:>4} {dv:>4} {ms:>9.4} {:>10}",
                "decode", 1, "-"
            );
            records.push(format!(
                "{{\"op\":\"decode\",\"impl\":\"ours\",\"B\":{b},\"T\":1,\"H\":{h},\"K\":{dk},\"V\":{dv},\"fwd_ms\":{ms:.5},\"fwdbwd_ms\":null}}"
            ));
        }
    }
    if let Some(path) = &a.json {
        let body = format!("[\n  {}\n]\n", records.join(",\n  "));
        fla_tensor::write_atomic(path, body.as_bytes())
            .map_err(|e| Error::Invalid(format!("writing the JSON: {e}")))?;
    }
    Ok(())
}

/// Prints one timed row, `label` first, and keeps its JSON record (op, impl, shape, times).
fn row(
    records: &mut Vec<String>,
    (op, imp, label): (&str, &str, &str),
    (b, t, h, dk, dv): (usize, usize, usize, usize, usize),
    fwd: f64,
    fwdbwd: f64,
) {
    println!("{label:<18} {b:>3} {t:>5} {h:>3} {dk:>4} {dv:>4} {fwd:>9.3} {fwdbwd:>10.3}");
    records.push(format!(
        "{{\"op\":\"{op}\",\"impl\":\"{imp}\",\"B\":{b},\"T\":{t},\"H\":{h},\"K\":{dk},\"V\":{dv},\"fwd_ms\":{fwd:.4},\"fwdbwd_ms\":{fwdbwd:.4}}}"
    ));
}

/// The slowest rank's (forward, forward + backward) ms of a sequence-parallel call over `world`
/// ranks: each rank's phases timed in turn on this GPU, with every rank's payloads gathered
/// beforehand (they do not change between repetitions). On `world` GPUs the ranks run at once,
/// so this is a rank's time there, less its two all-gathers per pass.
fn seq_parallel_ms(
    gpu: &Gpu,
    gate: GateKind,
    x: &GlaInputs<f32>,
    dtype: DType,
    world: usize,
) -> Result<(f64, f64)> {
    let t = x.q.shape()[1];
    if world == 0 || !t.is_multiple_of(world) {
        return Err(Error::Invalid(format!(
            "--seq-parallel {world}: the ranks must split T={t} evenly"
        )));
    }
    let len = t / world;
    let mut ranks = (0..world)
        .map(|r| {
            let seg = segment(x, r * len, (r + 1) * len, None);
            let d = DeviceGla::upload(gpu, gate, &seg, dtype)?;
            let up = d.upstream(gpu, &seg.v, None)?;
            Ok((d, up))
        })
        .collect::<Result<Vec<_>>>()?;
    let parts = (0..world)
        .map(|r| ranks[r].0.segment_forward_local(gpu, r, world))
        .collect::<Result<Vec<_>>>()?;
    let fwd_all = gather_in_turn(gpu, &parts)?;
    for (r, (d, _)) in ranks.iter_mut().enumerate() {
        d.segment_forward_finish(gpu, &fwd_all, r, world)?;
    }
    let parts = (0..world)
        .map(|r| {
            let (d, up) = &mut ranks[r];
            d.segment_backward_local(gpu, up, r, world)
        })
        .collect::<Result<Vec<_>>>()?;
    let bwd_all = gather_in_turn(gpu, &parts)?;
    let mut slowest = (0.0f64, 0.0f64);
    for (r, (d, up)) in ranks.iter_mut().enumerate() {
        let forward = |d: &mut DeviceGla| {
            d.segment_forward_local(gpu, r, world)?;
            d.segment_forward_finish(gpu, &fwd_all, r, world)
        };
        let fwd = gpu.time_ms(3, 20, || forward(d))?;
        let fwdbwd = gpu.time_ms(3, 20, || {
            forward(d)?;
            d.segment_backward_local(gpu, up, r, world)?;
            d.segment_backward_finish(gpu, up, &bwd_all, r, world)
        })?;
        slowest = (slowest.0.max(fwd), slowest.1.max(fwdbwd));
    }
    Ok(slowest)
}

/// One decode step (key gate): b sequences, one token each, states on the device.
fn decode_ms(gpu: &Gpu, dtype: DType, b: usize, (h, dk, dv): (usize, usize, usize)) -> Result<f64> {
    let x = inputs(GateKind::Key, b, 1, h, dk, dv);
    let scale = 1.0 / (dk as f32).sqrt();
    let mut dec = Decoder::new(gpu, GateKind::Key, (b, h), (dk, dv), scale, dtype)?;
    let (q, k, v) = (
        Buf::upload(gpu, x.q.data(), dtype)?,
        Buf::upload(gpu, x.k.data(), dtype)?,
        Buf::upload(gpu, x.v.data(), dtype)?,
    );
    let g = x.g.as_ref().expect("key gate inputs have g");
    let g = gpu
        .stream()
        .clone_htod(g.data())
        .map_err(|e| Error::Device(format!("upload: {e:?}")))?;
    let mut o = Buf::zeros(gpu, b * h * dv, dtype)?;
    let step = StepInputs {
        q: &q,
        k: &k,
        v: &v,
        g: Some(&g),
        gv: None,
        u: None,
    };
    gpu.time_ms(10, 200, || dec.step(gpu, &step, &mut o))
}
