//! The recurrence split along T into segments (what sequence-parallel ranks hold), with only
//! states passing between them, against the whole sequence: outputs, final states and every
//! gradient, for every gate kind, in f64.

mod common;

use common::{inputs, Rng, Shape};
use fla_ops::{
    backward_in_segments, forward_in_segments, gla_backward, gla_forward, GateKind, Options,
};
use fla_tensor::Tensor;

fn close(name: &str, got: &Tensor<f64>, want: &Tensor<f64>) {
    let e = got.rel_err(want);
    assert!(e < 1e-10, "{name}: relative error {e:e}");
}

#[test]
fn segments_give_the_whole_sequence() {
    let mut rng = Rng::new(21);
    let shape = Shape {
        b: 2,
        t: 150,
        h: 2,
        k: 16,
        v: 24,
    };
    for gate in GateKind::ALL {
        for (h0, bounds) in [
            (false, vec![0, 150]),
            (true, vec![0, 37, 64, 149, 150]),
            (false, vec![0, 1, 75, 150]),
        ] {
            let x = inputs(&mut rng, gate, &shape, h0, 1.0);
            let opts = Options::default();
            let whole = gla_forward(gate, &x, &opts).unwrap();
            let parts = forward_in_segments(gate, &x, &bounds, &opts).unwrap();
            close("o", &parts.o, &whole.o);
            close("ht", &parts.ht, &whole.ht);
            let d_o = rng.tensor(x.v.shape());
            let dht = rng.tensor(whole.ht.shape());
            let want = gla_backward(gate, &x, &d_o, Some(&dht), &opts).unwrap();
            let got = backward_in_segments(gate, &x, &d_o, Some(&dht), &bounds, &opts).unwrap();
            close("dq", &got.dq, &want.dq);
            close("dk", &got.dk, &want.dk);
            close("dv", &got.dv, &want.dv);
            for (name, a, b) in [
                ("dg", &got.dg, &want.dg),
                ("dgv", &got.dgv, &want.dgv),
                ("du", &got.du, &want.du),
                ("dh0", &got.dh0, &want.dh0),
            ] {
                match (a, b) {
                    (Some(a), Some(b)) => close(name, a, b),
                    (None, None) => {}
                    _ => panic!("{gate} {name}: present on one side only"),
                }
            }
        }
    }
}

#[test]
fn bad_bounds_are_refused() {
    let mut rng = Rng::new(3);
    let x = inputs(
        &mut rng,
        GateKind::Key,
        &Shape {
            b: 1,
            t: 10,
            h: 1,
            k: 16,
            v: 16,
        },
        false,
        1.0,
    );
    for bounds in [vec![0, 5], vec![1, 10], vec![0, 5, 5, 10], vec![0]] {
        let e = forward_in_segments(GateKind::Key, &x, &bounds, &Options::default()).unwrap_err();
        assert!(e.to_string().contains("segment bounds"), "{e}");
    }
}
