//! Data parallelism on GPUs (docs/DISTRIBUTED.md): the algorithm of
//! [`crate::data_parallel::DataParallel`] with the gradients summed on the devices. Each rank
//! is a [`GpuLearner`] on its own GPU, given the whole batches, computing on its own share of
//! each ([`crate::data_parallel::share`]). During the backward of a step's last micro-batch
//! the model sums each bucket of gradients over the ranks as soon as it is finished, on the
//! communicator's stream, while the layers below run ([`crate::gpu::GpuModel::distribute`]); every rank
//! then clips and steps on the average, so that all ranks take the steps one learner takes on
//! the whole batches. With ZeRO-1 the sums are reduce-scatters, each rank steps its shard,
//! and the weights are all-gathered.
//!
//! With [`Split::Sequence`] the ranks hold segments of every sequence instead (sequence
//! parallelism: sequences longer than one GPU holds); the GLA layers pass their states between
//! the ranks and the short convolutions their boundary rows, so the ranks together compute the
//! whole sequences, and the weights' gradients are summed as in data parallelism.
//!
//! [`HostStagedGroup`] runs ranks that share one GPU (NCCL refuses them), for tests.

use std::sync::Mutex;

use fla_cuda::cudarc::driver::{CudaView, CudaViewMut};
use fla_cuda::{check_pieces, DeviceGroup, Gpu};
use fla_tensor::{Error, Result};

use crate::data_parallel::{share, Collective, ThreadGroup};
use crate::dist::shard;
use crate::gpu::{dev, Split};
use crate::learner::{GpuLearner, Learner, OptState, Scorer};
use crate::train::Batch;
use crate::Model;

/// One rank of data- or sequence-parallel training on GPUs.
pub struct GpuParallel {
    inner: GpuLearner,
    split: Split,
    rank: usize,
    world: usize,
    /// Micro-batches per step, and those accumulated since the last zero_grads.
    micro_batches: usize,
    seen: usize,
}

impl GpuParallel {
    /// `inner` on this rank's GPU, `group` its member of the communicator, each rank holding
    /// what `split` says of every batch; gradients are summed in buckets of about
    /// `bucket_bytes`, and with `zero` the optimizer state is sharded.
    pub fn new(
        mut inner: GpuLearner,
        group: Box<dyn DeviceGroup>,
        split: Split,
        bucket_bytes: usize,
        zero: bool,
    ) -> Result<GpuParallel> {
        let (rank, world) = (group.rank(), group.world());
        inner.model.distribute(group, split, bucket_bytes, zero)?;
        Ok(GpuParallel {
            inner,
            split,
            rank,
            world,
            micro_batches: 1,
            seen: 0,
        })
    }

    pub fn learner(&self) -> &GpuLearner {
        &self.inner
    }
}

/// Rank `rank`'s segment of every sequence of `batch`: tokens `shard(t, world, rank)`. Segments
/// must be equal (the GLA layers' states pass between ranks sequence by sequence), so `t` must
/// be a multiple of `world`.
pub fn segment(batch: &Batch, world: usize, rank: usize) -> Result<Batch> {
    if !batch.t.is_multiple_of(world) {
        return Err(Error::Invalid(format!(
            "sequences of {} tokens do not split evenly over {world} ranks",
            batch.t
        )));
    }
    let cols = shard(batch.t, world, rank);
    fn take<T: Copy>(x: &[T], b: usize, t: usize, cols: &std::ops::Range<usize>) -> Vec<T> {
        (0..b)
            .flat_map(|s| x[s * t + cols.start..s * t + cols.end].iter().copied())
            .collect()
    }
    Ok(Batch {
        ids: take(&batch.ids, batch.b, batch.t, &cols),
        targets: take(&batch.targets, batch.b, batch.t, &cols),
        b: batch.b,
        t: cols.len(),
    })
}

impl Learner for GpuParallel {
    fn zero_grads(&mut self) -> Result<()> {
        self.seen = 0;
        self.inner.zero_grads()
    }

    /// The batch's mean loss. Data parallelism: this rank's share's mean loss, averaged over
    /// the ranks (equal shares). Sequence parallelism: this rank's segment's mean loss times
    /// its part of the batch's counted targets (with that weight on its gradients), summed.
    fn accumulate(&mut self, batch: &Batch, scale: f64) -> Result<f64> {
        let (mine, weight) = match self.split {
            Split::Batch => (share(batch, self.world, self.rank)?, 1.0),
            Split::Sequence => {
                let mine = segment(batch, self.world, self.rank)?;
                let counted = |b: &Batch| b.targets.iter().filter(|&&x| x >= 0).count();
                let (all, own) = (counted(batch), counted(&mine));
                (
                    mine,
                    if own == 0 {
                        0.0
                    } else {
                        own as f64 / all as f64
                    },
                )
            }
        };
        self.seen += 1;
        if self.seen == self.micro_batches {
            self.inner.model.reduce_in_backward();
        }
        let loss = self.inner.accumulate(&mine, scale * weight)?;
        Ok(match self.split {
            Split::Batch => self.inner.model.sum_over_ranks(loss)? / self.world as f64,
            Split::Sequence if weight == 0.0 => self.inner.model.sum_over_ranks(0.0)?,
            Split::Sequence => self.inner.model.sum_over_ranks(loss * weight)?,
        })
    }

