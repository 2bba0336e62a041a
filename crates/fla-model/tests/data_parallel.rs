//! Data parallelism on the CPU: ranks as threads, each on its share of every batch. Their
//! averaged gradients are one learner's on the whole batch (f32, to rounding); over several
//! steps every rank holds the same weights, bit for bit, and reports the whole batch's loss.
//! (Weights are not compared with one learner's after several steps: AdamW's first steps
//! divide gradients near zero by their own size, which turns rounding into step-sized
//! differences.)

use std::sync::Mutex;
use std::thread;

use fla_model::data_parallel::{share, train_ranks, Collective, DataParallel, ThreadGroup};
use fla_model::learner::{CpuLearner, Learner, Scorer};
use fla_model::mqar::Mqar;
use fla_model::rng::Rng;
use fla_model::train::{train, Batch, Task, TrainArgs};
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
            // Small buckets, so that the average takes several all-reduces.
            let mut dp = DataParallel::new(learner(), comm, 16 << 10);
            dp.zero_grads().unwrap();
            dp.accumulate(&batch, 1.0).unwrap();
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
            let mut dp = DataParallel::new(learner(), comm, 16 << 10);
            run(&mut dp, &batches)
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

fn train_args(out: &std::path::Path) -> TrainArgs {
    TrainArgs {
        steps: STEPS as u64,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup: 1,
        weight_decay: 0.1,
        decay_all: false,
        clip: 1.0,
        grad_accum: 1,
        seed: 9,
        save_every: 0,
        eval_every: 0,
        out: out.to_path_buf(),
        stop_at: None,
        progress: false,
        lead: true,
    }
}

/// The losses recorded in a run's metrics.jsonl, step by step.
fn recorded_losses(out: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// `train_ranks` with 2 ranks: the run that one learner makes on the whole batches (its
/// losses, to 1e-5), written once, by rank 0, with rank 0's evaluation at the end.
#[test]
fn ranks_train_like_one_learner_and_rank_0_writes() {
    let task = Mqar {
        vocab_size: 64,
        seq_len: 32,
        num_pairs: 4,
        batch_size: BATCH,
    };
    let dir = std::env::temp_dir().join(format!("fla-dp-ranks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (one, two) = (dir.join("one"), dir.join("two"));
    let eval_task = task.clone();
    let mut evaluate = |m: &mut dyn Scorer| {
        let (acc, loss) = eval_task.evaluate(m, 8, 3)?;
        Ok(vec![
            ("accuracy".to_string(), acc),
            ("val_loss".to_string(), loss),
        ])
    };
    train(
        &mut learner(),
        &mut task.clone(),
        &mut evaluate,
        &train_args(&one),
        false,
    )
    .unwrap();

    let groups = Mutex::new(
        ThreadGroup::new(2)
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
    );
    let make = |rank: usize| -> fla_tensor::Result<Box<dyn Learner>> {
        let comm = groups.lock().unwrap()[rank]
            .take()
            .expect("one learner per rank");
        Ok(Box::new(DataParallel::new(learner(), comm, 16 << 10)))
    };
    let evals = train_ranks(
        2,
        &make,
        &task,
        &mut evaluate,
        &train_args(&two),
        false,
        &|rank, e| panic!("rank {rank} failed: {e}"),
    )
    .unwrap();
    assert_eq!(evals.len(), 2, "rank 0 evaluates at the end: {evals:?}");
    assert!(evals.iter().all(|(_, v)| v.is_finite()));

    let (want, got) = (recorded_losses(&one), recorded_losses(&two));
    assert_eq!(got.len(), STEPS, "one record per step, from rank 0 alone");
    for (l, w) in got.iter().zip(&want) {
        assert!((l - w).abs() <= 1e-5 * w.abs(), "loss {l} vs {w}");
    }
    for file in [
        "model.safetensors",
        "config.json",
        "checkpoint/trainer.json",
        "loss.svg",
    ] {
        assert!(two.join(file).exists(), "rank 0 wrote no {file}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
