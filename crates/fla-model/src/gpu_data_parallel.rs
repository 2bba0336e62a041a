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
//! [`HostStagedGroup`] runs ranks that share one GPU (NCCL refuses them), for tests.

use std::sync::Mutex;

use fla_cuda::cudarc::driver::{CudaView, CudaViewMut};
use fla_cuda::{check_pieces, DeviceGroup, Gpu};
use fla_tensor::{Error, Result};

use crate::data_parallel::{share, Collective, ThreadGroup};
use crate::learner::{GpuLearner, Learner, OptState, Scorer};
use crate::train::Batch;
use crate::Model;

pub struct GpuDataParallel {
    inner: GpuLearner,
    rank: usize,
    world: usize,
    /// Micro-batches per step, and those accumulated since the last zero_grads.
    micro_batches: usize,
    seen: usize,
}

impl GpuDataParallel {
    /// `inner` on this rank's GPU, `group` its member of the communicator; gradients are summed
    /// in buckets of about `bucket_bytes`, and with `zero` the optimizer state is sharded.
    pub fn new(
        mut inner: GpuLearner,
        group: Box<dyn DeviceGroup>,
        bucket_bytes: usize,
        zero: bool,
    ) -> Result<GpuDataParallel> {
        let (rank, world) = (group.rank(), group.world());
        inner.model.distribute(group, bucket_bytes, zero)?;
        Ok(GpuDataParallel {
            inner,
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

impl Learner for GpuDataParallel {
    fn zero_grads(&mut self) -> Result<()> {
        self.seen = 0;
        self.inner.zero_grads()
    }

    /// The loss of this rank's share of `batch`, averaged over the ranks (the batch's mean
    /// loss).
    fn accumulate(&mut self, batch: &Batch, scale: f64) -> Result<f64> {
        let mine = share(batch, self.world, self.rank)?;
        self.seen += 1;
        if self.seen == self.micro_batches {
            self.inner.model.reduce_in_backward();
        }
        let loss = self.inner.accumulate(&mine, scale)?;
        Ok(self.inner.model.sum_over_ranks(loss)? / self.world as f64)
    }

    /// The gradients summed over the ranks, then clipped and stepped as their average.
    fn clip_and_step(&mut self, lr: f64, max_norm: f64) -> Result<f64> {
        let average = 1.0 / self.world as f64;
        self.inner.clip_and_step_scaled(lr, max_norm, average)
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

fn dev(what: &'static str) -> impl Fn(fla_cuda::cudarc::driver::DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e:?}"))
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
