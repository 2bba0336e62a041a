//! Launchers of the model's element-wise and row-wise kernels (kernels/layers.cu): RMSNorm,
//! the gated output norm, SwiGLU, the key gates, the short convolution, embeddings,
//! cross-entropy, AdamW and the squared norm, each forward and backward. Pointers are raw
//! device addresses of buffers the caller owns ([`ptr`]); a null address means "absent".

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use fla_tensor::{Error, Result};

use crate::device::{device_err, Gpu};
use crate::gla::{Buf, DType};

const SRC: &str = concat!(
    include_str!("../kernels/common.cuh"),
    "\n",
    include_str!("../kernels/layers.cu")
);
const THREADS: u32 = 256;
/// Warps per block (NW in layers.cu): the row-wise kernels give each warp whole rows.
const WARPS: usize = THREADS as usize / 32;
/// Widest row the kernels with per-column accumulators take (NT * MAXC in layers.cu).
pub const MAX_WIDTH: usize = 256 * 16;

/// The device address of an f32 buffer.
pub fn ptr(gpu: &Gpu, x: &CudaSlice<f32>) -> u64 {
    x.device_ptr(gpu.stream()).0
}

/// The device address of a buffer in the element type.
pub fn buf_ptr(gpu: &Gpu, x: &Buf) -> u64 {
    x.ptr(gpu)
}

/// One kernel argument.
#[derive(Clone, Copy)]
pub enum Arg {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// The numbers of one AdamW step: p ← p·shrink − lr·(m/c1)/(√(v/c2) + eps), where
/// shrink = 1 − lr·weight_decay, c1 = 1 − β1^t, c2 = 1 − β2^t.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f32,
    pub shrink: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub c1: f32,
    pub c2: f32,
    pub eps: f32,
    pub grad_scale: f32,
}

