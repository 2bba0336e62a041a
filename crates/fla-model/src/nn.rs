//! The layers of the model on the CPU, each a forward and a backward on row-major slices.
//! Backward functions add into their gradient outputs, so shared inputs accumulate.

use fla_ops::linalg::{matmul_par, MatRef};
use fla_tensor::Real;

fn parallelism(flops: usize) -> gemm::Parallelism {
    if flops >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

/// `y = x W^T` for `x` [n, i] and a PyTorch Linear weight `w` [o, i]: y [n, o].
pub fn linear<F: Real>(x: &[F], n: usize, w: &[F], o: usize) -> Vec<F> {
    let i = w.len() / o.max(1);
    let mut y = vec![F::ZERO; n * o];
    matmul_par(
        &mut y,
        o,
        MatRef::rows(x, n, i),
        MatRef::rows(w, o, i).t(),
        F::ONE,
        F::ZERO,
        parallelism(n * o * i),
    );
    y
}

/// Backward of [`linear`]: `dx += dy W`, `dw += dy^T x`.
pub fn linear_back<F: Real>(x: &[F], n: usize, w: &[F], dy: &[F], dx: &mut [F], dw: &mut [F]) {
    let o = dy.len() / n.max(1);
    let i = w.len() / o.max(1);
    let par = parallelism(n * o * i);
    matmul_par(
        dx,
        i,
        MatRef::rows(dy, n, o),
        MatRef::rows(w, o, i),
        F::ONE,
        F::ONE,
        par,
    );
    matmul_par(
        dw,
        i,
        MatRef::rows(dy, n, o).t(),
        MatRef::rows(x, n, i),
        F::ONE,
        F::ONE,
        par,
    );
}

/// RMSNorm over rows of `width`: `y = x / sqrt(mean(x^2) + eps) * w`. Returns y and each
/// row's 1/rms for the backward.
pub fn rms_norm<F: Real>(x: &[F], width: usize, w: Option<&[F]>, eps: f64) -> (Vec<F>, Vec<F>) {
    let mut y = vec![F::ZERO; x.len()];
    let mut rstd = Vec::with_capacity(x.len() / width);
    for (xr, yr) in x.chunks(width).zip(y.chunks_mut(width)) {
        let ms = xr.iter().map(|&v| v * v).sum::<F>() / F::from_f64(width as f64);
        let r = F::ONE / (ms + F::from_f64(eps)).sqrt();
        rstd.push(r);
        for (j, (yv, &xv)) in yr.iter_mut().zip(xr).enumerate() {
            *yv = xv * r * w.map_or(F::ONE, |w| w[j]);
        }
    }
    (y, rstd)
}

/// Backward of [`rms_norm`]: with `ŵ = w ⊙ dy`, `dx += r ŵ - x r^3 mean(x ⊙ ŵ)`,
/// `dw += Σ_rows dy ⊙ x r`.
pub fn rms_norm_back<F: Real>(
    x: &[F],
    width: usize,
    w: Option<&[F]>,
    rstd: &[F],
    dy: &[F],
    dx: &mut [F],
    mut dw: Option<&mut [F]>,
) {
    for (row, &r) in rstd.iter().enumerate() {
        let span = row * width..(row + 1) * width;
        let (xr, dyr) = (&x[span.clone()], &dy[span.clone()]);
        let wd = |j: usize| dyr[j] * w.map_or(F::ONE, |w| w[j]);
        let dot = (0..width).map(|j| xr[j] * wd(j)).sum::<F>() / F::from_f64(width as f64);
        let dxr = &mut dx[span];
        for j in 0..width {
            dxr[j] += r * wd(j) - xr[j] * r * r * r * dot;
        }
        if let Some(dw) = dw.as_deref_mut() {
            for j in 0..width {
                dw[j] += dyr[j] * xr[j] * r;
            }
        }
    }
}

pub fn sigmoid<F: Real>(x: F) -> F {
    F::ONE / (F::ONE + (-x).exp())
}

pub fn silu<F: Real>(x: F) -> F {
    x * sigmoid(x)
}

/// d silu / dx = σ(x) (1 + x (1 - σ(x))).
pub fn silu_grad<F: Real>(x: F) -> F {
    let s = sigmoid(x);
    s * (F::ONE + x * (F::ONE - s))
}

/// log σ(x) = min(x, 0) - log(1 + e^-|x|), without overflow; its derivative is σ(-x).
pub fn log_sigmoid<F: Real>(x: F) -> F {
    x.min(F::ZERO) - (F::ONE + (-x.abs()).exp()).ln()
}

/// Depthwise causal convolution, per sequence of `t` rows of `c` channels, with fla's
/// `ShortConvolution` weight [c, 1, width]: `y[s, ch] = Σ_i w[ch, i] x[s - width + 1 + i, ch]`.
/// Rows before a sequence's start come from `prefix` (each sequence's last `width - 1` earlier
/// rows, oldest first: the generation cache) or are zero.
pub fn causal_conv<F: Real>(x: &[F], t: usize, c: usize, w: &[F], prefix: Option<&[F]>) -> Vec<F> {
    let width = w.len() / c;
    let past = (width - 1) * c;
    let mut y = vec![F::ZERO; x.len()];
    for (seq, (xs, ys)) in x.chunks(t * c).zip(y.chunks_mut(t * c)).enumerate() {
        for s in 0..t {
            for i in 0..width {
                let row = match ((s + i + 1).checked_sub(width), prefix) {
                    (Some(src), _) => &xs[src * c..(src + 1) * c],
                    (None, Some(p)) => {
                        let at = seq * past + (s + i) * c;
                        &p[at..at + c]
                    }
                    (None, None) => continue,
                };
                for ch in 0..c {
                    ys[s * c + ch] += w[ch * width + i] * row[ch];
                }
            }
        }
    }
    y
}

/// The `width - 1` rows before the next token, per sequence: the last rows of `prefix`
/// followed by `x` ([B, t, c]).
pub fn conv_window<F: Real>(prefix: &[F], x: &[F], t: usize, c: usize, width: usize) -> Vec<F> {
    let past = (width - 1) * c;
    let mut out = Vec::with_capacity(prefix.len());
    for (p, xs) in prefix.chunks(past.max(1)).zip(x.chunks(t * c)) {
        let joined: Vec<F> = p[..past].iter().chain(xs).copied().collect();
        out.extend_from_slice(&joined[joined.len() - past..]);
    }
    out
}

/// Backward of [`causal_conv`] without a prefix (training).
pub fn causal_conv_back<F: Real>(
    x: &[F],
    t: usize,
    c: usize,
    w: &[F],
    dy: &[F],
    dx: &mut [F],
    dw: &mut [F],
) {
    let width = w.len() / c;
    for ((xs, dys), dxs) in x
        .chunks(t * c)
        .zip(dy.chunks(t * c))
        .zip(dx.chunks_mut(t * c))
    {
        for s in 0..t {
            for i in 0..width {
                let Some(src) = (s + i + 1).checked_sub(width) else {
                    continue;
                };
                for ch in 0..c {
                    let g = dys[s * c + ch];
                    dxs[src * c + ch] += w[ch * width + i] * g;
                    dw[ch * width + i] += xs[src * c + ch] * g;
                }
            }
        }
    }
}

/// Mean cross-entropy of `logits` [n, vocab] against `targets` (negative: ignored, as
/// PyTorch's ignore_index -100). Returns the loss (NaN when no target counts, as PyTorch)
/// and d loss / d logits.
pub fn cross_entropy<F: Real>(logits: &[F], vocab: usize, targets: &[i64]) -> (f64, Vec<F>) {
    let count = targets.iter().filter(|&&t| t >= 0).count();
    let mut dlogits = vec![F::ZERO; logits.len()];
    if count == 0 {
        return (f64::NAN, dlogits);
    }
    let inv = 1.0 / count as f64;
    let mut total = 0.0f64;
    for ((row, drow), &target) in logits
        .chunks(vocab)
        .zip(dlogits.chunks_mut(vocab))
        .zip(targets)
    {
        if target < 0 {
            continue;
        }
        let max = row
            .iter()
            .fold(F::from_f64(f64::NEG_INFINITY), |m, &v| m.max(v));
        let sum: F = row.iter().map(|&v| (v - max).exp()).sum();
        let lse = max + sum.ln();
        total += (lse - row[target as usize]).to_f64();
        for (d, &v) in drow.iter_mut().zip(row) {
            *d = (v - lse).exp() * F::from_f64(inv);
        }
        drow[target as usize] -= F::from_f64(inv);
    }
    (total * inv, dlogits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences of a scalar function of one vector, against its analytic gradient.
    fn check_grad(x: &[f64], f: impl Fn(&[f64]) -> f64, grad: &[f64]) {
        for i in 0..x.len() {
            let (mut a, mut b) = (x.to_vec(), x.to_vec());
            a[i] += 1e-6;
            b[i] -= 1e-6;
            let fd = (f(&a) - f(&b)) / 2e-6;
            assert!(
                (fd - grad[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{i}: fd {fd} vs {}",
                grad[i]
            );
        }
    }

    fn vals(n: usize, seed: f64) -> Vec<f64> {
        (0..n).map(|i| ((i as f64 + seed) * 0.731).sin()).collect()
    }

    #[test]
    fn rms_norm_gradients() {
        let (x, w, dy) = (vals(12, 1.0), vals(4, 2.0), vals(12, 3.0));
        let loss = |x: &[f64], w: &[f64]| {
            let (y, _) = rms_norm(x, 4, Some(w), 1e-6);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
        };
        let (_, r) = rms_norm(&x, 4, Some(&w), 1e-6);
        let (mut dx, mut dw) = (vec![0.0; 12], vec![0.0; 4]);
        rms_norm_back(&x, 4, Some(&w), &r, &dy, &mut dx, Some(&mut dw));
        check_grad(&x, |x| loss(x, &w), &dx);
        check_grad(&w, |w| loss(&x, w), &dw);
    }

    #[test]
    fn conv_gradients_and_step() {
        let (t, c) = (5, 3);
        let (x, w, dy) = (vals(2 * t * c, 1.0), vals(c * 4, 2.0), vals(2 * t * c, 3.0));
        let loss = |x: &[f64], w: &[f64]| {
            causal_conv(x, t, c, w, None)
                .iter()
                .zip(&dy)
                .map(|(a, b)| a * b)
                .sum::<f64>()
        };
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        causal_conv_back(&x, t, c, &w, &dy, &mut dx, &mut dw);
        check_grad(&x, |x| loss(x, &w), &dx);
        check_grad(&w, |w| loss(&x, w), &dw);
        // Two sequences run in two pieces through the window give the same outputs.
        let y = causal_conv(&x, t, c, &w, None);
        let (a, b) = (2, t - 2);
        let split =
            |s: usize, lo: usize, len: usize| x[(s * t + lo) * c..(s * t + lo + len) * c].to_vec();
        let first: Vec<f64> = [split(0, 0, a), split(1, 0, a)].concat();
        let second: Vec<f64> = [split(0, a, b), split(1, a, b)].concat();
        let zeros = vec![0.0; 2 * 3 * c];
        let y1 = causal_conv(&first, a, c, &w, Some(&zeros));
        let window = conv_window(&zeros, &first, a, c, 4);
        let y2 = causal_conv(&second, b, c, &w, Some(&window));
        for s in 0..2 {
            let got = [
                &y1[s * a * c..(s + 1) * a * c],
                &y2[s * b * c..(s + 1) * b * c],
            ]
            .concat();
            let want = &y[s * t * c..(s + 1) * t * c];
            assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12));
        }
    }

    #[test]
    fn cross_entropy_gradient_and_ignore() {
        let logits = vals(12, 1.0);
        let targets = [2i64, -100, 0];
        let (_, d) = cross_entropy(&logits, 4, &targets);
        check_grad(&logits, |l| cross_entropy(l, 4, &targets).0, &d);
        assert!(d[4..8].iter().all(|&v| v == 0.0));
        assert!(cross_entropy(&logits, 4, &[-100, -100, -100]).0.is_nan());
        assert!((log_sigmoid(-800.0f64) + 800.0).abs() < 1e-9 && log_sigmoid(800.0f64) == 0.0);
    }
}
