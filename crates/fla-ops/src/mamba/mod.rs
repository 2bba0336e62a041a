//! The Mamba (S6) selective scan: the one recurrence with a full K x V gate per step,
//!   S_t[k,v] = exp(delta_t[v] · a[k,v]) S_{t-1}[k,v] + k_t[k] v_t[v],   o_t = scale q_t S_t,
//! Mamba's h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t, y_t = C_t h_t with q = C, k = B,
//! v = Δ ⊙ x, delta = Δ, a = A (K = state size N, V = channels). The gate is not rank one,
//! so there is no chunkwise form: recurrent only, forward and backward.

use fla_tensor::{Error, Real, Result, Tensor};
use rayon::prelude::*;

/// Steps between stored states in the backward pass (the rest are recomputed).
const CHECKPOINT: usize = 64;

#[derive(Clone, Debug)]
pub struct ScanInputs<F> {
    /// [B,T,H,K] (Mamba's C)
    pub q: Tensor<F>,
    /// [B,T,H,K] (Mamba's B)
    pub k: Tensor<F>,
    /// [B,T,H,V] (Mamba's Δ ⊙ x)
    pub v: Tensor<F>,
    /// [B,T,H,V], >= 0 (Mamba's Δ, after softplus)
    pub delta: Tensor<F>,
    /// [H,K,V], <= 0 (Mamba's A = -exp(A_log))
    pub a: Tensor<F>,
    /// [B,H,K,V]
    pub h0: Option<Tensor<F>>,
    /// Defaults to 1, as in Mamba.
    pub scale: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct ScanGrads<F> {
    pub dq: Tensor<F>,
    pub dk: Tensor<F>,
    pub dv: Tensor<F>,
    pub ddelta: Tensor<F>,
    pub da: Tensor<F>,
    pub dh0: Option<Tensor<F>>,
}

struct Dims {
    b: usize,
    t: usize,
    h: usize,
    k: usize,
    v: usize,
}

fn check<F: Real>(x: &ScanInputs<F>) -> Result<Dims> {
    let (qs, vs) = (x.q.shape(), x.v.shape());
    if qs.len() != 4 {
        return Err(Error::Shape {
            name: "q".into(),
            expected: "[B, T, H, K] (4 dimensions)".into(),
            got: qs.to_vec(),
        });
    }
    if vs.len() != 4 {
        return Err(Error::Shape {
            name: "v".into(),
            expected: "[B, T, H, V] (4 dimensions)".into(),
            got: vs.to_vec(),
        });
    }
    let d = Dims {
        b: qs[0],
        t: qs[1],
        h: qs[2],
        k: qs[3],
        v: vs[3],
    };
    let named: [(&str, &Tensor<F>, &str, Vec<usize>); 5] = [
        ("k", &x.k, "[B, T, H, K]", vec![d.b, d.t, d.h, d.k]),
        ("v", &x.v, "[B, T, H, V]", vec![d.b, d.t, d.h, d.v]),
        ("delta", &x.delta, "[B, T, H, V]", vec![d.b, d.t, d.h, d.v]),
        ("a", &x.a, "[H, K, V]", vec![d.h, d.k, d.v]),
        ("q", &x.q, "[B, T, H, K]", vec![d.b, d.t, d.h, d.k]),
    ];
    for (name, t, pattern, want) in named {
        t.expect_shape(name, &want, pattern)?;
    }
    if let Some(h0) = &x.h0 {
        h0.expect_shape("h0", &[d.b, d.h, d.k, d.v], "[B, H, K, V]")?;
    }
    if x.delta.data().iter().any(|&x| x < F::ZERO) {
        return Err(Error::Invalid(
            "`delta` must be >= 0 (Mamba's Δ after softplus)".into(),
        ));
    }
    if x.a.data().iter().any(|&x| x > F::ZERO) {
        return Err(Error::Invalid(
            "`a` must be <= 0 (Mamba's A = -exp(A_log)), so the gate decays".into(),
        ));
    }
    Ok(d)
}

/// One (batch, head) sequence, gathered.
struct Seq<F> {
    q: Vec<F>,
    k: Vec<F>,
    v: Vec<F>,
    delta: Vec<F>,
    a: Vec<F>,
    h0: Vec<F>,
}

impl Dims {
    fn rows<F: Real>(&self, x: &[F], w: usize, b: usize, h: usize) -> Vec<F> {
        (0..self.t)
            .flat_map(|t| {
                x[((b * self.t + t) * self.h + h) * w..][..w]
                    .iter()
                    .copied()
            })
            .collect()
    }

