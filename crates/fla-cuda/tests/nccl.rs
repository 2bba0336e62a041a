//! NCCL communicators on the GPU. Without a GPU or without libnccl each test prints that it
//! skipped; with FLA_REQUIRE_CUDA=1 a missing GPU fails it, with FLA_REQUIRE_NCCL=1 a missing
//! NCCL does.

#[path = "support/gpu_and_nccl.rs"]
mod support;

use fla_cuda::{new_id, Gpu, NcclGroup};
use support::gpu_and_nccl;

/// Rank r's buffer: element i is (r + 1) * (i + 1) / 8, exact in f32.
fn values(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((rank + 1) * (i + 1)) as f32 / 8.0)
        .collect()
}

/// The ranks of a communicator of `world`, rank r on GPU r, one thread each: every rank all-reduces
/// its buffer, all-gathers it, and all-reduces two more as one group; returns what each saw.
fn run_ranks(world: usize, n: usize) -> Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> {
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
                group.all_reduce_sum(&mut summed).unwrap();
                let mut gathered = s.alloc_zeros::<f32>(world * n).unwrap();
                group.all_gather(&mine, &mut gathered).unwrap();
                let mut a = s.clone_htod(&values(rank, 3)).unwrap();
                let mut b = s.clone_htod(&values(rank, n)).unwrap();
                group.all_reduce_sum_all(&mut [&mut a, &mut b]).unwrap();
                let mut grouped = s.clone_dtoh(&a).unwrap();
                grouped.extend(s.clone_dtoh(&b).unwrap());
                (
                    s.clone_dtoh(&summed).unwrap(),
                    s.clone_dtoh(&gathered).unwrap(),
                    grouped,
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
    let mut grouped = total(3);
    grouped.extend(total(n));
    for (rank, (s, g, gr)) in run_ranks(world, n).into_iter().enumerate() {
        assert_eq!(s, total(n), "rank {rank}: all-reduce");
        assert_eq!(g, gathered, "rank {rank}: all-gather");
        assert_eq!(gr, grouped, "rank {rank}: grouped all-reduce");
    }
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
    if gpu_and_nccl().is_none() {
        return;
    }
    if fla_cuda::cudarc::driver::CudaContext::device_count().map_or(0, |n| n) < 2 {
        eprintln!("skipped: one GPU (NCCL refuses two ranks on one)");
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
    let send = s.alloc_zeros::<f32>(4).unwrap();
    let mut recv = s.alloc_zeros::<f32>(5).unwrap();
    let err = group.all_gather(&send, &mut recv).unwrap_err().to_string();
    assert!(
        err.contains("all-gather of 4 floats from each of 1 ranks into 5"),
        "{err}"
    );
}
