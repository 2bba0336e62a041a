//! Variable-length batches equal running each sequence alone; long sequences with gates near
//! -20 per step stay finite and equal the recurrent form.

mod common;
use common::*;
use fla_ops::{gla_backward, gla_forward, Form, GateKind, GlaInputs, Options};
use fla_tensor::Tensor;

/// Rows start..end along T of a [1, T, ...] tensor.
fn slice_t(x: &Tensor<f64>, start: usize, end: usize) -> Tensor<f64> {
    let s = x.shape();
    let row: usize = s[2..].iter().product();
    let mut shape = s.to_vec();
    shape[1] = end - start;
    Tensor::new(shape, x.data()[start * row..end * row].to_vec()).unwrap()
}

/// Sequence n of an [N, ...] tensor, as [1, ...].
fn slice_n(x: &Tensor<f64>, n: usize) -> Tensor<f64> {
    let mut shape = x.shape().to_vec();
    let row: usize = shape[1..].iter().product();
    shape[0] = 1;
    Tensor::new(shape, x.data()[n * row..(n + 1) * row].to_vec()).unwrap()
}

#[test]
fn varlen_equals_each_sequence_alone() {
    let cu = vec![0, 5, 5, 38, 39, 60];
    let n = cu.len() - 1;
    for (gi, gate) in GateKind::ALL.into_iter().enumerate() {
        let mut rng = Rng::new(70 + gi as u64);
        let s = Shape {
            b: 1,
            t: 60,
            h: 2,
            k: 8,
            v: 12,
        };
        let mut x = inputs(&mut rng, gate, &s, false, 1.0);
        x.h0 = Some(rng.tensor(&[n, s.h, s.k, s.v]));
        x.cu_seqlens = Some(cu.clone());
        let d_o = rng.tensor(&[1, s.t, s.h, s.v]);
        let dht = rng.tensor(&[n, s.h, s.k, s.v]);
        for form in [Form::Naive, Form::Recurrent, Form::Chunk, Form::FusedChunk] {
            let opts = Options {
                form,
                chunk_size: 16,
            };
            let packed = gla_forward(gate, &x, &opts).unwrap();
            let pg = gla_backward(gate, &x, &d_o, Some(&dht), &opts).unwrap();
            let mut du_sum = vec![0.0; s.h * s.k];
            for i in 0..n {
                let (a, b) = (cu[i], cu[i + 1]);
                let one = GlaInputs {
                    q: slice_t(&x.q, a, b),
                    k: slice_t(&x.k, a, b),
                    v: slice_t(&x.v, a, b),
                    g: x.g.as_ref().map(|g| slice_t(g, a, b)),
                    gv: x.gv.as_ref().map(|g| slice_t(g, a, b)),
                    u: x.u.clone(),
                    h0: Some(slice_n(x.h0.as_ref().unwrap(), i)),
                    scale: None,
                    cu_seqlens: None,
                };
                let alone = gla_forward(gate, &one, &opts).unwrap();
                let ag = gla_backward(
                    gate,
                    &one,
                    &slice_t(&d_o, a, b),
                    Some(&slice_n(&dht, i)),
                    &opts,
                )
                .unwrap();
                let tag = |w: &str| format!("{gate}/{form} seq {i} {w}");
                assert_close(&tag("o"), &slice_t(&packed.o, a, b), &alone.o, 1e-12);
                assert_close(&tag("ht"), &slice_n(&packed.ht, i), &alone.ht, 1e-12);
                assert_close(&tag("dq"), &slice_t(&pg.dq, a, b), &ag.dq, 1e-12);
                assert_close(&tag("dk"), &slice_t(&pg.dk, a, b), &ag.dk, 1e-12);
                assert_close(&tag("dv"), &slice_t(&pg.dv, a, b), &ag.dv, 1e-12);
                assert_close(
                    &tag("dh0"),
                    &slice_n(pg.dh0.as_ref().unwrap(), i),
                    ag.dh0.as_ref().unwrap(),
                    1e-12,
                );
                if let (Some(p), Some(a1)) = (&pg.dg, &ag.dg) {
                    assert_close(&tag("dg"), &slice_t(p, a, b), a1, 1e-12);
                }
                if let (Some(p), Some(a1)) = (&pg.dgv, &ag.dgv) {
                    assert_close(&tag("dgv"), &slice_t(p, a, b), a1, 1e-12);
                }
                if let Some(du) = &ag.du {
                    du_sum.iter_mut().zip(du.data()).for_each(|(s, d)| *s += d);
                }
            }
            if let Some(du) = &pg.du {
                let want = Tensor::new(vec![s.h, s.k], du_sum).unwrap();
                assert_close(&format!("{gate}/{form} du"), du, &want, 1e-12);
            }
        }
    }
}

