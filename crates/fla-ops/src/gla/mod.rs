//! The gated linear attention family: tensors in fla's [B, T, H, D] layout, every gate kind,
//! every form, forward and backward, with variable-length batches.

mod chunk;
mod chunk_math;
mod fused_chunk;
mod intra;
mod naive;
mod recurrent;
mod segments;
mod seq;

use std::fmt;
use std::str::FromStr;

use fla_tensor::{Error, Real, Result, Tensor};
use rayon::prelude::*;
pub use segments::{backward_in_segments, forward_in_segments, put_t, segment, slice_t};
use seq::{Seq, SeqGrads, SeqOut, SeqUpstream};

/// Which forget gates the recurrence has (../../docs/ARCHITECTURE.md, the family table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateKind {
    /// Plain linear attention.
    None,
    /// One log gate per head and step, `g` [B,T,H] (RetNet, Mamba-2, mLSTM, ...).
    Scalar,
    /// A log gate per key feature, `g` [B,T,H,K] (GLA, HGRN-2).
    Key,
    /// Key gates plus the RWKV-6 bonus `u` [H,K] for the current token.
    KeyBonus,
    /// Key gates `g` [B,T,H,K] and value gates `gv` [B,T,H,V] (decaying fast weights).
    Both,
}

impl GateKind {
    pub const ALL: [GateKind; 5] = [
        GateKind::None,
        GateKind::Scalar,
        GateKind::Key,
        GateKind::KeyBonus,
        GateKind::Both,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GateKind::None => "none",
            GateKind::Scalar => "scalar",
            GateKind::Key => "key",
            GateKind::KeyBonus => "key-bonus",
            GateKind::Both => "both",
        }
    }
}

impl FromStr for GateKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        GateKind::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown gate kind `{s}` (expected none, scalar, key, key-bonus or both)"
                ))
            })
    }
}

impl fmt::Display for GateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the recurrence is computed; all forms give the same results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Quadratic in T: every output as an explicit sum. The reference.
    Naive,
    /// Token by token through the state.
    Recurrent,
    /// Chunkwise, chunk states materialised, then all chunks in parallel.
    Chunk,
    /// Chunkwise in one sweep, the state never stored.
    FusedChunk,
}

impl Form {
    pub const ALL: [Form; 4] = [Form::Naive, Form::Recurrent, Form::Chunk, Form::FusedChunk];

    pub fn name(self) -> &'static str {
        match self {
            Form::Naive => "naive",
            Form::Recurrent => "recurrent",
            Form::Chunk => "chunk",
            Form::FusedChunk => "fused-chunk",
        }
    }
}

impl FromStr for Form {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Form::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown form `{s}` (expected naive, recurrent, chunk or fused-chunk)"
                ))
            })
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The form and its chunk size (64 by default, as in fla).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub form: Form,
    pub chunk_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            form: Form::Chunk,
            chunk_size: 64,
        }
    }
}

/// The inputs of the op, named and shaped as in fla (layout [B, T, H, D]).
#[derive(Clone, Debug)]
pub struct GlaInputs<F> {
    pub q: Tensor<F>,
    pub k: Tensor<F>,
    pub v: Tensor<F>,
    /// Log forget gate (<= 0): [B,T,H] for scalar gates, [B,T,H,K] for key gates.
    pub g: Option<Tensor<F>>,
    /// Log value gate (<= 0), [B,T,H,V], for the `both` kind.
    pub gv: Option<Tensor<F>>,
    /// RWKV-6 bonus, [H,K], for the `key-bonus` kind.
    pub u: Option<Tensor<F>>,
    /// Initial state, [N,H,K,V] with N the batch size or the number of sequences.
    pub h0: Option<Tensor<F>>,
    /// Defaults to K^-0.5.
    pub scale: Option<f64>,
    /// Offsets of packed sequences along T (B must be 1): 0 = c_0 <= c_1 <= ... = T.
    pub cu_seqlens: Option<Vec<usize>>,
}

