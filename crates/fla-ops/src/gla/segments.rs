//! The recurrence split along T into segments, as ranks of a sequence-parallel run hold them:
//! each segment runs on its own, and only K x V states pass between segments.
//!
//! Forward: segment p runs from a zero state, giving its final state L_p; with D_p the
//! segment's total decay (exp of its summed gates, per state entry), the true initial states
//! follow in order, H_0 = h0 and H_{p+1} = D_p ⊙ H_p + L_p, and each segment runs again from
//! H_p. Backward: the gradient reaching a segment's initial state is linear in the one
//! leaving it, dH_p = D_p ⊙ dH_{p+1} + dh0_p with dh0_p that of a run with no upstream state
//! gradient, so it follows in reverse order; each segment then runs its backward with
//! dht = dH_{p+1}. A distributed run exchanges only the L_p, D_p and dh0_p (all-gather).

use fla_tensor::{Error, Real, Result, Tensor};

use super::{gla_backward, gla_forward, GateKind, GlaGrads, GlaInputs, GlaOutputs, Options};

/// Rows t0..t1 of a [B, T, ...] tensor.
pub fn slice_t<F: Real>(x: &Tensor<F>, t0: usize, t1: usize) -> Tensor<F> {
    let s = x.shape();
    let (b, t) = (s[0], s[1]);
    let row: usize = s[2..].iter().product();
    let mut data = Vec::with_capacity(b * (t1 - t0) * row);
    for bi in 0..b {
        data.extend_from_slice(&x.data()[(bi * t + t0) * row..(bi * t + t1) * row]);
    }
    let mut shape = s.to_vec();
    shape[1] = t1 - t0;
    Tensor::new(shape, data).expect("a slice keeps its shape")
}

/// Writes `part` ([B, t1-t0, ...]) into rows t0..t1 of `dst` ([B, T, ...]).
pub fn put_t<F: Real>(dst: &mut Tensor<F>, part: &Tensor<F>, t0: usize) {
    let (b, t) = (dst.shape()[0], dst.shape()[1]);
    let row: usize = dst.shape()[2..].iter().product();
    let len = part.shape()[1];
    for bi in 0..b {
        let src = &part.data()[bi * len * row..(bi + 1) * len * row];
        dst.data_mut()[(bi * t + t0) * row..(bi * t + t0 + len) * row].copy_from_slice(src);
    }
}

/// The inputs of segment t0..t1, starting from `h0`.
pub fn segment<F: Real>(
    x: &GlaInputs<F>,
    t0: usize,
    t1: usize,
    h0: Option<Tensor<F>>,
) -> GlaInputs<F> {
    GlaInputs {
        q: slice_t(&x.q, t0, t1),
        k: slice_t(&x.k, t0, t1),
        v: slice_t(&x.v, t0, t1),
        g: x.g.as_ref().map(|g| slice_t(g, t0, t1)),
        gv: x.gv.as_ref().map(|g| slice_t(g, t0, t1)),
        u: x.u.clone(),
        h0,
        scale: x.scale,
        cu_seqlens: None,
    }
}

/// Each segment's total decay of the state, [B, H, K, V]: exp(Σ gk) ⊗ exp(Σ gv).
fn decay<F: Real>(
    gate: GateKind,
    s: &GlaInputs<F>,
    (b, h, dk, dv): (usize, usize, usize, usize),
) -> Vec<F> {
    let t = s.q.shape()[1];
    let mut d = vec![F::ONE; b * h * dk * dv];
    for bi in 0..b {
        for hi in 0..h {
            let (mut gk, mut gv) = (vec![F::ZERO; dk], vec![F::ZERO; dv]);
            for ti in 0..t {
                let row = (bi * t + ti) * h + hi;
                match (gate, &s.g) {
                    (GateKind::Scalar, Some(g)) => gk.iter_mut().for_each(|x| *x += g.data()[row]),
                    (_, Some(g)) => gk
                        .iter_mut()
                        .zip(&g.data()[row * dk..(row + 1) * dk])
                        .for_each(|(x, &y)| *x += y),
                    _ => {}
                }
                if let Some(g) = &s.gv {
                    gv.iter_mut()
                        .zip(&g.data()[row * dv..(row + 1) * dv])
                        .for_each(|(x, &y)| *x += y);
                }
            }
            let at = (bi * h + hi) * dk * dv;
            for i in 0..dk {
                for j in 0..dv {
                    d[at + i * dv + j] = (gk[i] + gv[j]).exp();
                }
            }
        }
    }
    d
}

fn check<F: Real>(x: &GlaInputs<F>, bounds: &[usize]) -> Result<()> {
    let t = x.q.shape().get(1).copied().unwrap_or(0);
    if x.cu_seqlens.is_some() {
        return Err(Error::Invalid(
            "segments split a batch of equal sequences; cu_seqlens is not taken".into(),
        ));
    }
    if bounds.len() < 2
        || bounds[0] != 0
        || *bounds.last().unwrap() != t
        || bounds.windows(2).any(|w| w[1] <= w[0])
    {
        return Err(Error::Invalid(format!(
            "segment bounds {bounds:?} must rise strictly from 0 to T={t}"
        )));
    }
    Ok(())
}

