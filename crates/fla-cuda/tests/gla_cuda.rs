//! The CUDA kernels against the CPU reference in f64 (the recurrent form, itself checked
//! against the naive form and finite differences in fla-ops' tests). Without a usable GPU
//! each test prints that it skipped; with FLA_REQUIRE_CUDA=1 it fails instead.
//! Tolerances (relative, ||a-b||/||b||): f32 1e-4, bf16 1e-2. The bf16 runs are compared with
//! the reference on the same inputs rounded to bf16 (q, k, v, the key or scalar gate, do: what
//! the kernels store in bf16), so that the error measured is the kernels', not the rounding of
//! the inputs.

#[path = "../../fla-ops/tests/common/mod.rs"]
mod common;

use common::{cast_inputs, inputs, Rng, Shape};
use fla_cuda::{
    gather_in_turn, gla_backward, gla_forward, Buf, DType, Decoder, DeviceGla, Gpu, StepInputs,
};
use fla_ops::gla::{put_t, segment, slice_t};
use fla_ops::{Form, GateKind, GlaGrads, GlaInputs, GlaOutputs, Options};
use fla_tensor::{Real, Tensor};

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

/// A tensor as the GPU holds it in `dtype`, back in f64.
fn as_stored(x: &Tensor<f64>, dtype: DType) -> Tensor<f64> {
    match dtype {
        DType::F32 => x.cast::<f32>().cast(),
        DType::Bf16 => Tensor::new(
            x.shape().to_vec(),
            x.data()
                .iter()
                .map(|&v| half::bf16::from_f64(v).to_f64())
                .collect(),
        )
        .unwrap(),
    }
}

/// The inputs as the GPU holds them: q, k, v and g in `dtype`, the rest in f32.
fn stored_inputs(x: &GlaInputs<f64>, dtype: DType) -> GlaInputs<f64> {
    let f32 = |t: &Option<Tensor<f64>>| t.as_ref().map(|t| as_stored(t, DType::F32));
    GlaInputs {
        q: as_stored(&x.q, dtype),
        k: as_stored(&x.k, dtype),
        v: as_stored(&x.v, dtype),
        g: x.g.as_ref().map(|t| as_stored(t, dtype)),
        gv: f32(&x.gv),
        u: f32(&x.u),
        h0: f32(&x.h0),
        scale: x.scale,
        cu_seqlens: x.cu_seqlens.clone(),
    }
}

/// The GPU's forms: the two-level chunk kernels, the fused chunk kernels and the recurrent
/// ones.
const FORMS: [Form; 3] = [Form::Chunk, Form::FusedChunk, Form::Recurrent];

/// The forms under test: all three, or those that FLA_TEST_FORMS names (comma-separated, as
/// `fla bench cuda --form` spells them), to spend less device time after a change to one.
fn forms() -> Vec<Form> {
    match std::env::var("FLA_TEST_FORMS") {
        Ok(names) => FORMS
            .into_iter()
            .filter(|f| names.split(',').any(|n| n == f.to_string()))
            .collect(),
        Err(_) => FORMS.to_vec(),
    }
}

fn check_forward(gpu: &Gpu, gate: GateKind, x: &GlaInputs<f64>, what: &str) {
    for dtype in [DType::F32, DType::Bf16] {
        let x = &stored_inputs(x, dtype);
        let want = reference(gate, x);
        let tol = tolerance(dtype);
        for form in forms() {
            let got = gla_forward(gpu, gate, &cast_inputs::<f32>(x), dtype, form).unwrap();
            let (eo, eh) = (rel_err(&got.o, &want.o), rel_err(&got.ht, &want.ht));
            let tag = format!("{what} {gate} {form} {dtype:?}");
            println!("{tag}: o {eo:.2e}, ht {eh:.2e}");
            assert!(eo < tol, "{tag}: o relative error {eo:.3e} >= {tol:.0e}");
            assert!(eh < tol, "{tag}: ht relative error {eh:.3e} >= {tol:.0e}");
        }
    }
}

fn check(what: &str, got: &Tensor<f32>, want: &Tensor<f64>, tol: f64) -> f64 {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:.3e} >= {tol:.0e}");
    e
}

