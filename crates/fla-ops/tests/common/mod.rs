//! Random inputs for the op tests.
#![allow(dead_code)]

use fla_ops::{GateKind, GlaInputs};
use fla_tensor::{Real, Tensor};

/// A small deterministic generator (SplitMix64), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (a, b) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    }

    pub fn tensor(&mut self, shape: &[usize]) -> Tensor<f64> {
        let n = shape.iter().product();
        Tensor::new(shape.to_vec(), (0..n).map(|_| self.normal()).collect()).unwrap()
    }

    /// Log gates as in GLA: logsigmoid(x) / 16 with x ~ N(0, 1) scaled up, so decays vary.
    pub fn gates(&mut self, shape: &[usize], strength: f64) -> Tensor<f64> {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| -strength * (1.0 + (-2.0 * self.normal()).exp()).ln())
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }
}

pub struct Shape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub k: usize,
    pub v: usize,
}

/// Random inputs for a gate kind; `h0` is the initial state's presence.
pub fn inputs(
    rng: &mut Rng,
    gate: GateKind,
    s: &Shape,
    h0: bool,
    gate_strength: f64,
) -> GlaInputs<f64> {
    let (b, t, h, k, v) = (s.b, s.t, s.h, s.k, s.v);
    let mut x = GlaInputs::new(
        rng.tensor(&[b, t, h, k]),
        rng.tensor(&[b, t, h, k]),
        rng.tensor(&[b, t, h, v]),
    );
    match gate {
        GateKind::None => {}
        GateKind::Scalar => x.g = Some(rng.gates(&[b, t, h], gate_strength)),
        _ => x.g = Some(rng.gates(&[b, t, h, k], gate_strength)),
    }
    if gate == GateKind::Both {
        x.gv = Some(rng.gates(&[b, t, h, v], gate_strength));
    }
    if gate == GateKind::KeyBonus {
        x.u = Some(rng.tensor(&[h, k]));
    }
    if h0 {
        x.h0 = Some(rng.tensor(&[b, h, k, v]));
    }
    x
}

pub fn cast_inputs<F: Real>(x: &GlaInputs<f64>) -> GlaInputs<F> {
    GlaInputs {
        q: x.q.cast(),
        k: x.k.cast(),
        v: x.v.cast(),
        g: x.g.as_ref().map(|t| t.cast()),
        gv: x.gv.as_ref().map(|t| t.cast()),
        u: x.u.as_ref().map(|t| t.cast()),
        h0: x.h0.as_ref().map(|t| t.cast()),
        scale: x.scale,
        cu_seqlens: x.cu_seqlens.clone(),
    }
}

/// Asserts ||got - want|| / ||want|| < tol, naming what is compared.
pub fn assert_close<F: Real>(what: &str, got: &Tensor<F>, want: &Tensor<f64>, tol: f64) {
    let err = got.cast::<f64>().rel_err(want);
    assert!(err < tol, "{what}: relative error {err:.3e} >= {tol:.0e}");
}
