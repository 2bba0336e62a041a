//! The naive reference's gradients against central finite differences in f64, for every
//! gate kind, on a loss L = Σ o ⊙ w_o + Σ ht ⊙ w_h with random weights.

mod common;
use common::*;
use fla_ops::{gla_backward, gla_forward, Form, GateKind, GlaInputs, Options};
use fla_tensor::Tensor;

fn loss(gate: GateKind, x: &GlaInputs<f64>, wo: &Tensor<f64>, wh: &Tensor<f64>) -> f64 {
    let out = gla_forward(
        gate,
        x,
        &Options {
            form: Form::Naive,
            chunk_size: 64,
        },
    )
    .unwrap();
    let dot = |a: &Tensor<f64>, b: &Tensor<f64>| {
        a.data()
            .iter()
            .zip(b.data())
            .map(|(x, y)| x * y)
            .sum::<f64>()
    };
    dot(&out.o, wo) + dot(&out.ht, wh)
}

/// The input tensor called `name`, for perturbation.
fn input_mut<'a>(x: &'a mut GlaInputs<f64>, name: &str) -> &'a mut Tensor<f64> {
    match name {
        "q" => &mut x.q,
        "k" => &mut x.k,
        "v" => &mut x.v,
        "g" => x.g.as_mut().unwrap(),
        "gv" => x.gv.as_mut().unwrap(),
        "u" => x.u.as_mut().unwrap(),
        "h0" => x.h0.as_mut().unwrap(),
        _ => unreachable!(),
    }
}

#[test]
fn naive_gradients_match_finite_differences() {
    for (i, gate) in GateKind::ALL.into_iter().enumerate() {
        let mut rng = Rng::new(40 + i as u64);
        let s = Shape {
            b: 1,
            t: 6,
            h: 2,
            k: 3,
            v: 2,
        };
        let x = inputs(&mut rng, gate, &s, true, 1.0);
        let wo = rng.tensor(&[s.b, s.t, s.h, s.v]);
        let wh = rng.tensor(&[s.b, s.h, s.k, s.v]);
        let g = gla_backward(
            gate,
            &x,
            &wo,
            Some(&wh),
            &Options {
                form: Form::Naive,
                chunk_size: 64,
            },
        )
        .unwrap();
        let mut named = vec![
            ("q", g.dq.clone()),
            ("k", g.dk.clone()),
            ("v", g.dv.clone()),
            ("h0", g.dh0.clone().unwrap()),
        ];
        for (n, t) in [("g", &g.dg), ("gv", &g.dgv), ("u", &g.du)] {
            if let Some(t) = t {
                named.push((n, t.clone()));
            }
        }
        let eps: f64 = 1e-6;
        for (name, analytic) in named {
            let mut numeric = vec![0.0; analytic.len()];
            for (idx, slot) in numeric.iter_mut().enumerate() {
                let mut xp = x.clone();
                let base = input_mut(&mut xp, name).data()[idx];
                // Log gates must stay <= 0: step inwards where a gate sits at 0.
                let h = if matches!(name, "g" | "gv") {
                    eps.min(-base / 2.0).max(1e-9)
                } else {
                    eps
                };
                input_mut(&mut xp, name).data_mut()[idx] = base + h;
                let up = loss(gate, &xp, &wo, &wh);
                input_mut(&mut xp, name).data_mut()[idx] = base - h;
                let down = loss(gate, &xp, &wo, &wh);
                *slot = (up - down) / (2.0 * h);
            }
            let numeric = Tensor::new(analytic.shape().to_vec(), numeric).unwrap();
            assert_close(
                &format!("{gate} d{name} vs finite differences"),
                &analytic,
                &numeric,
                1e-6,
            );
        }
    }
}
