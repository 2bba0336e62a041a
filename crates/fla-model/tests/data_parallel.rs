//! Data parallelism on the CPU: ranks as threads, each on its share of every batch. Their
//! averaged gradients are one learner's on the whole batch (f32, to rounding); over several
//! steps every rank holds the same weights, bit for bit, and reports the whole batch's loss.
//! (Weights are not compared with one learner's after several steps: AdamW's first steps
//! divide gradients near zero by their own size, which turns rounding into step-sized
//! differences.)

use std::thread;

use fla_model::data_parallel::{share, Collective, DataParallel, ThreadGroup};
use fla_model::learner::{CpuLearner, Learner};
use fla_model::mqar::Mqar;
use fla_model::rng::Rng;
use fla_model::train::{Batch, Task};
use fla_model::{GlaConfig, Model};

const STEPS: usize = 3;
const BATCH: usize = 6;

fn learner() -> CpuLearner {
    let config = GlaConfig::from_json(
        r#"{"model_type":"gla","hidden_size":64,"num_hidden_layers":2,"num_heads":2,
            "use_short_conv":true,"vocab_size":64}"#,
    )
    .unwrap();
    CpuLearner::new(Model::new(config, 5), 0.1, false)
}

fn batches() -> Vec<Batch> {
    let mut task = Mqar {
        vocab_size: 64,
        seq_len: 32,
        num_pairs: 4,
        batch_size: BATCH,
    };
    let mut rng = Rng::new(9);
    (0..STEPS).map(|_| task.batch(&mut rng)).collect()
}

/// The losses and final weights of `learner` stepping on `batches`.
fn run(learner: &mut dyn Learner, batches: &[Batch]) -> (Vec<f64>, Vec<Vec<f32>>) {
    let mut losses = Vec::new();
    for batch in batches {
        learner.zero_grads().unwrap();
        losses.push(learner.accumulate(batch, 1.0).unwrap());
        learner.clip_and_step(3e-3, 1.0).unwrap();
    }
    let params = learner.snapshot().unwrap().params;
    (losses, params.iter().map(|p| p.data().to_vec()).collect())
}

/// `f` on every rank of a new group of `world` threads; the results in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(ThreadGroup) -> T + Send + Clone + 'static,
) -> Vec<T> {
    let ranks: Vec<_> = ThreadGroup::new(world)
        .into_iter()
        .map(|comm| {
            let f = f.clone();
            thread::spawn(move || f(comm))
        })
        .collect();
    ranks.into_iter().map(|r| r.join().unwrap()).collect()
}

#[test]
fn averaged_gradients_are_one_learners_on_the_whole_batch() {
    let batch = batches().remove(0);
    let mut one = learner();
    one.zero_grads().unwrap();
    one.accumulate(&batch, 1.0).unwrap();
    let want: Vec<f32> = one.grads().iter().flat_map(|g| g.data().to_vec()).collect();
    let largest = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    for world in [1, 2, 3] {
        let batch = batch.clone();
        let got = on_ranks(world, move |comm| {
            let rank = comm.rank();
            // Small buckets, so that the average takes several all-reduces.
            let mut dp = DataParallel::new(learner(), comm, 16 << 10);
            dp.zero_grads().unwrap();
            dp.accumulate(&share(&batch, world, rank).unwrap(), 1.0)
                .unwrap();
            dp.average_grads().unwrap();
            dp.grads()
                .iter()
                .flat_map(|g| g.data().to_vec())
                .collect::<Vec<f32>>()
        });
        for (rank, g) in got.iter().enumerate() {
            assert_eq!(g, &got[0], "rank {rank} of {world} differs from rank 0");
        }
        let worst = got[0]
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!(
            "world {world}: gradients within {worst:.1e} of one learner's (largest {largest:.2e})"
        );
        assert!(
            worst <= 1e-5 * largest,
            "world {world}: gradients off by {worst}"
        );
    }
}

#[test]
fn ranks_step_together_and_report_the_whole_batchs_loss() {
    let batches = batches();
    let (want_losses, _) = run(&mut learner(), &batches);
    for world in [2, 3] {
        let batches = batches.clone();
        let got = on_ranks(world, move |comm| {
            let rank = comm.rank();
            let mut dp = DataParallel::new(learner(), comm, 16 << 10);
            let mine: Vec<Batch> = batches
                .iter()
                .map(|b| share(b, world, rank).unwrap())
                .collect();
            run(&mut dp, &mine)
        });
        for (rank, (losses, params)) in got.iter().enumerate() {
            assert_eq!(
                params, &got[0].1,
                "rank {rank} of {world} drifted from rank 0"
            );
            for (l, w) in losses.iter().zip(&want_losses) {
                assert!(
                    (l - w).abs() <= 1e-5 * w.abs(),
                    "world {world}: loss {l} vs {w}"
                );
            }
        }
    }
}

#[test]
fn uneven_shares_and_mismatched_buffers_are_named() {
    let batch = &batches()[0];
    let err = share(batch, 4, 0).unwrap_err().to_string();
    assert!(
        err.contains("6 sequences") && err.contains("4 ranks"),
        "{err}"
    );

    for result in on_ranks(2, |mut comm| {
        let mut buf = vec![1.0; 3 + comm.rank()];
        comm.all_reduce_sum(&mut buf).map(|_| buf)
    }) {
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("of 3 on rank 0") || err.contains("of 4 on rank 1"),
            "{err}"
        );
    }
}