/// The gradients present, by name.
fn named<F: Real>(g: &GlaGrads<F>) -> Vec<(&'static str, &Tensor<F>)> {
    let mut v = vec![("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)];
    for (n, t) in [
        ("dg", &g.dg),
        ("dgv", &g.dgv),
        ("du", &g.du),
        ("dh0", &g.dh0),
    ] {
        if let Some(t) = t {
            v.push((n, t));
        }
    }
    v
}

/// Outputs and every gradient against the f64 recurrent form, with a random do and, when
/// `with_dht`, a random dht.
fn check_backward(
    gpu: &Gpu,
    gate: GateKind,
    x: &GlaInputs<f64>,
    rng: &mut Rng,
    with_dht: bool,
    what: &str,
) {
    let opts = Options {
        form: Form::Recurrent,
        ..Options::default()
    };
    let d_o = rng.tensor(&[
        x.q.shape()[0],
        x.q.shape()[1],
        x.q.shape()[2],
        x.v.shape()[3],
    ]);
    let n_seqs = x
        .cu_seqlens
        .as_ref()
        .map_or(x.q.shape()[0], |c| c.len() - 1);
    let dht =
        with_dht.then(|| rng.tensor(&[n_seqs, x.q.shape()[2], x.q.shape()[3], x.v.shape()[3]]));
    for dtype in [DType::F32, DType::Bf16] {
        let tol = tolerance(dtype);
        let x = &stored_inputs(x, dtype);
        let d_o = as_stored(&d_o, dtype);
        let dht = dht.as_ref().map(|t| as_stored(t, DType::F32));
        let want_out = reference(gate, x);
        let want = fla_ops::gla_backward(gate, x, &d_o, dht.as_ref(), &opts).unwrap();
        for form in forms() {
            let (out, got) = gla_backward(
                gpu,
                gate,
                &cast_inputs::<f32>(x),
                &d_o.cast(),
                dht.as_ref().map(|t| t.cast()).as_ref(),
                dtype,
                form,
            )
            .unwrap();
            let mut line = format!("{what} {gate} {form} {dtype:?}:");
            let tag = |n: &str| format!("{what} {gate} {form} {dtype:?} {n}");
            line += &format!(" o {:.1e}", check(&tag("o"), &out.o, &want_out.o, tol));
            let (got32, want64) = (named(&got), named(&want));
            assert_eq!(
                got32.iter().map(|p| p.0).collect::<Vec<_>>(),
                want64.iter().map(|p| p.0).collect::<Vec<_>>(),
                "{what}: the GPU returned other gradients than the CPU"
            );
            for ((n, g), (_, w)) in got32.iter().zip(&want64) {
                line += &format!(" {n} {:.1e}", check(&tag(n), g, w, tol));
            }
            println!("{line}");
        }
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

/// The strong-gate cases, (gate, T, strength, K): gates near -20 per step, and mild gates
/// near the switch point between the paths; key tiles of 64 and of 128.
const STRONG_CASES: [(GateKind, usize, f64, usize); 6] = [
    (GateKind::Key, 16384, 20.0, 64),
    (GateKind::Both, 2048, 20.0, 64),
    (GateKind::KeyBonus, 2048, 20.0, 64),
    (GateKind::Scalar, 2048, 20.0, 128),
    (GateKind::Key, 4096, 0.9, 128),
    (GateKind::Both, 4096, 0.9, 64),
];

/// Gates near -20 per step: every chunk takes the term-by-term path; the mild case with a
/// total decay near the switch point takes both paths within one sequence. Key tiles of 64
/// and of 128 (K = 128 takes one tile in the two-level form's chunk_local).
#[test]
fn forward_strong_gates_long_sequence() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(13);
    for (gate, t, strength, k) in STRONG_CASES {
        let s = Shape {
            b: 1,
            t,
            h: 1,
            k,
            v: 64,
        };
        let x = inputs(&mut rng, gate, &s, true, strength);
        check_forward(&gpu, gate, &x, &format!("strength {strength} T={t} K={k}"));
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
    let err = gla_forward(&gpu, GateKind::Key, &x, DType::Bf16, Form::Chunk).unwrap_err();
    assert!(err.to_string().contains("multiples of 16"), "{err}");
    let err = Decoder::new(&gpu, GateKind::Key, (1, 1), (24, 32), 1.0, DType::Bf16).err();
    assert!(err.unwrap().to_string().contains("multiples of 16"));
}

#[test]
fn backward_every_gate_awkward_shapes() {
    let Some(gpu) = gpu() else { return };
    let shapes = [
        Shape {
            b: 2,
            t: 100,
            h: 3,
            k: 32,
            v: 48,
        },
        Shape {
            b: 1,
            t: 1,
            h: 2,
            k: 16,
            v: 16,
        },
        Shape {
            b: 2,
            t: 130,
            h: 2,
            k: 128,
            v: 64,
        },
        // K = V = 128: FLA_SWEEP_BV=128 builds the sweeps with outputs at 1024 threads.
        Shape {
            b: 1,
            t: 200,
            h: 2,
            k: 128,
            v: 128,
        },
        Shape {
            b: 1,
            t: 70,
            h: 1,
            k: 256,
            v: 512,
        },
    ];
    let mut rng = Rng::new(21);
    for gate in GATES {
        for (i, s) in shapes.iter().enumerate() {
            let x = inputs(&mut rng, gate, s, i % 2 == 0, 1.0);
            let what = format!("T={} K={} V={}", s.t, s.k, s.v);
            check_backward(&gpu, gate, &x, &mut rng, i != 1, &what);
        }
    }
}

#[test]
fn backward_varlen_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(22);
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
        check_backward(&gpu, gate, &x, &mut rng, true, "varlen");
    }
}

/// Gates near -20 per step (term-by-term paths) and mild gates near the switch point; key
/// tiles of 64 and of 128 (K = 128 takes one tile in the two-level form's chunk_local).
#[test]
fn backward_strong_gates_long_sequence() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(23);
    for (gate, t, strength, k) in STRONG_CASES {
        let s = Shape {
            b: 1,
            t,
            h: 1,
            k,
            v: 64,
        };
        let x = inputs(&mut rng, gate, &s, true, strength);
        check_backward(
            &gpu,
            gate,
            &x,
            &mut rng,
            true,
            &format!("strength {strength} T={t} K={k}"),
        );
    }
}

/// The decode step, token by token from a prefilled state, against the reference forward of
/// the whole sequences: every output and the final states.
#[test]
fn decode_steps_match_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(31);
    let s = Shape {
        b: 3,
        t: 6,
        h: 2,
        k: 32,
        v: 48,
    };
    let (b, t, h, dk, dv) = (s.b, s.t, s.h, s.k, s.v);
    for gate in GATES {
        let x0 = inputs(&mut rng, gate, &s, true, 1.0);
        for dtype in [DType::F32, DType::Bf16] {
            let x = &stored_inputs(&x0, dtype);
            let want = reference(gate, x);
            let scale = x.scale.unwrap_or(1.0 / (dk as f64).sqrt()) as f32;
            let mut dec = Decoder::new(&gpu, gate, (b, h), (dk, dv), scale, dtype).unwrap();
            dec.set_state(&gpu, &x.h0.as_ref().unwrap().cast()).unwrap();
            // Token i of every sequence, [B, H, D].
            let token = |x: &Tensor<f64>, i: usize| -> Vec<f32> {
                let w = x.data().len() / (b * t);
                (0..b)
                    .flat_map(|bi| x.data()[(bi * t + i) * w..(bi * t + i + 1) * w].to_vec())
                    .map(|v| v as f32)
                    .collect()
            };
            let upload = |v: Vec<f32>| gpu.stream().clone_htod(&v).unwrap();
            let u =
                x.u.as_ref()
                    .map(|u| upload(u.data().iter().map(|&v| v as f32).collect()));
            let mut o = Buf::zeros(&gpu, b * h * dv, dtype).unwrap();
            let mut got = vec![0f32; b * t * h * dv];
            for i in 0..t {
                let (q, k, v) = (
                    Buf::upload(&gpu, &token(&x.q, i), dtype).unwrap(),
                    Buf::upload(&gpu, &token(&x.k, i), dtype).unwrap(),
                    Buf::upload(&gpu, &token(&x.v, i), dtype).unwrap(),
                );
                let g = x.g.as_ref().map(|g| upload(token(g, i)));
                let gv = x.gv.as_ref().map(|g| upload(token(g, i)));
                let step = StepInputs {
                    q: &q,
                    k: &k,
                    v: &v,
                    g: g.as_ref(),
                    gv: gv.as_ref(),
                    u: u.as_ref(),
                };
                dec.step(&gpu, &step, &mut o).unwrap();
                let oi = o.download(&gpu).unwrap();
                for bi in 0..b {
                    let w = h * dv;
                    got[(bi * t + i) * w..(bi * t + i + 1) * w]
                        .copy_from_slice(&oi[bi * w..(bi + 1) * w]);
                }
            }
            let got = Tensor::new(vec![b, t, h, dv], got).unwrap();
            let tol = tolerance(dtype);
            let tag = format!("decode {gate} {dtype:?}");
            let eo = check(&format!("{tag} o"), &got, &want.o, tol);
            let eh = check(
                &format!("{tag} state"),
                &dec.state(&gpu).unwrap(),
                &want.ht,
                tol,
            );
            println!("{tag}: o {eo:.1e}, state {eh:.1e}");
        }
    }
    // A step with a missing gate is refused, naming it.
    let mut dec = Decoder::new(&gpu, GateKind::Key, (1, 1), (16, 16), 1.0, DType::F32).unwrap();
    let z = Buf::zeros(&gpu, 16, DType::F32).unwrap();
    let mut o = Buf::zeros(&gpu, 16, DType::F32).unwrap();
    let step = StepInputs {
        q: &z,
        k: &z,
        v: &z,
        g: None,
        gv: None,
        u: None,
    };
    let err = dec.step(&gpu, &step, &mut o).unwrap_err();
    assert!(err.to_string().contains("needs `g`"), "{err}");
}

