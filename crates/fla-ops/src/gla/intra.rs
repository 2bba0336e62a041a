//! Decayed products inside one chunk, the heart of the chunkwise forms.
//!
//! Within a chunk of L tokens, with per-feature cumulative log gates `left` (rows i) and
//! `right` (rows j), non-increasing along the chunk:
//!   scores:  M_ij  = Σ_d x_id y_jd exp(left_id - right_jd)       (j ≤ i, or j < i if strict)
//!   apply:   out_i += Σ_j M_ij w_j ⊙ exp(left_i - right_j)
//!   apply_t: out_j += Σ_i M_ij w_i ⊙ exp(left_i - right_j)
//! Each block of (i, j) pairs is one matrix product after splitting every exponent at a
//! reference r: exp(left_i - r) exp(r - right_j). Off the diagonal (i in [m,e), j in [s,m))
//! r = right_{m-1} makes both factors <= 1. On the diagonal, r = right_{s-1} makes the left
//! factor <= 1 and the right one <= exp(right_{s-1} - right_{e-1}); when that exceeds
//! exp(SAFE_EXP) the block is halved (the paper's secondary chunking, here recursive), so
//! any gate, down to -inf, stays finite and exact in the normal case of one block per chunk.

use crate::linalg::{matmul, MatRef};
use fla_tensor::Real;

/// Cumulative gates of both sides of a decayed product, `w` features wide.
#[derive(Clone, Copy)]
pub struct Decay<'a, F> {
    pub left: &'a [f64],
    pub right: &'a [f64],
    pub w: usize,
    /// (e^left, e^-right), precomputed by the caller when the chunk is one block
    /// (`fits_one_block`); they then replace every exp of that block.
    pub exps: Option<(&'a [F], &'a [F])>,
}

/// Whether a chunk whose cumulative gate ends at `last` is one block: e^-right then stays
/// below e^SAFE_EXP for every row.
pub fn fits_one_block<F: Real>(last: &[f64]) -> bool {
    last.iter().all(|&x| -x <= F::SAFE_EXP.to_f64())
}

/// A block of pairs: rows i in `i0..i1`, columns j in `j0..j1`, split at `reference`
/// (a row of `right`; None means the chunk start, where the cumulative gate is 0).
#[derive(Clone, Copy, Debug)]
struct Block {
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    reference: Option<usize>,
    diagonal: bool,
}

fn blocks<F: Real>(len: usize, decay: Option<&Decay<'_, F>>, strict: bool) -> Vec<Block> {
    let mut out = Vec::new();
    match decay {
        None => out.push(Block {
            i0: 0,
            i1: len,
            j0: 0,
            j1: len,
            reference: None,
            diagonal: true,
        }),
        Some(d) => split::<F>(0, len, d, strict, &mut out),
    }
    out
}

fn split<F: Real>(s: usize, e: usize, d: &Decay<'_, F>, strict: bool, out: &mut Vec<Block>) {
    if e <= s || (strict && e - s == 1) {
        return;
    }
    let reference = s.checked_sub(1);
    let at = |row: Option<usize>, c: usize| row.map_or(0.0, |r| d.right[r * d.w + c]);
    let span = (0..d.w)
        .map(|c| at(reference, c) - at(Some(e - 1), c))
        .fold(0.0, f64::max);
    if e - s == 1 {
        // A single pair (i, i) with left_i = right_i: no decay at all.
        out.push(Block {
            i0: s,
            i1: e,
            j0: s,
            j1: e,
            reference: Some(s),
            diagonal: true,
        });
    } else if span <= F::SAFE_EXP.to_f64() {
        out.push(Block {
            i0: s,
            i1: e,
            j0: s,
            j1: e,
            reference,
            diagonal: true,
        });
    } else {
        let m = (s + e) / 2;
        split::<F>(s, m, d, strict, out);
        out.push(Block {
            i0: m,
            i1: e,
            j0: s,
            j1: m,
            reference: Some(m - 1),
            diagonal: false,
        });
        split::<F>(m, e, d, strict, out);
    }
}

/// Rows `r0..r1` of `src` (width w), each entry times exp(±(g - reference)) when decayed.
fn scaled_rows<F: Real>(
    src: &[F],
    r0: usize,
    r1: usize,
    w: usize,
    d: Option<&Decay<'_, F>>,
    left: bool,
    reference: Option<usize>,
) -> Vec<F> {
    let mut out = src[r0 * w..r1 * w].to_vec();
    if let Some(d) = d {
        scale_rows(&mut out, r0, r1, w, d, left, reference);
    }
    out
}

/// Multiplies rows `r0..r1` of `m` (width w) by exp(±(g - reference)) in place.
fn scale_rows<F: Real>(
    m: &mut [F],
    r0: usize,
    r1: usize,
    w: usize,
    d: &Decay<'_, F>,
    left: bool,
    reference: Option<usize>,
) {
    if let (None, Some((exp_left, exp_neg_right))) = (reference, d.exps) {
        let e = if left { exp_left } else { exp_neg_right };
        m.iter_mut()
            .zip(&e[r0 * w..r1 * w])
            .for_each(|(x, &f)| *x *= f);
        return;
    }
    let g = if left { d.left } else { d.right };
    for r in r0..r1 {
        for c in 0..w {
            let rf = reference.map_or(0.0, |x| d.right[x * w + c]);
            let e = if left {
                g[r * w + c] - rf
            } else {
                rf - g[r * w + c]
            };
            m[(r - r0) * w + c] *= F::from_f64(e).exp();
        }
    }
}

