//! Training on several ranks inside the GPU model (docs/DISTRIBUTED.md): the gradients' sum
//! over the ranks, bucket by bucket as the backward finishes them, on the communicator's own
//! stream so that it overlaps the layers still to run; ZeRO-1, where each rank keeps the master
//! weights and AdamW moments of its pieces of the buckets only, steps those, and the ranks
//! all-gather the updated weights; and sequence parallelism, where the ranks hold segments of
//! the same sequences: the GLA layers pass states between them (fla-cuda's seq_parallel.rs)
//! and the short convolutions the rows across each boundary.

use fla_cuda::cudarc::driver::CudaSlice;
use fla_cuda::layers::{buf_ptr, ptr};
use fla_cuda::{Buf, DType, DeviceGroup};
use fla_tensor::{Error, Result};

use super::{dev, f32_mut, f32_ref, zeros, ConvTape, GpuModel};
use crate::dist::FlatPlan;

/// What each rank of a group holds of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Its share of the sequences (data parallelism).
    Batch,
    /// Its segment of every sequence, ranks in order along T (sequence parallelism).
    Sequence,
}

pub(super) struct Dist {
    group: Box<dyn DeviceGroup>,
    split: Split,
    /// ZeRO-1: this rank's shard ([`FlatPlan::owned`]) of the summed gradients, which the
    /// reduce-scatters leave; after the step it stages the rank's updated weights for the
    /// all-gather.
    shards: Option<CudaSlice<f32>>,
    /// Sum the buckets as the next backward finishes them (its last micro-batch's).
    in_backward: bool,
    /// Buckets whose sum has been issued this step, in the plan's order.
    issued: usize,
    /// Whether the compute stream has waited for this step's sums.
    joined: bool,
}

impl GpuModel {
    /// Makes this model one rank of training over `group`, holding what `split` says of each
    /// batch: the gradients are summed over the ranks in buckets of about `bucket_bytes` (f32),
    /// and with `zero` the optimizer state is sharded over them (ZeRO-1). The parameters and
    /// moments are laid out again for the buckets; every rank must start from the same ones.
    pub fn distribute(
        &mut self,
        group: Box<dyn DeviceGroup>,
        split: Split,
        bucket_bytes: usize,
        zero: bool,
    ) -> Result<()> {
        if self.dist.is_some() {
            return Err(Error::Invalid("the model is already distributed".into()));
        }
        let (model, opt) = (self.to_model()?, self.optimizer_state()?);
        let world = if zero { group.world() } else { 1 };
        self.plan = FlatPlan::new(&self.plan.lens, (bucket_bytes / 4).max(1), world);
        let shard = self.plan.shard_len();
        let gpu = &self.gpu;
        let shards = zero
            .then(|| gpu.stream().alloc_zeros(shard).map_err(dev("allocation")))
            .transpose()?;
        self.grads = zeros(gpu, self.plan.total, DType::F32)?;
        self.dist = Some(Dist {
            group,
            split,
            shards,
            in_backward: false,
            issued: 0,
            joined: true,
        });
        self.restore(&model, opt.step, &opt.m, &opt.v)
    }

    /// The next backward issues each bucket's sum over the ranks as soon as it has finished
    /// the bucket's gradients: call it before the last micro-batch of a step.
    pub fn reduce_in_backward(&mut self) {
        if let Some(d) = &mut self.dist {
            d.in_backward = true;
        }
    }

    /// The sum over the ranks of one number (a loss), or the number alone.
    pub fn sum_over_ranks(&self, x: f64) -> Result<f64> {
        match &self.dist {
            Some(d) => d.group.sum_f64(&self.gpu, x),
            None => Ok(x),
        }
    }

    /// The group when the ranks hold segments of the same sequences.
    pub(super) fn seq_group(&self) -> Option<&dyn DeviceGroup> {
        self.dist
            .as_ref()
            .filter(|d| d.split == Split::Sequence)
            .map(|d| d.group.as_ref())
    }