/// A sequence-parallel call with one rank per segment `bounds` (ranks run one after another
/// on one GPU; the all-gathers are copies) against the f64 reference on the whole sequences:
/// o and every gradient put back together along T, the last rank's ht and rank 0's dh0.
fn check_seq_parallel(
    gpu: &Gpu,
    gate: GateKind,
    x: &GlaInputs<f64>,
    bounds: &[usize],
    rng: &mut Rng,
    with_dht: bool,
    what: &str,
) {
    let opts = Options {
        form: Form::Recurrent,
        ..Options::default()
    };
    let (b, t, h, dk, dv) = (
        x.q.shape()[0],
        x.q.shape()[1],
        x.q.shape()[2],
        x.q.shape()[3],
        x.v.shape()[3],
    );
    let world = bounds.len() - 1;
    let d_o = rng.tensor(&[b, t, h, dv]);
    let dht = with_dht.then(|| rng.tensor(&[b, h, dk, dv]));
    for dtype in [DType::F32, DType::Bf16] {
        let tol = tolerance(dtype);
        let x = &stored_inputs(x, dtype);
        let d_o = as_stored(&d_o, dtype);
        let dht = dht.as_ref().map(|t| as_stored(t, DType::F32));
        let want_out = reference(gate, x);
        let want = fla_ops::gla_backward(gate, x, &d_o, dht.as_ref(), &opts).unwrap();
        let x32 = cast_inputs::<f32>(x);
        let mut ranks: Vec<_> = (0..world)
            .map(|r| {
                let seg = segment(&x32, bounds[r], bounds[r + 1], None);
                let seg = GlaInputs {
                    h0: if r == 0 { x32.h0.clone() } else { None },
                    ..seg
                };
                let d = DeviceGla::upload(gpu, gate, &seg, dtype).unwrap();
                let dht = dht.as_ref().filter(|_| r + 1 == world).map(|t| t.cast());
                let d_o = slice_t(&d_o.cast::<f32>(), bounds[r], bounds[r + 1]);
                let up = d.upstream(gpu, &d_o, dht.as_ref()).unwrap();
                (d, up)
            })
            .collect();
        let parts: Vec<_> = ranks
            .iter_mut()
            .enumerate()
            .map(|(r, (d, _))| d.segment_forward_local(gpu, r, world).unwrap())
            .collect();
        let all = gather_in_turn(gpu, &parts).unwrap();
        for (r, (d, _)) in ranks.iter_mut().enumerate() {
            d.segment_forward_finish(gpu, &all, r, world).unwrap();
        }
        let parts: Vec<_> = ranks
            .iter_mut()
            .enumerate()
            .map(|(r, (d, up))| d.segment_backward_local(gpu, up, r, world).unwrap())
            .collect();
        let all = gather_in_turn(gpu, &parts).unwrap();
        for (r, (d, up)) in ranks.iter_mut().enumerate() {
            d.segment_backward_finish(gpu, up, &all, r, world).unwrap();
        }
        let mut o = Tensor::zeros(&[b, t, h, dv]);
        let mut grads: Vec<Tensor<f32>> = named(&want)
            .iter()
            .filter(|p| p.0 != "dh0")
            .map(|p| Tensor::zeros(p.1.shape()))
            .collect();
        for (r, (d, _)) in ranks.iter().enumerate() {
            put_t(&mut o, &d.outputs(gpu).unwrap().o, bounds[r]);
            let g = d.gradients(gpu).unwrap();
            for (whole, (_, part)) in grads.iter_mut().zip(named(&g)) {
                put_t(whole, part, bounds[r]);
            }
        }
        let tag = |n: &str| format!("{what} {gate} {dtype:?} {world} ranks {n}");
        let mut line = tag(":");
        line += &format!(" o {:.1e}", check(&tag("o"), &o, &want_out.o, tol));
        let ht = ranks[world - 1].0.outputs(gpu).unwrap().ht;
        line += &format!(" ht {:.1e}", check(&tag("ht"), &ht, &want_out.ht, tol));
        for (got, (n, w)) in grads.iter().zip(named(&want)) {
            line += &format!(" {n} {:.1e}", check(&tag(n), got, w, tol));
        }
        if let Some(w) = &want.dh0 {
            let got = ranks[0].0.gradients(gpu).unwrap().dh0.unwrap();
            line += &format!(" dh0 {:.1e}", check(&tag("dh0"), &got, w, tol));
        }
        println!("{line}");
    }
}

