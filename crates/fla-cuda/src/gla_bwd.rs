//! The GLA backward on the GPU (kernels/gla_bwd.cu): upstream gradients uploaded beside a
//! [`DeviceGla`] whose forward has run, four kernels launched, gradients read back as host
//! f32 tensors in the exchange layout.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use fla_ops::{Form, GateKind, GlaGrads, GlaInputs, GlaOutputs};
use fla_tensor::{Error, Result, Tensor};

use crate::device::{device_err, Gpu};
use crate::gla::{
    forced_tile, opt_ptr, recurrent_kernels, threads, upload_f32, Buf, DType, DeviceGla,
};
use crate::gla_chunk::Chunks;

const BWD: &str = concat!(
    include_str!("../kernels/common.cuh"),
    "\n",
    include_str!("../kernels/gla_bwd.cu")
);
/// Rows per block of gla_bwd_rows (RB in the kernel).
const ROWS_PER_BLOCK: usize = 64;

/// The upstream gradients of one call on the device: do [B,T,H,V] in the call's dtype and,
/// optionally, dht [N,H,K,V] in f32.
pub struct DeviceUpstream {
    pub(crate) d_o: Buf,
    pub(crate) dht: Option<CudaSlice<f32>>,
}

/// Gradient buffers, with the f32 work buffers the kernels pass between them.
pub(crate) struct DeviceGrads {
    pub(crate) dq: Buf,
    pub(crate) dk: Buf,
    pub(crate) dv: Buf,
    /// q ⊙ dq without the diagonal terms, for the key gate's gradient.
    pub(crate) qdq: Option<CudaSlice<f32>>,
    /// The key gate's gradient per key column [B,T,H,K] (summed over K for a scalar gate),
    /// in the gates' element type.
    pub(crate) dgk: Option<Buf>,
    pub(crate) dg_scalar: Option<CudaSlice<f32>>,
    pub(crate) dgv: Option<CudaSlice<f32>>,
    pub(crate) du: Option<CudaSlice<f32>>,
    pub(crate) dh0: Option<CudaSlice<f32>>,
    pub(crate) work: Work,
}

/// What only one form's backward keeps.
pub(crate) enum Work {
    Chunk(ChunkWork),
    /// The two-level form keeps nothing beyond the forward's states.
    TwoLevel,
    /// dq and dk summed in f32 over the recurrent kernels' V tiles, then cast; the state at
    /// the end of every segment (with a gate), for the gate gradients' sums.
    Recurrent {
        dq: CudaSlice<f32>,
        dk: CudaSlice<f32>,
        ckpt: Option<CudaSlice<f32>>,
    },
}

pub(crate) struct ChunkWork {
    /// dv without its diagonal terms, summed over key tiles.
    dv_acc: CudaSlice<f32>,
    /// Each chunk's starting state [chunks, H, K, V] (with a gate), for the gates' gradients.
    states: Option<Buf>,
    /// The value gate's chunk boundary terms [chunks, H, V].
    zv: Option<CudaSlice<f32>>,
    chunks: Chunks,
}

pub(crate) fn zeros(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    gpu.stream.alloc_zeros(n).map_err(device_err("allocation"))
}

fn zeros_if(gpu: &Gpu, cond: bool, n: usize) -> Result<Option<CudaSlice<f32>>> {
    cond.then(|| zeros(gpu, n)).transpose()
}

pub(crate) fn ptr_mut(x: &mut Option<CudaSlice<f32>>, gpu: &Gpu) -> u64 {
    x.as_mut().map_or(0, |b| b.device_ptr_mut(&gpu.stream).0)
}

/// Shared memory of gla_bwd_dq and gla_bwd_dkv; the same sum as the OFF_* chain of
/// gla_bwd.cu.
fn bwd_smem(c: usize, bk: usize, bvs: usize, dv: usize, io: usize, gates: (bool, bool)) -> usize {
    let pad = 16 / io;
    4 * c * (bk + pad) * io
        + 2 * c * (bvs + pad) * io
        + if gates.0 { c * bk * 4 } else { 0 }
        + if gates.1 { c * bvs * 4 } else { 0 }
        + 2 * c * (c + 8) * 4
        + c * (bk + 4) * 4
        + c * (bvs + 4) * 4
        + bk * (dv + 4) * 4
        + c * 4
        + bk * 4
        + 16
}