    /// Sequence parallelism: the previous rank's last conv_size - 1 rows of each sequence of
    /// a convolution's input `lin` ([b, t, c] f32), which this rank's first outputs read;
    /// None on rank 0. Every rank sends its own last rows.
    pub(super) fn conv_halo(
        &self,
        lin: &Buf,
        (b, t, c): (usize, usize, usize),
    ) -> Result<Option<CudaSlice<f32>>> {
        let group = self.seq_group().expect("a sequence-parallel model");
        let (gpu, hr) = (&self.gpu, self.config.conv_size - 1);
        if t < hr {
            return Err(Error::Invalid(format!(
                "sequence parallelism: segments of {t} tokens are shorter than the short \
                 convolution's {hr} rows of history"
            )));
        }
        let s = gpu.stream();
        let mut mine = s
            .alloc_zeros::<f32>(b * hr * c)
            .map_err(dev("allocation"))?;
        let lin = f32_ref(lin);
        for seq in 0..b {
            let rows = lin.slice((seq * t + t - hr) * c..(seq * t + t) * c);
            s.memcpy_dtod(&rows, &mut mine.slice_mut(seq * hr * c..(seq + 1) * hr * c))
                .map_err(dev("device copy"))?;
        }
        let rank = group.rank();
        let all = group.gathered(gpu, &mine)?;
        match rank {
            0 => Ok(None),
            _ => {
                let prev = all.slice((rank - 1) * mine.len()..rank * mine.len());
                Ok(Some(s.clone_dtod(&prev).map_err(dev("device copy"))?))
            }
        }
    }

    /// Sequence parallelism, in a convolution's backward: what the next rank's first outputs
    /// send back to this rank's last rows (None on the last rank), after this rank sent the
    /// gradient of its own halo (and added the halo's terms of the weight's gradient, the
    /// parameter in slot `w`).
    pub(super) fn conv_halo_grad(
        &self,
        ct: &ConvTape,
        dout: &Buf,
        w: usize,
        (b, t, c): (usize, usize, usize),
    ) -> Result<Option<CudaSlice<f32>>> {
        let group = self.seq_group().expect("a sequence-parallel model");
        let (gpu, width) = (&self.gpu, self.config.conv_size);
        let s = gpu.stream();
        let dhalo = s
            .alloc_zeros::<f32>(b * (width - 1) * c)
            .map_err(dev("allocation"))?;
        if let Some(halo) = &ct.halo {
            self.ops.conv_silu_halo_bwd(
                gpu,
                ptr(gpu, halo),
                self.p(w),
                buf_ptr(gpu, &ct.pre),
                buf_ptr(gpu, dout),
                ptr(gpu, &dhalo),
                self.pg(w),
                (b, t, c),
                width,
            )?;
        }
        let (rank, world) = (group.rank(), group.world());
        let all = group.gathered(gpu, &dhalo)?;
        if rank + 1 == world {
            return Ok(None);
        }
        let next = all.slice((rank + 1) * dhalo.len()..(rank + 2) * dhalo.len());
        Ok(Some(s.clone_dtod(&next).map_err(dev("device copy"))?))
    }

    /// A new step: no bucket summed yet.
    pub(super) fn start_step(&mut self) -> Result<()> {
        if let Some(d) = &mut self.dist {
            if !d.joined {
                d.group.join(&self.gpu)?;
            }
            (d.in_backward, d.issued, d.joined) = (false, 0, true);
        }
        Ok(())
    }

