//! The GLA Transformer on the GPU: the same math as [`crate::model`], with products through
//! cuBLAS (bf16 or f32 inputs, f32 accumulation), the layer kernels of fla-cuda, and the
//! chunkwise GLA kernels. Mixed precision: f32 master weights, gradients, optimizer state,
//! residual stream and statistics; activations that products read are in the element type.

use fla_cuda::cudarc::driver::CudaSlice;
use fla_cuda::layers::{buf_ptr, ptr, AdamStep, Layers};
use fla_cuda::{Blas, Buf, DType, Decoder, DeviceGla, DeviceUpstream, Gpu, Operand, StepInputs};
use fla_ops::GateKind;
use fla_tensor::{Error, Result, Tensor};

use crate::config::{GlaConfig, GATE_LOGIT_NORMALIZER, GATE_LOW_RANK};
use crate::dist::FlatPlan;
use crate::layout::{LayerSlots, Layout, Role};
use crate::learner::OptState;
use crate::model::Model;

mod sync;

pub use sync::Split;

/// The gradient all-reduce's unit without a `distribute` call (NCCL runs best at a few MB).
pub const BUCKET_BYTES: usize = 25 << 20;

pub(crate) fn dev(what: &'static str) -> impl Fn(fla_cuda::cudarc::driver::DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

fn zeros(gpu: &Gpu, n: usize, dtype: DType) -> Result<Buf> {
    Buf::zeros(gpu, n.max(1), dtype)
}

/// A buffer that its producer writes whole (no memset).
fn empty(gpu: &Gpu, n: usize, dtype: DType) -> Result<Buf> {
    Buf::uninit(gpu, n.max(1), dtype)
}

fn clone_buf(gpu: &Gpu, x: &Buf) -> Result<Buf> {
    let s = gpu.stream();
    Ok(match x {
        Buf::F32(b) => Buf::F32(s.clone_dtod(b).map_err(dev("copy"))?),
        Buf::Bf16(b) => Buf::Bf16(s.clone_dtod(b).map_err(dev("copy"))?),
    })
}

fn f32_ref(x: &Buf) -> &CudaSlice<f32> {
    match x {
        Buf::F32(b) => b,
        Buf::Bf16(_) => unreachable!("an f32 buffer"),
    }
}

fn f32_mut(x: &mut Buf) -> &mut CudaSlice<f32> {
    match x {
        Buf::F32(b) => b,
        Buf::Bf16(_) => unreachable!("an f32 buffer"),
    }
}

/// Parameters laid out as `plan` says, padding zero.
fn flatten(plan: &FlatPlan, params: &[Tensor<f32>]) -> Vec<f32> {
    let mut flat = vec![0.0; plan.total];
    for (i, p) in params.iter().enumerate() {
        flat[plan.param(i)].copy_from_slice(p.data());
    }
    flat
}

fn f32_slice(x: Buf) -> CudaSlice<f32> {
    match x {
        Buf::F32(b) => b,
        Buf::Bf16(_) => unreachable!("an f32 buffer"),
    }
}

/// Generation state on the GPU: per layer, each short convolution's window of earlier
/// inputs [B, conv_size - 1, C] and the attention states [B, H, K, V] (in the Decoder).
pub struct GpuCache {
    pub b: usize,
    /// Tokens consumed per sequence.
    pub len: usize,
    layers: Vec<GpuLayerCache>,
}

struct GpuLayerCache {
    windows: Vec<Buf>,
    dec: Decoder,
}

/// Device time by phase, when FLA_PROFILE is set: an event after each phase, summed per name
/// when the step ends (events do not stop the stream).
struct Profile {
    marks: std::cell::RefCell<Vec<(&'static str, fla_cuda::cudarc::driver::CudaEvent)>>,
    totals: std::cell::RefCell<Vec<(&'static str, f64)>>,
}

/// Logits the loss computes at a time by default (rows x vocabulary; 128M f32 = 512 MB).
const LOGIT_BLOCK_ELEMENTS: usize = 1 << 27;

/// What a block computes before its attention.
struct AttnInputs {
    h1: Buf,
    rstd1: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    conv: Option<[ConvTape; 3]>,
    gk_low: Buf,
    raw: Buf,
    gate: CudaSlice<f32>,
}

/// What a block computes after its attention.
struct BlockRest {
    g_pre: Option<Buf>,
    rstd_o: Buf,
    o_gated: Buf,
    x_mid: Buf,
    h2: Buf,
    rstd2: Buf,
    gate: Buf,
    up: Buf,
    x_out: Buf,
}

/// A short convolution's input (the projection, f32), its pre-activation, and under sequence
/// parallelism the previous rank's last rows it read first.
struct ConvTape {
    lin: Buf,
    pre: Buf,
    halo: Option<CudaSlice<f32>>,
}

/// One block's activations kept for the backward.
struct LayerTape {
    x_in: Buf,
    h1: Buf,
    rstd1: Buf,
    /// Per q, k, v with short convolutions.
    conv: Option<[ConvTape; 3]>,
    gk_low: Buf,
    raw: Buf,
    gla: DeviceGla,
    g_pre: Option<Buf>,
    rstd_o: Buf,
    o_gated: Buf,
    x_mid: Buf,
    h2: Buf,
    rstd2: Buf,
    gate: Buf,
    up: Buf,
}

pub struct GpuModel {
    pub config: GlaConfig,
    pub layout: Layout,
    gpu: Gpu,
    blas: Blas,
    ops: Layers,
    dtype: DType,
    /// Where each parameter sits in the flat f32 vectors below.
    plan: FlatPlan,
    /// f32 master weights and gradients, flat ([`FlatPlan`]; padding stays zero).
    master: Buf,
    grads: Buf,
    /// AdamW's moments of the elements this rank steps: all of them, laid out as `master`,
    /// or under ZeRO-1 its shard.
    m: Buf,
    v: Buf,
    /// Element-type copies of the weights products read (matrices and the embeddings).
    weights: Vec<Option<Buf>>,
    pub step: u64,
    /// The most device memory in use (all of this process's, as the driver reports it) seen
    /// after a forward, when the activations are all held.
    pub peak_bytes: usize,
    /// Host seconds spent submitting forwards and backwards (up to the loss's read), summed:
    /// near the device time, the step is bound by the host's launches.
    pub submit_secs: f64,
    /// Logits the loss computes at a time (rows x vocabulary).
    pub logit_block_elements: usize,
    profile: Option<Profile>,
    /// Training on several ranks (data or sequence parallel): the communicator and what this
    /// rank keeps of it (sync.rs).
    dist: Option<sync::Dist>,
}

impl GpuModel {
    /// Moves `model`'s parameters to the GPU; products run in `dtype`.
    pub fn new(gpu: Gpu, model: &Model<f32>, dtype: DType) -> Result<GpuModel> {
        let c = &model.config;
        if c.kv_groups() != 1 {
            return Err(Error::Invalid(
                "the GPU model does not take num_kv_heads < num_heads yet; train it on the CPU"
                    .into(),
            ));
        }
        fla_cuda::check_head_sizes(c.head_k_dim(), c.head_v_dim())?;
        if c.hidden_size > fla_cuda::layers::MAX_WIDTH || c.intermediate() > i32::MAX as usize {
            return Err(Error::Invalid(format!(
                "hidden_size {} is wider than the GPU kernels take ({})",
                c.hidden_size,
                fla_cuda::layers::MAX_WIDTH
            )));
        }
        let blas = Blas::new(&gpu)?;
        let ops = Layers::new(dtype);
        let lens: Vec<usize> = model.params.iter().map(|p| p.len()).collect();
        let plan = FlatPlan::new(&lens, BUCKET_BYTES / 4, 1);
        let mut weights = Vec::new();
        for (spec, p) in model.layout.specs.iter().zip(&model.params) {
            let copy = matches!(spec.role, Role::Matrix | Role::Embedding);
            weights.push(
                copy.then(|| Buf::upload(&gpu, p.data(), dtype))
                    .transpose()?,
            );
        }
        let master = Buf::upload(&gpu, &flatten(&plan, &model.params), DType::F32)?;
        Ok(GpuModel {
            config: c.clone(),
            layout: model.layout.clone(),
            grads: zeros(&gpu, plan.total, DType::F32)?,
            m: zeros(&gpu, plan.total, DType::F32)?,
            v: zeros(&gpu, plan.total, DType::F32)?,
            plan,
            gpu,
            blas,
            ops,
            dtype,
            master,
            weights,
            step: 0,
            peak_bytes: 0,
            submit_secs: 0.0,
            logit_block_elements: LOGIT_BLOCK_ELEMENTS,
            profile: std::env::var_os("FLA_PROFILE").map(|_| Profile {
                marks: Default::default(),
                totals: Default::default(),
            }),
            dist: None,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Ends a phase named `name` (FLA_PROFILE only).
    fn mark(&self, name: &'static str) {
        if let Some(p) = &self.profile {
            let timed = Some(fla_cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            if let Ok(e) = self.gpu.stream().record_event(timed) {
                p.marks.borrow_mut().push((name, e));
            }
        }
    }

    /// Adds the phases marked since the last call to the totals (waits for the stream).
    fn close_profile(&self) {
        let Some(p) = &self.profile else { return };
        let marks = std::mem::take(&mut *p.marks.borrow_mut());
        let mut totals = p.totals.borrow_mut();
        for w in marks.windows(2) {
            let ms = w[0].1.elapsed_ms(&w[1].1).unwrap_or(0.0) as f64;
            match totals.iter_mut().find(|(n, _)| *n == w[1].0) {
                Some(t) => t.1 += ms,
                None => totals.push((w[1].0, ms)),
            }
        }
    }

    /// Device milliseconds by phase over the profiled steps (FLA_PROFILE set), in order.
    pub fn profile(&self) -> Vec<(&'static str, f64)> {
        self.profile
            .as_ref()
            .map_or(Vec::new(), |p| p.totals.borrow().clone())
    }

    /// The parameters as a CPU model (for saving and checking).
    pub fn to_model(&self) -> Result<Model<f32>> {
        let mut model = Model::<f32>::new(self.config.clone(), 0);
        model.params = self.unflatten(&self.master.download(&self.gpu)?)?;
        Ok(model)
    }

    /// AdamW's step count and moments, as host tensors in layout order. Under ZeRO-1 the
    /// ranks' shards are gathered first: every rank must call it.
    pub fn optimizer_state(&self) -> Result<OptState> {
        let (m, v) = self.full_moments()?;
        Ok(OptState {
            step: self.step,
            m: self.unflatten(&m)?,
            v: self.unflatten(&v)?,
        })
    }

    /// Replaces the weights, the optimizer's moments and its step count (a resumed run).
    pub fn restore(
        &mut self,
        model: &Model<f32>,
        step: u64,
        m: &[Tensor<f32>],
        v: &[Tensor<f32>],
    ) -> Result<()> {
        if model.config != self.config {
            return Err(Error::Invalid(
                "the checkpoint's config differs from the model's".into(),
            ));
        }
        let shapes_match = |xs: &[Tensor<f32>]| {
            xs.len() == self.plan.lens.len()
                && xs.iter().zip(&self.plan.lens).all(|(x, &n)| x.len() == n)
        };
        if !shapes_match(m) || !shapes_match(v) {
            return Err(Error::Invalid(
                "the checkpoint's optimizer moments do not match the model's parameters".into(),
            ));
        }
        self.master = Buf::upload(&self.gpu, &flatten(&self.plan, &model.params), DType::F32)?;
        for (w, p) in self.weights.iter_mut().zip(&model.params) {
            if let Some(w) = w {
                *w = Buf::upload(&self.gpu, p.data(), self.dtype)?;
            }
        }
        let (m, v) = (flatten(&self.plan, m), flatten(&self.plan, v));
        self.m = Buf::upload(&self.gpu, &self.my_share(&m), DType::F32)?;
        self.v = Buf::upload(&self.gpu, &self.my_share(&v), DType::F32)?;
        self.step = step;
        Ok(())
    }

    /// The gradients of the last backward, in layout order.
    pub fn gradients(&self) -> Result<Vec<Tensor<f32>>> {
        self.unflatten(&self.grads.download(&self.gpu)?)
    }

    /// Per parameter, in layout order, its elements of a flat vector.
    fn unflatten(&self, flat: &[f32]) -> Result<Vec<Tensor<f32>>> {
        self.layout
            .specs
            .iter()
            .enumerate()
            .map(|(i, s)| Tensor::new(s.shape.clone(), flat[self.plan.param(i)].to_vec()))
            .collect()
    }

    fn w(&self, slot: usize) -> &Buf {
        self.weights[slot]
            .as_ref()
            .expect("a matrix has an element-type copy")
    }

    fn p(&self, slot: usize) -> u64 {
        buf_ptr(&self.gpu, &self.master) + 4 * self.plan.offsets[slot] as u64
    }

    fn pg(&self, slot: usize) -> u64 {
        buf_ptr(&self.gpu, &self.grads) + 4 * self.plan.offsets[slot] as u64
    }

    /// out[n, o] (= or +=) x[n, i] W^T for the weight in `slot` [o, i].
    fn linear(
        &self,
        x: &Buf,
        n: usize,
        slot: usize,
        out: &mut Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.by_weight(x, n, slot, out, accumulate, true)
    }

    /// out (= or +=) x W^T (`transposed`: x [n, i], out [n, o]) or x W (x [n, o], out [n, i])
    /// for the weight in `slot` [o, i].
    fn by_weight(
        &self,
        x: &Buf,
        n: usize,
        slot: usize,
        out: &mut Buf,
        accumulate: bool,
        transposed: bool,
    ) -> Result<()> {
        let shape = &self.layout.specs[slot].shape;
        let (o, i) = (shape[0], shape[1]);
        let dims = if transposed { (n, o, i) } else { (n, i, o) };
        let beta = if accumulate { 1.0 } else { 0.0 };
        self.blas.matmul(
            &self.gpu,
            Operand::new(x, false),
            Operand::new(self.w(slot), transposed),
            out,
            dims,
            1.0,
            beta,
        )
    }

    /// dx[n, i] (= or +=) dy[n, o] W, and dW += dy^T x.
    fn linear_back(
        &mut self,
        x: &Buf,
        dy: &Buf,
        n: usize,
        slot: usize,
        dx: &mut Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.linear_dx(dy, n, slot, dx, accumulate)?;
        self.linear_dw(x, dy, n, slot)
    }

    /// dx[n, i] (= or +=) dy[n, o] W for the weight in `slot` [o, i].
    fn linear_dx(
        &self,
        dy: &Buf,
        n: usize,
        slot: usize,
        dx: &mut Buf,
        accumulate: bool,
    ) -> Result<()> {
        self.by_weight(dy, n, slot, dx, accumulate, false)
    }

    /// dW += dy[n, o]^T x[n, i] for the weight in `slot`.
    fn linear_dw(&mut self, x: &Buf, dy: &Buf, n: usize, slot: usize) -> Result<()> {
        let shape = &self.layout.specs[slot].shape;
        let (o, i) = (shape[0], shape[1]);
        self.blas.matmul_at(
            &self.gpu,
            Operand::new(dy, true),
            Operand::new(x, false),
            &mut self.grads,
            self.plan.offsets[slot],
            (o, i, n),
            1.0,
            1.0,
        )
    }

    /// Mean next-token cross-entropy of `ids` [B, T] against `targets` (negative: ignored),
    /// with every parameter's gradient left in the model (replacing the last ones).
    pub fn loss_and_grads(
        &mut self,
        ids: &[usize],
        b: usize,
        t: usize,
        targets: &[i64],
    ) -> Result<f64> {
        self.zero_grads()?;
        self.accumulate(ids, b, t, targets, 1.0)
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        self.grads.zero(&self.gpu)?;
        self.start_step()
    }

    /// Adds `scale` times the gradients of the batch's mean loss to the gradients; returns
    /// the mean loss.
    pub fn accumulate(
        &mut self,
        ids: &[usize],
        b: usize,
        t: usize,
        targets: &[i64],
        scale: f64,
    ) -> Result<f64> {
        let (n, d, vocab) = (b * t, self.config.hidden_size, self.config.vocab_size);
        if ids.len() != n || targets.len() != n || n == 0 {
            return Err(Error::Invalid(format!(
                "{} ids and {} targets for a batch of {b} x {t}",
                ids.len(),
                targets.len()
            )));
        }
        let tg32: Vec<i32> = targets
            .iter()
            .map(|&x| if x < 0 { -1 } else { x as i32 })
            .collect();
        let tg_d: CudaSlice<i32> = self.gpu.stream().clone_htod(&tg32).map_err(dev("upload"))?;
        let count = targets.iter().filter(|&&x| x >= 0).count();
        self.check_unsummed()?;
        // Sequence-parallel training: every rank holds a segment of the same sequences.
        let seq = self.seq_group().is_some();
        let submit = std::time::Instant::now();
        // Forward.
        self.mark("start");
        let (mut x, ids_d) = self.embed(ids)?;
        self.mark("embedding");
        let mut tapes = Vec::with_capacity(self.layout.layers.len());
        for l in 0..self.layout.layers.len() {
            let slots = self.layout.layers[l].clone();
            let (tape, out) = self.layer_forward(&slots, x, b, t, seq)?;
            tapes.push(tape);
            x = out;
        }
        let (hf, rstd_f) = self.final_norm(&x, n)?;
        self.mark("final norm");
        let g = &self.gpu;
        let s = g.stream();
        let idp = fla_cuda::cudarc::driver::DevicePtr::device_ptr(&ids_d, s).0;
        // The logits, their loss and their gradient a block of rows at a time, so that the
        // f32 logits of the whole batch never exist at once; dhf and the output projection's
        // gradient come out of the same blocks.
        let out_slot = self.layout.output_slot();
        let loss_rows = zeros(g, n, DType::F32)?;
        let mut dhf = empty(g, n * d, DType::F32)?;
        let tgp = fla_cuda::cudarc::driver::DevicePtr::device_ptr(&tg_d, s).0;
        let ce_scale = (scale / count.max(1) as f64) as f32;
        let block = (self.logit_block_elements / vocab).clamp(1, n);
        let mut logits = empty(g, block * vocab, DType::F32)?;
        let dlogits = empty(g, block * vocab, self.dtype)?;
        let w = self.weights[out_slot]
            .as_ref()
            .expect("the output projection has a copy");
        for r0 in (0..n).step_by(block) {
            let rows = block.min(n - r0);
            let (h_at, l_at) = (r0 * d, r0 as u64 * 4);
            self.blas.matmul(
                g,
                Operand::new(&hf, false).at(h_at),
                Operand::new(w, true),
                &mut logits,
                (rows, vocab, d),
                1.0,
                0.0,
            )?;
            self.ops.cross_entropy(
                g,
                buf_ptr(g, &logits),
                tgp + l_at,
                buf_ptr(g, &loss_rows) + l_at,
                buf_ptr(g, &dlogits),
                rows,
                vocab,
                ce_scale,
            )?;
            self.blas.matmul_at(
                g,
                Operand::new(&dlogits, false),
                Operand::new(w, false),
                &mut dhf,
                h_at,
                (rows, d, vocab),
                1.0,
                0.0,
            )?;
            self.blas.matmul_at(
                g,
                Operand::new(&dlogits, true),
                Operand::new(&hf, false).at(h_at),
                &mut self.grads,
                self.plan.offsets[out_slot],
                (vocab, d, rows),
                1.0,
                1.0,
            )?;
        }
        drop((logits, dlogits));
        self.mark("logits and loss (blocks), fwd+bwd");
        if let Ok((free, total)) = fla_cuda::cudarc::driver::result::mem_get_info() {
            self.peak_bytes = self.peak_bytes.max(total - free);
        }
        let g = &self.gpu;
        // The residual stream's gradient (f32) and its element-type copy for the products.
        let mut dx = zeros(g, n * d, DType::F32)?;
        let mut dx_io = empty(g, n * d, self.dtype)?;
        let norm = self.layout.norm;
        self.ops.rms_norm_bwd(
            g,
            buf_ptr(g, &x),
            self.p(norm),
            buf_ptr(g, &rstd_f),
            buf_ptr(g, &dhf),
            buf_ptr(g, &dx),
            buf_ptr(g, &dx_io),
            self.pg(norm),
            n,
            d,
        )?;
        // Each layer's parameters lie together, its attn_norm first, after the embeddings:
        // the backward finishes every parameter from `norm` on, then each layer's from its
        // attn_norm on, then the embeddings (with the tied output projection). Under data
        // parallelism the buckets so finished start their sums over the ranks at once.
        self.grads_done(norm)?;
        for l in (0..tapes.len()).rev() {
            let slots = self.layout.layers[l].clone();
            let tape = tapes.pop().expect("one tape per layer");
            (dx, dx_io) = self.layer_backward(&slots, tape, (b, t), dx, dx_io, seq)?;
            self.grads_done(slots.attn_norm)?;
        }
        let g = &self.gpu;
        self.ops.embed_bwd(
            g,
            idp,
            buf_ptr(g, &dx),
            self.pg(self.layout.embeddings),
            n,
            d,
        )?;
        self.mark("bwd: embedding");
        self.grads_done(0)?;
        self.submit_secs += submit.elapsed().as_secs_f64();
        // Read only now, so that the step never waits for the device in the middle.
        let loss_sum: f64 = loss_rows
            .download(&self.gpu)?
            .iter()
            .map(|&x| x as f64)
            .sum();
        Ok(if count == 0 {
            f64::NAN
        } else {
            loss_sum / count as f64
        })
    }

    /// A block's input norm, q, k, v (through the convolution and SiLU when configured) and
    /// key gates, for `n = b * t` rows. With `window` (generation, t = 1) the convolution
    /// steps through each sequence's window of earlier inputs instead.
    fn attn_inputs(
        &self,
        s: &LayerSlots,
        x_in: &Buf,
        (b, t): (usize, usize),
        mut windows: Option<&mut [Buf]>,
        seq: bool,
    ) -> Result<AttnInputs> {
        let (g, c, dt) = (&self.gpu, &self.config, self.dtype);
        let (n, d, eps) = (b * t, c.hidden_size, c.norm_eps as f32);
        let h1 = empty(g, n * d, dt)?;
        let rstd1 = empty(g, n, DType::F32)?;
        self.ops.rms_norm_fwd(
            g,
            buf_ptr(g, x_in),
            self.p(s.attn_norm),
            buf_ptr(g, &h1),
            buf_ptr(g, &rstd1),
            n,
            d,
            eps,
        )?;
        let widths = [c.key_dim(), c.key_dim(), c.value_dim()];
        let projs = [s.q_proj, s.k_proj, s.v_proj];
        let mut outs = Vec::with_capacity(3);
        let mut convs = Vec::with_capacity(3);
        for i in 0..3 {
            let mut out = empty(g, n * widths[i], dt)?;
            match s.convs {
                Some(cv) => {
                    let mut lin = empty(g, n * widths[i], DType::F32)?;
                    self.linear(&h1, n, projs[i], &mut lin, false)?;
                    let (w, width) = (self.p(cv[i]), c.conv_size);
                    if let Some(win) = windows.as_deref_mut() {
                        self.ops.conv_silu_step(
                            g,
                            buf_ptr(g, &lin),
                            buf_ptr(g, &win[i]),
                            w,
                            buf_ptr(g, &out),
                            (b, widths[i]),
                            width,
                        )?;
                    } else {
                        let pre = empty(g, n * widths[i], DType::F32)?;
                        let halo = match seq {
                            true => self.conv_halo(&lin, (b, t, widths[i]))?,
                            false => None,
                        };
                        self.ops.conv_silu_fwd(
                            g,
                            buf_ptr(g, &lin),
                            halo.as_ref().map_or(0, |h| ptr(g, h)),
                            w,
                            buf_ptr(g, &pre),
                            buf_ptr(g, &out),
                            (b, t, widths[i]),
                            width,
                        )?;
                        convs.push(ConvTape { lin, pre, halo });
                    }
                }
                None => self.linear(&h1, n, projs[i], &mut out, false)?,
            }
            outs.push(out);
        }
        let mut gk_low = empty(g, n * GATE_LOW_RANK, dt)?;
        self.linear(&h1, n, s.gk_proj0, &mut gk_low, false)?;
        let mut raw = empty(g, n * widths[1], DType::F32)?;
        self.linear(&gk_low, n, s.gk_proj1, &mut raw, false)?;
        let gate = empty(g, n * widths[1], DType::F32)?;
        let clamp = c.clamp_min.map_or(f32::NEG_INFINITY, |m| m as f32);
        let norm = GATE_LOGIT_NORMALIZER as f32;
        self.ops.gate_fwd(
            g,
            buf_ptr(g, &raw),
            self.p(s.gk_bias),
            buf_ptr(g, &gate),
            n * widths[1],
            widths[1],
            norm,
            clamp,
        )?;
        let v = outs.pop().expect("three projections");
        let k = outs.pop().expect("three projections");
        let q = outs.pop().expect("three projections");
        let conv = match convs.len() {
            3 => {
                let mut it = convs.into_iter();
                Some([it.next().unwrap(), it.next().unwrap(), it.next().unwrap()])
            }
            _ => None,
        };
        Ok(AttnInputs {
            h1,
            rstd1,
            q,
            k,
            v,
            conv,
            gk_low,
            raw,
            gate: f32_slice(gate),
        })
    }

    /// A block after its attention: the gated output norm of `o` [n, H, V], the output
    /// projection onto the residual, and the MLP.
    fn attn_output_and_mlp(
        &self,
        s: &LayerSlots,
        x_in: &Buf,
        h1: &Buf,
        o: &Buf,
        n: usize,
    ) -> Result<BlockRest> {
        let (g, c, dt) = (&self.gpu, &self.config, self.dtype);
        let (d, eps) = (c.hidden_size, c.norm_eps as f32);
        let (h, hv) = (c.num_heads, c.head_v_dim());
        let g_pre = match s.g_proj {
            Some(gp) => {
                let mut x = empty(g, n * c.value_dim(), dt)?;
                self.linear(h1, n, gp, &mut x, false)?;
                Some(x)
            }
            None => None,
        };
        let o_gated = empty(g, n * c.value_dim(), dt)?;
        let rstd_o = empty(g, n * h, DType::F32)?;
        let gp = g_pre.as_ref().map_or(0, |x| buf_ptr(g, x));
        let gw = s.g_norm.map_or(0, |i| self.p(i));
        self.ops.norm_gate_fwd(
            g,
            buf_ptr(g, o),
            gp,
            gw,
            buf_ptr(g, &o_gated),
            buf_ptr(g, &rstd_o),
            n * h,
            hv,
            eps,
        )?;
        let mut x_mid = clone_buf(g, x_in)?;
        self.linear(&o_gated, n, s.o_proj, &mut x_mid, true)?;
        let h2 = empty(g, n * d, dt)?;
        let rstd2 = empty(g, n, DType::F32)?;
        self.ops.rms_norm_fwd(
            g,
            buf_ptr(g, &x_mid),
            self.p(s.mlp_norm),
            buf_ptr(g, &h2),
            buf_ptr(g, &rstd2),
            n,
            d,
            eps,
        )?;
        let inter = c.intermediate();
        let mut gate = empty(g, n * inter, dt)?;
        let mut up = empty(g, n * inter, dt)?;
        self.linear(&h2, n, s.gate_proj, &mut gate, false)?;
        self.linear(&h2, n, s.up_proj, &mut up, false)?;
        let m = empty(g, n * inter, dt)?;
        self.ops.swiglu_fwd(
            g,
            buf_ptr(g, &gate),
            buf_ptr(g, &up),
            buf_ptr(g, &m),
            n * inter,
        )?;
        let mut x_out = clone_buf(g, &x_mid)?;
        self.linear(&m, n, s.down_proj, &mut x_out, true)?;
        // m is computed again in the backward (swiglu_bwd) rather than kept.
        drop(m);
        Ok(BlockRest {
            g_pre,
            rstd_o,
            o_gated,
            x_mid,
            h2,
            rstd2,
            gate,
            up,
            x_out,
        })
    }

    /// One block's forward; with `seq`, this rank's segment of sequence-parallel training.
    fn layer_forward(
        &self,
        s: &LayerSlots,
        x_in: Buf,
        b: usize,
        t: usize,
        seq: bool,
    ) -> Result<(LayerTape, Buf)> {
        let c = &self.config;
        let a = self.attn_inputs(s, &x_in, (b, t), None, seq)?;
        self.mark("fwd: norm, q k v, gates");
        let (h, hk, hv) = (c.num_heads, c.head_k_dim(), c.head_v_dim());
        let mut gla = DeviceGla::from_device(
            &self.gpu,
            (b, t, h),
            (hk, hv),
            a.q,
            a.k,
            a.v,
            Buf::F32(a.gate),
        )?;
        match self.seq_group().filter(|_| seq) {
            Some(group) => gla.forward_seq_parallel(&self.gpu, group)?,
            None => gla.forward(&self.gpu)?,
        }
        self.mark("fwd: GLA");
        let r = self.attn_output_and_mlp(s, &x_in, &a.h1, &gla.o, b * t)?;
        self.mark("fwd: output gate, o_proj, MLP");
        let tape = LayerTape {
            x_in,
            h1: a.h1,
            rstd1: a.rstd1,
            conv: a.conv,
            gk_low: a.gk_low,
            raw: a.raw,
            gla,
            g_pre: r.g_pre,
            rstd_o: r.rstd_o,
            o_gated: r.o_gated,
            x_mid: r.x_mid,
            h2: r.h2,
            rstd2: r.rstd2,
            gate: r.gate,
            up: r.up,
        };
        Ok((tape, r.x_out))
    }

    /// d loss / d x_in of one block from d loss / d x_out (f32, updated in place) and its
    /// element-type copy, adding into the parameters' gradients.
    fn layer_backward(
        &mut self,
        s: &LayerSlots,
        mut lt: LayerTape,
        (b, t): (usize, usize),
        dx_out: Buf,
        dx_io: Buf,
        seq: bool,
    ) -> Result<(Buf, Buf)> {
        let (c, dt) = (self.config.clone(), self.dtype);
        let (n, d) = (b * t, c.hidden_size);
        let (h, hv) = (c.num_heads, c.head_v_dim());
        let inter = c.intermediate();
        // MLP: dm, then dgate, dup and m again, then the down projection's weight gradient.
        let mut dm = empty(&self.gpu, n * inter, dt)?;
        self.linear_dx(&dx_io, n, s.down_proj, &mut dm, false)?;
        let g = &self.gpu;
        let (dgate, dup) = (empty(g, n * inter, dt)?, empty(g, n * inter, dt)?);
        let m = empty(g, n * inter, dt)?;
        self.ops.swiglu_bwd(
            g,
            buf_ptr(g, &lt.gate),
            buf_ptr(g, &lt.up),
            buf_ptr(g, &dm),
            buf_ptr(g, &dgate),
            buf_ptr(g, &dup),
            buf_ptr(g, &m),
            n * inter,
        )?;
        drop(dm);
        self.linear_dw(&m, &dx_io, n, s.down_proj)?;
        drop(m);
        let mut dh2 = empty(&self.gpu, n * d, DType::F32)?;
        self.linear_back(&lt.h2, &dgate, n, s.gate_proj, &mut dh2, false)?;
        self.linear_back(&lt.h2, &dup, n, s.up_proj, &mut dh2, true)?;
        let g = &self.gpu;
        let dx_mid = dx_out;
        self.ops.rms_norm_bwd(
            g,
            buf_ptr(g, &lt.x_mid),
            self.p(s.mlp_norm),
            buf_ptr(g, &lt.rstd2),
            buf_ptr(g, &dh2),
            buf_ptr(g, &dx_mid),
            buf_ptr(g, &dx_io),
            self.pg(s.mlp_norm),
            n,
            d,
        )?;
        self.mark("bwd: MLP");
        // Output projection, gate and per-head norm.
        let mut do_gated = empty(g, n * c.value_dim(), dt)?;
        self.linear_back(&lt.o_gated, &dx_io, n, s.o_proj, &mut do_gated, false)?;
        let g = &self.gpu;
        let d_o = empty(g, n * c.value_dim(), dt)?;
        let dg = empty(g, n * c.value_dim(), dt)?;
        let gp = lt.g_pre.as_ref().map_or(0, |x| buf_ptr(g, x));
        let gw = s.g_norm.map_or(0, |i| self.p(i));
        let gwg = s.g_norm.map_or(0, |i| self.pg(i));
        self.ops.norm_gate_bwd(
            g,
            buf_ptr(g, &lt.gla.o),
            gp,
            gw,
            buf_ptr(g, &lt.rstd_o),
            buf_ptr(g, &do_gated),
            buf_ptr(g, &d_o),
            buf_ptr(g, &dg),
            gwg,
            n * h,
            hv,
        )?;
        drop(do_gated);
        // dh1 gathers five products; the first writes it, or it starts at zero.
        let mut dh1 = match s.g_proj {
            Some(gpj) => {
                let mut dh1 = empty(g, n * d, DType::F32)?;
                self.linear_back(&lt.h1, &dg, n, gpj, &mut dh1, false)?;
                dh1
            }
            None => zeros(g, n * d, DType::F32)?,
        };
        self.mark("bwd: o_proj, output gate");
        // Attention.
        let g = &self.gpu;
        let up = DeviceUpstream::from_device(d_o);
        match self.seq_group().filter(|_| seq) {
            Some(group) => lt.gla.backward_seq_parallel(g, group, &up)?,
            None => lt.gla.backward(g, &up)?,
        }
        let (dq, dk, dv, dgk) = lt
            .gla
            .device_grads()
            .ok_or_else(|| Error::Device("no GLA gradients".into()))?;
        let dgk = dgk.ok_or_else(|| Error::Device("no key-gate gradient".into()))?;
        self.mark("bwd: GLA");
        // Key gates: through logsigmoid / 16 and the clamp, then the low-rank pair.
        let kw = c.key_dim();
        let draw = empty(g, n * kw, dt)?;
        let clamp = c.clamp_min.map_or(f32::NEG_INFINITY, |m| m as f32);
        let norm = GATE_LOGIT_NORMALIZER as f32;
        self.ops.gate_bwd(
            g,
            buf_ptr(g, &lt.raw),
            buf_ptr(g, dgk),
            buf_ptr(g, &draw),
            self.pg(s.gk_bias),
            n,
            kw,
            norm,
            clamp,
        )?;
        let mut dlow = empty(g, n * GATE_LOW_RANK, dt)?;
        // dlow is a product output read by the next product: written in the element type.
        self.linear_back(&lt.gk_low, &draw, n, s.gk_proj1, &mut dlow, false)?;
        self.linear_back(&lt.h1, &dlow, n, s.gk_proj0, &mut dh1, true)?;
        // q, k, v: SiLU and convolution, then the projections.
        let projs = [s.q_proj, s.k_proj, s.v_proj];
        let widths = [kw, kw, c.value_dim()];
        for (i, dout) in [dq, dk, dv].into_iter().enumerate() {
            let conv_grad = match (&lt.conv, s.convs) {
                (Some(conv), Some(cv)) => {
                    let g = &self.gpu;
                    let ct = &conv[i];
                    let dlin = empty(g, n * widths[i], dt)?;
                    let next = match seq {
                        true => self.conv_halo_grad(ct, dout, cv[i], (b, t, widths[i]))?,
                        false => None,
                    };
                    self.ops.conv_silu_bwd(
                        g,
                        buf_ptr(g, &ct.lin),
                        self.p(cv[i]),
                        buf_ptr(g, &ct.pre),
                        buf_ptr(g, dout),
                        next.as_ref().map_or(0, |x| ptr(g, x)),
                        buf_ptr(g, &dlin),
                        self.pg(cv[i]),
                        (b, t, widths[i]),
                        c.conv_size,
                    )?;
                    Some(dlin)
                }
                _ => None,
            };
            let dlin = conv_grad.as_ref().unwrap_or(dout);
            self.linear_back(&lt.h1, dlin, n, projs[i], &mut dh1, true)?;
        }
        let g = &self.gpu;
        self.mark("bwd: gates, q k v, attn norm");
        let dx_in = dx_mid;
        self.ops.rms_norm_bwd(
            g,
            buf_ptr(g, &lt.x_in),
            self.p(s.attn_norm),
            buf_ptr(g, &lt.rstd1),
            buf_ptr(g, &dh1),
            buf_ptr(g, &dx_in),
            buf_ptr(g, &dx_io),
            self.pg(s.attn_norm),
            n,
            d,
        )?;
        Ok((dx_in, dx_io))
    }

    /// The forward alone: mean cross-entropy of `ids` [B, T] against `targets` (negative:
    /// ignored) and, when asked, the logits [B*T, vocab]; each layer's activations are freed
    /// as the next runs.
    pub fn evaluate(
        &self,
        ids: &[usize],
        b: usize,
        t: usize,
        targets: &[i64],
        want_logits: bool,
    ) -> Result<(f64, Option<Vec<f32>>)> {
        let (n, vocab) = (b * t, self.config.vocab_size);
        if ids.len() != n || targets.len() != n || n == 0 {
            return Err(Error::Invalid(format!(
                "{} ids and {} targets for a batch of {b} x {t}",
                ids.len(),
                targets.len()
            )));
        }
        let (mut x, _ids) = self.embed(ids)?;
        for slots in &self.layout.layers {
            x = self.layer_forward(slots, x, b, t, false)?.1;
        }
        let rows: Vec<usize> = (0..n).collect();
        let logits = self.logits_of_rows(&x, &rows)?;
        let (loss, _) = crate::nn::cross_entropy(&logits, vocab, targets);
        Ok((loss, want_logits.then_some(logits)))
    }

    /// x [n, d] f32 for the token ids `ids` (uploaded here).
    fn embed(&self, ids: &[usize]) -> Result<(Buf, CudaSlice<i32>)> {
        let (g, d) = (&self.gpu, self.config.hidden_size);
        let vocab = self.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&i| i >= vocab) {
            return Err(Error::Invalid(format!(
                "input_ids holds token {bad}, outside the vocabulary of {vocab}"
            )));
        }
        let ids32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let ids_d: CudaSlice<i32> = g.stream().clone_htod(&ids32).map_err(dev("upload"))?;
        let x = empty(g, ids.len() * d, DType::F32)?;
        let idp = fla_cuda::cudarc::driver::DevicePtr::device_ptr(&ids_d, g.stream()).0;
        self.ops.embed_fwd(
            g,
            idp,
            self.p(self.layout.embeddings),
            buf_ptr(g, &x),
            ids.len(),
            d,
        )?;
        Ok((x, ids_d))
    }

    /// The final RMSNorm of x [n, d]: the normed rows in the element type and 1/rms.
    fn final_norm(&self, x: &Buf, n: usize) -> Result<(Buf, Buf)> {
        let (g, d) = (&self.gpu, self.config.hidden_size);
        let hf = empty(g, n * d, self.dtype)?;
        let rstd = empty(g, n, DType::F32)?;
        let eps = self.config.norm_eps as f32;
        self.ops.rms_norm_fwd(
            g,
            buf_ptr(g, x),
            self.p(self.layout.norm),
            buf_ptr(g, &hf),
            buf_ptr(g, &rstd),
            n,
            d,
            eps,
        )?;
        Ok((hf, rstd))
    }

    /// Logits [rows, vocab] (host) of the residual rows `rows` of x [n, d].
    fn logits_of_rows(&self, x: &Buf, rows: &[usize]) -> Result<Vec<f32>> {
        let (g, d, vocab) = (&self.gpu, self.config.hidden_size, self.config.vocab_size);
        let Buf::F32(src) = x else {
            unreachable!("the residual stream is f32")
        };
        let mut picked: CudaSlice<f32> = g
            .stream()
            .alloc_zeros(rows.len() * d)
            .map_err(dev("allocation"))?;
        for (i, &r) in rows.iter().enumerate() {
            let from = src.slice(r * d..(r + 1) * d);
            let mut to = picked.slice_mut(i * d..(i + 1) * d);
            g.stream()
                .memcpy_dtod(&from, &mut to)
                .map_err(dev("copy"))?;
        }
        let n = rows.len();
        let (hf, _) = self.final_norm(&Buf::F32(picked), n)?;
        let mut logits = empty(g, n * vocab, DType::F32)?;
        self.linear(&hf, n, self.layout.output_slot(), &mut logits, false)?;
        logits.download(g)
    }

    /// Feeds prompts `ids` [B, T] chunkwise; returns the logits after each sequence's last
    /// token [B, vocab] and the generation state (convolution windows, attention states).
    pub fn prefill(&self, ids: &[usize], b: usize, t: usize) -> Result<(Vec<f32>, GpuCache)> {
        let c = &self.config;
        if b == 0 || t == 0 || ids.len() != b * t {
            return Err(Error::Invalid(format!(
                "{} prompt ids do not form {b} prompts of {t} tokens",
                ids.len()
            )));
        }
        let (mut x, _ids) = self.embed(ids)?;
        let (h, hk, hv) = (c.num_heads, c.head_k_dim(), c.head_v_dim());
        let past = c.conv_size.saturating_sub(1);
        let mut layers = Vec::with_capacity(self.layout.layers.len());
        for slots in &self.layout.layers {
            let (tape, out) = self.layer_forward(slots, x, b, t, false)?;
            x = out;
            let state = Tensor::new(
                vec![b, h, hk, hv],
                self.gpu
                    .stream()
                    .clone_dtoh(&tape.gla.ht)
                    .map_err(dev("download"))?,
            )?;
            let mut dec = Decoder::new(
                &self.gpu,
                GateKind::Key,
                (b, h),
                (hk, hv),
                (hk as f32).powf(-0.5),
                self.dtype,
            )?;
            dec.set_state(&self.gpu, &state)?;
            // Each window: the last conv_size - 1 projections of each prompt, zeros before it.
            let mut windows = Vec::new();
            for ConvTape { lin, .. } in tape.conv.iter().flatten() {
                let width = lin.len() / (b * t);
                let all = lin.download(&self.gpu)?;
                let mut w = vec![0.0f32; b * past * width];
                for seq in 0..b {
                    for k in 0..past.min(t) {
                        let src = (seq * t + t - 1 - k) * width;
                        let dst = (seq * past + past - 1 - k) * width;
                        w[dst..dst + width].copy_from_slice(&all[src..src + width]);
                    }
                }
                windows.push(Buf::upload(&self.gpu, &w, DType::F32)?);
            }
            layers.push(GpuLayerCache { windows, dec });
        }
        let last: Vec<usize> = (0..b).map(|i| i * t + t - 1).collect();
        Ok((
            self.logits_of_rows(&x, &last)?,
            GpuCache { b, len: t, layers },
        ))
    }

    /// One token per sequence through the cache (the recurrent step); logits [B, vocab].
    pub fn step(&self, cache: &mut GpuCache, tokens: &[usize]) -> Result<Vec<f32>> {
        let c = &self.config;
        let b = cache.b;
        if tokens.len() != b {
            return Err(Error::Invalid(format!(
                "{} tokens for {b} sequences",
                tokens.len()
            )));
        }
        let (mut x, _ids) = self.embed(tokens)?;
        for (slots, lc) in self.layout.layers.iter().zip(&mut cache.layers) {
            let windows = (!lc.windows.is_empty()).then_some(&mut lc.windows[..]);
            let a = self.attn_inputs(slots, &x, (b, 1), windows, false)?;
            let mut o = zeros(&self.gpu, b * c.value_dim(), self.dtype)?;
            let inputs = StepInputs {
                q: &a.q,
                k: &a.k,
                v: &a.v,
                g: Some(&a.gate),
                gv: None,
                u: None,
            };
            lc.dec.step(&self.gpu, &inputs, &mut o)?;
            x = self.attn_output_and_mlp(slots, &x, &a.h1, &o, b)?.x_out;
        }
        cache.len += 1;
        let rows: Vec<usize> = (0..b).collect();
        self.logits_of_rows(&x, &rows)
    }

    /// Global L2 norm of the gradients (after the ranks' sum, under data parallelism).
    pub fn grad_norm(&mut self) -> Result<f64> {
        self.finish_grads()?;
        let g = &self.gpu;
        let acc = empty(g, 1, DType::F32)?;
        let (grads, n) = self.stepped_grads();
        self.ops.sum_squares(g, grads, buf_ptr(g, &acc), n)?;
        self.mark("gradient norm");
        let mine = acc.download(g)?[0] as f64;
        Ok(self.sum_over_shards(mine)?.sqrt())
    }

    /// One AdamW step (β 0.9/0.95, ε 1e-8, decay on matrices unless `decay_all`), with the
    /// gradients scaled by `grad_scale` (clipping); refreshes the element-type weights. Steps
    /// the elements this rank owns ([`FlatPlan::owned`]: all of them but under ZeRO-1).
    pub fn adamw(
        &mut self,
        lr: f64,
        weight_decay: f64,
        decay_all: bool,
        grad_scale: f64,
    ) -> Result<()> {
        self.finish_grads()?;
        self.step += 1;
        let t = self.step as i32;
        let g = &self.gpu;
        let (grads, _) = self.stepped_grads();
        let elem = if self.dtype == DType::Bf16 { 2 } else { 4 };
        for seg in self.plan.owned(self.shard_rank()) {
            let i = seg.param;
            let decays = decay_all || self.layout.specs[i].role == Role::Matrix;
            let h = AdamStep {
                lr: lr as f32,
                shrink: if decays {
                    (1.0 - lr * weight_decay) as f32
                } else {
                    1.0
                },
                beta1: 0.9,
                beta2: 0.95,
                c1: (1.0 - 0.9f64.powi(t)) as f32,
                c2: (1.0 - 0.95f64.powi(t)) as f32,
                eps: 1e-8,
                grad_scale: grad_scale as f32,
            };
            // Under ZeRO-1 the copies are refreshed whole after the weights' all-gather.
            let copy = match (&self.weights[i], self.sharded()) {
                (Some(w), false) => {
                    buf_ptr(g, w) + elem * (seg.flat.start - self.plan.offsets[i]) as u64
                }
                _ => 0,
            };
            // The weights in place in the whole; the gradients and moments in this rank's shard.
            let at = 4 * seg.shard.start as u64;
            self.ops.adamw(
                g,
                buf_ptr(g, &self.master) + 4 * seg.flat.start as u64,
                grads + at,
                buf_ptr(g, &self.m) + at,
                buf_ptr(g, &self.v) + at,
                copy,
                seg.shard.len(),
                &h,
            )?;
        }
        self.gather_weights()?;
        self.mark("AdamW");
        self.close_profile();
        Ok(())
    }
}