/// (chunk, K tile, V step) of the backward: the widest that fit in shared memory, the K tile
/// then narrowed while that leaves more than half the GPU idle (each K tile recomputes the
/// chunk's do·v products, so narrower costs).
fn bwd_tiling(gpu: &Gpu, d: &DeviceGla) -> Result<(usize, usize, usize)> {
    let gates = (d.gate != GateKind::None, d.gate == GateKind::Both);
    let (dk, dv, io) = (d.dk, d.dv, d.dtype.bytes());
    let fits = |c, bk, bvs| {
        dk.is_multiple_of(bk)
            && dv.is_multiple_of(bvs)
            && bwd_smem(c, bk, bvs, dv, io, gates) <= gpu.max_smem()
    };
    let heads = d.n_seqs * d.h;
    for c in [64, 32] {
        let forced_bvs = forced_tile("FLA_GLA_BVS");
        for bvs in [64, 32, 16]
            .into_iter()
            .filter(|&b| forced_bvs.is_none_or(|f| f == b))
        {
            if let Some(bk) = forced_tile("FLA_GLA_BK").filter(|&bk| fits(c, bk, bvs)) {
                return Ok((c, bk, bvs));
            }
            if let Some(mut bk) = [64, 32, 16].into_iter().find(|&bk| fits(c, bk, bvs)) {
                while bk > 16 && fits(c, bk / 2, bvs) && 2 * heads * dk / bk <= gpu.sms() {
                    bk /= 2;
                }
                return Ok((c, bk, bvs));
            }
        }
    }
    Err(Error::Device(format!(
        "head sizes K={dk}, V={dv} do not fit the GPU's shared memory"
    )))
}

impl DeviceUpstream {
    /// do already on the device ([B,T,H,V] in the call's element type), no dht.
    pub fn from_device(d_o: Buf) -> DeviceUpstream {
        DeviceUpstream { d_o, dht: None }
    }
}

impl DeviceGla {
    /// dq, dk, dv (element type) and the key gate's gradient (the gates' element type) of
    /// the last backward, on the device.
    pub fn device_grads(&self) -> Option<(&Buf, &Buf, &Buf, Option<&Buf>)> {
        self.grads
            .as_ref()
            .map(|g| (&g.dq, &g.dk, &g.dv, g.dgk.as_ref()))
    }

    /// Checks and uploads the upstream gradients: do like o, dht like ht.
    pub fn upstream(
        &self,
        gpu: &Gpu,
        d_o: &Tensor<f32>,
        dht: Option<&Tensor<f32>>,
    ) -> Result<DeviceUpstream> {
        d_o.expect_shape("do", &[self.b, self.t, self.h, self.dv], "[B, T, H, V]")?;
        if let Some(d) = dht {
            d.expect_shape(
                "dht",
                &[self.n_seqs, self.h, self.dk, self.dv],
                "[N, H, K, V]",
            )?;
        }
        Ok(DeviceUpstream {
            d_o: Buf::upload(gpu, d_o.data(), self.dtype)?,
            dht: upload_f32(gpu, dht)?,
        })
    }

    /// The gradient buffers, zeroed, around one form's work buffers.
    pub(crate) fn alloc_grads(&self, gpu: &Gpu, work: Work) -> Result<DeviceGrads> {
        let rows = self.b * self.t * self.h;
        let has_g = self.gate != GateKind::None;
        // The two-level kernels sum the scalar gate's gradient directly and need no q ⊙ dq.
        let two_level = matches!(work, Work::TwoLevel);
        let per_key = if two_level {
            self.gate == GateKind::Key
        } else {
            has_g
        };
        // The two-level kernels write every element of dq, dk, dv and the key gate's gradient;
        // the fused ones add into some of them.
        let grad = |n: usize| {
            if two_level {
                Buf::uninit(gpu, n, self.dtype)
            } else {
                Buf::zeros(gpu, n, self.dtype)
            }
        };
        let gate_dtype = self.g.as_ref().map_or(DType::F32, |g| g.dtype());
        let dgk = per_key
            .then(|| {
                if two_level {
                    Buf::uninit(gpu, rows * self.dk, gate_dtype)
                } else {
                    Buf::zeros(gpu, rows * self.dk, gate_dtype)
                }
            })
            .transpose()?;
        Ok(DeviceGrads {
            dq: grad(rows * self.dk)?,
            dk: grad(rows * self.dk)?,
            dv: grad(rows * self.dv)?,
            qdq: zeros_if(gpu, has_g && !two_level, rows * self.dk)?,
            dgk,
            dg_scalar: zeros_if(gpu, self.gate == GateKind::Scalar, rows)?,
            dgv: zeros_if(gpu, self.gate == GateKind::Both, rows * self.dv)?,
            du: zeros_if(gpu, self.u.is_some(), self.h * self.dk)?,
            dh0: zeros_if(
                gpu,
                self.h0.is_some(),
                self.n_seqs * self.h * self.dk * self.dv,
            )?,
            work,
        })
    }

