//! The materialised chunkwise form (the paper's two-level form): a sequential pass writes the
//! state entering every chunk, then all chunks compute in parallel. Backward likewise: the
//! entering states and the gradients of the leaving states, then all chunks in parallel.

use super::chunk_math::{chunks, finish_backward, Chunk};
use super::seq::{Seq, SeqGrads, SeqOut, SeqUpstream};
use fla_tensor::Real;
use rayon::prelude::*;

/// The states entering each chunk, and the final state.
fn states<F: Real>(s: &Seq<F>, cs: &[Chunk<'_, F>]) -> (Vec<Vec<F>>, Vec<F>) {
    let mut st = s.h0.clone().unwrap_or_else(|| vec![F::ZERO; s.dk * s.dv]);
    let mut entering = Vec::with_capacity(cs.len());
    for c in cs {
        entering.push(st.clone());
        c.update_state(&mut st);
    }
    (entering, st)
}

fn chunk_list<F: Real>(s: &Seq<F>, size: usize) -> Vec<Chunk<'_, F>> {
    chunks(s.t, size)
        .map(|(t0, len)| Chunk::new(s, t0, len))
        .collect()
}

/// Concatenates per-chunk row blocks in order.
fn concat<F: Real>(parts: Vec<Vec<F>>) -> Vec<F> {
    parts.into_iter().flatten().collect()
}

pub fn forward<F: Real>(s: &Seq<F>, size: usize) -> SeqOut<F> {
    let cs = chunk_list(s, size);
    let (entering, ht) = states(s, &cs);
    let mut o = concat(
        cs.par_iter()
            .zip(&entering)
            .map(|(c, st)| c.output(st))
            .collect(),
    );
    s.add_diagonal_output(&mut o, &s.diagonal_weight());
    SeqOut { o, ht }
}

pub fn backward<F: Real>(s: &Seq<F>, up: &SeqUpstream<F>, size: usize) -> SeqGrads<F> {
    let cs = chunk_list(s, size);
    let (entering, ht) = states(s, &cs);
    // Gradients of the state leaving each chunk, from the last chunk back.
    let mut leaving = vec![Vec::new(); cs.len()];
    let mut ds = up.dht.clone();
    for (n, c) in cs.iter().enumerate().rev() {
        leaving[n] = ds.clone();
        c.state_grad(&mut ds, &up.d_o);
    }
    let with_o = s.gv.is_some();
    let parts: Vec<_> = (0..cs.len())
        .into_par_iter()
        .map(|n| {
            let c = &cs[n];
            let da = c.attention_grad(&up.d_o);
            let (dk, dv) = c.dk_dv(&leaving[n], &up.d_o, &da);
            let o = if with_o {
                c.output(&entering[n])
            } else {
                Vec::new()
            };
            (c.dq(&entering[n], &up.d_o, &da), dk, dv, o)
        })
        .collect();
    let (mut dq, mut dk, mut dv, mut o) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (a, b, c, d) in parts {
        dq.extend(a);
        dk.extend(b);
        dv.extend(c);
        o.extend(d);
    }
    finish_backward(s, up, (dq, dk, dv), with_o.then_some(&o[..]), &ht, ds)
}