impl<F: Real> GlaInputs<F> {
    pub fn new(q: Tensor<F>, k: Tensor<F>, v: Tensor<F>) -> Self {
        GlaInputs {
            q,
            k,
            v,
            g: None,
            gv: None,
            u: None,
            h0: None,
            scale: None,
            cu_seqlens: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GlaOutputs<F> {
    /// [B,T,H,V]
    pub o: Tensor<F>,
    /// Final states, [N,H,K,V].
    pub ht: Tensor<F>,
}

/// Gradients of every input; `dg`, `dgv`, `du`, `dh0` only where the input was given.
#[derive(Clone, Debug)]
pub struct GlaGrads<F> {
    pub dq: Tensor<F>,
    pub dk: Tensor<F>,
    pub dv: Tensor<F>,
    pub dg: Option<Tensor<F>>,
    pub dgv: Option<Tensor<F>>,
    pub du: Option<Tensor<F>>,
    pub dh0: Option<Tensor<F>>,
}

/// The checked sizes of a call (shared with the GPU back end, which checks the same way).
pub struct Problem {
    pub gate: GateKind,
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub dk: usize,
    pub dv: usize,
    /// (batch row, start, length) of each sequence.
    pub spans: Vec<(usize, usize, usize)>,
    pub scale: f64,
}

fn check_gate<F: Real>(name: &str, g: &Tensor<F>) -> Result<()> {
    if let Some(i) = g.data().iter().position(|&x| x > F::ZERO) {
        return Err(Error::Invalid(format!(
            "`{name}` holds a positive log gate {} at flat index {i}: log forget gates must be <= 0",
            g.data()[i]
        )));
    }
    Ok(())
}

fn absent<F>(name: &str, x: &Option<Tensor<F>>, gate: GateKind) -> Result<()> {
    match x {
        Some(_) => Err(Error::Invalid(format!("tensor `{name}` is not used by gate kind `{gate}`; remove it or pick another gate kind"))),
        None => Ok(()),
    }
}

fn required<'a, F>(name: &str, x: &'a Option<Tensor<F>>, gate: GateKind) -> Result<&'a Tensor<F>> {
    x.as_ref().ok_or_else(|| Error::Missing {
        name: name.into(),
        why: format!("gate kind `{gate}` needs it"),
    })
}

impl Problem {
    /// Checks every input's shape, presence and values for `gate`.
    pub fn new<F: Real>(gate: GateKind, x: &GlaInputs<F>) -> Result<Problem> {
        let qs = x.q.shape();
        if qs.len() != 4 {
            return Err(Error::Shape {
                name: "q".into(),
                expected: "[B, T, H, K] (4 dimensions)".into(),
                got: qs.to_vec(),
            });
        }
        let (b, t, h, dk) = (qs[0], qs[1], qs[2], qs[3]);
        let vs = x.v.shape();
        if vs.len() != 4 {
            return Err(Error::Shape {
                name: "v".into(),
                expected: "[B, T, H, V] (4 dimensions)".into(),
                got: vs.to_vec(),
            });
        }
        let dv = vs[3];
        if dk == 0 || dv == 0 || h == 0 {
            return Err(Error::Invalid(format!(
                "head count and head sizes must be positive (H={h}, K={dk}, V={dv})"
            )));
        }
        x.q.expect_shape("q", &[b, t, h, dk], "[B, T, H, K]")?;
        x.k.expect_shape("k", &[b, t, h, dk], "[B, T, H, K]")?;
        x.v.expect_shape("v", &[b, t, h, dv], "[B, T, H, V]")?;
        match gate {
            GateKind::None => absent("g", &x.g, gate)?,
            GateKind::Scalar => {
                required("g", &x.g, gate)?.expect_shape("g", &[b, t, h], "[B, T, H]")?
            }
            _ => required("g", &x.g, gate)?.expect_shape("g", &[b, t, h, dk], "[B, T, H, K]")?,
        }
        if let Some(g) = &x.g {
            check_gate("g", g)?;
        }
        if gate == GateKind::Both {
            let gv = required("gv", &x.gv, gate)?;
            gv.expect_shape("gv", &[b, t, h, dv], "[B, T, H, V]")?;
            check_gate("gv", gv)?;
        } else {
            absent("gv", &x.gv, gate)?;
        }
        if gate == GateKind::KeyBonus {
            required("u", &x.u, gate)?.expect_shape("u", &[h, dk], "[H, K]")?;
        } else {
            absent("u", &x.u, gate)?;
        }
        let spans = match &x.cu_seqlens {
            None => (0..b).map(|i| (i, 0, t)).collect::<Vec<_>>(),
            Some(cu) => {
                if b != 1 {
                    return Err(Error::Invalid(format!(
                        "cu_seqlens needs a batch of 1 (sequences packed along T), got B={b}"
                    )));
                }
                if cu.len() < 2
                    || cu[0] != 0
                    || *cu.last().unwrap() != t
                    || cu.windows(2).any(|w| w[1] < w[0])
                {
                    return Err(Error::Invalid(format!(
                        "cu_seqlens {cu:?} must start at 0, never decrease and end at T={t}"
                    )));
                }
                cu.windows(2).map(|w| (0, w[0], w[1] - w[0])).collect()
            }
        };
        if let Some(h0) = &x.h0 {
            h0.expect_shape("h0", &[spans.len(), h, dk, dv], "[N, H, K, V]")?;
        }
        let scale = x.scale.unwrap_or((dk as f64).powf(-0.5));
        if !scale.is_finite() {
            return Err(Error::Invalid(format!("scale must be finite, got {scale}")));
        }
        Ok(Problem {
            gate,
            b,
            t,
            h,
            dk,
            dv,
            spans,
            scale,
        })
    }

