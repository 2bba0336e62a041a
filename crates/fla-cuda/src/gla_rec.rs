//! The recurrent form on the GPU (kernels/gla_rec.cu): forward and backward one token at a
//! time (for checking the chunk kernels, and for short sequences), and [`Decoder`], the
//! batched single-token step that generation runs with the states kept on the device.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use fla_ops::GateKind;
use fla_tensor::{Error, Result, Tensor};

use crate::device::{device_err, Gpu};
use crate::gla::{check_head_sizes, opt_ptr, Buf, DType, DeviceGla, NT};
use crate::gla_bwd::{ptr_mut, zeros, DeviceGrads, DeviceUpstream, Work};

const REC: &str = concat!(
    include_str!("../kernels/common.cuh"),
    "\n",
    include_str!("../kernels/gla_rec.cu")
);
/// Tokens per segment of the backward's gate-gradient sums (SEG in the kernel; a multiple of
/// every staging size).
const SEGMENT: usize = 64;
/// Shared memory a recurrent kernel may take: small enough for two blocks per SM everywhere.
const SMEM_BUDGET: usize = 96 * 1024;

/// The state columns each block holds (BV in the kernel).
fn state_cols(dv: usize) -> usize {
    if dv.is_multiple_of(32) {
        32
    } else {
        16
    }
}

/// Shared memory of the recurrent kernels for RC staged tokens; the same sum as the OFF_*
/// chain of gla_rec.cu.
fn rec_smem(rc: usize, dk: usize, bv: usize, gate: GateKind) -> usize {
    let kg = NT as usize / bv;
    let gate_width = match gate {
        GateKind::None => 0,
        GateKind::Scalar => 1,
        _ => dk,
    };
    let value_gate = if gate == GateKind::Both { bv } else { 0 };
    4 * rc * (3 * dk + gate_width + 2 * bv + value_gate + 2 + kg * bv)
}

/// Tokens staged at a time: the most that fit the budget, at most 32 and no more than the
/// longest sequence needs.
fn staged_tokens(gpu: &Gpu, dk: usize, bv: usize, gate: GateKind, longest: usize) -> usize {
    let budget = SMEM_BUDGET.min(gpu.max_smem());
    let mut rc = longest.next_power_of_two().clamp(1, 32);
    while rc > 1 && rec_smem(rc, dk, bv, gate) > budget {
        rc /= 2;
    }
    rc
}

/// The -D settings of the recurrent kernels.
fn rec_defines(
    dtype: DType,
    gate: GateKind,
    (dk, dv): (usize, usize),
    rc: usize,
    has_h0: bool,
    has_dht: bool,
) -> Vec<(&'static str, i64)> {
    vec![
        ("USE_BF16", i64::from(dtype == DType::Bf16)),
        ("NT", NT as i64),
        ("HEAD_K", dk as i64),
        ("HEAD_V", dv as i64),
        ("BV", state_cols(dv) as i64),
        ("RC", rc as i64),
        ("HAS_G", i64::from(gate != GateKind::None)),
        ("G_SCALAR", i64::from(gate == GateKind::Scalar)),
        ("HAS_GV", i64::from(gate == GateKind::Both)),
        ("HAS_U", i64::from(gate == GateKind::KeyBonus)),
        ("HAS_H0", i64::from(has_h0)),
        ("HAS_DHT", i64::from(has_dht)),
        ("SEG", SEGMENT as i64),
    ]
}

