//! Data parallelism inside the GPU model (docs/DISTRIBUTED.md): the gradients' sum over the
//! ranks, bucket by bucket as the backward finishes them, on the communicator's own stream so
//! that it overlaps the layers still to run; and ZeRO-1, where each rank keeps the master
//! weights and AdamW moments of its pieces of the buckets only, steps those, and the ranks
//! all-gather the updated weights.

use fla_cuda::cudarc::driver::CudaSlice;
use fla_cuda::layers::buf_ptr;
use fla_cuda::{Buf, DType, DeviceGroup};
use fla_tensor::{Error, Result};

use super::{dev, f32_mut, zeros, GpuModel};
use crate::dist::FlatPlan;

pub(super) struct Dist {
    group: Box<dyn DeviceGroup>,
    /// ZeRO-1: this rank's shard ([`FlatPlan::owned`]) of the master weights, and the summed
    /// gradients of it that the reduce-scatter leaves.
    shards: Option<Shards>,
    /// Sum the buckets as the next backward finishes them (its last micro-batch's).
    in_backward: bool,
    /// Buckets whose sum has been issued this step, in the plan's order.
    issued: usize,
    /// Whether the compute stream has waited for this step's sums.
    joined: bool,
}

struct Shards {
    master: CudaSlice<f32>,
    grads: CudaSlice<f32>,
}

impl GpuModel {
    /// Makes this model one rank of data-parallel training over `group`: the gradients are
    /// summed over the ranks in buckets of about `bucket_bytes` (f32), and with `zero` the
    /// optimizer state is sharded over them (ZeRO-1). The parameters and moments are laid out
    /// again for the buckets; every rank must start from the same ones.
    pub fn distribute(
        &mut self,
        group: Box<dyn DeviceGroup>,
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
            .then(|| -> Result<Shards> {
                let s = gpu.stream();
                Ok(Shards {
                    master: s.alloc_zeros(shard).map_err(dev("allocation"))?,
                    grads: s.alloc_zeros(shard).map_err(dev("allocation"))?,
                })
            })
            .transpose()?;
        self.grads = zeros(gpu, self.plan.total, DType::F32)?;
        self.dist = Some(Dist {
            group,
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
                    &mut sh.grads.slice_mut(self.plan.piece_in_shard(b)),
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

    /// The f32 weights and summed gradients that AdamW steps, laid out as the moments.
    pub(super) fn stepped(&self) -> (u64, u64) {
        let g = &self.gpu;
        match self.dist.as_ref().and_then(|d| d.shards.as_ref()) {
            Some(sh) => (ptr(g, &sh.master), ptr(g, &sh.grads)),
            None => (buf_ptr(g, &self.master), buf_ptr(g, &self.grads)),
        }
    }

    /// The summed gradients this rank steps, and how many.
    pub(super) fn stepped_grads(&self) -> (u64, usize) {
        let (_, grads) = self.stepped();
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
    /// and the element-type copies refreshed from them.
    pub(super) fn gather_weights(&mut self) -> Result<()> {
        let Some(d) = &self.dist else { return Ok(()) };
        let Some(sh) = &d.shards else { return Ok(()) };
        let gpu = &self.gpu;
        let master = f32_mut(&mut self.master);
        for b in &self.plan.buckets {
            d.group.all_gather(
                gpu,
                &sh.master.slice(self.plan.piece_in_shard(b)),
                &mut master.slice_mut(b.region.clone()),
            )?;
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

    /// Under ZeRO-1, this rank's shard of the master weights taken from the whole (after the
    /// whole was replaced).
    pub(super) fn restore_shards(&mut self) -> Result<()> {
        if !self.sharded() {
            return Ok(());
        }
        let mine = self.my_share(&self.master.download(&self.gpu)?);
        let s = self.gpu.stream().clone();
        if let Some(sh) = self.dist.as_mut().and_then(|d| d.shards.as_mut()) {
            s.memcpy_htod(&mine, &mut sh.master)
                .map_err(dev("upload"))?;
        }
        Ok(())
    }
}

fn ptr(gpu: &fla_cuda::Gpu, x: &CudaSlice<f32>) -> u64 {
    fla_cuda::layers::ptr(gpu, x)
}

fn f32_ref(x: &Buf) -> &CudaSlice<f32> {
    match x {
        Buf::F32(b) => b,
        Buf::Bf16(_) => unreachable!("an f32 buffer"),
    }
}
