//! The selective scan: gradients against finite differences in f64, and equality with the
//! `both` GLA kind when the gate happens to be rank one (a = -1 everywhere: gv = -delta).

mod common;
use common::*;
use fla_ops::mamba::{selective_scan_backward, selective_scan_forward, ScanInputs};
use fla_ops::{gla_backward, gla_forward, Form, GateKind, GlaInputs, Options};
use fla_tensor::Tensor;

fn scan_inputs(rng: &mut Rng, b: usize, t: usize, h: usize, k: usize, v: usize) -> ScanInputs<f64> {
    let delta = rng.gates(&[b, t, h, v], 1.0);
    let delta = Tensor::new(
        delta.shape().to_vec(),
        delta.data().iter().map(|x| -x).collect(),
    )
    .unwrap();
    let a = rng.gates(&[h, k, v], 2.0);
    ScanInputs {
        q: rng.tensor(&[b, t, h, k]),
        k: rng.tensor(&[b, t, h, k]),
        v: rng.tensor(&[b, t, h, v]),
        delta,
        a,
        h0: Some(rng.tensor(&[b, h, k, v])),
        scale: Some(0.7),
    }
}

fn field<'a>(x: &'a mut ScanInputs<f64>, name: &str) -> &'a mut Tensor<f64> {
    match name {
        "q" => &mut x.q,
        "k" => &mut x.k,
        "v" => &mut x.v,
        "delta" => &mut x.delta,
        "a" => &mut x.a,
        _ => x.h0.as_mut().unwrap(),
    }
}

#[test]
fn scan_gradients_match_finite_differences() {
    let mut rng = Rng::new(11);
    let x = scan_inputs(&mut rng, 2, 70, 2, 3, 2);
    let wo = rng.tensor(&[2, 70, 2, 2]);
    let wh = rng.tensor(&[2, 2, 3, 2]);
    let loss = |x: &ScanInputs<f64>| {
        let (o, ht) = selective_scan_forward(x).unwrap();
        let dot = |a: &Tensor<f64>, b: &Tensor<f64>| {
            a.data()
                .iter()
                .zip(b.data())
                .map(|(p, q)| p * q)
                .sum::<f64>()
        };
        dot(&o, &wo) + dot(&ht, &wh)
    };
    let g = selective_scan_backward(&x, &wo, Some(&wh)).unwrap();
    let named = [
        ("q", &g.dq),
        ("k", &g.dk),
        ("v", &g.dv),
        ("delta", &g.ddelta),
        ("a", &g.da),
        ("h0", g.dh0.as_ref().unwrap()),
    ];
    for (name, analytic) in named {
        let mut numeric = vec![0.0; analytic.len()];
        for (i, slot) in numeric.iter_mut().enumerate() {
            let mut xp = x.clone();
            let base = field(&mut xp, name).data()[i];
            let h: f64 = if name == "delta" {
                1e-6f64.min(base / 2.0).max(1e-9)
            } else if name == "a" {
                1e-6f64.min(-base / 2.0).max(1e-9)
            } else {
                1e-6
            };
            field(&mut xp, name).data_mut()[i] = base + h;
            let up = loss(&xp);
            field(&mut xp, name).data_mut()[i] = base - h;
            *slot = (up - loss(&xp)) / (2.0 * h);
        }
        assert_close(
            &format!("scan d{name}"),
            analytic,
            &Tensor::new(analytic.shape().to_vec(), numeric).unwrap(),
            1e-6,
        );
    }
}

#[test]
fn scan_with_rank_one_gate_equals_gla_both() {
    let mut rng = Rng::new(12);
    let (b, t, h, k, v) = (2, 45, 2, 5, 7);
    let mut x = scan_inputs(&mut rng, b, t, h, k, v);
    x.a = Tensor::new(vec![h, k, v], vec![-1.0; h * k * v]).unwrap();
    let mut y = GlaInputs::new(x.q.clone(), x.k.clone(), x.v.clone());
    y.g = Some(Tensor::zeros(&[b, t, h, k]));
    y.gv = Some(
        Tensor::new(
            x.delta.shape().to_vec(),
            x.delta.data().iter().map(|d| -d).collect(),
        )
        .unwrap(),
    );
    y.h0 = x.h0.clone();
    y.scale = x.scale;
    let opts = Options {
        form: Form::Chunk,
        chunk_size: 16,
    };
    let (o, ht) = selective_scan_forward(&x).unwrap();
    let want = gla_forward(GateKind::Both, &y, &opts).unwrap();
    assert_close("o", &o, &want.o, 1e-12);
    assert_close("ht", &ht, &want.ht, 1e-12);
    let d_o = rng.tensor(&[b, t, h, v]);
    let dht = rng.tensor(&[b, h, k, v]);
    let g = selective_scan_backward(&x, &d_o, Some(&dht)).unwrap();
    let w = gla_backward(GateKind::Both, &y, &d_o, Some(&dht), &opts).unwrap();
    assert_close("dq", &g.dq, &w.dq, 1e-10);
    assert_close("dk", &g.dk, &w.dk, 1e-10);
    assert_close("dv", &g.dv, &w.dv, 1e-10);
    let minus_dgv = Tensor::new(
        g.ddelta.shape().to_vec(),
        w.dgv.unwrap().data().iter().map(|x| -x).collect(),
    )
    .unwrap();
    assert_close("ddelta", &g.ddelta, &minus_dgv, 1e-10);
    assert_close(
        "dh0",
        g.dh0.as_ref().unwrap(),
        w.dh0.as_ref().unwrap(),
        1e-10,
    );
}

#[test]
fn scan_rejects_bad_input() {
    let mut rng = Rng::new(13);
    let mut x = scan_inputs(&mut rng, 1, 4, 1, 2, 3);
    x.a = Tensor::zeros(&[1, 3, 2]);
    assert_eq!(
        selective_scan_forward(&x).unwrap_err().to_string(),
        "tensor `a` has shape [1, 3, 2], expected [H, K, V] = [1, 2, 3]"
    );
    let mut x = scan_inputs(&mut rng, 1, 4, 1, 2, 3);
    x.a.data_mut()[0] = 1.0;
    assert!(selective_scan_forward(&x)
        .unwrap_err()
        .to_string()
        .contains("must be <= 0"));
}
