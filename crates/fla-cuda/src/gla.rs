//! The gated linear attention family on the GPU: inputs uploaded once into device buffers,
//! kernels launched on them, results read back as host f32 tensors in the exchange layout.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use fla_ops::gla::Problem;
use fla_ops::{Form, GateKind, GlaInputs, GlaOutputs};
use fla_tensor::{Error, Result, Tensor};

use crate::device::{device_err, Gpu};

const FWD: &str = concat!(
    include_str!("../kernels/common.cuh"),
    "\n",
    include_str!("../kernels/gla_fwd.cu")
);
/// Threads per block of the recurrent kernels and of small helper kernels.
pub(crate) const NT: u32 = 256;

/// Element type of q, k, v, o and their gradients on the device, and of the key or scalar
/// gate that [`DeviceGla::upload`] uploads. Every accumulation, the gates' cumulative sums and
/// the value gate and bonus stay f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::Bf16),
            _ => Err(Error::Invalid(format!(
                "unknown dtype `{s}`: expected f32 or bf16"
            ))),
        }
    }
}

impl DType {
    pub(crate) fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// A device buffer of q, k, v or o in the chosen dtype (bf16 as its bits).
pub enum Buf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl Buf {
    /// `x` on the device in `dtype`.
    pub fn upload(gpu: &Gpu, x: &[f32], dtype: DType) -> Result<Buf> {
        let s = &gpu.stream;
        Ok(match dtype {
            DType::F32 => Buf::F32(s.clone_htod(x).map_err(device_err("upload"))?),
            DType::Bf16 => {
                let bits: Vec<u16> = x
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                Buf::Bf16(s.clone_htod(&bits).map_err(device_err("upload"))?)
            }
        })
    }

    pub fn zeros(gpu: &Gpu, n: usize, dtype: DType) -> Result<Buf> {
        let s = &gpu.stream;
        Ok(match dtype {
            DType::F32 => Buf::F32(s.alloc_zeros(n).map_err(device_err("allocation"))?),
            DType::Bf16 => Buf::Bf16(s.alloc_zeros(n).map_err(device_err("allocation"))?),
        })
    }

    /// A buffer of `n` elements left as the allocator hands it over (no memset): for outputs
    /// that a kernel or product writes whole before anything reads them. See [`uninit`].
    pub fn uninit(gpu: &Gpu, n: usize, dtype: DType) -> Result<Buf> {
        Ok(match dtype {
            DType::F32 => Buf::F32(uninit(gpu, n)?),
            DType::Bf16 => Buf::Bf16(uninit(gpu, n)?),
        })
    }

    /// The elements as host f32.
    pub fn download(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let s = &gpu.stream;
        Ok(match self {
            Buf::F32(b) => s.clone_dtoh(b).map_err(device_err("download"))?,
            Buf::Bf16(b) => s
                .clone_dtoh(b)
                .map_err(device_err("download"))?
                .into_iter()
                .map(|x| half::bf16::from_bits(x).to_f32())
                .collect(),
        })
    }

    /// Sets every element to zero.
    pub fn zero(&mut self, gpu: &Gpu) -> Result<()> {
        let s = &gpu.stream;
        match self {
            Buf::F32(b) => s.memset_zeros(b),
            Buf::Bf16(b) => s.memset_zeros(b),
        }
        .map_err(device_err("memset"))
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            Buf::F32(b) => b.len(),
            Buf::Bf16(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Buf::F32(_) => DType::F32,
            Buf::Bf16(_) => DType::Bf16,
        }
    }

    pub(crate) fn ptr(&self, gpu: &Gpu) -> u64 {
        match self {
            Buf::F32(b) => b.device_ptr(&gpu.stream).0,
            Buf::Bf16(b) => b.device_ptr(&gpu.stream).0,
        }
    }

    pub(crate) fn ptr_mut(&mut self, gpu: &Gpu) -> u64 {
        match self {
            Buf::F32(b) => b.device_ptr_mut(&gpu.stream).0,
            Buf::Bf16(b) => b.device_ptr_mut(&gpu.stream).0,
        }
    }
}

/// `n` elements of device memory that the caller writes whole before reading. With
/// FLA_POISON_UNINIT=1 (for tests) they start as all-ones bits, a NaN in f32 and bf16, so that
/// reading an element that nothing wrote shows in the results instead of passing unseen on
/// memory that happened to be zero.
pub(crate) fn uninit<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, n: usize) -> Result<CudaSlice<T>> {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let s = &gpu.stream;
    // SAFETY: any bits are a valid f32 or bf16 pattern; callers write before they read.
    let mut x = unsafe { s.alloc::<T>(n) }.map_err(device_err("allocation"))?;
    if *POISON.get_or_init(|| std::env::var("FLA_POISON_UNINIT").as_deref() == Ok("1")) {
        let bytes = n * std::mem::size_of::<T>();
        let p = x.device_ptr_mut(s).0;
        // SAFETY: the range is the allocation just made, on its own stream.
        unsafe { cudarc::driver::result::memset_d8_async(p, 0xff, bytes, s.cu_stream()) }
            .map_err(device_err("memset"))?;
    }
    Ok(x)
}

