//! Data parallelism on GPUs (docs/DISTRIBUTED.md): the algorithm of
//! [`crate::data_parallel::DataParallel`] with the gradients summed by NCCL on the device.
//! Each rank is a [`GpuLearner`] on its own GPU, given the whole batches, computing on its own
//! share of each ([`crate::data_parallel::share`]); after the backward the ranks' gradients are summed in
//! place (one NCCL group call over every gradient buffer), and every rank clips and steps on
//! the average, so that all ranks take the steps one learner takes on the whole batches.

use fla_cuda::cudarc::driver::CudaSlice;
use fla_cuda::NcclGroup;
use fla_tensor::{Error, Result};

use crate::data_parallel::share;
use crate::learner::{GpuLearner, Learner, OptState, Scorer};
use crate::train::Batch;
use crate::Model;

pub struct GpuDataParallel {
    inner: GpuLearner,
    group: NcclGroup,
}

impl GpuDataParallel {
    /// `inner` on this rank's GPU, `group` its member of the communicator on the same GPU.
    pub fn new(inner: GpuLearner, group: NcclGroup) -> GpuDataParallel {
        GpuDataParallel { inner, group }
    }

    pub fn learner(&self) -> &GpuLearner {
        &self.inner
    }

    /// The sum over the ranks of one number (the ranks' losses), in f64.
    fn sum_over_ranks(&self, x: f64) -> Result<f64> {
        let s = self.inner.model.gpu().stream();
        let dev = |e| Error::Device(format!("loss all-reduce: {e:?}"));
        let mut buf: CudaSlice<f64> = s.clone_htod(&[x]).map_err(dev)?;
        self.group.all_reduce_sum(&mut buf)?;
        Ok(s.clone_dtoh(&buf).map_err(dev)?[0])
    }
}

impl Learner for GpuDataParallel {
    fn zero_grads(&mut self) -> Result<()> {
        self.inner.zero_grads()
    }

    /// The loss of this rank's share of `batch`, averaged over the ranks (the batch's mean
    /// loss).
    fn accumulate(&mut self, batch: &Batch, scale: f64) -> Result<f64> {
        let mine = share(batch, self.group.world(), self.group.rank())?;
        let loss = self.inner.accumulate(&mine, scale)?;
        Ok(self.sum_over_ranks(loss)? / self.group.world() as f64)
    }

    /// The gradients summed over the ranks, then clipped and stepped as their average.
    fn clip_and_step(&mut self, lr: f64, max_norm: f64) -> Result<f64> {
        self.inner.model.sum_grads(&self.group)?;
        let average = 1.0 / self.group.world() as f64;
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
}
