//! One chunk of the chunkwise form: its output from the state entering it, the state it
//! leaves, and the gradients, shared by the fused and the materialised drivers.
//!
//! With G, B the chunk-local inclusive cumulative key and value gates (Γ, Β their last rows)
//! and Gq the query-side gate (G, or G one step back with the RWKV-6 bonus):
//!   o     = scale ((q ⊙ e^Gq) S) ⊙ e^B + intra          (inter-chunk part: paper eq. for O_[i+1])
//!   intra = apply(scores(q, k; Gq, G) · scale, v; B, B)
//!   S'    = (e^Γ ⊗ e^Β) ⊙ S + (k ⊙ e^(Γ-G))^T (v ⊙ e^(Β-B))
//! Every exponent here is <= 0, so nothing overflows; intra.rs keeps the intra part stable.

use super::intra::{apply, apply_t, fits_one_block, mask, scores, Decay};
use super::seq::{cumsum_rows_f64, Seq};
use crate::linalg::{matmul, MatRef};
use fla_tensor::Real;

/// One side's gate inside a chunk: the key side (K wide) or the value side (V wide).
struct GateSide<F> {
    w: usize,
    /// Inclusive cumulative gate G (f64, see cumsum_rows_f64), L x w.
    right: Vec<f64>,
    /// The query-side cumulative gate where it differs from G (the bonus: G one step back).
    left: Option<Vec<f64>>,
    /// e^Γ, the decay of the whole chunk (Γ the last row of G).
    last_exp: Vec<F>,
    /// (e^left, e^-G) when the chunk is one intra block (e^-G then stays below e^SAFE_EXP):
    /// every decay of the chunk is a product of these, so each chunk takes L·w exps only.
    exps: Option<(Vec<F>, Vec<F>)>,
}

impl<F: Real> GateSide<F> {
    fn new(gate: &[F], t0: usize, len: usize, w: usize, shifted_left: bool) -> Self {
        let right = cumsum_rows_f64(gate, t0, len, w);
        let left = shifted_left.then(|| {
            let mut l = vec![0.0; len * w];
            l[w..].copy_from_slice(&right[..(len - 1) * w]);
            l
        });
        let last = &right[(len - 1) * w..];
        let last_exp = last.iter().map(|&x| F::from_f64(x).exp()).collect();
        let exps = fits_one_block::<F>(last).then(|| {
            let e: Vec<F> = right.iter().map(|&x| F::from_f64(x).exp()).collect();
            let neg = e.iter().map(|&x| F::ONE / x).collect();
            let left = if shifted_left {
                let mut l = vec![F::ONE; len * w];
                l[w..].copy_from_slice(&e[..(len - 1) * w]);
                l
            } else {
                e
            };
            (left, neg)
        });
        GateSide {
            w,
            right,
            left,
            last_exp,
            exps,
        }
    }

    fn left(&self) -> &[f64] {
        self.left.as_deref().unwrap_or(&self.right)
    }

    fn decay(&self) -> Decay<'_, F> {
        Decay {
            left: self.left(),
            right: &self.right,
            w: self.w,
            exps: self.exps.as_ref().map(|(l, r)| (&l[..], &r[..])),
        }
    }

    /// m ⊙ e^left: rows as they read the state entering the chunk.
    fn entering(&self, m: &[F]) -> Vec<F> {
        let mut out = m.to_vec();
        match &self.exps {
            Some((l, _)) => out.iter_mut().zip(l).for_each(|(o, e)| *o *= *e),
            None => {
                for (o, g) in out.chunks_mut(self.w).zip(self.left().chunks(self.w)) {
                    o.iter_mut()
                        .zip(g)
                        .for_each(|(o, &g)| *o *= F::from_f64(g).exp());
                }
            }
        }
        out
    }

    /// m ⊙ e^(Γ-G): rows as they enter the state leaving the chunk.
    fn leaving(&self, m: &[F]) -> Vec<F> {
        let mut out = m.to_vec();
        let last = &self.right[self.right.len() - self.w..];
        for (r, o) in out.chunks_mut(self.w).enumerate() {
            match &self.exps {
                Some((_, neg)) => {
                    let neg = &neg[r * self.w..(r + 1) * self.w];
                    for c in 0..self.w {
                        o[c] *= neg[c] * self.last_exp[c];
                    }
                }
                None => {
                    let g = &self.right[r * self.w..(r + 1) * self.w];
                    for c in 0..self.w {
                        o[c] *= F::from_f64(last[c] - g[c]).exp();
                    }
                }
            }
        }
        out
    }
}

