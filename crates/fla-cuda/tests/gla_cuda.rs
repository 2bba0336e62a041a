//! The CUDA kernels against the CPU reference in f64 (the recurrent form, itself checked
//! against the naive form and finite differences in fla-ops' tests). Without a usable GPU
//! each test prints that it skipped; with FLA_REQUIRE_CUDA=1 it fails instead.
//! Tolerances (relative, ||a-b||/||b||): f32 1e-4, bf16 1e-2.

#[path = "../../fla-ops/tests/common/mod.rs"]
mod common;

use common::{cast_inputs, inputs, Rng, Shape};
use fla_cuda::{gla_forward, DType, Gpu};
use fla_ops::{Form, GateKind, GlaInputs, GlaOutputs, Options};
use fla_tensor::Tensor;

fn gpu() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) if std::env::var("FLA_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("FLA_REQUIRE_CUDA=1 but no usable GPU: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::Bf16 => 1e-2,
    }
}

fn reference(gate: GateKind, x: &GlaInputs<f64>) -> GlaOutputs<f64> {
    let opts = Options {
        form: Form::Recurrent,
        ..Options::default()
    };
    fla_ops::gla_forward(gate, x, &opts).unwrap()
}

fn rel_err(got: &Tensor<f32>, want: &Tensor<f64>) -> f64 {
    assert!(
        got.data().iter().all(|x| x.is_finite()),
        "non-finite output"
    );
    got.cast::<f64>().rel_err(want)
}

fn check_forward(gpu: &Gpu, gate: GateKind, x: &GlaInputs<f64>, what: &str) {
    let want = reference(gate, x);
    for dtype in [DType::F32, DType::Bf16] {
        let got = gla_forward(gpu, gate, &cast_inputs::<f32>(x), dtype).unwrap();
        let tol = tolerance(dtype);
        let (eo, eh) = (rel_err(&got.o, &want.o), rel_err(&got.ht, &want.ht));
        println!("{what} {gate} {dtype:?}: o {eo:.2e}, ht {eh:.2e}");
        assert!(
            eo < tol,
            "{what} {gate} {dtype:?}: o relative error {eo:.3e} >= {tol:.0e}"
        );
        assert!(
            eh < tol,
            "{what} {gate} {dtype:?}: ht relative error {eh:.3e} >= {tol:.0e}"
        );
    }
}

const GATES: [GateKind; 5] = [
    GateKind::None,
    GateKind::Scalar,
    GateKind::Key,
    GateKind::KeyBonus,
    GateKind::Both,
];

#[test]
fn forward_every_gate_awkward_shapes() {
    let Some(gpu) = gpu() else { return };
    let shapes = [
        (
            Shape {
                b: 2,
                t: 100,
                h: 3,
                k: 32,
                v: 48,
            },
            true,
        ),
        (
            Shape {
                b: 1,
                t: 1,
                h: 2,
                k: 16,
                v: 16,
            },
            false,
        ),
        (
            Shape {
                b: 2,
                t: 130,
                h: 2,
                k: 64,
                v: 128,
            },
            true,
        ),
        (
            Shape {
                b: 1,
                t: 70,
                h: 1,
                k: 256,
                v: 512,
            },
            true,
        ),
    ];
    let mut rng = Rng::new(11);
    for gate in GATES {
        for (s, h0) in &shapes {
            let x = inputs(&mut rng, gate, s, *h0, 1.0);
            check_forward(&gpu, gate, &x, &format!("T={} K={} V={}", s.t, s.k, s.v));
        }
    }
}

#[test]
fn forward_varlen_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(12);
    for gate in GATES {
        let s = Shape {
            b: 1,
            t: 163,
            h: 2,
            k: 48,
            v: 32,
        };
        let mut x = inputs(&mut rng, gate, &s, false, 1.0);
        x.cu_seqlens = Some(vec![0, 37, 37, 100, 163]);
        x.h0 = Some(rng.tensor(&[4, 2, 48, 32]));
        check_forward(&gpu, gate, &x, "varlen");
    }
}

/// Gates near -20 per step: every chunk takes the term-by-term path; the mild case with a
/// total decay near the switch point takes both paths within one sequence.
#[test]
fn forward_strong_gates_long_sequence() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(13);
    for (gate, t, strength) in [
        (GateKind::Key, 16384, 20.0),
        (GateKind::Both, 2048, 20.0),
        (GateKind::KeyBonus, 2048, 20.0),
        (GateKind::Key, 4096, 0.9),
        (GateKind::Both, 4096, 0.9),
    ] {
        let s = Shape {
            b: 1,
            t,
            h: 1,
            k: 64,
            v: 64,
        };
        let x = inputs(&mut rng, gate, &s, true, strength);
        check_forward(&gpu, gate, &x, &format!("strength {strength} T={t}"));
    }
}

#[test]
fn bad_head_size_is_a_clear_error() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(14);
    let s = Shape {
        b: 1,
        t: 8,
        h: 1,
        k: 24,
        v: 32,
    };
    let x = cast_inputs::<f32>(&inputs(&mut rng, GateKind::Key, &s, false, 1.0));
    let err = gla_forward(&gpu, GateKind::Key, &x, DType::Bf16).unwrap_err();
    assert!(err.to_string().contains("multiples of 16"), "{err}");
}