/// Per-step log gates near -20 over T = 16384: every chunkwise result in f32 is finite and
/// matches the recurrent form in f64 (forward and all gradients).
#[test]
fn gates_near_minus_20_over_16k_steps() {
    let t = 16384;
    for (gi, gate) in [
        GateKind::Scalar,
        GateKind::Key,
        GateKind::KeyBonus,
        GateKind::Both,
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = Rng::new(500 + gi as u64);
        let s = Shape {
            b: 1,
            t,
            h: 1,
            k: 16,
            v: 16,
        };
        let mut x = inputs(&mut rng, gate, &s, true, 1.0);
        // Half the features decay by about e^-20 every step, the rest barely at all.
        for g in [x.g.as_mut(), x.gv.as_mut()].into_iter().flatten() {
            for (i, val) in g.data_mut().iter_mut().enumerate() {
                *val = if (i / 3) % 2 == 0 {
                    -20.0 + 0.5 * rng.uniform()
                } else {
                    -0.001 * rng.uniform()
                };
            }
        }
        let d_o = rng.tensor(&[1, t, 1, s.v]);
        let dht = rng.tensor(&[1, 1, s.k, s.v]);
        let rec = Options {
            form: Form::Recurrent,
            chunk_size: 64,
        };
        let want = gla_forward(gate, &x, &rec).unwrap();
        let wg = gla_backward(gate, &x, &d_o, Some(&dht), &rec).unwrap();
        let x32: GlaInputs<f32> = cast_inputs(&x);
        for form in [Form::Chunk, Form::FusedChunk] {
            let opts = Options {
                form,
                chunk_size: 64,
            };
            let out = gla_forward(gate, &x32, &opts).unwrap();
            let g = gla_backward(gate, &x32, &d_o.cast(), Some(&dht.cast()), &opts).unwrap();
            for (name, t) in [
                ("o", &out.o),
                ("ht", &out.ht),
                ("dq", &g.dq),
                ("dk", &g.dk),
                ("dv", &g.dv),
            ] {
                t.check_finite(name).unwrap();
            }
            let tag = |w: &str| format!("{gate}/{form} T=16384 {w}");
            assert_close(&tag("o"), &out.o, &want.o, 1e-5);
            assert_close(&tag("ht"), &out.ht, &want.ht, 1e-5);
            assert_close(&tag("dq"), &g.dq, &wg.dq, 1e-5);
            assert_close(&tag("dk"), &g.dk, &wg.dk, 1e-5);
            assert_close(&tag("dv"), &g.dv, &wg.dv, 1e-5);
            assert_close(
                &tag("dh0"),
                g.dh0.as_ref().unwrap(),
                wg.dh0.as_ref().unwrap(),
                1e-5,
            );
            for (name, a, b) in [
                ("dg", &g.dg, &wg.dg),
                ("dgv", &g.dgv, &wg.dgv),
                ("du", &g.du, &wg.du),
            ] {
                if let (Some(a), Some(b)) = (a, b) {
                    a.check_finite(name).unwrap();
                    assert_close(&tag(name), a, b, 1e-5);
                }
            }
        }
    }
}
