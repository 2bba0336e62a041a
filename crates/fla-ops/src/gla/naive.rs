//! The parallel (quadratic) form: every output as an explicit sum over earlier tokens, and
//! its gradient by differentiating each term. Slow and obviously right: the reference.
//!
//! With G, B the inclusive cumulative key and value gates (global over the sequence), and
//! Gq = G (or G shifted by one step, Gq_i = G_{i-1}, with the RWKV-6 bonus):
//!   o_iv = scale Σ_{j ≤ i} Σ_k q_ik k_jk v_jv exp(Gq_ik - G_jk + B_iv - B_jv)
//!        + scale Σ_k q_ik h0_kv exp(Gq_ik + B_iv)
//!   (bonus: j < i in the sum, plus scale Σ_k q_ik u_k k_ik v_iv)
//!   ht_kv = h0_kv exp(G_Tk + B_Tv) + Σ_j k_jk v_jv exp(G_Tk - G_jk + B_Tv - B_jv)

use super::seq::{cumsum_rows, rev_cumsum_rows, Seq, SeqGrads, SeqOut, SeqUpstream};
use fla_tensor::Real;

/// The cumulative gates of a sequence: G (T x K), Gq (T x K), B (T x V), zeros when absent.
struct Cum<F> {
    g: Vec<F>,
    gq: Vec<F>,
    b: Vec<F>,
}

fn cumulative<F: Real>(s: &Seq<F>) -> Cum<F> {
    let (t, kd, vd) = (s.t, s.dk, s.dv);
    let g = match &s.gk {
        Some(gk) => cumsum_rows(gk, 0, t, kd),
        None => vec![F::ZERO; t * kd],
    };
    let b = match &s.gv {
        Some(gv) => cumsum_rows(gv, 0, t, vd),
        None => vec![F::ZERO; t * vd],
    };
    let gq = if s.u.is_some() {
        let mut gq = vec![F::ZERO; t * kd];
        if t > 1 {
            gq[kd..].copy_from_slice(&g[..(t - 1) * kd]);
        }
        gq
    } else {
        g.clone()
    };
    Cum { g, gq, b }
}

/// Upper limit (exclusive) of j for query i: j ≤ i, or j < i with the bonus.
fn j_end<F>(s: &Seq<F>, i: usize) -> usize {
    if s.u.is_some() {
        i
    } else {
        i + 1
    }
}

pub fn forward<F: Real>(s: &Seq<F>) -> SeqOut<F> {
    let (t, kd, vd, sc) = (s.t, s.dk, s.dv, s.scale);
    let c = cumulative(s);
    let mut o = vec![F::ZERO; t * vd];
    for i in 0..t {
        for j in 0..j_end(s, i) {
            for a in 0..kd {
                let qk = sc * s.q[i * kd + a] * s.k[j * kd + a];
                let ek = c.gq[i * kd + a] - c.g[j * kd + a];
                for b in 0..vd {
                    let e = (ek + c.b[i * vd + b] - c.b[j * vd + b]).exp();
                    o[i * vd + b] += qk * s.v[j * vd + b] * e;
                }
            }
        }
        if let Some(h0) = &s.h0 {
            for a in 0..kd {
                for b in 0..vd {
                    let e = (c.gq[i * kd + a] + c.b[i * vd + b]).exp();
                    o[i * vd + b] += sc * s.q[i * kd + a] * h0[a * vd + b] * e;
                }
            }
        }
    }
    if let Some(u) = &s.u {
        s.add_diagonal_output(&mut o, u);
    }
    let mut ht = vec![F::ZERO; kd * vd];
    if t > 0 {
        let last = t - 1;
        for a in 0..kd {
            for b in 0..vd {
                let end = c.g[last * kd + a] + c.b[last * vd + b];
                let mut acc = match &s.h0 {
                    Some(h0) => h0[a * vd + b] * end.exp(),
                    None => F::ZERO,
                };
                for j in 0..t {
                    let e = (end - c.g[j * kd + a] - c.b[j * vd + b]).exp();
                    acc += s.k[j * kd + a] * s.v[j * vd + b] * e;
                }
                ht[a * vd + b] = acc;
            }
        }
    } else if let Some(h0) = &s.h0 {
        ht.copy_from_slice(h0);
    }
    SeqOut { o, ht }
}