/// The layer kernels for one element type, each looked up once (a lookup per launch cost more
/// host time than the small kernels take on the GPU).
pub struct Layers {
    dtype: DType,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

fn width_ok(width: usize) -> Result<()> {
    if width == 0 || width > MAX_WIDTH {
        return Err(Error::Invalid(format!(
            "row width {width} is outside the layer kernels' 1..={MAX_WIDTH}"
        )));
    }
    Ok(())
}

impl Layers {
    pub fn new(dtype: DType) -> Layers {
        Layers {
            dtype,
            functions: Mutex::new(HashMap::new()),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Launches kernel `name` on `blocks` blocks of 256 threads.
    pub fn launch(&self, gpu: &Gpu, name: &str, blocks: usize, args: &[Arg]) -> Result<()> {
        let f = {
            let mut functions = self.functions.lock().unwrap();
            match functions.get(name) {
                Some(f) => f.clone(),
                None => {
                    let defines = [
                        ("USE_BF16", i64::from(self.dtype == DType::Bf16)),
                        ("NT", THREADS as i64),
                    ];
                    let f = gpu.function(SRC, name, &defines, 0)?;
                    functions.insert(name.to_string(), f.clone());
                    f
                }
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (blocks.clamp(1, 1 << 30) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = gpu.stream().launch_builder(&f);
        for a in args {
            match a {
                Arg::P(p) => launch.arg(p),
                Arg::I(i) => launch.arg(i),
                Arg::L(l) => launch.arg(l),
                Arg::F(x) => launch.arg(x),
            };
        }
        unsafe { launch.launch(cfg) }.map_err(device_err(name))?;
        Ok(())
    }

    /// Blocks for `rows` rows of a row-wise kernel: a warp per row, up to a full GPU of
    /// blocks (a block adds its parameter-gradient partials once, at its end).
    fn row_blocks(gpu: &Gpu, rows: usize) -> usize {
        rows.div_ceil(WARPS).min(gpu.sms() * 8)
    }

    /// Blocks of a grid-stride element-wise kernel over `n` elements.
    fn elem_blocks(gpu: &Gpu, n: usize) -> usize {
        n.div_ceil(THREADS as usize).min(gpu.sms() * 16)
    }

    /// y = rmsnorm(x) * w (f32 in, element type out), rstd per row.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_fwd(
        &self,
        gpu: &Gpu,
        x: u64,
        w: u64,
        y: u64,
        rstd: u64,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<()> {
        width_ok(width)?;
        let args = [
            Arg::P(x),
            Arg::P(w),
            Arg::P(y),
            Arg::P(rstd),
            Arg::I(rows as i32),
            Arg::I(width as i32),
            Arg::F(eps),
        ];
        self.launch(gpu, "rms_norm_fwd", Self::row_blocks(gpu, rows), &args)
    }

    /// dx += d/dx, dw += d/dw (dw may be null) given dy (f32); dx_io (or null) receives the
    /// new dx in the element type.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_bwd(
        &self,
        gpu: &Gpu,
        x: u64,
        w: u64,
        rstd: u64,
        dy: u64,
        dx: u64,
        dx_io: u64,
        dw: u64,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        width_ok(width)?;
        let args = [
            Arg::P(x),
            Arg::P(w),
            Arg::P(rstd),
            Arg::P(dy),
            Arg::P(dx),
            Arg::P(dx_io),
            Arg::P(dw),
            Arg::I(rows as i32),
            Arg::I(width as i32),
        ];
        self.launch(gpu, "rms_norm_bwd", Self::row_blocks(gpu, rows), &args)
    }

    /// out = rmsnorm(o) * w * silu(g) per head row (g null: no gate).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_gate_fwd(
        &self,
        gpu: &Gpu,
        o: u64,
        g: u64,
        w: u64,
        out: u64,
        rstd: u64,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<()> {
        width_ok(width)?;
        let args = [
            Arg::P(o),
            Arg::P(g),
            Arg::P(w),
            Arg::P(out),
            Arg::P(rstd),
            Arg::I(rows as i32),
            Arg::I(width as i32),
            Arg::F(eps),
        ];
        self.launch(gpu, "norm_gate_fwd", Self::row_blocks(gpu, rows), &args)
    }

    /// d_o and dg (element type, written) and dw (f32, added) from dout (element type).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_gate_bwd(
        &self,
        gpu: &Gpu,
        o: u64,
        g: u64,
        w: u64,
        rstd: u64,
        dout: u64,
        d_o: u64,
        dg: u64,
        dw: u64,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        width_ok(width)?;
        let args = [
            Arg::P(o),
            Arg::P(g),
            Arg::P(w),
            Arg::P(rstd),
            Arg::P(dout),
            Arg::P(d_o),
            Arg::P(dg),
            Arg::P(dw),
            Arg::I(rows as i32),
            Arg::I(width as i32),
        ];
        self.launch(gpu, "norm_gate_bwd", Self::row_blocks(gpu, rows), &args)
    }

    pub fn swiglu_fwd(&self, gpu: &Gpu, gate: u64, up: u64, m: u64, n: usize) -> Result<()> {
        let args = [Arg::P(gate), Arg::P(up), Arg::P(m), Arg::L(n as i64)];
        self.launch(gpu, "swiglu_fwd", Self::elem_blocks(gpu, n), &args)
    }

    /// dgate and dup from dm (all in the element type); `m` (or null) receives silu(gate) * up
    /// again.
    #[allow(clippy::too_many_arguments)]
    pub fn swiglu_bwd(
        &self,
        gpu: &Gpu,
        gate: u64,
        up: u64,
        dm: u64,
        dgate: u64,
        dup: u64,
        m: u64,
        n: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(gate),
            Arg::P(up),
            Arg::P(dm),
            Arg::P(dgate),
            Arg::P(dup),
            Arg::P(m),
            Arg::L(n as i64),
        ];
        self.launch(gpu, "swiglu_bwd", Self::elem_blocks(gpu, n), &args)
    }

    /// raw += bias (in place); g = max(logsigmoid(raw) / norm, clamp).
    #[allow(clippy::too_many_arguments)]
    pub fn gate_fwd(
        &self,
        gpu: &Gpu,
        raw: u64,
        bias: u64,
        g: u64,
        n: usize,
        width: usize,
        norm: f32,
        clamp: f32,
    ) -> Result<()> {
        let args = [
            Arg::P(raw),
            Arg::P(bias),
            Arg::P(g),
            Arg::L(n as i64),
            Arg::I(width as i32),
            Arg::F(norm),
            Arg::F(clamp),
        ];
        self.launch(gpu, "gate_fwd", Self::elem_blocks(gpu, n), &args)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn gate_bwd(
        &self,
        gpu: &Gpu,
        raw: u64,
        dg: u64,
        draw: u64,
        dbias: u64,
        rows: usize,
        width: usize,
        norm: f32,
        clamp: f32,
    ) -> Result<()> {
        width_ok(width)?;
        let args = [
            Arg::P(raw),
            Arg::P(dg),
            Arg::P(draw),
            Arg::P(dbias),
            Arg::I(rows as i32),
            Arg::I(width as i32),
            Arg::F(norm),
            Arg::F(clamp),
        ];
        self.launch(gpu, "gate_bwd", Self::row_blocks(gpu, rows), &args)
    }

    /// pre = causal depthwise conv of x [b, t, c] with w [c, width]; out = silu(pre). The
    /// rows before each sequence are zero, or `halo`'s ([b, width-1, c] f32) where not null.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_silu_fwd(
        &self,
        gpu: &Gpu,
        x: u64,
        halo: u64,
        w: u64,
        pre: u64,
        out: u64,
        (b, t, c): (usize, usize, usize),
        width: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(x),
            Arg::P(halo),
            Arg::P(w),
            Arg::P(pre),
            Arg::P(out),
            Arg::I(b as i32),
            Arg::I(t as i32),
            Arg::I(c as i32),
            Arg::I(width as i32),
        ];
        self.launch(
            gpu,
            "conv_silu_fwd",
            Self::elem_blocks(gpu, b * t * c),
            &args,
        )
    }

    /// One generation step of the convolution: x [b, c] f32, window [b, width-1, c] f32
    /// (shifted in place), out = silu(conv) in the element type.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_silu_step(
        &self,
        gpu: &Gpu,
        x: u64,
        window: u64,
        w: u64,
        out: u64,
        (b, c): (usize, usize),
        width: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(x),
            Arg::P(window),
            Arg::P(w),
            Arg::P(out),
            Arg::I(b as i32),
            Arg::I(c as i32),
            Arg::I(width as i32),
        ];
        self.launch(gpu, "conv_silu_step", Self::elem_blocks(gpu, b * c), &args)
    }