pub(crate) fn opt_ptr(x: &Option<CudaSlice<f32>>, gpu: &Gpu) -> u64 {
    x.as_ref().map_or(0, |b| b.device_ptr(&gpu.stream).0)
}

pub(crate) fn upload_f32(gpu: &Gpu, x: Option<&Tensor<f32>>) -> Result<Option<CudaSlice<f32>>> {
    x.map(|t| {
        gpu.stream
            .clone_htod(t.data())
            .map_err(device_err("upload"))
    })
    .transpose()
}

/// Shared memory of the fused forward kernel; the same sum as the OFF_* chain in gla_fwd.cu.
fn fwd_smem(c: usize, dk: usize, bv: usize, io: usize, has_g: bool, has_gv: bool) -> usize {
    let pad = 16 / io; // the row padding of the q, k, v tiles (QS, VS)
    2 * c * (dk + pad) * io
        + c * (bv + pad) * io
        + if has_g { c * dk * 4 } else { 0 }
        + if has_gv { c * bv * 4 } else { 0 }
        + c * (c + 8) * 4
        + dk * (bv + 4) * 4
        + c * (bv + 4) * 4
        + c * 4
        + 16
}

/// The inputs of one GLA call, on the device, with room for the outputs (and, once a
/// backward has run, for the gradients).
pub struct DeviceGla {
    pub(crate) gate: GateKind,
    pub(crate) dtype: DType,
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) h: usize,
    pub(crate) dk: usize,
    pub(crate) dv: usize,
    pub(crate) n_seqs: usize,
    /// Each sequence's length.
    pub(crate) lens: Vec<usize>,
    pub(crate) scale: f32,
    pub(crate) q: Buf,
    pub(crate) k: Buf,
    pub(crate) v: Buf,
    /// The key or scalar gate, in the call's element type or f32 (the fused and recurrent
    /// kernels widen it to f32 first).
    pub(crate) g: Option<Buf>,
    pub(crate) gv: Option<CudaSlice<f32>>,
    pub(crate) u: Option<CudaSlice<f32>>,
    pub(crate) h0: Option<CudaSlice<f32>>,
    /// h0 is this rank's initial state from a sequence-parallel forward, not the caller's.
    pub(crate) folded_h0: bool,
    pub(crate) cu_seqlens: CudaSlice<i32>,
    pub o: Buf,
    pub ht: CudaSlice<f32>,
    /// The output without its diagonal terms, f32, kept for the value gate's gradient.
    pub(crate) ond: Option<CudaSlice<f32>>,
    pub(crate) forward_done: bool,
    /// Run the chunk form in two levels (materialised states) rather than the fused sweeps.
    pub(crate) use_two_level: bool,
    /// What the two-level forward keeps for the backward.
    pub(crate) two_level: Option<crate::gla_chunk::TwoLevel>,
    pub(crate) grads: Option<crate::gla_bwd::DeviceGrads>,
}

/// The head sizes every GPU kernel takes: K in 16..=256 and V in 16..=512, multiples of 16.
pub fn check_head_sizes(dk: usize, dv: usize) -> Result<()> {
    let steps_of_16 = dk.is_multiple_of(16) && dv.is_multiple_of(16);
    if !steps_of_16 || !(16..=256).contains(&dk) || !(16..=512).contains(&dv) {
        return Err(Error::Invalid(format!(
            "the CUDA kernels take head sizes K in 16..=256 and V in 16..=512, multiples of 16; got K={dk}, V={dv}"
        )));
    }
    Ok(())
}

/// Threads per block of the chunk kernels: 512, or 256 when the environment variable `var`
/// says so (FLA_GLA_FWD_NT for the forward, FLA_GLA_BWD_NT for the backward). Their shared
/// memory allows one block per SM, so 512 threads give each scheduler four warps to switch
/// between instead of two: on the H100 the forward ran 23% faster and forward+backward 20%.
pub(crate) fn threads(var: &str) -> u32 {
    match std::env::var(var).ok().and_then(|x| x.parse().ok()) {
        Some(256) => 256,
        _ => 512,
    }
}