/// The initial state of every segment ([B, H, K, V] each), given the segments' inputs.
fn initial_states<F: Real>(
    gate: GateKind,
    x: &GlaInputs<F>,
    bounds: &[usize],
    opts: &Options,
) -> Result<Vec<Tensor<F>>> {
    let s = x.q.shape();
    let dims = (s[0], s[2], s[3], x.v.shape()[3]);
    let zero = Tensor::zeros(&[dims.0, dims.1, dims.2, dims.3]);
    let mut states = vec![x.h0.clone().unwrap_or_else(|| zero.clone())];
    for w in bounds.windows(2).take(bounds.len() - 2) {
        let seg = segment(x, w[0], w[1], None);
        let local = gla_forward(gate, &seg, opts)?.ht;
        let d = decay(gate, &seg, dims);
        let prev = states.last().unwrap();
        let next: Vec<F> = (0..d.len())
            .map(|i| d[i] * prev.data()[i] + local.data()[i])
            .collect();
        states.push(Tensor::new(zero.shape().to_vec(), next)?);
    }
    Ok(states)
}

/// The forward over segments split at `bounds` (0 = first, last = T): the same outputs and
/// final states as [`gla_forward`] on the whole.
pub fn forward_in_segments<F: Real>(
    gate: GateKind,
    x: &GlaInputs<F>,
    bounds: &[usize],
    opts: &Options,
) -> Result<GlaOutputs<F>> {
    check(x, bounds)?;
    let states = initial_states(gate, x, bounds, opts)?;
    let mut o = Tensor::zeros(&[
        x.v.shape()[0],
        x.v.shape()[1],
        x.v.shape()[2],
        x.v.shape()[3],
    ]);
    let mut ht = None;
    for (w, h0) in bounds.windows(2).zip(states) {
        let out = gla_forward(gate, &segment(x, w[0], w[1], Some(h0)), opts)?;
        put_t(&mut o, &out.o, w[0]);
        ht = Some(out.ht);
    }
    Ok(GlaOutputs {
        o,
        ht: ht.expect("at least one segment"),
    })
}

/// The backward over segments: the same gradients as [`gla_backward`] on the whole.
pub fn backward_in_segments<F: Real>(
    gate: GateKind,
    x: &GlaInputs<F>,
    d_o: &Tensor<F>,
    dht: Option<&Tensor<F>>,
    bounds: &[usize],
    opts: &Options,
) -> Result<GlaGrads<F>> {
    check(x, bounds)?;
    let states = initial_states(gate, x, bounds, opts)?;
    let s = x.q.shape();
    let dims = (s[0], s[2], s[3], x.v.shape()[3]);
    let shape = [dims.0, dims.1, dims.2, dims.3];
    let segs: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
    // The state gradients, last segment first: dH_P = dht, dH_p = D_p ⊙ dH_{p+1} + dh0_p.
    let mut upstream = vec![dht.cloned().unwrap_or_else(|| Tensor::zeros(&shape)); segs.len()];
    for p in (1..segs.len()).rev() {
        let (t0, t1) = segs[p];
        let seg = segment(x, t0, t1, Some(states[p].clone()));
        let local = gla_backward(gate, &seg, &slice_t(d_o, t0, t1), None, opts)?;
        let dh0 = local.dh0.expect("h0 given, dh0 returned");
        let d = decay(gate, &seg, dims);
        let next = &upstream[p];
        let dh: Vec<F> = (0..d.len())
            .map(|i| d[i] * next.data()[i] + dh0.data()[i])
            .collect();
        upstream[p - 1] = Tensor::new(shape.to_vec(), dh)?;
    }
    let mut out = GlaGrads {
        dq: Tensor::zeros(x.q.shape()),
        dk: Tensor::zeros(x.k.shape()),
        dv: Tensor::zeros(x.v.shape()),
        dg: x.g.as_ref().map(|g| Tensor::zeros(g.shape())),
        dgv: x.gv.as_ref().map(|g| Tensor::zeros(g.shape())),
        du: x.u.as_ref().map(|u| Tensor::zeros(u.shape())),
        dh0: None,
    };
    for (p, &(t0, t1)) in segs.iter().enumerate() {
        let h0 = (p > 0 || x.h0.is_some()).then(|| states[p].clone());
        let seg = segment(x, t0, t1, h0);
        let g = gla_backward(gate, &seg, &slice_t(d_o, t0, t1), Some(&upstream[p]), opts)?;
        put_t(&mut out.dq, &g.dq, t0);
        put_t(&mut out.dk, &g.dk, t0);
        put_t(&mut out.dv, &g.dv, t0);
        if let (Some(dst), Some(src)) = (out.dg.as_mut(), &g.dg) {
            put_t(dst, src, t0);
        }
        if let (Some(dst), Some(src)) = (out.dgv.as_mut(), &g.dgv) {
            put_t(dst, src, t0);
        }
        if let (Some(dst), Some(src)) = (out.du.as_mut(), &g.du) {
            dst.data_mut()
                .iter_mut()
                .zip(src.data())
                .for_each(|(a, &b)| *a += b);
        }
        if p == 0 {
            out.dh0 = x.h0.as_ref().and(g.dh0);
        }
    }
    Ok(out)
}
