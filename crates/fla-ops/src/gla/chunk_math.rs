//! One chunk of the chunkwise form: its output from the state entering it, the state it
//! leaves, and the gradients, shared by the fused and the materialised drivers.
//!
//! With G, B the chunk-local inclusive cumulative key and value gates (Γ, Β their last rows)
//! and Gq the query-side gate (G, or G one step back with the RWKV-6 bonus):
//!   o     = scale ((q ⊙ e^Gq) S) ⊙ e^B + intra          (inter-chunk part: paper eq. for O_[i+1])
//!   intra = apply(scores(q, k; Gq, G) · scale, v; B, B)
//!   S'    = (e^Γ ⊗ e^Β) ⊙ S + (k ⊙ e^(Γ-G))^T (v ⊙ e^(Β-B))
//! Every exponent here is <= 0, so nothing overflows; intra.rs keeps the intra part stable.

use super::intra::{apply, apply_t, mask, scores, Decay};
use super::seq::{cumsum_rows_f64, Seq};
use crate::linalg::{matmul, MatRef};
use fla_tensor::Real;

pub struct Chunk<'a, F> {
    s: &'a Seq<F>,
    t0: usize,
    len: usize,
    // Cumulative gates in f64 (see cumsum_rows_f64).
    g: Option<Vec<f64>>,  // L x K
    gq: Option<Vec<f64>>, // L x K, only with the bonus
    b: Option<Vec<f64>>,  // L x V
}

/// `m ⊙ exp(sign·(g - base))`, row-wise, for an L x w matrix; unchanged without a gate.
fn decayed<F: Real>(
    m: &[F],
    g: Option<&[f64]>,
    base: Option<&[f64]>,
    negate: bool,
    w: usize,
) -> Vec<F> {
    let Some(g) = g else { return m.to_vec() };
    let sign = if negate { -1.0 } else { 1.0 };
    let mut out = m.to_vec();
    for (o, g) in out.chunks_mut(w).zip(g.chunks(w)) {
        for c in 0..w {
            let e = g[c] - base.map_or(0.0, |b| b[c]);
            o[c] *= F::from_f64(sign * e).exp();
        }
    }
    out
}

impl<'a, F: Real> Chunk<'a, F> {
    pub fn new(s: &'a Seq<F>, t0: usize, len: usize) -> Self {
        let g = s.gk.as_ref().map(|gk| cumsum_rows_f64(gk, t0, len, s.dk));
        let gq = match (&g, &s.u) {
            (Some(g), Some(_)) => {
                let mut gq = vec![0.0; len * s.dk];
                gq[s.dk..].copy_from_slice(&g[..(len - 1) * s.dk]);
                Some(gq)
            }
            _ => None,
        };
        let b = s.gv.as_ref().map(|gv| cumsum_rows_f64(gv, t0, len, s.dv));
        Chunk {
            s,
            t0,
            len,
            g,
            gq,
            b,
        }
    }

