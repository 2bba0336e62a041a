//! One (sequence, head) pair in contiguous row-major buffers: the unit every form works on.

use fla_tensor::Real;

/// Inputs of one sequence and head. Gates are per-step log gates (<= 0); a scalar gate is
/// broadcast over K by the caller, so every form sees at most a key gate and a value gate.
pub struct Seq<F> {
    pub t: usize,
    pub dk: usize,
    pub dv: usize,
    pub q: Vec<F>,          // T x K
    pub k: Vec<F>,          // T x K
    pub v: Vec<F>,          // T x V
    pub gk: Option<Vec<F>>, // T x K
    pub gv: Option<Vec<F>>, // T x V
    pub u: Option<Vec<F>>,  // K: RWKV-6 bonus; the output then reads S_{t-1}
    pub h0: Option<Vec<F>>, // K x V
    pub scale: F,
}

/// Outputs of one sequence and head.
pub struct SeqOut<F> {
    pub o: Vec<F>,  // T x V
    pub ht: Vec<F>, // K x V
}

/// Gradients of one sequence and head (gates per step, like the inputs).
pub struct SeqGrads<F> {
    pub dq: Vec<F>,
    pub dk: Vec<F>,
    pub dv: Vec<F>,
    pub dgk: Option<Vec<F>>,
    pub dgv: Option<Vec<F>>,
    pub du: Option<Vec<F>>,
    pub dh0: Vec<F>,
}

/// Upstream gradients of one sequence and head.
pub struct SeqUpstream<F> {
    pub d_o: Vec<F>, // T x V
    pub dht: Vec<F>, // K x V (zeros when not given)
}

/// Inclusive cumulative sums of `rows` rows of `g` (width `w`) starting at row `start`.
pub fn cumsum_rows<F: Real>(g: &[F], start: usize, rows: usize, w: usize) -> Vec<F> {
    let mut out = g[start * w..(start + rows) * w].to_vec();
    for i in 1..rows {
        for d in 0..w {
            let prev = out[(i - 1) * w + d];
            out[i * w + d] += prev;
        }
    }
    out
}

/// Inclusive cumulative sums like [`cumsum_rows`], kept in f64 whatever the input type:
/// the chunk forms take exponents as differences of these sums, which must stay exact when
/// the sums are large (gates near -20 per step reach -1280 over a chunk of 64).
pub fn cumsum_rows_f64<F: Real>(g: &[F], start: usize, rows: usize, w: usize) -> Vec<f64> {
    let mut out: Vec<f64> = g[start * w..(start + rows) * w]
        .iter()
        .map(|x| x.to_f64())
        .collect();
    for i in 1..rows {
        for d in 0..w {
            let prev = out[(i - 1) * w + d];
            out[i * w + d] += prev;
        }
    }
    out
}

/// Reverse cumulative sums in place: `x_t <- sum_{s >= t} x_s` per column.
pub fn rev_cumsum_rows<F: Real>(x: &mut [F], rows: usize, w: usize) {
    for i in (0..rows.saturating_sub(1)).rev() {
        for d in 0..w {
            let next = x[(i + 1) * w + d];
            x[i * w + d] += next;
        }
    }
}

impl<F: Real> Seq<F> {
    /// The weight of the current token's own term, which no gate touches: u with the RWKV-6
    /// bonus, else ones (o_t's term scale (q_t·k_t) v_t read from S_t).
    pub fn diagonal_weight(&self) -> Vec<F> {
        self.u.clone().unwrap_or_else(|| vec![F::ONE; self.dk])
    }

    /// Adds the current token's own terms: `o_t += scale (q_t·(w⊙k_t)) v_t`.
    pub fn add_diagonal_output(&self, o: &mut [F], w: &[F]) {
        let (kd, vd) = (self.dk, self.dv);
        for t in 0..self.t {
            let a = self.scale
                * (0..kd)
                    .map(|i| self.q[t * kd + i] * w[i] * self.k[t * kd + i])
                    .sum::<F>();
            for j in 0..vd {
                o[t * vd + j] += a * self.v[t * vd + j];
            }
        }
    }