    fn chunk_work(&self, gpu: &Gpu, chunk: usize) -> Result<ChunkWork> {
        let chunks = Chunks::new(gpu, &self.lens, chunk)?;
        let states_len = chunks.count * self.h * self.dk * self.dv;
        Ok(ChunkWork {
            dv_acc: zeros(gpu, self.b * self.t * self.h * self.dv)?,
            states: (self.gate != GateKind::None)
                .then(|| Buf::zeros(gpu, states_len.max(1), self.dtype))
                .transpose()?,
            zv: zeros_if(
                gpu,
                self.gate == GateKind::Both,
                (chunks.count * self.h * self.dv).max(1),
            )?,
            chunks,
        })
    }

    /// Launches the backward for upstream gradients `up`; the forward must have run (the
    /// gates' gradients read its final states, and the value gate's its outputs).
    pub fn backward(&mut self, gpu: &Gpu, up: &DeviceUpstream) -> Result<()> {
        if !self.forward_done {
            return Err(Error::Invalid(
                "the GPU backward needs the forward run first".into(),
            ));
        }
        if self.use_two_level {
            return self.backward_two_level(gpu, up);
        }
        self.widen_gates(gpu)?;
        let (c, bk, bvs) = bwd_tiling(gpu, self)?;
        if !matches!(
            self.grads,
            Some(DeviceGrads {
                work: Work::Chunk(_),
                ..
            })
        ) {
            let work = Work::Chunk(self.chunk_work(gpu, c)?);
            self.grads = Some(self.alloc_grads(gpu, work)?);
        }
        let gates = (self.gate != GateKind::None, self.gate == GateKind::Both);
        let smem = bwd_smem(c, bk, bvs, self.dv, self.dtype.bytes(), gates);
        let atomic = self.dk / bk > 1;
        let nt = threads("FLA_GLA_BWD_NT");
        let mut defines = self.defines(c, nt);
        defines.extend([
            ("BK", bk as i64),
            ("BVS", bvs as i64),
            ("HAS_DHT", i64::from(up.dht.is_some())),
            ("DV_ATOMIC", i64::from(atomic)),
        ]);
        let s = &gpu.stream;
        let [q, k, v, g, gv, u, h0] = self.input_ptrs(gpu);
        let gr = self.grads.as_mut().expect("allocated above");
        let Work::Chunk(cw) = &mut gr.work else {
            unreachable!("chunk work allocated above")
        };
        if atomic {
            s.memset_zeros(&mut cw.dv_acc)
                .map_err(device_err("memset"))?;
        }
        for x in [gr.du.as_mut(), cw.zv.as_mut()].into_iter().flatten() {
            s.memset_zeros(x).map_err(device_err("memset"))?;
        }
        let (d_o, dht) = (up.d_o.ptr(gpu), opt_ptr(&up.dht, gpu));
        let ond = opt_ptr(&self.ond, gpu);
        let cu = self.cu_seqlens.device_ptr(s).0;
        let (dq, dk, dv) = (gr.dq.ptr_mut(gpu), gr.dk.ptr_mut(gpu), gr.dv.ptr_mut(gpu));
        let dv_acc = cw.dv_acc.device_ptr_mut(s).0;
        let qdq = ptr_mut(&mut gr.qdq, gpu);
        let dgk = gr.dgk.as_mut().map_or(0, |x| x.ptr_mut(gpu));
        let (dgs, dgv) = (ptr_mut(&mut gr.dg_scalar, gpu), ptr_mut(&mut gr.dgv, gpu));
        let (du, dh0) = (ptr_mut(&mut gr.du, gpu), ptr_mut(&mut gr.dh0, gpu));
        let states = cw.states.as_mut().map_or(0, |b| b.ptr_mut(gpu));
        let zv = ptr_mut(&mut cw.zv, gpu);
        let chunk_off = cw.chunks.off.device_ptr(s).0;
        let chunk_seq = cw.chunks.seq.device_ptr(s).0;
        let (h, scale) = (self.h as i32, self.scale);
        let sweep = LaunchConfig {
            grid_dim: ((self.dk / bk) as u32, self.h as u32, self.n_seqs as u32),
            block_dim: (nt, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let launch = |name: &str, smem: usize, cfg: LaunchConfig, ptrs: &[&u64], ints: &[&i32]| {
            let f = gpu.function(BWD, name, &defines, smem)?;
            let mut l = s.launch_builder(&f);
            for p in ptrs {
                l.arg(*p);
            }
            for i in ints {
                l.arg(*i);
            }
            l.arg(&scale);
            unsafe { l.launch(cfg) }.map_err(device_err("gla backward launch"))?;
            Ok::<(), Error>(())
        };
        launch(
            "gla_bwd_dq",
            smem,
            sweep,
            &[
                &q, &k, &v, &g, &gv, &u, &h0, &d_o, &dq, &qdq, &states, &cu, &chunk_off,
            ],
            &[&h],
        )?;
        launch(
            "gla_bwd_dkv",
            smem,
            sweep,
            &[
                &q, &k, &v, &g, &gv, &u, &d_o, &dht, &qdq, &states, &dk, &dv_acc, &dgk, &zv, &dh0,
                &cu, &chunk_off,
            ],
            &[&h],
        )?;
        let tokens = (self.b * self.t) as i32;
        let rows = LaunchConfig {
            grid_dim: (
                (self.b * self.t).div_ceil(ROWS_PER_BLOCK).max(1) as u32,
                self.h as u32,
                1,
            ),
            block_dim: (nt, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(
            "gla_bwd_rows",
            0,
            rows,
            &[
                &q, &k, &v, &u, &d_o, &ond, &dv_acc, &dgk, &dv, &dgs, &dgv, &du,
            ],
            &[&tokens, &h],
        )?;
        if gates.1 && cw.chunks.count > 0 {
            // gla_bwd_dgv takes no scale: launched by hand.
            let f = gpu.function(BWD, "gla_bwd_dgv", &defines, 0)?;
            let cfg = LaunchConfig {
                grid_dim: (
                    self.dv.div_ceil(nt as usize) as u32,
                    self.h as u32,
                    cw.chunks.count as u32,
                ),
                block_dim: (nt, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = s.launch_builder(&f);
            l.arg(&dgv)
                .arg(&zv)
                .arg(&cu)
                .arg(&chunk_off)
                .arg(&chunk_seq)
                .arg(&h);
            unsafe { l.launch(cfg) }.map_err(device_err("gla_bwd_dgv launch"))?;
        }
        Ok(())
    }

    /// The gradients of the last backward as host f32 tensors, shaped like the CPU op's.
    pub fn gradients(&self, gpu: &Gpu) -> Result<GlaGrads<f32>> {
        let gr = self
            .grads
            .as_ref()
            .ok_or_else(|| Error::Invalid("no GPU backward has run".into()))?;
        gpu.synchronize()?;
        let (b, t, h, dk, dv) = (self.b, self.t, self.h, self.dk, self.dv);
        let get = |x: &CudaSlice<f32>| gpu.stream.clone_dtoh(x).map_err(device_err("download"));
        let tensor = |x: &Option<CudaSlice<f32>>, shape: Vec<usize>| {
            x.as_ref().map(|x| Tensor::new(shape, get(x)?)).transpose()
        };
        let dg = match self.gate {
            GateKind::Scalar => tensor(&gr.dg_scalar, vec![b, t, h])?,
            _ => gr
                .dgk
                .as_ref()
                .map(|x| Tensor::new(vec![b, t, h, dk], x.download(gpu)?))
                .transpose()?,
        };
        Ok(GlaGrads {
            dq: Tensor::new(vec![b, t, h, dk], gr.dq.download(gpu)?)?,
            dk: Tensor::new(vec![b, t, h, dk], gr.dk.download(gpu)?)?,
            dv: Tensor::new(vec![b, t, h, dv], gr.dv.download(gpu)?)?,
            dg,
            dgv: tensor(&gr.dgv, vec![b, t, h, dv])?,
            du: tensor(&gr.du, vec![h, dk])?,
            dh0: tensor(&gr.dh0, vec![self.n_seqs, h, dk, dv])?,
        })
    }
}

/// Forward and backward on the GPU from host tensors in `form`: outputs and every gradient.
pub fn gla_backward(
    gpu: &Gpu,
    gate: GateKind,
    x: &GlaInputs<f32>,
    d_o: &Tensor<f32>,
    dht: Option<&Tensor<f32>>,
    dtype: DType,
    form: Form,
) -> Result<(GlaOutputs<f32>, GlaGrads<f32>)> {
    let recurrent = recurrent_kernels(form)?;
    let mut d = DeviceGla::upload(gpu, gate, x, dtype)?;
    d.use_fused(form == Form::FusedChunk);
    let up = d.upstream(gpu, d_o, dht)?;
    if recurrent {
        d.forward_recurrent(gpu)?;
        d.backward_recurrent(gpu, &up)?;
    } else {
        d.forward(gpu)?;
        d.backward(gpu, &up)?;
    }
    Ok((d.outputs(gpu)?, d.gradients(gpu)?))
}
