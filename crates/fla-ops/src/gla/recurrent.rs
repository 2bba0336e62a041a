//! The recurrent form: one K x V state updated token by token.
//!   S_t = (exp(gk_t)^T exp(gv_t)) ⊙ S_{t-1} + k_t^T v_t,   o_t = scale q_t S_t
//! or, with the RWKV-6 bonus u (fla's convention),
//!   o_t = scale q_t (S_{t-1} + (u ⊙ k_t)^T v_t),           S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t
//! The backward pass runs in reverse, recomputing states from checkpoints every
//! `CHECKPOINT` steps, and differentiates every decay directly.

use super::seq::{Seq, SeqGrads, SeqOut, SeqUpstream};
use fla_tensor::Real;

const CHECKPOINT: usize = 64;

/// The decay factors of step t: exp(gk_t) (K) and exp(gv_t) (V), ones when absent.
fn decays<F: Real>(s: &Seq<F>, t: usize, a: &mut [F], b: &mut [F]) {
    match &s.gk {
        Some(g) => a
            .iter_mut()
            .zip(&g[t * s.dk..])
            .for_each(|(x, g)| *x = g.exp()),
        None => a.fill(F::ONE),
    }
    match &s.gv {
        Some(g) => b
            .iter_mut()
            .zip(&g[t * s.dv..])
            .for_each(|(x, g)| *x = g.exp()),
        None => b.fill(F::ONE),
    }
}

/// S <- (a^T b) ⊙ S + k_t^T v_t.
fn step<F: Real>(s: &Seq<F>, t: usize, st: &mut [F], a: &[F], b: &[F]) {
    let (kd, vd) = (s.dk, s.dv);
    for i in 0..kd {
        let ki = s.k[t * kd + i];
        let row = &mut st[i * vd..(i + 1) * vd];
        for j in 0..vd {
            row[j] = a[i] * b[j] * row[j] + ki * s.v[t * vd + j];
        }
    }
}

/// o_t += scale q_t S.
fn read<F: Real>(s: &Seq<F>, t: usize, st: &[F], o: &mut [F]) {
    let (kd, vd) = (s.dk, s.dv);
    for i in 0..kd {
        let qi = s.scale * s.q[t * kd + i];
        for j in 0..vd {
            o[t * vd + j] += qi * st[i * vd + j];
        }
    }
}

pub fn forward<F: Real>(s: &Seq<F>) -> SeqOut<F> {
    let (kd, vd) = (s.dk, s.dv);
    let mut st = s.h0.clone().unwrap_or_else(|| vec![F::ZERO; kd * vd]);
    let mut o = vec![F::ZERO; s.t * vd];
    let (mut a, mut b) = (vec![F::ONE; kd], vec![F::ONE; vd]);
    let bonus = s.u.is_some();
    for t in 0..s.t {
        decays(s, t, &mut a, &mut b);
        if bonus {
            read(s, t, &st, &mut o);
        }
        step(s, t, &mut st, &a, &b);
        if !bonus {
            read(s, t, &st, &mut o);
        }
    }
    if let Some(u) = &s.u {
        s.add_diagonal_output(&mut o, u);
    }
    SeqOut { o, ht: st }
}

pub fn backward<F: Real>(s: &Seq<F>, up: &SeqUpstream<F>) -> SeqGrads<F> {
    let (t_len, kd, vd, sc) = (s.t, s.dk, s.dv, s.scale);
    let kv = kd * vd;
    let bonus = s.u.is_some();
    // States entering each segment of CHECKPOINT steps.
    let mut checkpoints = Vec::new();
    let mut st = s.h0.clone().unwrap_or_else(|| vec![F::ZERO; kv]);
    let (mut a, mut b) = (vec![F::ONE; kd], vec![F::ONE; vd]);
    for t in 0..t_len {
        if t % CHECKPOINT == 0 {
            checkpoints.push(st.clone());
        }
        decays(s, t, &mut a, &mut b);
        step(s, t, &mut st, &a, &b);
    }
    let (mut dq, mut dk, mut dv) = (
        vec![F::ZERO; t_len * kd],
        vec![F::ZERO; t_len * kd],
        vec![F::ZERO; t_len * vd],
    );
    let mut dgk = s.gk.as_ref().map(|_| vec![F::ZERO; t_len * kd]);
    let mut dgv = s.gv.as_ref().map(|_| vec![F::ZERO; t_len * vd]);
    let mut ds = up.dht.clone(); // dL/dS_t, running backwards
    let mut states = vec![F::ZERO; (CHECKPOINT + 1) * kv]; // S_{t0-1}, S_{t0}, ...
    for (seg, start) in checkpoints.iter().enumerate().rev() {
        let t0 = seg * CHECKPOINT;
        let t1 = (t0 + CHECKPOINT).min(t_len);
        states[..kv].copy_from_slice(start);
        for t in t0..t1 {
            let (prev, next) = states.split_at_mut((t - t0 + 1) * kv);
            next[..kv].copy_from_slice(&prev[(t - t0) * kv..]);
            decays(s, t, &mut a, &mut b);
            step(s, t, &mut next[..kv], &a, &b);
        }
        for t in (t0..t1).rev() {
            let prev = &states[(t - t0) * kv..(t - t0 + 1) * kv];
            let cur = &states[(t - t0 + 1) * kv..(t - t0 + 2) * kv];
            decays(s, t, &mut a, &mut b);
            let d_o = &up.d_o[t * vd..(t + 1) * vd];
            // The state o_t reads: S_t, or S_{t-1} with the bonus (its u-term is added later).
            let read_state = if bonus { prev } else { cur };
            if !bonus {
                add_outer(&mut ds, &s.q[t * kd..(t + 1) * kd], d_o, sc);
            }
            for i in 0..kd {
                let mut acc_q = F::ZERO;
                let mut acc_k = F::ZERO;
                let mut acc_g = F::ZERO;
                for j in 0..vd {
                    let (d, p) = (ds[i * vd + j], prev[i * vd + j]);
                    acc_q += read_state[i * vd + j] * d_o[j];
                    acc_k += d * s.v[t * vd + j];
                    dv[t * vd + j] += s.k[t * kd + i] * d;
                    // dL/d(log decay) of entry (i, j): dS ⊙ exp(gk_i + gv_j) ⊙ S_{t-1}
                    let w = d * a[i] * b[j] * p;
                    acc_g += w;
                    if let Some(dgv) = dgv.as_mut() {
                        dgv[t * vd + j] += w;
                    }
                }
                dq[t * kd + i] = sc * acc_q;
                dk[t * kd + i] = acc_k;
                if let Some(dgk) = dgk.as_mut() {
                    dgk[t * kd + i] = acc_g;
                }
            }
            for i in 0..kd {
                for j in 0..vd {
                    ds[i * vd + j] *= a[i] * b[j];
                }
            }
            if bonus {
                add_outer(&mut ds, &s.q[t * kd..(t + 1) * kd], d_o, sc);
            }
        }
    }
    let mut grads = SeqGrads {
        dq,
        dk,
        dv,
        dgk,
        dgv,
        du: None,
        dh0: ds,
    };
    if let Some(u) = &s.u {
        s.add_diagonal_grads(&up.d_o, u, &mut grads);
    }
    grads
}

/// m += scale x^T y.
fn add_outer<F: Real>(m: &mut [F], x: &[F], y: &[F], scale: F) {
    let vd = y.len();
    for (i, &xi) in x.iter().enumerate() {
        let w = scale * xi;
        for j in 0..vd {
            m[i * vd + j] += w * y[j];
        }
    }
}