/// A tile width (16, 32, 64 or 128) forced by the environment variable `var` instead of the
/// chosen one, for tuning: FLA_GLA_BV (fused forward V tile), FLA_GLA_BK and FLA_GLA_BVS (fused
/// backward K tile and V step), FLA_CHUNK_BK and FLA_CHUNK_BV (two-level form: the K and V
/// tiles of its kernels) and FLA_DQK_BV (two-level form: chunk_dqk's V step). The
/// caller checks that it divides the head size and fits.
pub(crate) fn forced_tile(var: &str) -> Option<usize> {
    let x = std::env::var(var).ok()?.parse().ok()?;
    [16, 32, 64, 128].contains(&x).then_some(x)
}

/// The tiling of the fused forward: (chunk size, V tile), the largest that fit in shared
/// memory, with the V tile narrowed while that leaves more than half the GPU idle (few
/// sequences and heads; each V tile recomputes the chunk's attention, so narrower costs).
fn fwd_tiling(
    gpu: &Gpu,
    gate: GateKind,
    dtype: DType,
    (dk, dv): (usize, usize),
    heads: usize,
) -> Result<(usize, usize)> {
    let (has_g, has_gv) = (gate != GateKind::None, gate == GateKind::Both);
    let fits = |c, bv| {
        dv.is_multiple_of(bv) && fwd_smem(c, dk, bv, dtype.bytes(), has_g, has_gv) <= gpu.max_smem()
    };
    for c in [64, 32] {
        if let Some(bv) = forced_tile("FLA_GLA_BV").filter(|&bv| fits(c, bv)) {
            return Ok((c, bv));
        }
        if let Some(mut bv) = [64, 32, 16].into_iter().find(|&bv| fits(c, bv)) {
            while bv > 16 && dv.is_multiple_of(bv / 2) && 2 * heads * dv / bv <= gpu.sms() {
                bv /= 2;
            }
            return Ok((c, bv));
        }
    }
    Err(Error::Device(format!(
        "head sizes K={dk}, V={dv} do not fit the GPU's shared memory"
    )))
}

impl DeviceGla {
    /// Checks the inputs like the CPU op does, then uploads them (q, k, v and the key or
    /// scalar gate in `dtype`, the rest in f32).
    pub fn upload(gpu: &Gpu, gate: GateKind, x: &GlaInputs<f32>, dtype: DType) -> Result<Self> {
        let p = Problem::new(gate, x)?;
        check_head_sizes(p.dk, p.dv)?;
        let n_seqs = p.spans.len();
        let cu: Vec<i32> = match &x.cu_seqlens {
            Some(c) => c.iter().map(|&x| x as i32).collect(),
            None => (0..=p.b).map(|i| (i * p.t) as i32).collect(),
        };
        if p.b * p.t > i32::MAX as usize {
            return Err(Error::Invalid("more than 2^31 tokens in one call".into()));
        }
        let s = &gpu.stream;
        Ok(DeviceGla {
            gate,
            dtype,
            b: p.b,
            t: p.t,
            h: p.h,
            dk: p.dk,
            dv: p.dv,
            n_seqs,
            lens: p.spans.iter().map(|s| s.2).collect(),
            scale: p.scale as f32,
            q: Buf::upload(gpu, x.q.data(), dtype)?,
            k: Buf::upload(gpu, x.k.data(), dtype)?,
            v: Buf::upload(gpu, x.v.data(), dtype)?,
            g: x.g
                .as_ref()
                .map(|g| Buf::upload(gpu, g.data(), dtype))
                .transpose()?,
            gv: upload_f32(gpu, x.gv.as_ref())?,
            u: upload_f32(gpu, x.u.as_ref())?,
            h0: upload_f32(gpu, x.h0.as_ref())?,
            folded_h0: false,
            cu_seqlens: s.clone_htod(&cu).map_err(device_err("upload"))?,
            o: Buf::zeros(gpu, p.b * p.t * p.h * p.dv, dtype)?,
            ht: s
                .alloc_zeros(n_seqs * p.h * p.dk * p.dv)
                .map_err(device_err("allocation"))?,
            ond: if gate == GateKind::Both {
                Some(
                    s.alloc_zeros(p.b * p.t * p.h * p.dv)
                        .map_err(device_err("allocation"))?,
                )
            } else {
                None
            },
            forward_done: false,
            use_two_level: crate::gla_chunk::supports(gate),
            two_level: None,
            grads: None,
        })
    }