pub struct Chunk<'a, F> {
    s: &'a Seq<F>,
    t0: usize,
    len: usize,
    key: Option<GateSide<F>>,
    value: Option<GateSide<F>>,
}

impl<'a, F: Real> Chunk<'a, F> {
    pub fn new(s: &'a Seq<F>, t0: usize, len: usize) -> Self {
        let bonus = s.u.is_some();
        Chunk {
            s,
            t0,
            len,
            key: s
                .gk
                .as_ref()
                .map(|g| GateSide::new(g, t0, len, s.dk, bonus)),
            value: s
                .gv
                .as_ref()
                .map(|g| GateSide::new(g, t0, len, s.dv, false)),
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

    fn key_decay(&self) -> Option<Decay<'_, F>> {
        self.key.as_ref().map(GateSide::decay)
    }

    fn value_decay(&self) -> Option<Decay<'_, F>> {
        self.value.as_ref().map(GateSide::decay)
    }

    /// m ⊙ e^left of `side`, or m itself without that gate.
    fn entering(side: &Option<GateSide<F>>, m: &[F]) -> Vec<F> {
        side.as_ref().map_or_else(|| m.to_vec(), |g| g.entering(m))
    }

    /// m ⊙ e^(Γ-G) of `side`, or m itself without that gate.
    fn leaving(side: &Option<GateSide<F>>, m: &[F]) -> Vec<F> {
        side.as_ref().map_or_else(|| m.to_vec(), |g| g.leaving(m))
    }

    /// The decay of the whole chunk applied to a state: S ⊙ (e^Γ ⊗ e^Β).
    fn decay_state(&self, st: &mut [F]) {
        let vd = self.s.dv;
        if let Some(key) = &self.key {
            for (row, &a) in st.chunks_mut(vd).zip(&key.last_exp) {
                row.iter_mut().for_each(|x| *x *= a);
            }
        }
        if let Some(value) = &self.value {
            for row in st.chunks_mut(vd) {
                row.iter_mut()
                    .zip(&value.last_exp)
                    .for_each(|(x, &b)| *x *= b);
            }
        }
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
        let q_in = Self::entering(&self.key, self.rows(&self.s.q, kd));
        let mut o = vec![F::ZERO; len * vd];
        matmul(
            &mut o,
            vd,
            MatRef::rows(&q_in, len, kd),
            MatRef::rows(st, kd, vd),
            self.s.scale,
            F::ZERO,
        );
        if self.value.is_some() {
            o = Self::entering(&self.value, &o);
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
        let k_out = Self::leaving(&self.key, self.rows(&self.s.k, kd));
        let v_out = Self::leaving(&self.value, self.rows(&self.s.v, vd));
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
        let q_in = Self::entering(&self.key, self.rows(&self.s.q, kd));
        let do_in = Self::entering(&self.value, self.rows(d_o, vd));
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
        let do_in = Self::entering(&self.value, self.rows(d_o, vd));
        let mut dq = vec![F::ZERO; len * kd];
        matmul(
            &mut dq,
            kd,
            MatRef::rows(&do_in, len, vd),
            MatRef::rows(st, kd, vd).t(),
            self.s.scale,
            F::ZERO,
        );
        if self.key.is_some() {
            dq = Self::entering(&self.key, &dq);
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
        let k_out = Self::leaving(&self.key, self.rows(&self.s.k, kd));
        let v_out = Self::leaving(&self.value, self.rows(&self.s.v, vd));
        let mut dk = vec![F::ZERO; len * kd];
        matmul(
            &mut dk,
            kd,
            MatRef::rows(&v_out, len, vd),
            MatRef::rows(ds, kd, vd).t(),
            F::ONE,
            F::ZERO,
        );
        if self.key.is_some() {
            dk = Self::leaving(&self.key, &dk);
        }
        let mut dv = vec![F::ZERO; len * vd];
        matmul(
            &mut dv,
            vd,
            MatRef::rows(&k_out, len, kd),
            MatRef::rows(ds, kd, vd),
            F::ONE,
            F::ZERO,
        );
        if self.value.is_some() {
            dv = Self::leaving(&self.value, &dv);
        }
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