    /// The tasks: every (sequence, head) pair.
    fn tasks(&self) -> Vec<(usize, usize)> {
        (0..self.spans.len())
            .flat_map(|n| (0..self.h).map(move |h| (n, h)))
            .collect()
    }

    /// Rows `start..start+len` of head `h` in batch row `b` of a [B,T,H,w] tensor.
    fn gather<F: Real>(&self, x: &[F], w: usize, n: usize, h: usize) -> Vec<F> {
        let (b, start, len) = self.spans[n];
        let mut out = Vec::with_capacity(len * w);
        for t in start..start + len {
            let at = ((b * self.t + t) * self.h + h) * w;
            out.extend_from_slice(&x[at..at + w]);
        }
        out
    }

    fn scatter<F: Real>(&self, dst: &mut [F], src: &[F], w: usize, n: usize, h: usize) {
        let (b, start, len) = self.spans[n];
        for i in 0..len {
            let at = ((b * self.t + start + i) * self.h + h) * w;
            dst[at..at + w].copy_from_slice(&src[i * w..(i + 1) * w]);
        }
    }

    fn state<'a, F>(&self, x: &'a [F], n: usize, h: usize) -> &'a [F] {
        let kv = self.dk * self.dv;
        &x[(n * self.h + h) * kv..(n * self.h + h + 1) * kv]
    }

    fn seq<F: Real>(&self, x: &GlaInputs<F>, n: usize, h: usize) -> Seq<F> {
        let (dk, dv) = (self.dk, self.dv);
        let gk = x.g.as_ref().map(|g| match self.gate {
            // A scalar gate is a key gate equal across K.
            GateKind::Scalar => self
                .gather(g.data(), 1, n, h)
                .into_iter()
                .flat_map(|x| std::iter::repeat_n(x, dk))
                .collect(),
            _ => self.gather(g.data(), dk, n, h),
        });
        Seq {
            t: self.spans[n].2,
            dk,
            dv,
            q: self.gather(x.q.data(), dk, n, h),
            k: self.gather(x.k.data(), dk, n, h),
            v: self.gather(x.v.data(), dv, n, h),
            gk,
            gv: x.gv.as_ref().map(|g| self.gather(g.data(), dv, n, h)),
            u: x.u
                .as_ref()
                .map(|u| u.data()[h * dk..(h + 1) * dk].to_vec()),
            h0: x.h0.as_ref().map(|h0| self.state(h0.data(), n, h).to_vec()),
            scale: F::from_f64(self.scale),
        }
    }
}

fn check_chunk(opts: &Options) -> Result<()> {
    if opts.chunk_size == 0 {
        return Err(Error::Invalid("chunk size must be at least 1".into()));
    }
    Ok(())
}

fn run_forward<F: Real>(s: &Seq<F>, opts: &Options) -> SeqOut<F> {
    match opts.form {
        Form::Naive => naive::forward(s),
        Form::Recurrent => recurrent::forward(s),
        Form::Chunk => chunk::forward(s, opts.chunk_size),
        Form::FusedChunk => fused_chunk::forward(s, opts.chunk_size),
    }
}

fn run_backward<F: Real>(s: &Seq<F>, up: &SeqUpstream<F>, opts: &Options) -> SeqGrads<F> {
    match opts.form {
        Form::Naive => naive::backward(s, up),
        Form::Recurrent => recurrent::backward(s, up),
        Form::Chunk => chunk::backward(s, up, opts.chunk_size),
        Form::FusedChunk => fused_chunk::backward(s, up, opts.chunk_size),
    }
}

