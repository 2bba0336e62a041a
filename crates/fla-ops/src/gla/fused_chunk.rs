//! The fused chunkwise form: one sweep over the chunks with the state carried along and never
//! stored (the paper's FlashLinearAttention (a): least I/O, parallel only over heads).
//! Backward: a forward sweep for dq (which needs the entering states) and a reverse sweep
//! for dk, dv (which need the gradients of the leaving states).

use super::chunk_math::{chunks, finish_backward, Chunk};
use super::seq::{Seq, SeqGrads, SeqOut, SeqUpstream};
use fla_tensor::Real;

pub fn forward<F: Real>(s: &Seq<F>, size: usize) -> SeqOut<F> {
    let mut st = s.h0.clone().unwrap_or_else(|| vec![F::ZERO; s.dk * s.dv]);
    let mut o = vec![F::ZERO; s.t * s.dv];
    for (t0, len) in chunks(s.t, size) {
        let c = Chunk::new(s, t0, len);
        o[t0 * s.dv..(t0 + len) * s.dv].copy_from_slice(&c.output(&st));
        c.update_state(&mut st);
    }
    s.add_diagonal_output(&mut o, &s.diagonal_weight());
    SeqOut { o, ht: st }
}

pub fn backward<F: Real>(s: &Seq<F>, up: &SeqUpstream<F>, size: usize) -> SeqGrads<F> {
    let (kd, vd) = (s.dk, s.dv);
    let mut st = s.h0.clone().unwrap_or_else(|| vec![F::ZERO; kd * vd]);
    let mut dq = vec![F::ZERO; s.t * kd];
    // The value gate's gradient needs the outputs; recompute them in the same sweep.
    let mut o = s.gv.as_ref().map(|_| vec![F::ZERO; s.t * vd]);
    for (t0, len) in chunks(s.t, size) {
        let c = Chunk::new(s, t0, len);
        dq[t0 * kd..(t0 + len) * kd].copy_from_slice(&c.dq(
            &st,
            &up.d_o,
            &c.attention_grad(&up.d_o),
        ));
        if let Some(o) = o.as_mut() {
            o[t0 * vd..(t0 + len) * vd].copy_from_slice(&c.output(&st));
        }
        c.update_state(&mut st);
    }
    let mut ds = up.dht.clone();
    let (mut dk, mut dv) = (vec![F::ZERO; s.t * kd], vec![F::ZERO; s.t * vd]);
    let all: Vec<_> = chunks(s.t, size).collect();
    for &(t0, len) in all.iter().rev() {
        let c = Chunk::new(s, t0, len);
        // dA is recomputed rather than kept from the forward sweep: the fused form stores nothing per chunk.
        let (ck, cv) = c.dk_dv(&ds, &up.d_o, &c.attention_grad(&up.d_o));
        dk[t0 * kd..(t0 + len) * kd].copy_from_slice(&ck);
        dv[t0 * vd..(t0 + len) * vd].copy_from_slice(&cv);
        c.state_grad(&mut ds, &up.d_o);
    }
    finish_backward(s, up, (dq, dk, dv), o.as_deref(), &st, ds)
}