/// alpha · masked scores, L x L row-major (zero outside the causal mask).
pub fn scores<F: Real>(
    len: usize,
    x: &[F],
    y: &[F],
    w: usize,
    decay: Option<Decay<'_, F>>,
    strict: bool,
    alpha: F,
) -> Vec<F> {
    let mut m = vec![F::ZERO; len * len];
    let d = decay.as_ref();
    for b in blocks::<F>(len, d, strict) {
        let xs = scaled_rows(x, b.i0, b.i1, w, d, true, b.reference);
        let ys = scaled_rows(y, b.j0, b.j1, w, d, false, b.reference);
        let (ni, nj) = (b.i1 - b.i0, b.j1 - b.j0);
        let dst = &mut m[b.i0 * len + b.j0..];
        matmul(
            dst,
            len,
            MatRef::rows(&xs, ni, w),
            MatRef::rows(&ys, nj, w).t(),
            alpha,
            F::ZERO,
        );
        if b.diagonal {
            for i in b.i0..b.i1 {
                let first_masked = if strict { i } else { i + 1 };
                for j in first_masked.max(b.j0)..b.j1 {
                    m[i * len + j] = F::ZERO;
                }
            }
        }
    }
    m
}

/// Zeroes the entries of an L x L matrix outside the causal mask.
pub fn mask<F: Real>(m: &mut [F], len: usize, strict: bool) {
    for i in 0..len {
        let first_masked = if strict { i } else { i + 1 };
        m[i * len + first_masked.min(len)..(i + 1) * len].fill(F::ZERO);
    }
}

/// out_i += Σ_j m_ij w_j ⊙ exp(left_i - right_j), with m already masked.
pub fn apply<F: Real>(
    len: usize,
    m: &[F],
    src: &[F],
    w: usize,
    decay: Option<Decay<'_, F>>,
    strict: bool,
    out: &mut [F],
) {
    let d = decay.as_ref();
    for b in blocks::<F>(len, d, strict) {
        let (ni, nj) = (b.i1 - b.i0, b.j1 - b.j0);
        let mb = MatRef {
            data: &m[b.i0 * len + b.j0..],
            rows: ni,
            cols: nj,
            rs: len,
            cs: 1,
        };
        match d {
            None => matmul(
                &mut out[b.i0 * w..],
                w,
                mb,
                MatRef::rows(&src[b.j0 * w..], nj, w),
                F::ONE,
                F::ONE,
            ),
            Some(dd) => {
                let ws = scaled_rows(src, b.j0, b.j1, w, d, false, b.reference);
                let mut tmp = vec![F::ZERO; ni * w];
                matmul(&mut tmp, w, mb, MatRef::rows(&ws, nj, w), F::ONE, F::ZERO);
                scale_rows(&mut tmp, b.i0, b.i1, w, dd, true, b.reference);
                out[b.i0 * w..b.i1 * w]
                    .iter_mut()
                    .zip(&tmp)
                    .for_each(|(o, t)| *o += *t);
            }
        }
    }
}

/// out_j += Σ_i m_ij w_i ⊙ exp(left_i - right_j), with m already masked.
pub fn apply_t<F: Real>(
    len: usize,
    m: &[F],
    src: &[F],
    w: usize,
    decay: Option<Decay<'_, F>>,
    strict: bool,
    out: &mut [F],
) {
    let d = decay.as_ref();
    for b in blocks::<F>(len, d, strict) {
        let (ni, nj) = (b.i1 - b.i0, b.j1 - b.j0);
        let mt = MatRef {
            data: &m[b.i0 * len + b.j0..],
            rows: ni,
            cols: nj,
            rs: len,
            cs: 1,
        }
        .t();
        match d {
            None => matmul(
                &mut out[b.j0 * w..],
                w,
                mt,
                MatRef::rows(&src[b.i0 * w..], ni, w),
                F::ONE,
                F::ONE,
            ),
            Some(dd) => {
                let ws = scaled_rows(src, b.i0, b.i1, w, d, true, b.reference);
                let mut tmp = vec![F::ZERO; nj * w];
                matmul(&mut tmp, w, mt, MatRef::rows(&ws, ni, w), F::ONE, F::ZERO);
                scale_rows(&mut tmp, b.j0, b.j1, w, dd, false, b.reference);
                out[b.j0 * w..b.j1 * w]
                    .iter_mut()
                    .zip(&tmp)
                    .for_each(|(o, t)| *o += *t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocks cover every causal pair exactly once, however strong the gates.
    #[test]
    fn blocks_cover_each_causal_pair_once() {
        for (step, strict) in [
            (-0.01f64, false),
            (-3.0, false),
            (-20.0, false),
            (-20.0, true),
            (-1e30, false),
        ] {
            let (len, w) = (64, 3);
            let g: Vec<f64> = (0..len * w).map(|i| step * ((i / w) + 1) as f64).collect();
            let d = Decay::<f32> {
                left: &g,
                right: &g,
                w,
                exps: None,
            };
            let mut seen = vec![0; len * len];
            for b in blocks::<f32>(len, Some(&d), strict) {
                for i in b.i0..b.i1 {
                    for j in b.j0..b.j1 {
                        if j < i || (j == i && !strict) {
                            seen[i * len + j] += 1;
                        }
                    }
                }
            }
            for i in 0..len {
                for j in 0..len {
                    let want = usize::from(j < i || (j == i && !strict));
                    assert_eq!(seen[i * len + j], want, "pair ({i},{j}) with step {step}");
                }
            }
        }
    }
}