/// Launches `name` on a (V tiles, heads, sequences) grid with device addresses `ptrs`, then
/// the head count and the scale.
fn launch(
    gpu: &Gpu,
    name: &str,
    defines: &[(&str, i64)],
    smem: usize,
    grid: (usize, usize, usize),
    ptrs: &[u64],
    (h, scale): (i32, f32),
) -> Result<()> {
    let f = gpu.function(REC, name, defines, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (NT, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let mut l = gpu.stream.launch_builder(&f);
    for p in ptrs {
        l.arg(p);
    }
    l.arg(&h).arg(&scale);
    unsafe { l.launch(cfg) }.map_err(device_err("recurrent kernel launch"))?;
    Ok(())
}

/// f32 `x` into `y` in its element type (a copy in the f32 build).
fn cast_into(gpu: &Gpu, x: &CudaSlice<f32>, y: &mut Buf) -> Result<()> {
    match y {
        Buf::F32(y) => gpu
            .stream
            .memcpy_dtod(x, y)
            .map_err(device_err("device copy")),
        Buf::Bf16(_) => {
            let xp = x.device_ptr(&gpu.stream).0;
            launch_cast(gpu, "rec_cast", xp, y.ptr_mut(gpu), x.len())
        }
    }
}

/// `x` as f32, exactly (a copy of an f32 buffer).
pub(crate) fn widened(gpu: &Gpu, x: &Buf) -> Result<CudaSlice<f32>> {
    match x {
        Buf::F32(x) => gpu.stream.clone_dtod(x).map_err(device_err("device copy")),
        Buf::Bf16(_) => {
            let mut y = crate::gla::uninit(gpu, x.len().max(1))?;
            let yp = y.device_ptr_mut(&gpu.stream).0;
            launch_cast(gpu, "widen", x.ptr(gpu), yp, x.len())?;
            Ok(y)
        }
    }
}

/// One of cast.cu's kernels between f32 and bf16 over `n` elements.
fn launch_cast(gpu: &Gpu, name: &str, x: u64, y: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let n = i32::try_from(n).map_err(|_| Error::Invalid("over 2^31 elements to cast".into()))?;
    let defines = [("USE_BF16", 1), ("NT", NT as i64)];
    let f = gpu.function(REC_CAST, name, &defines, 0)?;
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(NT).min(4096), 1, 1),
        block_dim: (NT, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&x).arg(&y).arg(&n);
    unsafe { l.launch(cfg) }.map_err(device_err(name))?;
    Ok(())
}

/// The cast kernel alone (gla_rec.cu needs shape settings the cast does not).
const REC_CAST: &str = concat!(
    include_str!("../kernels/common.cuh"),
    "\n",
    include_str!("../kernels/cast.cu")
);

impl DeviceGla {
    fn rec_setup(&self, gpu: &Gpu, has_dht: bool) -> (Vec<(&'static str, i64)>, usize) {
        let bv = state_cols(self.dv);
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        let rc = staged_tokens(gpu, self.dk, bv, self.gate, longest);
        let defines = rec_defines(
            self.dtype,
            self.gate,
            (self.dk, self.dv),
            rc,
            self.h0.is_some(),
            has_dht,
        );
        (defines, rec_smem(rc, self.dk, bv, self.gate))
    }

    fn rec_grid(&self) -> (usize, usize, usize) {
        (self.dv / state_cols(self.dv), self.h, self.n_seqs)
    }

    /// The forward in the recurrent form: o and ht, like [`DeviceGla::forward`].
    pub fn forward_recurrent(&mut self, gpu: &Gpu) -> Result<()> {
        self.widen_gates(gpu)?;
        let (defines, smem) = self.rec_setup(gpu, false);
        let [q, k, v, g, gv, u, h0] = self.input_ptrs(gpu);
        let o = self.o.ptr_mut(gpu);
        let ht = self.ht.device_ptr_mut(&gpu.stream).0;
        let cu = self.cu_seqlens.device_ptr(&gpu.stream).0;
        let ptrs = [q, k, v, g, gv, u, h0, o, ht, cu];
        let hs = (self.h as i32, self.scale);
        launch(
            gpu,
            "gla_rec_fwd",
            &defines,
            smem,
            self.rec_grid(),
            &ptrs,
            hs,
        )?;
        self.forward_done = true;
        Ok(())
    }

    /// The backward in the recurrent form, from the inputs alone (it recomputes the states;
    /// no forward needed): every gradient, read back by [`DeviceGla::gradients`].
    /// Takes (B T / 64 + N) H K V f32 of checkpoints with a gate.
    pub fn backward_recurrent(&mut self, gpu: &Gpu, up: &DeviceUpstream) -> Result<()> {
        self.widen_gates(gpu)?;
        let (defines, smem) = self.rec_setup(gpu, up.dht.is_some());
        if !matches!(
            self.grads,
            Some(DeviceGrads {
                work: Work::Recurrent { .. },
                ..
            })
        ) {
            let n = self.b * self.t * self.h * self.dk;
            let segments = self.b * self.t / SEGMENT + self.n_seqs;
            let has_gate = self.gate != GateKind::None;
            let work = Work::Recurrent {
                dq: zeros(gpu, n)?,
                dk: zeros(gpu, n)?,
                ckpt: has_gate
                    .then(|| zeros(gpu, (segments * self.h * self.dk * self.dv).max(1)))
                    .transpose()?,
            };
            self.grads = Some(self.alloc_grads(gpu, work)?);
        }
        let s = &gpu.stream;
        let [q, k, v, g, gv, u, h0] = self.input_ptrs(gpu);
        let (grid, hs) = (self.rec_grid(), (self.h as i32, self.scale));
        let gr = self.grads.as_mut().expect("allocated above");
        let Work::Recurrent {
            dq: dq32,
            dk: dk32,
            ckpt,
        } = &mut gr.work
        else {
            unreachable!("recurrent work allocated above")
        };
        // Sums over V tiles accumulate into these.
        let optional = [&mut gr.qdq, &mut gr.dg_scalar, &mut gr.du];
        for x in [&mut *dq32, &mut *dk32]
            .into_iter()
            .chain(optional.into_iter().flatten())
        {
            s.memset_zeros(x).map_err(device_err("memset"))?;
        }
        if let Some(x) = gr.dgk.as_mut() {
            x.zero(gpu)?;
        }
        let (d_o, dht) = (up.d_o.ptr(gpu), opt_ptr(&up.dht, gpu));
        let cu = self.cu_seqlens.device_ptr(s).0;
        let ckpt = ptr_mut(ckpt, gpu);
        let ond = self.ond.as_mut().map_or(0, |b| b.device_ptr_mut(s).0);
        let (dqp, dkp) = (dq32.device_ptr_mut(s).0, dk32.device_ptr_mut(s).0);
        let qdq = ptr_mut(&mut gr.qdq, gpu);
        let dg = match self.gate {
            GateKind::Scalar => ptr_mut(&mut gr.dg_scalar, gpu),
            _ => gr.dgk.as_mut().map_or(0, |x| x.ptr_mut(gpu)),
        };
        let (dgv, du, dh0) = (
            ptr_mut(&mut gr.dgv, gpu),
            ptr_mut(&mut gr.du, gpu),
            ptr_mut(&mut gr.dh0, gpu),
        );
        let dv = gr.dv.ptr_mut(gpu);
        let ptrs = [q, k, v, g, gv, u, h0, d_o, dqp, qdq, ond, du, ckpt, cu];
        launch(gpu, "gla_rec_dq", &defines, smem, grid, &ptrs, hs)?;
        let ptrs = [
            q, k, v, g, gv, u, d_o, dht, ckpt, qdq, ond, dkp, dv, dg, dgv, dh0, cu,
        ];
        launch(gpu, "gla_rec_dkv", &defines, smem, grid, &ptrs, hs)?;
        cast_into(gpu, dq32, &mut gr.dq)?;
        cast_into(gpu, dk32, &mut gr.dk)?;
        Ok(())
    }
}

/// Generation's recurrent states on the GPU, one K x V state (f32) per (sequence, head), and
/// the batched step: one token per sequence in, the states updated in place, that token's
/// output out. Tensors of one step are [B, H, D] (fla's [B, 1, H, D]); gates f32.
pub struct Decoder {
    gate: GateKind,
    dtype: DType,
    batch: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    state: CudaSlice<f32>,
    cu_seqlens: CudaSlice<i32>,
}

/// The inputs of one decode step on the device: q, k [B,H,K] and v [B,H,V] in the decoder's
/// dtype, g [B,H,K] (scalar gate: [B,H]) and gv [B,H,V] f32, u [H,K] f32, as the gate needs.
pub struct StepInputs<'a> {
    pub q: &'a Buf,
    pub k: &'a Buf,
    pub v: &'a Buf,
    pub g: Option<&'a CudaSlice<f32>>,
    pub gv: Option<&'a CudaSlice<f32>>,
    pub u: Option<&'a CudaSlice<f32>>,
}

impl Decoder {
    /// Zero states for `batch` sequences of `heads` heads; `scale` multiplies q·k.
    pub fn new(
        gpu: &Gpu,
        gate: GateKind,
        (batch, heads): (usize, usize),
        (dk, dv): (usize, usize),
        scale: f32,
        dtype: DType,
    ) -> Result<Decoder> {
        check_head_sizes(dk, dv)?;
        if batch == 0 || heads == 0 {
            return Err(Error::Invalid(
                "a decoder needs at least one sequence and one head".into(),
            ));
        }
        let cu: Vec<i32> = (0..=batch as i32).collect();
        let s = &gpu.stream;
        Ok(Decoder {
            gate,
            dtype,
            batch,
            heads,
            dk,
            dv,
            scale,
            state: zeros(gpu, batch * heads * dk * dv)?,
            cu_seqlens: s.clone_htod(&cu).map_err(device_err("upload"))?,
        })
    }

    /// Replaces the states with `h` [B,H,K,V] (the final states of a prefill).
    pub fn set_state(&mut self, gpu: &Gpu, h: &Tensor<f32>) -> Result<()> {
        h.expect_shape(
            "state",
            &[self.batch, self.heads, self.dk, self.dv],
            "[B, H, K, V]",
        )?;
        gpu.stream
            .memcpy_htod(h.data(), &mut self.state)
            .map_err(device_err("upload"))
    }

    /// The states [B,H,K,V] as a host tensor.
    pub fn state(&self, gpu: &Gpu) -> Result<Tensor<f32>> {
        let x = gpu
            .stream
            .clone_dtoh(&self.state)
            .map_err(device_err("download"))?;
        Tensor::new(vec![self.batch, self.heads, self.dk, self.dv], x)
    }

    /// One token per sequence: states updated in place, the output into `o` [B,H,V].
    pub fn step(&mut self, gpu: &Gpu, x: &StepInputs, o: &mut Buf) -> Result<()> {
        let (b, h, dk, dv) = (self.batch, self.heads, self.dk, self.dv);
        let gate_len = if self.gate == GateKind::Scalar {
            b * h
        } else {
            b * h * dk
        };
        let checks: [(&str, Option<usize>, usize, bool); 7] = [
            ("q", Some(x.q.len()), b * h * dk, x.q.dtype() == self.dtype),
            ("k", Some(x.k.len()), b * h * dk, x.k.dtype() == self.dtype),
            ("v", Some(x.v.len()), b * h * dv, x.v.dtype() == self.dtype),
            ("o", Some(o.len()), b * h * dv, o.dtype() == self.dtype),
            ("g", x.g.map(|g| g.len()), gate_len, true),
            ("gv", x.gv.map(|g| g.len()), b * h * dv, true),
            ("u", x.u.map(|u| u.len()), h * dk, true),
        ];
        let needed = |name: &str| match name {
            "g" => self.gate != GateKind::None,
            "gv" => self.gate == GateKind::Both,
            "u" => self.gate == GateKind::KeyBonus,
            _ => true,
        };
        for (name, len, want, dtype_ok) in checks {
            match (len, needed(name)) {
                (Some(n), true) if n != want => {
                    return Err(Error::Invalid(format!(
                        "decode step: `{name}` has {n} elements, expected {want}"
                    )))
                }
                (Some(_), true) if !dtype_ok => {
                    return Err(Error::Invalid(format!(
                        "decode step: `{name}` is not {:?}",
                        self.dtype
                    )))
                }
                (None, true) => {
                    return Err(Error::Invalid(format!(
                        "decode step: gate kind {} needs `{name}`",
                        self.gate
                    )))
                }
                (Some(_), false) => {
                    return Err(Error::Invalid(format!(
                        "decode step: gate kind {} takes no `{name}`",
                        self.gate
                    )))
                }
                _ => {}
            }
        }
        let bv = state_cols(dv);
        let defines = rec_defines(self.dtype, self.gate, (dk, dv), 1, true, false);
        let smem = rec_smem(1, dk, bv, self.gate);
        let s = &gpu.stream;
        let dptr = |x: Option<&CudaSlice<f32>>| x.map_or(0, |x| x.device_ptr(s).0);
        let state = self.state.device_ptr_mut(s).0;
        let ptrs = [
            x.q.ptr(gpu),
            x.k.ptr(gpu),
            x.v.ptr(gpu),
            dptr(x.g),
            dptr(x.gv),
            dptr(x.u),
            state,
            o.ptr_mut(gpu),
            state,
            self.cu_seqlens.device_ptr(s).0,
        ];
        let grid = (dv / bv, h, b);
        launch(
            gpu,
            "gla_rec_fwd",
            &defines,
            smem,
            grid,
            &ptrs,
            (h as i32, self.scale),
        )
    }
}