pub fn backward<F: Real>(s: &Seq<F>, up: &SeqUpstream<F>) -> SeqGrads<F> {
    let (t, kd, vd, sc) = (s.t, s.dk, s.dv, s.scale);
    let c = cumulative(s);
    let (mut dq, mut dk, mut dv) = (
        vec![F::ZERO; t * kd],
        vec![F::ZERO; t * kd],
        vec![F::ZERO; t * vd],
    );
    let mut dh0 = vec![F::ZERO; kd * vd];
    // Gradients with respect to the cumulative gates G, Gq and B.
    let (mut dgc, mut dgq, mut db) = (
        vec![F::ZERO; t * kd],
        vec![F::ZERO; t * kd],
        vec![F::ZERO; t * vd],
    );
    let d_o = &up.d_o;
    for i in 0..t {
        for j in 0..j_end(s, i) {
            for a in 0..kd {
                let (qi, kj) = (s.q[i * kd + a], s.k[j * kd + a]);
                let ek = c.gq[i * kd + a] - c.g[j * kd + a];
                for b in 0..vd {
                    let e = (ek + c.b[i * vd + b] - c.b[j * vd + b]).exp();
                    let w = d_o[i * vd + b] * sc * e; // dL/d(q k v) for this term
                    let vj = s.v[j * vd + b];
                    let term = w * qi * kj * vj;
                    dq[i * kd + a] += w * kj * vj;
                    dk[j * kd + a] += w * qi * vj;
                    dv[j * vd + b] += w * qi * kj;
                    dgq[i * kd + a] += term;
                    dgc[j * kd + a] -= term;
                    db[i * vd + b] += term;
                    db[j * vd + b] -= term;
                }
            }
        }
        if let Some(h0) = &s.h0 {
            for a in 0..kd {
                for b in 0..vd {
                    let e = (c.gq[i * kd + a] + c.b[i * vd + b]).exp();
                    let w = d_o[i * vd + b] * sc * e;
                    let term = w * s.q[i * kd + a] * h0[a * vd + b];
                    dq[i * kd + a] += w * h0[a * vd + b];
                    dh0[a * vd + b] += w * s.q[i * kd + a];
                    dgq[i * kd + a] += term;
                    db[i * vd + b] += term;
                }
            }
        }
    }
    if t > 0 {
        let last = t - 1;
        for a in 0..kd {
            for b in 0..vd {
                let dht = up.dht[a * vd + b];
                let end = c.g[last * kd + a] + c.b[last * vd + b];
                if let Some(h0) = &s.h0 {
                    let e = end.exp();
                    let term = dht * h0[a * vd + b] * e;
                    dh0[a * vd + b] += dht * e;
                    dgc[last * kd + a] += term;
                    db[last * vd + b] += term;
                }
                for j in 0..t {
                    let e = (end - c.g[j * kd + a] - c.b[j * vd + b]).exp();
                    let (kj, vj) = (s.k[j * kd + a], s.v[j * vd + b]);
                    let term = dht * kj * vj * e;
                    dk[j * kd + a] += dht * vj * e;
                    dv[j * vd + b] += dht * kj * e;
                    dgc[last * kd + a] += term;
                    dgc[j * kd + a] -= term;
                    db[last * vd + b] += term;
                    db[j * vd + b] -= term;
                }
            }
        }
    } else {
        dh0.copy_from_slice(&up.dht);
    }
    // Gq is G itself, or G one step back with the bonus (Gq_0 = 0 is a constant).
    let shift = usize::from(s.u.is_some());
    for i in shift..t {
        for a in 0..kd {
            dgc[(i - shift) * kd + a] += dgq[i * kd + a];
        }
    }
    let mut grads = SeqGrads {
        dq,
        dk,
        dv,
        dgk: None,
        dgv: None,
        du: None,
        dh0,
    };
    if s.gk.is_some() {
        rev_cumsum_rows(&mut dgc, t, kd);
        grads.dgk = Some(dgc);
    }
    if s.gv.is_some() {
        rev_cumsum_rows(&mut db, t, vd);
        grads.dgv = Some(db);
    }
    if let Some(u) = &s.u {
        s.add_diagonal_grads(d_o, u, &mut grads);
    }
    grads
}