    /// dx (element type, written) and dw (f32, added) from dout (element type); where `next`
    /// ([b, width-1, c] f32) is not null, each sequence's last width-1 rows of dx add it.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_silu_bwd(
        &self,
        gpu: &Gpu,
        x: u64,
        w: u64,
        pre: u64,
        dout: u64,
        next: u64,
        dx: u64,
        dw: u64,
        (b, t, c): (usize, usize, usize),
        width: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(x),
            Arg::P(w),
            Arg::P(pre),
            Arg::P(dout),
            Arg::P(next),
            Arg::P(dx),
            Arg::P(dw),
            Arg::I(b as i32),
            Arg::I(t as i32),
            Arg::I(c as i32),
            Arg::I(width as i32),
        ];
        self.launch(
            gpu,
            "conv_silu_bwd",
            Self::elem_blocks(gpu, b * t * c),
            &args,
        )
    }

    /// The halo's gradient dhalo ([b, width-1, c] f32, written) through the first outputs of
    /// [`Layers::conv_silu_fwd`] with that halo, and its terms of dw (added).
    #[allow(clippy::too_many_arguments)]
    pub fn conv_silu_halo_bwd(
        &self,
        gpu: &Gpu,
        halo: u64,
        w: u64,
        pre: u64,
        dout: u64,
        dhalo: u64,
        dw: u64,
        (b, t, c): (usize, usize, usize),
        width: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(halo),
            Arg::P(w),
            Arg::P(pre),
            Arg::P(dout),
            Arg::P(dhalo),
            Arg::P(dw),
            Arg::I(b as i32),
            Arg::I(t as i32),
            Arg::I(c as i32),
            Arg::I(width as i32),
        ];
        let n = b * (width - 1) * c;
        self.launch(gpu, "conv_silu_halo_bwd", Self::elem_blocks(gpu, n), &args)
    }

    pub fn embed_fwd(
        &self,
        gpu: &Gpu,
        ids: u64,
        e: u64,
        x: u64,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(ids),
            Arg::P(e),
            Arg::P(x),
            Arg::I(rows as i32),
            Arg::I(width as i32),
        ];
        self.launch(
            gpu,
            "embed_fwd",
            Self::elem_blocks(gpu, rows * width),
            &args,
        )
    }

    pub fn embed_bwd(
        &self,
        gpu: &Gpu,
        ids: u64,
        dx: u64,
        de: u64,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let args = [
            Arg::P(ids),
            Arg::P(dx),
            Arg::P(de),
            Arg::I(rows as i32),
            Arg::I(width as i32),
        ];
        self.launch(
            gpu,
            "embed_bwd",
            Self::elem_blocks(gpu, rows * width),
            &args,
        )
    }

    /// Per-row losses of f32 logits, and d(mean loss)/d logits in the element type
    /// (`scale` = 1 / count); one block per row.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy(
        &self,
        gpu: &Gpu,
        logits: u64,
        targets: u64,
        loss: u64,
        dlogits: u64,
        rows: usize,
        vocab: usize,
        scale: f32,
    ) -> Result<()> {
        let args = [
            Arg::P(logits),
            Arg::P(targets),
            Arg::P(loss),
            Arg::P(dlogits),
            Arg::I(rows as i32),
            Arg::I(vocab as i32),
            Arg::F(scale),
        ];
        self.launch(gpu, "cross_entropy", rows, &args)
    }

    /// One AdamW update of `n` f32 weights `p` from `grad` (times `h.grad_scale`, for
    /// clipping); `copy` (or null) receives the new weights in the element type.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        gpu: &Gpu,
        p: u64,
        grad: u64,
        m: u64,
        v: u64,
        copy: u64,
        n: usize,
        h: &AdamStep,
    ) -> Result<()> {
        let args = [
            Arg::P(p),
            Arg::P(grad),
            Arg::P(m),
            Arg::P(v),
            Arg::P(copy),
            Arg::L(n as i64),
            Arg::F(h.lr),
            Arg::F(h.shrink),
            Arg::F(h.beta1),
            Arg::F(h.beta2),
            Arg::F(h.c1),
            Arg::F(h.c2),
            Arg::F(h.eps),
            Arg::F(h.grad_scale),
        ];
        self.launch(gpu, "adamw", Self::elem_blocks(gpu, n), &args)
    }

    /// y = x (f32) in the element type, `n` elements.
    pub fn narrow(&self, gpu: &Gpu, x: u64, y: u64, n: usize) -> Result<()> {
        let args = [Arg::P(x), Arg::P(y), Arg::L(n as i64)];
        self.launch(gpu, "narrow", Self::elem_blocks(gpu, n), &args)
    }

    /// Σ x² written into `out` (one f32), the same bits for the same x: per-block sums, then
    /// their sum in order.
    pub fn sum_squares(&self, gpu: &Gpu, x: u64, out: u64, n: usize) -> Result<()> {
        let blocks = Self::elem_blocks(gpu, n).max(1);
        let partials = crate::gla::uninit::<f32>(gpu, blocks)?;
        let p = ptr(gpu, &partials);
        self.launch(
            gpu,
            "sum_squares",
            blocks,
            &[Arg::P(x), Arg::P(p), Arg::L(n as i64)],
        )?;
        self.launch(
            gpu,
            "sum_partials",
            1,
            &[Arg::P(p), Arg::P(out), Arg::I(blocks as i32)],
        )
    }
}
