//! Small dense matrix products through the `gemm` crate, on strided views.

use fla_tensor::Real;

/// A read-only strided view of a `rows x cols` matrix: element (i, j) is `data[i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, F> {
    pub data: &'a [F],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, F> MatRef<'a, F> {
    /// A row-major matrix whose rows are `cols` apart.
    pub fn rows(data: &'a [F], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = beta·dst + alpha·(a b)` with `dst` row-major `a.rows x b.cols` (rows `ld` apart);
/// `beta` is 0 or 1. Single-threaded: callers parallelise over heads and chunks.
pub fn matmul<F: Real>(
    dst: &mut [F],
    ld: usize,
    a: MatRef<'_, F>,
    b: MatRef<'_, F>,
    alpha: F,
    beta: F,
) {
    matmul_par(dst, ld, a, b, alpha, beta, gemm::Parallelism::None)
}

/// [`matmul`] with the parallelism of the `gemm` crate chosen by the caller.
pub fn matmul_par<F: Real>(
    dst: &mut [F],
    ld: usize,
    a: MatRef<'_, F>,
    b: MatRef<'_, F>,
    alpha: F,
    beta: F,
    par: gemm::Parallelism,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(k, b.rows, "matmul: inner dimensions differ");
    assert!(a.fits() && b.fits(), "matmul: view out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * ld + n <= dst.len(),
        "matmul: dst too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == F::ZERO {
            for i in 0..m {
                dst[i * ld..i * ld + n].fill(F::ZERO);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index of a, b and dst inside its slice, and the
    // borrow checker guarantees dst does not alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            beta != F::ZERO,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_loops_with_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.91).cos()).collect(); // n x k
        let mut c = vec![1.0; m * n];
        matmul(
            &mut c,
            n,
            MatRef::rows(&a, m, k),
            MatRef::rows(&bt, n, k).t(),
            2.0,
            1.0,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f64 =
                    1.0 + 2.0 * (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum::<f64>();
                assert!((c[i * n + j] - want).abs() < 1e-12);
            }
        }
    }
}