#[test]
fn sequence_parallel_segments_match_the_whole_sequence() {
    let Some(gpu) = gpu() else { return };
    if !forms().contains(&Form::Chunk) {
        println!("skipped: FLA_TEST_FORMS leaves out the chunk form");
        return;
    }
    let mut rng = Rng::new(41);
    let small = Shape {
        b: 2,
        t: 300,
        h: 2,
        k: 32,
        v: 48,
    };
    // Three ranks, one with a segment shorter than a chunk; h0 on rank 0, dht on the last.
    for gate in [GateKind::None, GateKind::Scalar, GateKind::Key] {
        let x = inputs(&mut rng, gate, &small, true, 1.0);
        check_seq_parallel(&gpu, gate, &x, &[0, 100, 130, 300], &mut rng, true, "small");
    }
    // The model's head sizes and the largest, without h0 or dht.
    for (k, v, t, bounds) in [
        (128, 128, 512, vec![0, 128, 320, 512]),
        (256, 512, 300, vec![0, 200, 300]),
    ] {
        let s = Shape {
            b: 1,
            t,
            h: 2,
            k,
            v,
        };
        let x = inputs(&mut rng, GateKind::Key, &s, false, 1.0);
        check_seq_parallel(&gpu, GateKind::Key, &x, &bounds, &mut rng, false, "heads");
    }
}