    /// A key-gated call on inputs already on the device (a model's projections): q, k [B,T,H,K]
    /// and v [B,T,H,V] in one element type, log gates g [B,T,H,K] in f32 or that type (its
    /// gradient comes back in the same), B sequences of T tokens, scale K^-1/2. The buffers
    /// move in; [`DeviceGla::inputs`] lends them back.
    #[allow(clippy::too_many_arguments)]
    pub fn from_device(
        gpu: &Gpu,
        (b, t, h): (usize, usize, usize),
        (dk, dv): (usize, usize),
        q: Buf,
        k: Buf,
        v: Buf,
        g: Buf,
    ) -> Result<Self> {
        check_head_sizes(dk, dv)?;
        let dtype = q.dtype();
        let n = b * t * h;
        if k.dtype() != dtype
            || v.dtype() != dtype
            || q.len() != n * dk
            || k.len() != n * dk
            || v.len() != n * dv
            || g.len() != n * dk
            || (g.dtype() != DType::F32 && g.dtype() != dtype)
        {
            return Err(Error::Invalid(format!(
                "GLA inputs on the device: q, k, g need {} elements and v {} in one element type (g may be f32)",
                n * dk,
                n * dv
            )));
        }
        let cu: Vec<i32> = (0..=b).map(|i| (i * t) as i32).collect();
        let s = &gpu.stream;
        Ok(DeviceGla {
            gate: GateKind::Key,
            dtype,
            b,
            t,
            h,
            dk,
            dv,
            n_seqs: b,
            lens: vec![t; b],
            scale: (dk as f32).powf(-0.5),
            q,
            k,
            v,
            g: Some(g),
            gv: None,
            u: None,
            h0: None,
            folded_h0: false,
            cu_seqlens: s.clone_htod(&cu).map_err(device_err("upload"))?,
            o: Buf::zeros(gpu, n * dv, dtype)?,
            ht: s
                .alloc_zeros(b * h * dk * dv)
                .map_err(device_err("allocation"))?,
            ond: None,
            forward_done: false,
            use_two_level: true,
            two_level: None,
            grads: None,
        })
    }

    /// q, k, v and the gates, as given to [`DeviceGla::from_device`].
    pub fn inputs(&self) -> (&Buf, &Buf, &Buf, Option<&Buf>) {
        (&self.q, &self.k, &self.v, self.g.as_ref())
    }

    /// The -D settings every GLA kernel takes: element type, `threads` per block, head sizes, chunk
    /// size and which gates and extras are present.
    pub(crate) fn defines(&self, chunk: usize, threads: u32) -> Vec<(&'static str, i64)> {
        vec![
            ("USE_BF16", i64::from(self.dtype == DType::Bf16)),
            ("NT", threads as i64),
            ("HEAD_K", self.dk as i64),
            ("HEAD_V", self.dv as i64),
            ("CHUNK", chunk as i64),
            ("HAS_G", i64::from(self.gate != GateKind::None)),
            ("G_SCALAR", i64::from(self.gate == GateKind::Scalar)),
            ("HAS_GV", i64::from(self.gate == GateKind::Both)),
            ("HAS_U", i64::from(self.gate == GateKind::KeyBonus)),
            ("HAS_H0", i64::from(self.h0.is_some())),
            ("GATE_BF16", i64::from(self.gates_bf16())),
        ]
    }

    /// Whether the gates are held in bf16.
    pub(crate) fn gates_bf16(&self) -> bool {
        matches!(self.g, Some(Buf::Bf16(_)))
    }

    /// The fused and recurrent kernels read the gates in f32: bf16 gates widened (exactly)
    /// in place.
    pub(crate) fn widen_gates(&mut self, gpu: &Gpu) -> Result<()> {
        if let Some(g) = self.g.as_ref().filter(|g| g.dtype() == DType::Bf16) {
            self.g = Some(Buf::F32(crate::gla_rec::widened(gpu, g)?));
        }
        Ok(())
    }

    /// Device addresses of q, k, v, g, gv, u, h0 (0 for those absent), the kernels' first
    /// arguments.
    pub(crate) fn input_ptrs(&self, gpu: &Gpu) -> [u64; 7] {
        [
            self.q.ptr(gpu),
            self.k.ptr(gpu),
            self.v.ptr(gpu),
            self.g.as_ref().map_or(0, |g| g.ptr(gpu)),
            opt_ptr(&self.gv, gpu),
            opt_ptr(&self.u, gpu),
            opt_ptr(&self.h0, gpu),
        ]
    }