    /// Refuses a backward after this step's sums began: its gradients would miss them.
    pub(super) fn check_unsummed(&self) -> Result<()> {
        match &self.dist {
            Some(d) if d.issued > 0 => Err(Error::Invalid(
                "a micro-batch after the gradients' sum over the ranks began: call zero_grads \
                 first, or reduce_in_backward only before a step's last micro-batch"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// The backward has finished every gradient from parameter `from` on: issues the sums of
    /// the buckets that completes, when this backward reduces.
    pub(super) fn grads_done(&mut self, from: usize) -> Result<()> {
        if self.dist.as_ref().is_some_and(|d| d.in_backward) {
            self.issue_buckets(from)?;
        }
        Ok(())
    }

    /// Issues, in order, the sums of the buckets not yet issued whose parameters all lie at
    /// or after `from`.
    fn issue_buckets(&mut self, from: usize) -> Result<()> {
        let Some(d) = &mut self.dist else {
            return Ok(());
        };
        let gpu = &self.gpu;
        let grads = f32_mut(&mut self.grads);
        while let Some(b) = self.plan.buckets.get(d.issued) {
            if b.params.start < from {
                break;
            }
            match &mut d.shards {
                None => d
                    .group
                    .all_reduce_sum(gpu, &mut grads.slice_mut(b.region.clone()))?,
                Some(sh) => d.group.reduce_scatter_sum(
                    gpu,
                    &grads.slice(b.region.clone()),
                    &mut sh.slice_mut(self.plan.piece_in_shard(b)),
                )?,
            }
            d.issued += 1;
            d.joined = false;
        }
        Ok(())
    }

    /// Every bucket summed and waited for (those the backward did not issue are issued now).
    pub(super) fn finish_grads(&mut self) -> Result<()> {
        self.issue_buckets(0)?;
        if let Some(d) = &mut self.dist {
            if !d.joined {
                d.group.join(&self.gpu)?;
                d.joined = true;
                self.mark("gradient sums over the ranks");
            }
        }
        Ok(())
    }

    pub(super) fn sharded(&self) -> bool {
        self.dist.as_ref().is_some_and(|d| d.shards.is_some())
    }

    /// Which rank's pieces [`FlatPlan::owned`] gives this model: its own under ZeRO-1, else
    /// the whole (a plan of one piece).
    pub(super) fn shard_rank(&self) -> usize {
        match &self.dist {
            Some(d) if d.shards.is_some() => d.group.rank(),
            _ => 0,
        }
    }

    /// The summed gradients this rank steps, laid out as the moments, and how many.
    pub(super) fn stepped_grads(&self) -> (u64, usize) {
        let g = &self.gpu;
        let grads = match self.dist.as_ref().and_then(|d| d.shards.as_ref()) {
            Some(sh) => ptr(g, sh),
            None => buf_ptr(g, &self.grads),
        };
        (grads, self.plan.shard_len())
    }

    /// A number summed over the shards (a squared norm), or kept when nothing is sharded.
    pub(super) fn sum_over_shards(&self, x: f64) -> Result<f64> {
        match &self.dist {
            Some(d) if d.shards.is_some() => d.group.sum_f64(&self.gpu, x),
            _ => Ok(x),
        }
    }

    /// After a sharded step: every rank's pieces of the master weights gathered into the whole,
    /// and the element-type copies refreshed from them. The pieces go out from the gradient
    /// shard, spent by then (an all-gather's source may not lie in its destination).
    pub(super) fn gather_weights(&mut self) -> Result<()> {
        let Some(d) = &mut self.dist else {
            return Ok(());
        };
        let Some(sh) = &mut d.shards else {
            return Ok(());
        };
        let (gpu, rank) = (&self.gpu, d.group.rank());
        let master = f32_mut(&mut self.master);
        for b in &self.plan.buckets {
            let at = self.plan.piece_in_shard(b);
            gpu.stream()
                .memcpy_dtod(
                    &master.slice(self.plan.piece(b, rank)),
                    &mut sh.slice_mut(at.clone()),
                )
                .map_err(dev("device copy"))?;
            d.group
                .all_gather(gpu, &sh.slice(at), &mut master.slice_mut(b.region.clone()))?;
        }
        d.group.join(gpu)?;
        for (i, w) in self.weights.iter().enumerate() {
            if let Some(w) = w {
                let at = 4 * self.plan.offsets[i] as u64;
                self.ops.narrow(
                    gpu,
                    buf_ptr(gpu, &self.master) + at,
                    buf_ptr(gpu, w),
                    w.len(),
                )?;
            }
        }
        self.mark("weights' all-gather");
        Ok(())
    }

    /// AdamW's moments laid out flat, gathered from the ranks under ZeRO-1 (every rank must
    /// call it then).
    pub(super) fn full_moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let gpu = &self.gpu;
        let Some(d) = self.dist.as_ref().filter(|d| d.shards.is_some()) else {
            return Ok((self.m.download(gpu)?, self.v.download(gpu)?));
        };
        let gather = |mine: &Buf| -> Result<Vec<f32>> {
            let mut all = zeros(gpu, self.plan.total, DType::F32)?;
            let (all_f, mine_f) = (f32_mut(&mut all), f32_ref(mine));
            for b in &self.plan.buckets {
                d.group.all_gather(
                    gpu,
                    &mine_f.slice(self.plan.piece_in_shard(b)),
                    &mut all_f.slice_mut(b.region.clone()),
                )?;
            }
            d.group.join(gpu)?;
            all.download(gpu)
        };
        Ok((gather(&self.m)?, gather(&self.v)?))
    }

    /// This rank's share of a flat vector: the whole, or under ZeRO-1 its pieces of the
    /// buckets in layout order.
    pub(super) fn my_share(&self, flat: &[f32]) -> Vec<f32> {
        if !self.sharded() {
            return flat.to_vec();
        }
        let rank = self.shard_rank();
        self.plan
            .buckets
            .iter()
            .rev()
            .flat_map(|b| flat[self.plan.piece(b, rank)].iter().copied())
            .collect()
    }
}