    /// The gradients summed over the ranks, then clipped and stepped: as their average under
    /// data parallelism, as they are (the batch's) under sequence parallelism.
    fn clip_and_step(&mut self, lr: f64, max_norm: f64) -> Result<f64> {
        let scale = match self.split {
            Split::Batch => 1.0 / self.world as f64,
            Split::Sequence => 1.0,
        };
        self.inner.clip_and_step_scaled(lr, max_norm, scale)
    }

    fn steps(&self) -> u64 {
        self.inner.steps()
    }

    fn snapshot(&self) -> Result<Model<f32>> {
        self.inner.snapshot()
    }

    fn optimizer(&self) -> Result<OptState> {
        self.inner.optimizer()
    }

    fn restore(&mut self, model: Model<f32>, opt: OptState) -> Result<()> {
        self.inner.restore(model, opt)
    }

    fn scorer(&mut self) -> &mut dyn Scorer {
        self.inner.scorer()
    }

    fn plan_micro_batches(&mut self, n: usize) {
        self.micro_batches = n.max(1);
    }

    fn optimizer_is_collective(&self) -> bool {
        self.world > 1
    }
}

/// Ranks as threads that may share one GPU: each collective copies the buffers to the host and
/// sums them in a [`ThreadGroup`] (in rank order, so every rank gets the same bits). Slow, and
/// done before it returns; for checking the data-parallel algorithm with several ranks on a
/// machine with one GPU.
pub struct HostStagedGroup {
    group: Mutex<ThreadGroup>,
    rank: usize,
    world: usize,
}

impl HostStagedGroup {
    /// The `world` members of a new group, rank 0 first: hand one to each thread.
    pub fn new(world: usize) -> Vec<HostStagedGroup> {
        ThreadGroup::new(world)
            .into_iter()
            .enumerate()
            .map(|(rank, g)| HostStagedGroup {
                group: Mutex::new(g),
                rank,
                world,
            })
            .collect()
    }

    /// Sums `x` over the ranks on the host.
    fn sum(&self, x: &mut [f32]) -> Result<()> {
        self.group
            .lock()
            .map_err(|_| Error::Invalid("a rank's collective panicked".into()))?
            .all_reduce_sum(x)
    }
}

impl DeviceGroup for HostStagedGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, gpu: &Gpu, buf: &mut CudaViewMut<'_, f32>) -> Result<()> {
        let s = gpu.stream();
        let mut x = s.clone_dtoh(buf).map_err(dev("download"))?;
        self.sum(&mut x)?;
        s.memcpy_htod(&x, buf).map_err(dev("upload"))?;
        Ok(())
    }

    fn reduce_scatter_sum(
        &self,
        gpu: &Gpu,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let n = recv.len();
        check_pieces("reduce-scatter", n, self.world, send.len())?;
        let s = gpu.stream();
        let mut x = s.clone_dtoh(send).map_err(dev("download"))?;
        self.sum(&mut x)?;
        s.memcpy_htod(&x[self.rank * n..(self.rank + 1) * n], recv)
            .map_err(dev("upload"))?;
        Ok(())
    }

    /// Each rank's piece summed with zeros elsewhere: exact.
    fn all_gather(
        &self,
        gpu: &Gpu,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let n = send.len();
        check_pieces("all-gather", n, self.world, recv.len())?;
        let s = gpu.stream();
        let mut x = vec![0.0; recv.len()];
        s.memcpy_dtoh(send, &mut x[self.rank * n..(self.rank + 1) * n])
            .map_err(dev("download"))?;
        self.sum(&mut x)?;
        s.memcpy_htod(&x, recv).map_err(dev("upload"))?;
        Ok(())
    }

    fn join(&self, _gpu: &Gpu) -> Result<()> {
        Ok(())
    }

    /// In f32, as [`ThreadGroup`] sums.
    fn sum_f64(&self, _gpu: &Gpu, x: f64) -> Result<f64> {
        let mut v = [x as f32];
        self.sum(&mut v)?;
        Ok(f64::from(v[0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_put_back_together_are_the_batch() {
        let (b, t) = (3, 12);
        let batch = Batch {
            ids: (0..b * t).collect(),
            targets: (0..b * t).map(|i| i as i64 - 5).collect(),
            b,
            t,
        };
        for world in [1, 2, 3, 4, 6] {
            let parts: Vec<Batch> = (0..world)
                .map(|r| segment(&batch, world, r).unwrap())
                .collect();
            let mut ids = Vec::new();
            let mut targets = Vec::new();
            for s in 0..b {
                for p in &parts {
                    assert_eq!((p.b, p.t), (b, t / world));
                    ids.extend_from_slice(&p.ids[s * p.t..(s + 1) * p.t]);
                    targets.extend_from_slice(&p.targets[s * p.t..(s + 1) * p.t]);
                }
            }
            assert_eq!(ids, batch.ids, "{world} ranks");
            assert_eq!(targets, batch.targets, "{world} ranks");
        }
        let err = segment(&batch, 5, 0).unwrap_err().to_string();
        assert!(
            err.contains("sequences of 12 tokens do not split evenly over 5 ranks"),
            "{err}"
        );
    }
}