    fn put<F: Real>(&self, dst: &mut [F], src: &[F], w: usize, b: usize, h: usize) {
        for t in 0..self.t {
            dst[((b * self.t + t) * self.h + h) * w..][..w]
                .copy_from_slice(&src[t * w..(t + 1) * w]);
        }
    }

    fn seq<F: Real>(&self, x: &ScanInputs<F>, b: usize, h: usize) -> Seq<F> {
        let kv = self.k * self.v;
        Seq {
            q: self.rows(x.q.data(), self.k, b, h),
            k: self.rows(x.k.data(), self.k, b, h),
            v: self.rows(x.v.data(), self.v, b, h),
            delta: self.rows(x.delta.data(), self.v, b, h),
            a: x.a.data()[h * kv..(h + 1) * kv].to_vec(),
            h0: x.h0.as_ref().map_or_else(
                || vec![F::ZERO; kv],
                |h0| h0.data()[(b * self.h + h) * kv..][..kv].to_vec(),
            ),
        }
    }

    /// S <- exp(delta_t ⊙ a) ⊙ S + k_t^T v_t.
    fn step<F: Real>(&self, s: &Seq<F>, t: usize, st: &mut [F]) {
        let (kd, vd) = (self.k, self.v);
        for i in 0..kd {
            for j in 0..vd {
                let e = (s.delta[t * vd + j] * s.a[i * vd + j]).exp();
                st[i * vd + j] = e * st[i * vd + j] + s.k[t * kd + i] * s.v[t * vd + j];
            }
        }
    }
}

/// Outputs o [B,T,H,V] and final states ht [B,H,K,V].
pub fn selective_scan_forward<F: Real>(x: &ScanInputs<F>) -> Result<(Tensor<F>, Tensor<F>)> {
    let d = check(x)?;
    let scale = F::from_f64(x.scale.unwrap_or(1.0));
    let (kd, vd, kv) = (d.k, d.v, d.k * d.v);
    let tasks: Vec<(usize, usize)> = (0..d.b)
        .flat_map(|b| (0..d.h).map(move |h| (b, h)))
        .collect();
    let outs: Vec<(Vec<F>, Vec<F>)> = tasks
        .par_iter()
        .map(|&(b, h)| {
            let s = d.seq(x, b, h);
            let mut st = s.h0.clone();
            let mut o = vec![F::ZERO; d.t * vd];
            for t in 0..d.t {
                d.step(&s, t, &mut st);
                for i in 0..kd {
                    let qi = scale * s.q[t * kd + i];
                    for j in 0..vd {
                        o[t * vd + j] += qi * st[i * vd + j];
                    }
                }
            }
            (o, st)
        })
        .collect();
    let mut o = Tensor::zeros(&[d.b, d.t, d.h, vd]);
    let mut ht = Tensor::zeros(&[d.b, d.h, kd, vd]);
    for (&(b, h), (so, st)) in tasks.iter().zip(&outs) {
        d.put(o.data_mut(), so, vd, b, h);
        ht.data_mut()[(b * d.h + h) * kv..][..kv].copy_from_slice(st);
    }
    Ok((o, ht))
}

/// Gradients of every input given d_o [B,T,H,V] and optionally dht [B,H,K,V].
pub fn selective_scan_backward<F: Real>(
    x: &ScanInputs<F>,
    d_o: &Tensor<F>,
    dht: Option<&Tensor<F>>,
) -> Result<ScanGrads<F>> {
    let d = check(x)?;
    let (kd, vd, kv, tl) = (d.k, d.v, d.k * d.v, d.t);
    d_o.expect_shape("do", &[d.b, d.t, d.h, vd], "[B, T, H, V]")?;
    if let Some(g) = dht {
        g.expect_shape("dht", &[d.b, d.h, kd, vd], "[B, H, K, V]")?;
    }
    let scale = F::from_f64(x.scale.unwrap_or(1.0));
    let tasks: Vec<(usize, usize)> = (0..d.b)
        .flat_map(|b| (0..d.h).map(move |h| (b, h)))
        .collect();
    type Parts<F> = (Vec<F>, Vec<F>, Vec<F>, Vec<F>, Vec<F>, Vec<F>);
    let parts: Vec<Parts<F>> = tasks
        .par_iter()
        .map(|&(b, h)| {
            let s = d.seq(x, b, h);
            let go = d.rows(d_o.data(), vd, b, h);
            let mut ds = dht.map_or_else(
                || vec![F::ZERO; kv],
                |g| g.data()[(b * d.h + h) * kv..][..kv].to_vec(),
            );
            let mut checkpoints = Vec::new();
            let mut st = s.h0.clone();
            for t in 0..tl {
                if t % CHECKPOINT == 0 {
                    checkpoints.push(st.clone());
                }
                d.step(&s, t, &mut st);
            }
            let (mut dq, mut dk, mut dv) = (
                vec![F::ZERO; tl * kd],
                vec![F::ZERO; tl * kd],
                vec![F::ZERO; tl * vd],
            );
            let (mut ddelta, mut da) = (vec![F::ZERO; tl * vd], vec![F::ZERO; kv]);
            let mut states = vec![F::ZERO; (CHECKPOINT + 1) * kv];
            for (seg, start) in checkpoints.iter().enumerate().rev() {
                let (t0, t1) = (seg * CHECKPOINT, ((seg + 1) * CHECKPOINT).min(tl));
                states[..kv].copy_from_slice(start);
                for t in t0..t1 {
                    let (prev, next) = states.split_at_mut((t - t0 + 1) * kv);
                    next[..kv].copy_from_slice(&prev[(t - t0) * kv..]);
                    d.step(&s, t, &mut next[..kv]);
                }
                for t in (t0..t1).rev() {
                    let prev = &states[(t - t0) * kv..(t - t0 + 1) * kv];
                    let cur = &states[(t - t0 + 1) * kv..(t - t0 + 2) * kv];
                    for i in 0..kd {
                        let qi = scale * s.q[t * kd + i];
                        let (mut acc_q, mut acc_k) = (F::ZERO, F::ZERO);
                        for j in 0..vd {
                            let idx = i * vd + j;
                            let g = ds[idx] + qi * go[t * vd + j]; // dL/dS_t
                            acc_q += cur[idx] * go[t * vd + j];
                            acc_k += g * s.v[t * vd + j];
                            dv[t * vd + j] += g * s.k[t * kd + i];
                            let (dl, al) = (s.delta[t * vd + j], s.a[idx]);
                            let e = (dl * al).exp();
                            // d/d(delta·a) of exp(delta·a) S_{t-1}
                            let w = g * e * prev[idx];
                            ddelta[t * vd + j] += w * al;
                            da[idx] += w * dl;
                            ds[idx] = g * e;
                        }
                        dq[t * kd + i] = scale * acc_q;
                        dk[t * kd + i] = acc_k;
                    }
                }
            }
            (dq, dk, dv, ddelta, da, ds)
        })
        .collect();
    let mut g = ScanGrads {
        dq: Tensor::zeros(&[d.b, tl, d.h, kd]),
        dk: Tensor::zeros(&[d.b, tl, d.h, kd]),
        dv: Tensor::zeros(&[d.b, tl, d.h, vd]),
        ddelta: Tensor::zeros(&[d.b, tl, d.h, vd]),
        da: Tensor::zeros(&[d.h, kd, vd]),
        dh0: x.h0.as_ref().map(|h0| Tensor::zeros(h0.shape())),
    };
    for (&(b, h), (dq, dk, dv, ddelta, da, dh0)) in tasks.iter().zip(&parts) {
        d.put(g.dq.data_mut(), dq, kd, b, h);
        d.put(g.dk.data_mut(), dk, kd, b, h);
        d.put(g.dv.data_mut(), dv, vd, b, h);
        d.put(g.ddelta.data_mut(), ddelta, vd, b, h);
        g.da.data_mut()[h * kv..(h + 1) * kv]
            .iter_mut()
            .zip(da)
            .for_each(|(x, y)| *x += *y);
        if let Some(t) = g.dh0.as_mut() {
            t.data_mut()[(b * d.h + h) * kv..][..kv].copy_from_slice(dh0);
        }
    }
    Ok(g)
}
