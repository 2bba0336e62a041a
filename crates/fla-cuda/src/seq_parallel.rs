//! Sequence parallelism for the two-level chunk form (issue 5, docs/DISTRIBUTED.md): long
//! sequences split along T over ranks, rank r holding a contiguous segment of every sequence
//! (sequence n of rank r continues sequence n of rank r - 1). Only K x V states pass between
//! ranks; `fla_ops::gla::segments` states the same math on the CPU.
//!
//! Forward: every rank runs chunk_local and the state sweep on its segment from its own h0
//! (the caller's on rank 0, none on the others), giving its final state L_r, and sums its
//! chunks' gates to log D_r. After an all-gather of (L, log D), rank r's initial state is
//! H_r = fold over p < r of H ← D_p ⊙ H + L_p from H = 0 (rank 0's L already holds the
//! caller's h0); the sweep runs again from H_r and writes o. chunk_local's work does not
//! depend on the initial state, so it runs once.
//!
//! Backward: the gradient reaching a segment's start is linear in the one leaving its end,
//! dH_r = D_r ⊙ dH_{r+1} + dh0_r, with dh0_r from the segment's own outputs. Every rank but
//! the first runs the backward state sweep alone from its own dht (the caller's on the last
//! rank, none on the others), giving dh0_r; after an all-gather of (dh0, log D), rank r's
//! dht is dH_{r+1} = fold over p > r, last first, of dH ← D_p ⊙ dH + dh0_p from 0, and its
//! whole backward runs from it. Each rank then holds exactly its segment's gradients.
//!
//! The phases are public so that ranks can be run one after another on one GPU (the tests do);
//! [`DeviceGla::forward_seq_parallel`] and [`DeviceGla::backward_seq_parallel`] run them around
//! a communicator's all-gather.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use fla_ops::GateKind;
use fla_tensor::{Error, Result};

use crate::device::{device_err, Gpu};
use crate::gla::{uninit, DeviceGla};
use crate::gla_bwd::DeviceUpstream;
use crate::group::DeviceGroup;
use crate::layers::Arg;

const SRC: &str = include_str!("../kernels/seq_parallel.cu");
const THREADS: u32 = 256;

/// Kernel `name` of seq_parallel.cu over `n` threads.
fn launch(gpu: &Gpu, name: &str, n: usize, args: &[Arg]) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function(SRC, name, &[], 0)?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = gpu.stream.launch_builder(&f);
    for a in args {
        match a {
            Arg::P(p) => l.arg(p),
            Arg::I(i) => l.arg(i),
            Arg::L(x) => l.arg(x),
            Arg::F(x) => l.arg(x),
        };
    }
    unsafe { l.launch(cfg) }.map_err(device_err(name))?;
    Ok(())
}

impl DeviceGla {
    /// Elements of a state for every sequence and head.
    fn states_len(&self) -> usize {
        self.n_seqs * self.h * self.dk * self.dv
    }

    /// Floats a rank sends in each all-gather: its states, then its log decays.
    pub fn segment_payload_len(&self) -> usize {
        self.states_len() + self.n_seqs * self.h * self.dk
    }

    fn check_segment(&self, rank: usize, world: usize) -> Result<()> {
        if !self.use_two_level {
            return Err(Error::Invalid(format!(
                "sequence parallelism runs the two-level chunk form, for gates none, scalar or \
                 key; this call has gate {} and {} kernels",
                self.gate,
                if crate::gla_chunk::supports(self.gate) {
                    "the fused"
                } else {
                    "no two-level"
                }
            )));
        }
        if rank >= world {
            return Err(Error::Invalid(format!("rank {rank} of {world} ranks")));
        }
        Ok(())
    }