    /// Chooses the chunk kernels: the fused sweeps (fla's fused_chunk) instead of the two-level
    /// form (fla's chunk; the default where the gate kind allows it).
    pub fn use_fused(&mut self, fused: bool) {
        self.use_two_level = !fused && crate::gla_chunk::supports(self.gate);
        self.two_level = None;
        self.grads = None;
        self.forward_done = false;
    }

    /// Launches the forward: o and ht (the final states) into this struct's buffers.
    pub fn forward(&mut self, gpu: &Gpu) -> Result<()> {
        if self.use_two_level {
            self.forward_two_level(gpu)?;
            self.forward_done = true;
            return Ok(());
        }
        self.widen_gates(gpu)?;
        let heads = self.n_seqs * self.h;
        let (c, bv) = fwd_tiling(gpu, self.gate, self.dtype, (self.dk, self.dv), heads)?;
        let has_g = self.gate != GateKind::None;
        let has_gv = self.gate == GateKind::Both;
        let smem = fwd_smem(c, self.dk, bv, self.dtype.bytes(), has_g, has_gv);
        let nt = threads("FLA_GLA_FWD_NT");
        let mut defines = self.defines(c, nt);
        defines.extend([
            ("BV", bv as i64),
            ("STORE_HT", 1),
            ("STORE_OND", i64::from(self.ond.is_some())),
        ]);
        let f = gpu.function(FWD, "gla_fwd", &defines, smem)?;
        let cfg = LaunchConfig {
            grid_dim: ((self.dv / bv) as u32, self.h as u32, self.n_seqs as u32),
            block_dim: (nt, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let [q, k, v, g, gv, u, h0] = self.input_ptrs(gpu);
        let o = self.o.ptr_mut(gpu);
        let ht = self.ht.device_ptr_mut(&gpu.stream).0;
        let ond = self
            .ond
            .as_mut()
            .map_or(0, |b| b.device_ptr_mut(&gpu.stream).0);
        let cu = self.cu_seqlens.device_ptr(&gpu.stream).0;
        let h = self.h as i32;
        let mut launch = gpu.stream.launch_builder(&f);
        for p in [&q, &k, &v, &g, &gv, &u, &h0, &o, &ht, &ond, &cu] {
            launch.arg(p);
        }
        launch.arg(&h).arg(&self.scale);
        unsafe { launch.launch(cfg) }.map_err(device_err("gla_fwd launch"))?;
        self.forward_done = true;
        Ok(())
    }

    /// o [B,T,H,V] and ht [N,H,K,V] as host f32 tensors.
    pub fn outputs(&self, gpu: &Gpu) -> Result<GlaOutputs<f32>> {
        gpu.synchronize()?;
        let o = self.o.download(gpu)?;
        let ht = gpu
            .stream
            .clone_dtoh(&self.ht)
            .map_err(device_err("download"))?;
        Ok(GlaOutputs {
            o: Tensor::new(vec![self.b, self.t, self.h, self.dv], o)?,
            ht: Tensor::new(vec![self.n_seqs, self.h, self.dk, self.dv], ht)?,
        })
    }
}

/// Which kernels run `form` on the GPU: the recurrent ones (true) or the chunk ones; the
/// naive form runs on the CPU only.
pub(crate) fn recurrent_kernels(form: Form) -> Result<bool> {
    match form {
        Form::Chunk | Form::FusedChunk => Ok(false),
        Form::Recurrent => Ok(true),
        Form::Naive => Err(Error::Invalid(
            "the naive form runs on the CPU only; the GPU runs the chunk and recurrent forms"
                .into(),
        )),
    }
}

/// The forward pass on the GPU from host tensors: upload, launch, read back.
pub fn gla_forward(
    gpu: &Gpu,
    gate: GateKind,
    x: &GlaInputs<f32>,
    dtype: DType,
    form: Form,
) -> Result<GlaOutputs<f32>> {
    let recurrent = recurrent_kernels(form)?;
    let mut d = DeviceGla::upload(gpu, gate, x, dtype)?;
    d.use_fused(form == Form::FusedChunk);
    if recurrent {
        d.forward_recurrent(gpu)?;
    } else {
        d.forward(gpu)?;
    }
    d.outputs(gpu)
}