#[test]
fn sequence_parallel_misuse_is_named() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng::new(43);
    let s = Shape {
        b: 1,
        t: 20,
        h: 1,
        k: 16,
        v: 16,
    };
    let x = cast_inputs::<f32>(&inputs(&mut rng, GateKind::Key, &s, true, 1.0));
    // h0 belongs to rank 0.
    let mut d = DeviceGla::upload(&gpu, GateKind::Key, &x, DType::F32).unwrap();
    let err = d.segment_forward_local(&gpu, 1, 2).unwrap_err();
    assert!(err.to_string().contains("only rank 0"), "{err}");
    // The value gate has no two-level kernels.
    let both = cast_inputs::<f32>(&inputs(&mut rng, GateKind::Both, &s, false, 1.0));
    let mut d = DeviceGla::upload(&gpu, GateKind::Both, &both, DType::F32).unwrap();
    let err = d.segment_forward_local(&gpu, 0, 2).unwrap_err();
    assert!(err.to_string().contains("two-level chunk form"), "{err}");
    // dht belongs to the last rank; the backward needs the sequence-parallel forward.
    let mut d = DeviceGla::upload(&gpu, GateKind::Key, &x, DType::F32).unwrap();
    let d_o = Tensor::zeros(&[1, 20, 1, 16]);
    let dht = Tensor::zeros(&[1, 1, 16, 16]);
    let up = d.upstream(&gpu, &d_o, Some(&dht)).unwrap();
    let err = d.segment_backward_local(&gpu, &up, 0, 2).unwrap_err();
    assert!(err.to_string().contains("forward first"), "{err}");
    let part = d.segment_forward_local(&gpu, 0, 2).unwrap();
    let all = gather_in_turn(&gpu, &[part.clone(), part]).unwrap();
    d.segment_forward_finish(&gpu, &all, 0, 2).unwrap();
    let err = d.segment_backward_local(&gpu, &up, 0, 2).unwrap_err();
    assert!(err.to_string().contains("only the last rank"), "{err}");
    // A gathered buffer of the wrong size.
    let short = gpu.stream().alloc_zeros::<f32>(3).unwrap();
    let err = d.segment_forward_finish(&gpu, &short, 1, 2).unwrap_err();
    assert!(err.to_string().contains("gathered segment states"), "{err}");
}