    /// The log decays of this segment (every sequence, head and key) into `payload` after its
    /// states, from the last forward's chunk gates.
    fn log_decays_into(&self, gpu: &Gpu, payload: &mut CudaSlice<f32>) -> Result<()> {
        let states = self.states_len();
        let (gam, off) = self
            .chunk_gates()
            .ok_or_else(|| Error::Invalid("the segment's forward has not run".into()))?;
        let s = &gpu.stream;
        let (gam, off) = (gam.device_ptr(s).0, off.device_ptr(s).0);
        let out = payload.device_ptr_mut(s).0 + (states * 4) as u64;
        let n_keys = self.n_seqs * self.h * self.dk;
        let args = [
            Arg::P(gam),
            Arg::P(off),
            Arg::P(out),
            Arg::I(n_keys as i32),
            Arg::I((self.h * self.dk) as i32),
            Arg::I(i32::from(self.gate != GateKind::None)),
        ];
        launch(gpu, "segment_log_decay", n_keys, &args)
    }

    /// Folds the gathered payloads into this rank's initial state (forward) or the gradient
    /// reaching its segment's end (backward).
    fn fold(
        &self,
        gpu: &Gpu,
        gathered: &CudaSlice<f32>,
        (rank, world): (usize, usize),
        backward: bool,
    ) -> Result<CudaSlice<f32>> {
        let len = self.segment_payload_len();
        if gathered.len() != len * world {
            return Err(Error::Invalid(format!(
                "gathered segment states: {} floats, {world} ranks of {len} expected",
                gathered.len()
            )));
        }
        let states = self.states_len();
        let mut out = uninit::<f32>(gpu, states.max(1))?;
        let s = &gpu.stream;
        let (src, dst) = (gathered.device_ptr(s).0, out.device_ptr_mut(s).0);
        let args = [
            Arg::P(src),
            Arg::P(dst),
            Arg::L(states as i64),
            Arg::I(self.dv as i32),
            Arg::I(rank as i32),
            Arg::I(world as i32),
            Arg::I(i32::from(backward)),
        ];
        launch(gpu, "fold_states", states, &args)?;
        Ok(out)
    }

    /// Forward, phase 1 of rank `rank` of `world`: chunk_local and the state sweep from this
    /// rank's own initial state (only rank 0 takes the caller's h0). Returns what the rank
    /// sends: its final state and its log decays.
    pub fn segment_forward_local(
        &mut self,
        gpu: &Gpu,
        rank: usize,
        world: usize,
    ) -> Result<CudaSlice<f32>> {
        self.check_segment(rank, world)?;
        if rank > 0 {
            if self.h0.is_some() && !self.folded_h0 {
                return Err(Error::Invalid(format!(
                    "rank {rank} of a sequence-parallel call was given h0: only rank 0 takes an \
                     initial state"
                )));
            }
            // A previous call's folded state is not this one's (the finish resets the gradient
            // buffers).
            self.h0 = None;
        }
        self.forward_done = false;
        self.two_level_local(gpu)?;
        self.two_level_sweep(gpu, false)?;
        let mut payload = uninit::<f32>(gpu, self.segment_payload_len())?;
        gpu.stream
            .memcpy_dtod(&self.ht, &mut payload.slice_mut(..self.states_len()))
            .map_err(device_err("device copy"))?;
        self.log_decays_into(gpu, &mut payload)?;
        Ok(payload)
    }

    /// Forward, phase 2: with every rank's phase-1 payload gathered in rank order, the sweep
    /// again from this rank's true initial state, and o. ht is then the state at this
    /// segment's end (the last rank's: the whole sequence's).
    pub fn segment_forward_finish(
        &mut self,
        gpu: &Gpu,
        gathered: &CudaSlice<f32>,
        rank: usize,
        world: usize,
    ) -> Result<()> {
        self.check_segment(rank, world)?;
        if rank > 0 {
            let h0 = self.fold(gpu, gathered, (rank, world), false)?;
            self.h0 = Some(h0);
            self.folded_h0 = true;
            // The gradient buffers gain dh0.
            self.grads = None;
        }
        self.two_level_sweep(gpu, true)?;
        self.forward_done = true;
        Ok(())
    }

