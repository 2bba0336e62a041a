//! NCCL communicators on the GPU. Without a GPU or without libnccl each test prints that it
//! skipped; with FLA_REQUIRE_CUDA=1 a missing GPU fails it, with FLA_REQUIRE_NCCL=1 a missing
//! NCCL does.

#[path = "../../fla-ops/tests/common/mod.rs"]
mod common;
#[path = "support/gpu_and_nccl.rs"]
mod support;

use common::{cast_inputs, inputs, Rng, Shape};
use fla_cuda::{gla_backward, new_id, DType, DeviceGla, DeviceGroup, Gpu, NcclGroup};
use fla_ops::gla::{put_t, segment, slice_t};
use fla_ops::{Form, GateKind, GlaInputs};
use fla_tensor::Tensor;
use support::gpu_and_nccl;

/// Rank r's buffer: element i is (r + 1) * (i + 1) / 8, exact in f32.
fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((rank + 1) * (i + 1)) as f32 / 8.0)
        .collect()
}

/// The ranks of a communicator of `world`, rank r on GPU r, one thread each: every rank
/// all-reduces its buffer, all-gathers it, reduce-scatters a buffer of `world` pieces and sums
/// a number; returns what each saw.
/// What a rank saw: the all-reduced, all-gathered and reduce-scattered buffers, and the sum.
type Seen = (Vec<f32>, Vec<f32>, Vec<f32>, f64);

fn run_ranks(world: usize, n: usize) -> Vec<Seen> {
    let id = new_id().unwrap();
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let gpu = Gpu::new(rank).unwrap();
                let group = NcclGroup::new(&gpu, rank, world, id).unwrap();
                assert_eq!((group.rank(), group.world()), (rank, world));
                let s = gpu.stream();
                let mine = s.clone_htod(&values(rank, n)).unwrap();
                let mut summed = s.clone_htod(&values(rank, n)).unwrap();
                group
                    .all_reduce_sum(&gpu, &mut summed.as_view_mut())
                    .unwrap();
                let mut gathered = s.alloc_zeros::<f32>(world * n).unwrap();
                group
                    .all_gather(&gpu, &mine.as_view(), &mut gathered.as_view_mut())
                    .unwrap();
                let pieces = s.clone_htod(&values(rank, world * n)).unwrap();
                let mut scattered = s.alloc_zeros::<f32>(n).unwrap();
                group
                    .reduce_scatter_sum(&gpu, &pieces.as_view(), &mut scattered.as_view_mut())
                    .unwrap();
                group.join(&gpu).unwrap();
                let loss = group.sum_f64(&gpu, 0.1 * (rank + 1) as f64).unwrap();
                (
                    s.clone_dtoh(&summed).unwrap(),
                    s.clone_dtoh(&gathered).unwrap(),
                    s.clone_dtoh(&scattered).unwrap(),
                    loss,
                )
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn check_ranks(world: usize) {
    let n = 1000;
    let total = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (0..world).map(|r| values(r, len)[i]).sum())
            .collect()
    };
    let gathered: Vec<f32> = (0..world).flat_map(|r| values(r, n)).collect();
    let losses: f64 = (0..world).map(|r| 0.1 * (r + 1) as f64).sum();
    for (rank, (s, g, sc, loss)) in run_ranks(world, n).into_iter().enumerate() {
        assert_eq!(s, total(n), "rank {rank}: all-reduce");
        assert_eq!(g, gathered, "rank {rank}: all-gather");
        assert_eq!(
            sc,
            total(world * n)[rank * n..(rank + 1) * n],
            "rank {rank}: reduce-scatter"
        );
        assert!((loss - losses).abs() < 1e-15, "rank {rank}: sum {loss}");
    }
}

/// Whether GPUs 0 and 1 and NCCL are usable; if not, says why the test skipped.
fn two_gpus() -> bool {
    if gpu_and_nccl().is_none() {
        return false;
    }
    if fla_cuda::cudarc::driver::CudaContext::device_count().map_or(0, |n| n) < 2 {
        eprintln!("skipped: one GPU (NCCL refuses two ranks on one)");
        return false;
    }
    true
}

#[test]
fn one_rank_collectives() {
    if gpu_and_nccl().is_none() {
        return;
    }
    check_ranks(1);
}

/// Two ranks on GPUs 0 and 1: run by hand (`--ignored`) on a machine with two. NCCL refuses
/// two ranks of one communicator on one GPU ("Duplicate GPU detected", NCCL 2.28.3 on the
/// lent H100), so a single-GPU machine cannot run it.
#[test]
#[ignore]
fn two_ranks_on_two_gpus() {
    if !two_gpus() {
        return;
    }
    check_ranks(2);
}

