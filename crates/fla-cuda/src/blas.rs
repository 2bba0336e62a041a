//! Dense matrix products through cuBLAS on row-major device buffers: bf16 or f32 inputs,
//! f32 accumulation (no TF32: f32 products are f32 products), output in either type.

use cudarc::cublas::{result as cublas_result, sys as cublas_sys, CudaBlas};
use fla_tensor::{Error, Result};

use crate::device::Gpu;
use crate::gla::{Buf, DType};

/// A cuBLAS handle on the GPU's stream.
pub struct Blas {
    blas: CudaBlas,
}

/// One operand of [`Blas::matmul`]: a row-major matrix starting `off` elements into a
/// buffer, read transposed when `t`.
pub struct Operand<'a> {
    pub buf: &'a Buf,
    pub t: bool,
    pub off: usize,
}

impl<'a> Operand<'a> {
    pub fn new(buf: &'a Buf, t: bool) -> Operand<'a> {
        Operand { buf, t, off: 0 }
    }

    /// The same operand starting `off` elements in.
    pub fn at(self, off: usize) -> Operand<'a> {
        Operand { off, ..self }
    }
}

fn cuda_type(d: DType) -> cublas_sys::cudaDataType {
    match d {
        DType::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
        DType::Bf16 => cublas_sys::cudaDataType::CUDA_R_16BF,
    }
}

impl Blas {
    pub fn new(gpu: &Gpu) -> Result<Blas> {
        let blas = CudaBlas::new(gpu.stream().clone())
            .map_err(|e| Error::Device(format!("cannot open cuBLAS: {e:?}")))?;
        Ok(Blas { blas })
    }

    /// `c = alpha · op(a) op(b) + beta · c` with op(a) [m, k], op(b) [k, n] and c [m, n], all
    /// row-major and contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        gpu: &Gpu,
        a: Operand,
        b: Operand,
        c: &mut Buf,
        dims: (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.matmul_at(gpu, a, b, c, 0, dims, alpha, beta)
    }

    /// [`Blas::matmul`] into c starting `c_off` elements into its buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_at(
        &self,
        gpu: &Gpu,
        a: Operand,
        b: Operand,
        c: &mut Buf,
        c_off: usize,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if a.buf.len() < a.off + m * k || b.buf.len() < b.off + k * n || c.len() < c_off + m * n {
            return Err(Error::Invalid(format!(
                "matmul of [{m}, {k}] by [{k}, {n}]: buffers of {}, {} and {} elements are too small",
                a.buf.len(),
                b.buf.len(),
                c.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let dim = |x: usize| {
            i32::try_from(x).map_err(|_| Error::Invalid(format!("matmul size {x} exceeds 2^31")))
        };
        // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets B first. A row-major
        // [r, c] buffer is a column-major [c, r] matrix with leading dimension c.
        let op = |t: bool| {
            if t {
                cublas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                cublas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ldb = if b.t { k } else { n };
        let lda = if a.t { m } else { k };
        let bytes = |d: DType, off: usize| (off * d.bytes()) as u64;
        let pa = a.buf.ptr(gpu) + bytes(a.buf.dtype(), a.off);
        let pb = b.buf.ptr(gpu) + bytes(b.buf.dtype(), b.off);
        let (ta, tb) = (cuda_type(a.buf.dtype()), cuda_type(b.buf.dtype()));
        let tc = cuda_type(c.dtype());
        let pc = c.ptr_mut(gpu) + bytes(c.dtype(), c_off);
        // SAFETY: the sizes were checked against the buffers above; cuBLAS runs on the
        // GPU's stream, ordered with every other launch.
        unsafe {
            cublas_result::gemm_ex(
                *self.blas.handle(),
                op(b.t),
                op(a.t),
                dim(n)?,
                dim(m)?,
                dim(k)?,
                (&alpha) as *const f32 as *const _,
                pb as *const _,
                tb,
                dim(ldb)?,
                pa as *const _,
                ta,
                dim(lda)?,
                (&beta) as *const f32 as *const _,
                pc as *mut _,
                tc,
                dim(n)?,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Device(format!("cuBLAS matmul [{m}, {k}] x [{k}, {n}]: {e:?}")))
    }
}