    /// Gradients of those terms, added to dq, dk, dv; sets du when the weight is the bonus u.
    pub fn add_diagonal_grads(&self, d_o: &[F], w: &[F], g: &mut SeqGrads<F>) {
        let (kd, vd, s) = (self.dk, self.dv, self.scale);
        let mut du = vec![F::ZERO; kd];
        for t in 0..self.t {
            let vdo: F = (0..vd).map(|j| self.v[t * vd + j] * d_o[t * vd + j]).sum();
            let mut a = F::ZERO;
            for i in 0..kd {
                let (q, k) = (self.q[t * kd + i], self.k[t * kd + i]);
                g.dq[t * kd + i] += s * w[i] * k * vdo;
                g.dk[t * kd + i] += s * w[i] * q * vdo;
                du[i] += s * q * k * vdo;
                a += q * w[i] * k;
            }
            for j in 0..vd {
                g.dv[t * vd + j] += s * a * d_o[t * vd + j];
            }
        }
        if self.u.is_some() {
            g.du = Some(du);
        }
    }

    /// Gate gradients from the gradients of q, k, v, without differentiating any decay.
    ///
    /// q enters the outputs only as q_i ⊙ exp(Gq_i) and k only as k_j ⊙ exp(-G_j) (times
    /// exp(G_{T-1}) in the final state), where G is the inclusive cumulative key gate and
    /// Gq = G (Gq_i = G_{i-1} with the bonus). Hence dL/dG_s = [q⊙dq at the query position
    /// reading G_s] - k_s⊙dk_s, plus rowsum(dht⊙ht) at s = T-1, and dg = reverse cumsum.
    /// Likewise on the value side with o⊙do - v⊙dv and colsum(dht⊙ht).
    /// `dq`, `dk`, `dv` and `o` must not include the diagonal terms: those carry no gate, and
    /// leaving them out keeps q⊙dq and k⊙dk from cancelling (strong gates make them dominate).
    pub fn gate_grads(&self, up: &SeqUpstream<F>, o: Option<&[F]>, ht: &[F], g: &mut SeqGrads<F>) {
        // Accumulated in f64: the reverse sums run over the whole sequence and cancel.
        let (t, kd, vd) = (self.t, self.dk, self.dv);
        let prod = |a: F, b: F| a.to_f64() * b.to_f64();
        let finish = |mut x: Vec<f64>, w: usize| {
            rev_cumsum_rows(&mut x, t, w);
            x.into_iter().map(F::from_f64).collect::<Vec<F>>()
        };
        if self.gk.is_some() {
            let shift = usize::from(self.u.is_some());
            let mut dg = vec![0.0; t * kd];
            for s in 0..t {
                for i in 0..kd {
                    let mut x = -prod(self.k[s * kd + i], g.dk[s * kd + i]);
                    if s + shift < t {
                        let r = (s + shift) * kd + i;
                        x += prod(self.q[r], g.dq[r]);
                    }
                    dg[s * kd + i] = x;
                }
            }
            if t > 0 {
                for i in 0..kd {
                    dg[(t - 1) * kd + i] += (0..vd)
                        .map(|j| prod(up.dht[i * vd + j], ht[i * vd + j]))
                        .sum::<f64>();
                }
            }
            g.dgk = Some(finish(dg, kd));
        }
        if self.gv.is_some() {
            let o = o.expect("gate_grads: the value gate needs the outputs");
            let mut db: Vec<f64> = (0..t * vd)
                .map(|r| prod(o[r], up.d_o[r]) - prod(self.v[r], g.dv[r]))
                .collect();
            if t > 0 {
                for j in 0..vd {
                    db[(t - 1) * vd + j] += (0..kd)
                        .map(|i| prod(up.dht[i * vd + j], ht[i * vd + j]))
                        .sum::<f64>();
                }
            }
            g.dgv = Some(finish(db, vd));
        }
    }
}