#[test]
fn bad_ranks_and_buffers_are_named() {
    let Some(gpu) = gpu_and_nccl() else { return };
    let id = new_id().unwrap();
    let err = NcclGroup::new(&gpu, 1, 1, id).err().unwrap().to_string();
    assert!(err.contains("rank 1 of a group of 1"), "{err}");
    let group = NcclGroup::new(&gpu, 0, 1, id).unwrap();
    let s = gpu.stream();
    let mut send = s.alloc_zeros::<f32>(4).unwrap();
    let mut recv = s.alloc_zeros::<f32>(5).unwrap();
    let err = group
        .all_gather(&gpu, &send.as_view(), &mut recv.as_view_mut())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("all-gather of 4 floats from each of 1 ranks into 5"),
        "{err}"
    );
    let err = group
        .reduce_scatter_sum(&gpu, &recv.as_view(), &mut send.as_view_mut())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reduce-scatter of 4 floats from each of 1 ranks into 5"),
        "{err}"
    );
}

/// Sequence parallelism over a communicator of `world` ranks (rank r on GPU r, one thread
/// each, holding rows [r T / world, (r + 1) T / world) of every sequence; h0 on rank 0, dht on
/// the last) against GPU 0 running the whole sequences, in f32: o, dq, dk, dv, dg, the last
/// rank's ht and rank 0's dh0, to 1e-4 relative.
fn check_seq_parallel(world: usize) {
    let mut rng = Rng::new(47);
    let s = Shape {
        b: 2,
        t: 384,
        h: 2,
        k: 64,
        v: 64,
    };
    let x = cast_inputs::<f32>(&inputs(&mut rng, GateKind::Key, &s, true, 1.0));
    let d_o = rng.tensor(&[s.b, s.t, s.h, s.v]).cast::<f32>();
    let dht = rng.tensor(&[s.b, s.h, s.k, s.v]).cast::<f32>();
    let gpu = Gpu::new(0).unwrap();
    let (want_out, want) = gla_backward(
        &gpu,
        GateKind::Key,
        &x,
        &d_o,
        Some(&dht),
        DType::F32,
        Form::Chunk,
    )
    .unwrap();
    let id = new_id().unwrap();
    let bounds: Vec<usize> = (0..=world).map(|r| r * s.t / world).collect();
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let (t0, t1) = (bounds[rank], bounds[rank + 1]);
            let seg = GlaInputs {
                h0: if rank == 0 { x.h0.clone() } else { None },
                ..segment(&x, t0, t1, None)
            };
            let d_o = slice_t(&d_o, t0, t1);
            let dht = (rank + 1 == world).then(|| dht.clone());
            std::thread::spawn(move || {
                let gpu = Gpu::new(rank).unwrap();
                let group = NcclGroup::new(&gpu, rank, world, id).unwrap();
                let mut d = DeviceGla::upload(&gpu, GateKind::Key, &seg, DType::F32).unwrap();
                let up = d.upstream(&gpu, &d_o, dht.as_ref()).unwrap();
                d.forward_seq_parallel(&gpu, &group).unwrap();
                d.backward_seq_parallel(&gpu, &group, &up).unwrap();
                (d.outputs(&gpu).unwrap(), d.gradients(&gpu).unwrap())
            })
        })
        // Every rank started before any is waited for: each blocks until all have joined.
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let close = |what: &str, got: &Tensor<f32>, want: &Tensor<f32>| {
        let e = got.cast::<f64>().rel_err(&want.cast::<f64>());
        assert!(e < 1e-4, "{world} ranks: {what} relative error {e:.3e}");
    };
    let mut o = Tensor::zeros(want_out.o.shape());
    let mut grads = [&want.dq, &want.dk, &want.dv, want.dg.as_ref().unwrap()]
        .map(|w| Tensor::<f32>::zeros(w.shape()));
    for (r, (out, g)) in ranks.iter().enumerate() {
        put_t(&mut o, &out.o, bounds[r]);
        for (whole, part) in grads
            .iter_mut()
            .zip([&g.dq, &g.dk, &g.dv, g.dg.as_ref().unwrap()])
        {
            put_t(whole, part, bounds[r]);
        }
    }
    close("o", &o, &want_out.o);
    close("ht", &ranks[world - 1].0.ht, &want_out.ht);
    let wants = [&want.dq, &want.dk, &want.dv, want.dg.as_ref().unwrap()];
    for ((n, got), w) in ["dq", "dk", "dv", "dg"].iter().zip(&grads).zip(wants) {
        close(n, got, w);
    }
    close(
        "dh0",
        ranks[0].1.dh0.as_ref().unwrap(),
        want.dh0.as_ref().unwrap(),
    );
}

#[test]
fn sequence_parallel_over_one_rank() {
    if gpu_and_nccl().is_none() {
        return;
    }
    check_seq_parallel(1);
}

/// Two ranks on GPUs 0 and 1, run by hand (`--ignored`) on a machine with two.
#[test]
#[ignore]
fn sequence_parallel_over_two_gpus() {
    if !two_gpus() {
        return;
    }
    check_seq_parallel(2);
}
