//! Bad input gets the documented error, never a panic.

mod common;
use common::*;
use fla_ops::{gla_backward, gla_forward, GateKind, GlaInputs, Options};
use fla_tensor::{Error, Tensor};

fn base(gate: GateKind) -> GlaInputs<f64> {
    inputs(
        &mut Rng::new(1),
        gate,
        &Shape {
            b: 2,
            t: 7,
            h: 2,
            k: 4,
            v: 3,
        },
        false,
        1.0,
    )
}

fn err(gate: GateKind, x: &GlaInputs<f64>) -> String {
    gla_forward(gate, x, &Options::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn wrong_shape_names_the_tensor_and_the_expected_shape() {
    let mut x = base(GateKind::Key);
    x.k = Tensor::zeros(&[2, 7, 2, 5]);
    assert_eq!(
        err(GateKind::Key, &x),
        "tensor `k` has shape [2, 7, 2, 5], expected [B, T, H, K] = [2, 7, 2, 4]"
    );
    let mut x = base(GateKind::Scalar);
    x.g = Some(Tensor::zeros(&[2, 7, 2, 4]));
    assert_eq!(
        err(GateKind::Scalar, &x),
        "tensor `g` has shape [2, 7, 2, 4], expected [B, T, H] = [2, 7, 2]"
    );
    let mut x = base(GateKind::None);
    x.q = Tensor::zeros(&[7, 2, 4]);
    assert!(err(GateKind::None, &x)
        .starts_with("tensor `q` has shape [7, 2, 4], expected [B, T, H, K]"));
    let mut x = base(GateKind::None);
    x.h0 = Some(Tensor::zeros(&[1, 2, 4, 3]));
    assert!(err(GateKind::None, &x).contains("`h0`"));
}

#[test]
fn missing_and_unused_tensors() {
    let mut x = base(GateKind::Key);
    x.g = None;
    assert!(matches!(
        gla_forward(GateKind::Key, &x, &Options::default()),
        Err(Error::Missing { .. })
    ));
    assert_eq!(
        err(GateKind::Key, &x),
        "tensor `g` is missing: gate kind `key` needs it"
    );
    let x = base(GateKind::Key);
    assert!(err(GateKind::KeyBonus, &x).contains("tensor `u` is missing"));
    assert!(err(GateKind::None, &x).contains("tensor `g` is not used by gate kind `none`"));
}

#[test]
fn non_finite_and_positive_gates() {
    let mut x = base(GateKind::Key);
    x.v.data_mut()[5] = f64::NAN;
    assert!(matches!(
        gla_forward(GateKind::Key, &x, &Options::default()),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(
        err(GateKind::Key, &x),
        "tensor `v` holds a non-finite value NaN at [0, 0, 1, 2]"
    );
    let mut x = base(GateKind::Key);
    x.g.as_mut().unwrap().data_mut()[3] = 0.5;
    assert!(err(GateKind::Key, &x).contains("log forget gates must be <= 0"));
}

#[test]
fn bad_cu_seqlens_and_gradients() {
    let mut x = base(GateKind::None);
    x.cu_seqlens = Some(vec![0, 7]);
    assert!(err(GateKind::None, &x).contains("batch of 1"));
    let mut x = inputs(
        &mut Rng::new(2),
        GateKind::None,
        &Shape {
            b: 1,
            t: 7,
            h: 2,
            k: 4,
            v: 3,
        },
        false,
        1.0,
    );
    x.cu_seqlens = Some(vec![0, 5, 3, 7]);
    assert!(err(GateKind::None, &x).contains("never decrease"));
    x.cu_seqlens = None;
    let d_o = Tensor::zeros(&[1, 7, 2, 4]);
    let e = gla_backward(GateKind::None, &x, &d_o, None, &Options::default()).unwrap_err();
    assert!(e.to_string().starts_with("tensor `do` has shape"));
    let opts = Options {
        chunk_size: 0,
        ..Options::default()
    };
    assert!(gla_forward(GateKind::None, &x, &opts)
        .unwrap_err()
        .to_string()
        .contains("chunk size"));
}
