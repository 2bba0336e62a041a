//! Every gate kind x form against the naive reference in f64: outputs, final states and every
//! gradient, on awkward shapes. Forms run in f64 (tolerance 1e-10: any algebra slip shows)
//! and in f32 (tolerance 1e-5 relative, the project's f32 standard).

mod common;
use common::*;
use fla_ops::{gla_backward, gla_forward, Form, GateKind, GlaInputs, Options};
use fla_tensor::{Real, Tensor};

struct Case {
    shape: Shape,
    chunk: usize,
    h0: bool,
    dht: bool,
}

fn cases() -> Vec<Case> {
    let s = |b, t, h, k, v| Shape { b, t, h, k, v };
    vec![
        Case {
            shape: s(2, 1, 2, 16, 16),
            chunk: 64,
            h0: false,
            dht: false,
        },
        Case {
            shape: s(1, 37, 2, 24, 40),
            chunk: 16,
            h0: true,
            dht: true,
        },
        Case {
            shape: s(2, 50, 1, 40, 24),
            chunk: 64,
            h0: false,
            dht: true,
        },
        Case {
            shape: s(1, 67, 3, 8, 5),
            chunk: 8,
            h0: true,
            dht: false,
        },
        Case {
            shape: s(1, 33, 1, 16, 32),
            chunk: 11,
            h0: true,
            dht: true,
        },
    ]
}

type Reference = (Tensor<f64>, Tensor<f64>, fla_ops::GlaGrads<f64>);

fn reference(
    gate: GateKind,
    x: &GlaInputs<f64>,
    d_o: &Tensor<f64>,
    dht: Option<&Tensor<f64>>,
) -> Reference {
    let opts = Options {
        form: Form::Naive,
        chunk_size: 64,
    };
    let out = gla_forward(gate, x, &opts).unwrap();
    let g = gla_backward(gate, x, d_o, dht, &opts).unwrap();
    (out.o, out.ht, g)
}

fn check_form<F: Real>(
    gate: GateKind,
    form: Form,
    case: &Case,
    x64: &GlaInputs<f64>,
    d_o: &Tensor<f64>,
    dht: Option<&Tensor<f64>>,
    want: &Reference,
    tol: f64,
) {
    let x: GlaInputs<F> = cast_inputs(x64);
    let opts = Options {
        form,
        chunk_size: case.chunk,
    };
    let s = &case.shape;
    let tag = |n: &str| {
        format!(
            "{gate}/{form} {n} (B={} T={} H={} K={} V={} C={})",
            s.b, s.t, s.h, s.k, s.v, case.chunk
        )
    };
    let out = gla_forward(gate, &x, &opts).unwrap();
    assert_close(&tag("o"), &out.o, &want.0, tol);
    assert_close(&tag("ht"), &out.ht, &want.1, tol);
    let g = gla_backward(gate, &x, &d_o.cast(), dht.map(|d| d.cast()).as_ref(), &opts).unwrap();
    assert_close(&tag("dq"), &g.dq, &want.2.dq, tol);
    assert_close(&tag("dk"), &g.dk, &want.2.dk, tol);
    assert_close(&tag("dv"), &g.dv, &want.2.dv, tol);
    let pairs = [
        ("dg", &g.dg, &want.2.dg),
        ("dgv", &g.dgv, &want.2.dgv),
        ("du", &g.du, &want.2.du),
        ("dh0", &g.dh0, &want.2.dh0),
    ];
    for (name, got, exp) in pairs {
        match (got, exp) {
            (Some(a), Some(b)) => assert_close(&tag(name), a, b, tol),
            (None, None) => {}
            _ => panic!("{}: present in one result only", tag(name)),
        }
    }
}

fn check_gate(gate: GateKind, seed: u64) {
    for (i, case) in cases().iter().enumerate() {
        let mut rng = Rng::new(seed * 100 + i as u64);
        let s = &case.shape;
        let x = inputs(&mut rng, gate, s, case.h0, 1.0);
        let d_o = rng.tensor(&[s.b, s.t, s.h, s.v]);
        let dht = case.dht.then(|| rng.tensor(&[s.b, s.h, s.k, s.v]));
        let want = reference(gate, &x, &d_o, dht.as_ref());
        for form in [Form::Recurrent, Form::Chunk, Form::FusedChunk] {
            check_form::<f64>(gate, form, case, &x, &d_o, dht.as_ref(), &want, 1e-10);
            check_form::<f32>(gate, form, case, &x, &d_o, dht.as_ref(), &want, 1e-5);
        }
    }
}

#[test]
fn gate_none_all_forms() {
    check_gate(GateKind::None, 1);
}

#[test]
fn gate_scalar_all_forms() {
    check_gate(GateKind::Scalar, 2);
}

#[test]
fn gate_key_all_forms() {
    check_gate(GateKind::Key, 3);
}

#[test]
fn gate_key_bonus_all_forms() {
    check_gate(GateKind::KeyBonus, 4);
}

#[test]
fn gate_both_all_forms() {
    check_gate(GateKind::Both, 5);
}

/// Strong gates make chunks split into sub-blocks (intra.rs): still exact.
#[test]
fn strong_gates_split_blocks_exactly() {
    for (i, gate) in [
        GateKind::Key,
        GateKind::KeyBonus,
        GateKind::Both,
        GateKind::Scalar,
    ]
    .into_iter()
    .enumerate()
    {
        let case = Case {
            shape: Shape {
                b: 1,
                t: 45,
                h: 2,
                k: 16,
                v: 8,
            },
            chunk: 32,
            h0: true,
            dht: true,
        };
        let mut rng = Rng::new(900 + i as u64);
        let s = &case.shape;
        let x = inputs(&mut rng, gate, s, true, 8.0);
        let d_o = rng.tensor(&[s.b, s.t, s.h, s.v]);
        let dht = Some(rng.tensor(&[s.b, s.h, s.k, s.v]));
        let want = reference(gate, &x, &d_o, dht.as_ref());
        for form in [Form::Recurrent, Form::Chunk, Form::FusedChunk] {
            check_form::<f64>(gate, form, &case, &x, &d_o, dht.as_ref(), &want, 1e-10);
            check_form::<f32>(gate, form, &case, &x, &d_o, dht.as_ref(), &want, 1e-5);
        }
    }
}
