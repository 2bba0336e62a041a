//! What the training loop drives: a model with its gradients and AdamW state, on the CPU
//! ([`CpuLearner`]) or the GPU ([`GpuLearner`]).

use fla_tensor::{Result, Tensor};

use crate::gpu::GpuModel;
use crate::model::Model;
use crate::optim::{clip_grad_norm, AdamW};
use crate::train::Batch;

/// A model that scores batches without gradients (evaluation), on the CPU or the GPU.
pub trait Scorer {
    /// Mean cross-entropy against `targets` (negative: ignored) and, when asked, the logits
    /// [B*T, vocab].
    fn score(
        &mut self,
        ids: &[usize],
        b: usize,
        t: usize,
        targets: &[i64],
        logits: bool,
    ) -> Result<(f64, Option<Vec<f32>>)>;
    fn vocab(&self) -> usize;
}

impl<F: fla_tensor::Real> Scorer for Model<F> {
    fn score(
        &mut self,
        ids: &[usize],
        b: usize,
        t: usize,
        targets: &[i64],
        logits: bool,
    ) -> Result<(f64, Option<Vec<f32>>)> {
        let out = self.loss(ids, b, t, targets, false)?;
        let l = logits.then(|| out.logits.iter().map(|x| x.to_f64() as f32).collect());
        Ok((out.loss, l))
    }
    fn vocab(&self) -> usize {
        self.config.vocab_size
    }
}

impl Scorer for GpuModel {
    fn score(
        &mut self,
        ids: &[usize],
        b: usize,
        t: usize,
        targets: &[i64],
        logits: bool,
    ) -> Result<(f64, Option<Vec<f32>>)> {
        self.evaluate(ids, b, t, targets, logits)
    }
    fn vocab(&self) -> usize {
        self.config.vocab_size
    }
}

/// AdamW's state: its step count and both moments, in layout order.
pub struct OptState {
    pub step: u64,
    pub m: Vec<Tensor<f32>>,
    pub v: Vec<Tensor<f32>>,
}

pub trait Learner {
    /// Clears the gradients.
    fn zero_grads(&mut self) -> Result<()>;
    /// Adds `scale` × the gradients of the batch's mean loss; returns that loss.
    fn accumulate(&mut self, batch: &Batch, scale: f64) -> Result<f64>;
    /// Clips the gradients to `max_norm` (0: no clipping), then one AdamW step at `lr`;
    /// returns the norm before clipping.
    fn clip_and_step(&mut self, lr: f64, max_norm: f64) -> Result<f64>;
    /// Optimizer steps taken.
    fn steps(&self) -> u64;
    /// The weights as a CPU model (to evaluate and save).
    fn snapshot(&self) -> Result<Model<f32>>;
    fn optimizer(&self) -> Result<OptState>;
    /// Continues from a checkpoint.
    fn restore(&mut self, model: Model<f32>, opt: OptState) -> Result<()>;
    /// The model, to evaluate.
    fn scorer(&mut self) -> &mut dyn Scorer;
    /// Each step accumulates `n` micro-batches (a data-parallel learner sums the gradients
    /// over its ranks during the last one's backward).
    fn plan_micro_batches(&mut self, _n: usize) {}
    /// Whether [`Learner::optimizer`] gathers from the ranks (ZeRO-1), so that every rank
    /// must call it when one does.
    fn optimizer_is_collective(&self) -> bool {
        false
    }
}

pub struct CpuLearner {
    pub model: Model<f32>,
    pub opt: AdamW<f32>,
    grads: Vec<Tensor<f32>>,
}

impl CpuLearner {
    pub fn new(model: Model<f32>, weight_decay: f64, decay_all: bool) -> CpuLearner {
        let opt = AdamW::new(&model.layout, weight_decay, decay_all);
        let grads = model.layout.zeros();
        CpuLearner { model, opt, grads }
    }

    /// The accumulated gradients, in layout order.
    pub fn grads(&self) -> &[Tensor<f32>] {
        &self.grads
    }

    pub fn grads_mut(&mut self) -> &mut [Tensor<f32>] {
        &mut self.grads
    }
}

impl Learner for CpuLearner {
    fn zero_grads(&mut self) -> Result<()> {
        self.grads.iter_mut().for_each(|g| g.data_mut().fill(0.0));
        Ok(())
    }

    fn accumulate(&mut self, batch: &Batch, scale: f64) -> Result<f64> {
        let out = self
            .model
            .loss(&batch.ids, batch.b, batch.t, &batch.targets, true)?;
        let s = scale as f32;
        for (acc, g) in self.grads.iter_mut().zip(out.grads.unwrap_or_default()) {
            acc.data_mut()
                .iter_mut()
                .zip(g.data())
                .for_each(|(a, &b)| *a += b * s);
        }
        Ok(out.loss)
    }

    fn clip_and_step(&mut self, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = clip_grad_norm(&mut self.grads, max_norm);
        self.opt.update(&mut self.model.params, &self.grads, lr);
        Ok(norm)
    }

    fn steps(&self) -> u64 {
        self.opt.step
    }

    fn snapshot(&self) -> Result<Model<f32>> {
        Ok(self.model.clone())
    }

    fn optimizer(&self) -> Result<OptState> {
        Ok(OptState {
            step: self.opt.step,
            m: self.opt.m.clone(),
            v: self.opt.v.clone(),
        })
    }

    fn restore(&mut self, model: Model<f32>, opt: OptState) -> Result<()> {
        self.model = model;
        self.opt.step = opt.step;
        self.opt.m = opt.m;
        self.opt.v = opt.v;
        Ok(())
    }

    fn scorer(&mut self) -> &mut dyn Scorer {
        &mut self.model
    }
}

pub struct GpuLearner {
    pub model: GpuModel,
    pub weight_decay: f64,
    pub decay_all: bool,
}

impl GpuLearner {
    /// [`Learner::clip_and_step`] for gradients that are `grad_scale` times those stored (a
    /// sum over ranks, say, of which the step takes the average): the norm, the clipping and
    /// the step all see the scaled gradients.
    pub fn clip_and_step_scaled(&mut self, lr: f64, max_norm: f64, grad_scale: f64) -> Result<f64> {
        let norm = self.model.grad_norm()? * grad_scale;
        let clip = if max_norm > 0.0 && norm > max_norm {
            max_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.model
            .adamw(lr, self.weight_decay, self.decay_all, clip * grad_scale)?;
        Ok(norm)
    }
}

impl Learner for GpuLearner {
    fn zero_grads(&mut self) -> Result<()> {
        self.model.zero_grads()
    }

    fn accumulate(&mut self, batch: &Batch, scale: f64) -> Result<f64> {
        self.model
            .accumulate(&batch.ids, batch.b, batch.t, &batch.targets, scale)
    }

    fn clip_and_step(&mut self, lr: f64, max_norm: f64) -> Result<f64> {
        self.clip_and_step_scaled(lr, max_norm, 1.0)
    }

    fn steps(&self) -> u64 {
        self.model.step
    }

    fn snapshot(&self) -> Result<Model<f32>> {
        self.model.to_model()
    }

    fn optimizer(&self) -> Result<OptState> {
        self.model.optimizer_state()
    }

    fn restore(&mut self, model: Model<f32>, opt: OptState) -> Result<()> {
        self.model.restore(&model, opt.step, &opt.m, &opt.v)
    }

    fn scorer(&mut self) -> &mut dyn Scorer {
        &mut self.model
    }
}