    fn rows<'b>(&self, x: &'b [F], w: usize) -> &'b [F] {
        &x[self.t0 * w..(self.t0 + self.len) * w]
    }

    /// The intra-chunk products always leave out the diagonal (i = j): it carries no gate and
    /// is added apart, with weight u or 1 (Seq::add_diagonal_output).
    fn strict(&self) -> bool {
        true
    }

    fn gq(&self) -> Option<&[f64]> {
        self.gq.as_deref().or(self.g.as_deref())
    }

    fn last(g: &Option<Vec<f64>>, len: usize, w: usize) -> Option<&[f64]> {
        g.as_deref().map(|g| &g[(len - 1) * w..len * w])
    }

    fn key_decay(&self) -> Option<Decay<'_>> {
        let g = self.g.as_deref()?;
        Some(Decay {
            left: self.gq().unwrap(),
            right: g,
            w: self.s.dk,
        })
    }

    fn value_decay(&self) -> Option<Decay<'_>> {
        let b = self.b.as_deref()?;
        Some(Decay {
            left: b,
            right: b,
            w: self.s.dv,
        })
    }

    /// The decay of the whole chunk applied to a state: S ⊙ (e^Γ ⊗ e^Β).
    fn decay_state(&self, st: &mut [F]) {
        let (kd, vd) = (self.s.dk, self.s.dv);
        let a = Self::last(&self.g, self.len, kd);
        let b = Self::last(&self.b, self.len, vd);
        if a.is_none() && b.is_none() {
            return;
        }
        for i in 0..kd {
            let ai = a.map_or(F::ONE, |a| F::from_f64(a[i]).exp());
            for j in 0..vd {
                st[i * vd + j] *= ai * b.map_or(F::ONE, |b| F::from_f64(b[j]).exp());
            }
        }
    }

    /// q ⊙ e^Gq: the queries as they read the state entering the chunk.
    fn q_in(&self) -> Vec<F> {
        decayed(
            self.rows(&self.s.q, self.s.dk),
            self.gq(),
            None,
            false,
            self.s.dk,
        )
    }

    /// k ⊙ e^(Γ-G) and v ⊙ e^(Β-B): the keys and values as they enter the leaving state.
    fn k_out(&self) -> Vec<F> {
        let (kd, last) = (self.s.dk, Self::last(&self.g, self.len, self.s.dk));
        decayed(self.rows(&self.s.k, kd), self.g.as_deref(), last, true, kd)
    }

    fn v_out(&self) -> Vec<F> {
        let (vd, last) = (self.s.dv, Self::last(&self.b, self.len, self.s.dv));
        decayed(self.rows(&self.s.v, vd), self.b.as_deref(), last, true, vd)
    }

    /// scale · masked decayed q k^T (the intra-chunk attention).
    fn attention(&self) -> Vec<F> {
        let kd = self.s.dk;
        scores(
            self.len,
            self.rows(&self.s.q, kd),
            self.rows(&self.s.k, kd),
            kd,
            self.key_decay(),
            self.strict(),
            self.s.scale,
        )
    }

    /// scale · masked decayed do v^T (the gradient of the attention), which dq and dk share.
    pub fn attention_grad(&self, d_o: &[F]) -> Vec<F> {
        let (vd, len) = (self.s.dv, self.len);
        let (d_o, v) = (self.rows(d_o, vd), self.rows(&self.s.v, vd));
        match self.value_decay() {
            Some(d) => scores(len, d_o, v, vd, Some(d), self.strict(), self.s.scale),
            None => {
                let mut m = vec![F::ZERO; len * len];
                matmul(
                    &mut m,
                    len,
                    MatRef::rows(d_o, len, vd),
                    MatRef::rows(v, len, vd).t(),
                    self.s.scale,
                    F::ZERO,
                );
                mask(&mut m, len, self.strict());
                m
            }
        }
    }

    /// The chunk's outputs (L x V) given the state entering it, without the diagonal terms.
    pub fn output(&self, st: &[F]) -> Vec<F> {
        let (kd, vd, len) = (self.s.dk, self.s.dv, self.len);
        let q_in = self.q_in();
        let mut o = vec![F::ZERO; len * vd];
        matmul(
            &mut o,
            vd,
            MatRef::rows(&q_in, len, kd),
            MatRef::rows(st, kd, vd),
            self.s.scale,
            F::ZERO,
        );
        if self.b.is_some() {
            o = decayed(&o, self.b.as_deref(), None, false, vd);
        }
        let a = self.attention();
        apply(
            len,
            &a,
            self.rows(&self.s.v, vd),
            vd,
            self.value_decay(),
            self.strict(),
            &mut o,
        );
        o
    }

    /// S <- the state leaving the chunk.
    pub fn update_state(&self, st: &mut [F]) {
        let (kd, vd) = (self.s.dk, self.s.dv);
        self.decay_state(st);
        let (k_out, v_out) = (self.k_out(), self.v_out());
        matmul(
            st,
            vd,
            MatRef::rows(&k_out, self.len, kd).t(),
            MatRef::rows(&v_out, self.len, vd),
            F::ONE,
            F::ONE,
        );
    }

    /// dS <- the gradient of the state entering the chunk, from that of the state leaving it.
    pub fn state_grad(&self, ds: &mut [F], d_o: &[F]) {
        let (kd, vd) = (self.s.dk, self.s.dv);
        self.decay_state(ds);
        let q_in = self.q_in();
        let do_in = decayed(self.rows(d_o, vd), self.b.as_deref(), None, false, vd);
        matmul(
            ds,
            vd,
            MatRef::rows(&q_in, self.len, kd).t(),
            MatRef::rows(&do_in, self.len, vd),
            self.s.scale,
            F::ONE,
        );
    }

    /// dq of the chunk (L x K) given the state entering it and `attention_grad`, without the
    /// diagonal terms.
    pub fn dq(&self, st: &[F], d_o: &[F], da: &[F]) -> Vec<F> {
        let (kd, vd, len) = (self.s.dk, self.s.dv, self.len);
        let do_in = decayed(self.rows(d_o, vd), self.b.as_deref(), None, false, vd);
        let mut dq = vec![F::ZERO; len * kd];
        matmul(
            &mut dq,
            kd,
            MatRef::rows(&do_in, len, vd),
            MatRef::rows(st, kd, vd).t(),
            self.s.scale,
            F::ZERO,
        );
        if self.g.is_some() {
            dq = decayed(&dq, self.gq(), None, false, kd);
        }
        apply(
            len,
            da,
            self.rows(&self.s.k, kd),
            kd,
            self.key_decay(),
            self.strict(),
            &mut dq,
        );
        dq
    }

    /// dk and dv of the chunk given the gradient of the state leaving it and `attention_grad`,
    /// without the diagonal terms.
    pub fn dk_dv(&self, ds: &[F], d_o: &[F], da: &[F]) -> (Vec<F>, Vec<F>) {
        let (kd, vd, len) = (self.s.dk, self.s.dv, self.len);
        let (k_out, v_out) = (self.k_out(), self.v_out());
        let mut dk = vec![F::ZERO; len * kd];
        matmul(
            &mut dk,
            kd,
            MatRef::rows(&v_out, len, vd),
            MatRef::rows(ds, kd, vd).t(),
            F::ONE,
            F::ZERO,
        );
        let last_g = Self::last(&self.g, len, kd);
        dk = decayed(&dk, self.g.as_deref(), last_g, true, kd);
        let mut dv = vec![F::ZERO; len * vd];
        matmul(
            &mut dv,
            vd,
            MatRef::rows(&k_out, len, kd),
            MatRef::rows(ds, kd, vd),
            F::ONE,
            F::ZERO,
        );
        let last_b = Self::last(&self.b, len, vd);
        dv = decayed(&dv, self.b.as_deref(), last_b, true, vd);
        apply_t(
            len,
            da,
            self.rows(&self.s.q, kd),
            kd,
            self.key_decay(),
            self.strict(),
            &mut dk,
        );
        let a = self.attention();
        apply_t(
            len,
            &a,
            self.rows(d_o, vd),
            vd,
            self.value_decay(),
            self.strict(),
            &mut dv,
        );
        (dk, dv)
    }
}

/// The chunks of a sequence: (start, length) with length `size` but for the last.
pub fn chunks(t: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(size).map(move |t0| (t0, size.min(t - t0)))
}

/// Completes a chunkwise backward pass: gate gradients by the dq/dk identity, then the
/// diagonal terms (which no gate touches).
pub fn finish_backward<F: Real>(
    s: &Seq<F>,
    up: &super::seq::SeqUpstream<F>,
    parts: (Vec<F>, Vec<F>, Vec<F>),
    o: Option<&[F]>,
    ht: &[F],
    dh0: Vec<F>,
) -> super::seq::SeqGrads<F> {
    let (dq, dk, dv) = parts;
    let mut g = super::seq::SeqGrads {
        dq,
        dk,
        dv,
        dgk: None,
        dgv: None,
        du: None,
        dh0,
    };
    s.gate_grads(up, o, ht, &mut g);
    s.add_diagonal_grads(&up.d_o, &s.diagonal_weight(), &mut g);
    g
}
