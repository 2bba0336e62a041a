//! AdamW (Loshchilov and Hutter, 2019) as PyTorch computes it, the warmup + cosine learning
//! rate schedule, and gradient clipping by the global norm.

use fla_tensor::{Real, Tensor};

use crate::layout::{Layout, Role};

#[derive(Clone, Debug)]
pub struct AdamW<F> {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Which parameters decay: matrices always; embeddings, norms and biases when asked.
    pub decays: Vec<bool>,
    pub step: u64,
    pub m: Vec<Tensor<F>>,
    pub v: Vec<Tensor<F>>,
}

impl<F: Real> AdamW<F> {
    pub fn new(layout: &Layout, weight_decay: f64, decay_all: bool) -> AdamW<F> {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            decays: layout
                .specs
                .iter()
                .map(|s| decay_all || s.role == Role::Matrix)
                .collect(),
            step: 0,
            m: layout.zeros(),
            v: layout.zeros(),
        }
    }

    /// One update of every parameter at learning rate `lr`:
    /// p ← p (1 - lr λ) - lr m̂ / (√v̂ + ε), with the bias-corrected moments m̂, v̂.
    pub fn update(&mut self, params: &mut [Tensor<F>], grads: &[Tensor<F>], lr: f64) {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        for i in 0..params.len() {
            let shrink = if self.decays[i] {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let (p, g) = (params[i].data_mut(), grads[i].data());
            let (m, v) = (self.m[i].data_mut(), self.v[i].data_mut());
            for j in 0..p.len() {
                let gj = g[j].to_f64();
                let mj = b1 * m[j].to_f64() + (1.0 - b1) * gj;
                let vj = b2 * v[j].to_f64() + (1.0 - b2) * gj * gj;
                m[j] = F::from_f64(mj);
                v[j] = F::from_f64(vj);
                let step = lr * (mj / c1) / ((vj / c2).sqrt() + self.eps);
                p[j] = F::from_f64(p[j].to_f64() * shrink - step);
            }
        }
    }
}

/// Linear warmup over `warmup` steps to `peak`, then a cosine down to `peak * min_ratio`
/// at `total` steps.
pub fn learning_rate(step: u64, total: u64, warmup: u64, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// Scales the gradients so that their global L2 norm is at most `max_norm` (0: no clipping);
/// returns the norm before clipping.
pub fn clip_grad_norm<F: Real>(grads: &mut [Tensor<F>], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.data().iter())
        .map(|x| x.to_f64() * x.to_f64())
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = F::from_f64(max_norm / (norm + 1e-6));
        grads
            .iter_mut()
            .for_each(|g| g.data_mut().iter_mut().for_each(|x| *x *= s));
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert!((learning_rate(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((learning_rate(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((learning_rate(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_decays() {
        // After one step m̂ = g and v̂ = g², so each weight moves by lr · sign(g).
        let mut p = vec![Tensor::new(vec![2], vec![1.0f64, -2.0]).unwrap()];
        let g = vec![Tensor::new(vec![2], vec![0.5, -3.0]).unwrap()];
        let mut opt = AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 0.0,
            weight_decay: 0.1,
            decays: vec![true],
            step: 0,
            m: vec![Tensor::zeros(&[2])],
            v: vec![Tensor::zeros(&[2])],
        };
        opt.update(&mut p, &g, 0.01);
        assert!((p[0].data()[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-12);
        assert!((p[0].data()[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-12);
        let mut gs = vec![Tensor::new(vec![2], vec![3.0f64, 4.0]).unwrap()];
        assert_eq!(clip_grad_norm(&mut gs, 1.0), 5.0);
        assert!((gs[0].data()[0] - 0.6).abs() < 1e-6);
    }
}