    /// Backward, phase 1, after the sequence-parallel forward: the gradient reaching this
    /// segment's start from its own outputs (and, on the last rank, from the caller's dht).
    /// Rank 0's is not needed and is sent as zeros. Only the last rank takes a dht.
    pub fn segment_backward_local(
        &mut self,
        gpu: &Gpu,
        up: &DeviceUpstream,
        rank: usize,
        world: usize,
    ) -> Result<CudaSlice<f32>> {
        self.check_segment(rank, world)?;
        if !self.forward_done || (rank > 0 && !self.folded_h0) {
            return Err(Error::Invalid(
                "the sequence-parallel backward needs the sequence-parallel forward first".into(),
            ));
        }
        if up.dht.is_some() && rank + 1 < world {
            return Err(Error::Invalid(format!(
                "rank {rank} of {world} of a sequence-parallel call was given dht: only the \
                 last rank takes it"
            )));
        }
        let mut payload = gpu
            .stream
            .alloc_zeros::<f32>(self.segment_payload_len())
            .map_err(device_err("allocation"))?;
        if rank > 0 {
            let s = &gpu.stream;
            let dht = up.dht.as_ref().map_or(0, |x| x.device_ptr(s).0);
            let dh0 = payload.device_ptr_mut(s).0;
            self.two_level_dh0(gpu, &up.d_o, dht, dh0)?;
        }
        self.log_decays_into(gpu, &mut payload)?;
        Ok(payload)
    }

    /// Backward, phase 2: with every rank's phase-1 payload gathered, the whole backward from
    /// the gradient reaching this segment's end. dh0 is then the gradient at the segment's
    /// start (rank 0's: the caller's h0's, where one was given).
    pub fn segment_backward_finish(
        &mut self,
        gpu: &Gpu,
        up: &DeviceUpstream,
        gathered: &CudaSlice<f32>,
        rank: usize,
        world: usize,
    ) -> Result<()> {
        self.check_segment(rank, world)?;
        if rank + 1 == world {
            return self.backward_two_level_from(gpu, &up.d_o, up.dht.as_ref());
        }
        let dht = self.fold(gpu, gathered, (rank, world), true)?;
        self.backward_two_level_from(gpu, &up.d_o, Some(&dht))
    }

    /// The forward of this rank's segment of a sequence-parallel call over `group`.
    pub fn forward_seq_parallel(&mut self, gpu: &Gpu, group: &dyn DeviceGroup) -> Result<()> {
        let (rank, world) = (group.rank(), group.world());
        let part = self.segment_forward_local(gpu, rank, world)?;
        let all = group.gathered(gpu, &part)?;
        self.segment_forward_finish(gpu, &all, rank, world)
    }

    /// The backward of this rank's segment, after [`DeviceGla::forward_seq_parallel`].
    pub fn backward_seq_parallel(
        &mut self,
        gpu: &Gpu,
        group: &dyn DeviceGroup,
        up: &DeviceUpstream,
    ) -> Result<()> {
        let (rank, world) = (group.rank(), group.world());
        let part = self.segment_backward_local(gpu, up, rank, world)?;
        let all = group.gathered(gpu, &part)?;
        self.segment_backward_finish(gpu, up, &all, rank, world)
    }
}

/// What an all-gather would leave, for ranks run one after another on one GPU (tests,
/// benchmarks): every rank's payload side by side, in rank order.
pub fn gather_in_turn(gpu: &Gpu, parts: &[CudaSlice<f32>]) -> Result<CudaSlice<f32>> {
    let len = parts.first().map_or(0, |p| p.len());
    if parts.iter().any(|p| p.len() != len) {
        return Err(Error::Invalid("ranks' payloads of different sizes".into()));
    }
    let mut all = uninit::<f32>(gpu, (len * parts.len()).max(1))?;
    for (r, p) in parts.iter().enumerate() {
        gpu.stream
            .memcpy_dtod(p, &mut all.slice_mut(r * len..(r + 1) * len))
            .map_err(device_err("device copy"))?;
    }
    Ok(all)
}