/// Outputs `o` and final states `ht`.
pub fn gla_forward<F: Real>(
    gate: GateKind,
    x: &GlaInputs<F>,
    opts: &Options,
) -> Result<GlaOutputs<F>> {
    let p = Problem::new(gate, x)?;
    check_chunk(opts)?;
    let tasks = p.tasks();
    let outs: Vec<SeqOut<F>> = tasks
        .par_iter()
        .map(|&(n, h)| run_forward(&p.seq(x, n, h), opts))
        .collect();
    let mut o = Tensor::zeros(&[p.b, p.t, p.h, p.dv]);
    let mut ht = Tensor::zeros(&[p.spans.len(), p.h, p.dk, p.dv]);
    let kv = p.dk * p.dv;
    for (&(n, h), out) in tasks.iter().zip(&outs) {
        p.scatter(o.data_mut(), &out.o, p.dv, n, h);
        ht.data_mut()[(n * p.h + h) * kv..(n * p.h + h + 1) * kv].copy_from_slice(&out.ht);
    }
    Ok(GlaOutputs { o, ht })
}

/// Gradients of every input given `d_o` [B,T,H,V] and optionally `dht` [N,H,K,V].
pub fn gla_backward<F: Real>(
    gate: GateKind,
    x: &GlaInputs<F>,
    d_o: &Tensor<F>,
    dht: Option<&Tensor<F>>,
    opts: &Options,
) -> Result<GlaGrads<F>> {
    let p = Problem::new(gate, x)?;
    check_chunk(opts)?;
    d_o.expect_shape("do", &[p.b, p.t, p.h, p.dv], "[B, T, H, V]")?;
    if let Some(d) = dht {
        d.expect_shape("dht", &[p.spans.len(), p.h, p.dk, p.dv], "[N, H, K, V]")?;
    }
    let kv = p.dk * p.dv;
    let tasks = p.tasks();
    let grads: Vec<SeqGrads<F>> = tasks
        .par_iter()
        .map(|&(n, h)| {
            let up = SeqUpstream {
                d_o: p.gather(d_o.data(), p.dv, n, h),
                dht: dht.map_or_else(|| vec![F::ZERO; kv], |d| p.state(d.data(), n, h).to_vec()),
            };
            run_backward(&p.seq(x, n, h), &up, opts)
        })
        .collect();
    let (b, t, hh, dk, dv) = (p.b, p.t, p.h, p.dk, p.dv);
    let mut out = GlaGrads {
        dq: Tensor::zeros(&[b, t, hh, dk]),
        dk: Tensor::zeros(&[b, t, hh, dk]),
        dv: Tensor::zeros(&[b, t, hh, dv]),
        dg: x.g.as_ref().map(|g| Tensor::zeros(g.shape())),
        dgv: x.gv.as_ref().map(|g| Tensor::zeros(g.shape())),
        du: x.u.as_ref().map(|u| Tensor::zeros(u.shape())),
        dh0: x.h0.as_ref().map(|h0| Tensor::zeros(h0.shape())),
    };
    for (&(n, h), g) in tasks.iter().zip(&grads) {
        p.scatter(out.dq.data_mut(), &g.dq, dk, n, h);
        p.scatter(out.dk.data_mut(), &g.dk, dk, n, h);
        p.scatter(out.dv.data_mut(), &g.dv, dv, n, h);
        if let (Some(dst), Some(src)) = (out.dg.as_mut(), &g.dgk) {
            if gate == GateKind::Scalar {
                let summed: Vec<F> = src.chunks(dk).map(|r| r.iter().copied().sum()).collect();
                p.scatter(dst.data_mut(), &summed, 1, n, h);
            } else {
                p.scatter(dst.data_mut(), src, dk, n, h);
            }
        }
        if let (Some(dst), Some(src)) = (out.dgv.as_mut(), &g.dgv) {
            p.scatter(dst.data_mut(), src, dv, n, h);
        }
        if let (Some(dst), Some(src)) = (out.du.as_mut(), &g.du) {
            dst.data_mut()[h * dk..(h + 1) * dk]
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d += *s);
        }
        if let Some(dst) = out.dh0.as_mut() {
            dst.data_mut()[(n * hh + h) * kv..(n * hh + h + 1) * kv].copy_from_slice(&g.dh0);
        }
    }
    Ok(out)
}
