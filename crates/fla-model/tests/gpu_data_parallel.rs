//! Data parallelism on GPUs. Ranks as threads sharing GPU 0 through the host
//! ([`HostStagedGroup`]: NCCL refuses two ranks on one GPU), 2 and 3 of them, must sum their
//! gradients, bucket by bucket during the backward, to one learner's on the whole batch (f32,
//! 1e-5 of the largest); with and without ZeRO-1 and two micro-batches a step they must report
//! the whole batch's losses and gradient norms (1e-5), hold the same weights bit for bit, and
//! under ZeRO-1 gather AdamW's moments to one learner's after a step (1e-5 per tensor).
//! One rank over NCCL must take the steps of a plain GPU learner: the same losses and gradient
//! norms, and weights within 1e-5 per tensor after three steps (not the same bits: the model's
//! backward sums some gradients with f32 atomics, whose order varies from run to run).
//! Two ranks on GPUs 0 and 1 (run by hand with `--ignored` on a machine with two) must do the
//! same over NCCL.
//! Without a GPU or NCCL each test prints that it skipped; FLA_REQUIRE_CUDA=1 and
//! FLA_REQUIRE_NCCL=1 make those failures.

use std::sync::Mutex;

#[path = "../../fla-cuda/tests/support/gpu_and_nccl.rs"]
mod support;

use fla_cuda::{new_id, DType, DeviceGroup, Gpu, NcclGroup};
use fla_model::data_parallel::share;
use fla_model::data_parallel::train_ranks;
use fla_model::gpu::GpuModel;
use fla_model::gpu::Split;
use fla_model::gpu_data_parallel::{segment, GpuParallel, HostStagedGroup};
use fla_model::learner::{GpuLearner, Learner, OptState, Scorer};
use fla_model::mqar::Mqar;
use fla_model::rng::Rng;
use fla_model::train::{train, Batch, Task, TrainArgs};
use fla_model::{GlaConfig, Model};
use support::{gpu, gpu_and_nccl};

/// Small buckets, so that the test model's backward issues many.
const BUCKET_BYTES: usize = 24 << 10;

fn gpu_count() -> usize {
    fla_cuda::cudarc::driver::CudaContext::device_count().map_or(0, |n| n as usize)
}

fn model() -> Model<f32> {
    let config = GlaConfig::from_json(
        r#"{"model_type":"gla","hidden_size":64,"num_hidden_layers":2,"num_heads":2,
            "use_short_conv":true,"vocab_size":64}"#,
    )
    .unwrap();
    Model::new(config, 5)
}

fn learner(gpu: Gpu) -> GpuLearner {
    GpuLearner {
        model: GpuModel::new(gpu, &model(), DType::F32).unwrap(),
        weight_decay: 0.1,
        decay_all: false,
    }
}

/// A learner on `gpu`, one rank of `group`, holding what `split` says of each batch.
fn parallel(gpu: Gpu, group: impl DeviceGroup + 'static, split: Split, zero: bool) -> GpuParallel {
    GpuParallel::new(learner(gpu), Box::new(group), split, BUCKET_BYTES, zero).unwrap()
}

fn batches(steps: usize) -> Vec<Batch> {
    batches_of(steps, 32)
}

fn batches_of(steps: usize, seq_len: usize) -> Vec<Batch> {
    let mut task = Mqar {
        vocab_size: 64,
        seq_len,
        num_pairs: 4,
        batch_size: 12,
    };
    let mut rng = Rng::new(9);
    (0..steps).map(|_| task.batch(&mut rng)).collect()
}

/// The losses, gradient norms and final weights of `learner` stepping on `batches`, each step
/// on `micro` equal micro-batches of the batch.
fn run(
    learner: &mut dyn Learner,
    batches: &[Batch],
    micro: usize,
) -> (Vec<f64>, Vec<f64>, Vec<Vec<f32>>) {
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    learner.plan_micro_batches(micro);
    for batch in batches {
        learner.zero_grads().unwrap();
        let mut loss = 0.0;
        for m in 0..micro {
            let part = share(batch, micro, m).unwrap();
            loss += learner.accumulate(&part, 1.0 / micro as f64).unwrap() / micro as f64;
        }
        losses.push(loss);
        norms.push(learner.clip_and_step(3e-3, 0.5).unwrap());
    }
    let params = learner.snapshot().unwrap().params;
    (
        losses,
        norms,
        params.iter().map(|p| p.data().to_vec()).collect(),
    )
}

/// Runs `f` on ranks 0..world as threads, each with its member of a host-staged group and
/// GPU 0; returns what each gave, rank order.
fn on_shared_gpu<T: Send>(world: usize, f: impl Fn(HostStagedGroup, Gpu) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let ranks: Vec<_> = HostStagedGroup::new(world)
            .into_iter()
            .map(|g| {
                let f = &f;
                s.spawn(move || f(g, Gpu::new(0).unwrap()))
            })
            .collect();
        ranks.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

fn close_all(what: &str, a: &[f64], b: &[f64]) {
    assert!(
        a.iter()
            .zip(b)
            .all(|(&x, &y)| (x - y).abs() <= 1e-5 * y.abs()),
        "{what}: {a:?} vs {b:?}"
    );
}

/// Largest |a - b| against the largest |b|, over tensors of the same shapes.
fn worst(a: &[fla_tensor::Tensor<f32>], b: &[fla_tensor::Tensor<f32>]) -> (f32, f32) {
    let (mut diff, mut size) = (0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.data().iter().zip(y.data()) {
            diff = diff.max((p - q).abs());
            size = size.max(q.abs());
        }
    }
    (diff, size)
}

/// Ranks of 2 and 3 sharing GPU 0, each holding what `split` says of `batch` and weighting its
/// mean loss by `weight(its part, world)`, sum their gradients during the backward to one
/// learner's on the whole batch (f32, 1e-5 of the largest).
fn check_summed_gradients(
    batch: &Batch,
    split: Split,
    weight: impl Fn(&Batch, usize) -> f64 + Sync,
) {
    let Some(gpu) = gpu() else { return };
    let mut whole = learner(gpu);
    whole.zero_grads().unwrap();
    whole.accumulate(batch, 1.0).unwrap();
    let want = whole.model.gradients().unwrap();
    for world in [2, 3] {
        let got = on_shared_gpu(world, |group, gpu| {
            let (rank, world) = (group.rank(), group.world());
            let mut l = learner(gpu);
            l.model
                .distribute(Box::new(group), split, BUCKET_BYTES, false)
                .unwrap();
            l.zero_grads().unwrap();
            l.model.reduce_in_backward();
            let mine = match split {
                Split::Batch => share(batch, world, rank).unwrap(),
                Split::Sequence => segment(batch, world, rank).unwrap(),
            };
            l.accumulate(&mine, weight(&mine, world)).unwrap();
            // The norm waits for the sums; the gradients are then the ranks' sum.
            l.model.grad_norm().unwrap();
            l.model.gradients().unwrap()
        });
        for (rank, g) in got.iter().enumerate() {
            let (diff, size) = worst(g, &want);
            assert!(
                diff <= 1e-5 * size,
                "{split:?}, world {world} rank {rank}: gradients off by {diff} (largest {size})"
            );
        }
    }
}

#[test]
fn ranks_sharing_a_gpu_sum_buckets_in_the_backward_like_one_learner() {
    let batch = batches(1).pop().unwrap();
    check_summed_gradients(&batch, Split::Batch, |_, world| 1.0 / world as f64);
}

#[test]
fn ranks_sharing_a_gpu_train_like_one_learner_with_and_without_zero() {
    let Some(gpu) = gpu() else { return };
    let batches = batches(3);
    let micro = 2;
    // One learner's moments after the first step, and its losses and norms over three.
    let mut plain = learner(gpu);
    let first = run(&mut plain, &batches[..1], micro);
    let plain_opt = plain.optimizer().unwrap();
    let rest = run(&mut plain, &batches[1..], micro);
    let want_losses: Vec<f64> = first.0.iter().chain(&rest.0).copied().collect();
    let want_norms: Vec<f64> = first.1.iter().chain(&rest.1).copied().collect();
    for world in [2, 3] {
        for zero in [false, true] {
            let got = on_shared_gpu(world, |group, gpu| {
                let mut dp = parallel(gpu, group, Split::Batch, zero);
                let first = run(&mut dp, &batches[..1], micro);
                // Every rank gathers under ZeRO-1.
                let opt: OptState = dp.optimizer().unwrap();
                let rest = run(&mut dp, &batches[1..], micro);
                (first, opt, rest)
            });
            let how = format!("world {world}, zero {zero}");
            for (rank, (first, opt, rest)) in got.iter().enumerate() {
                let losses: Vec<f64> = first.0.iter().chain(&rest.0).copied().collect();
                let norms: Vec<f64> = first.1.iter().chain(&rest.1).copied().collect();
                close_all(&format!("{how} rank {rank}: losses"), &losses, &want_losses);
                close_all(&format!("{how} rank {rank}: norms"), &norms, &want_norms);
                assert_eq!(
                    rest.2, got[0].2 .2,
                    "{how}: rank {rank} drifted from rank 0"
                );
                assert_eq!(opt.step, 1);
                for (what, a, b) in [("m", &opt.m, &plain_opt.m), ("v", &opt.v, &plain_opt.v)] {
                    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                        let e = x.rel_err(y);
                        assert!(
                            e <= 1e-5,
                            "{how} rank {rank}: {what} of parameter {i} off by {e:e}"
                        );
                    }
                }
            }
        }
    }
}

/// Sequence parallelism: 2 and 3 ranks sharing GPU 0, each holding a segment of every
/// sequence (48 tokens: segments of 24 and 16, shorter than a chunk, with the short
/// convolutions' rows passing between them), sum to one learner's gradients on the whole
/// sequences (f32, 1e-5 of the largest).
#[test]
fn sequence_parallel_ranks_sum_like_one_learner_on_the_whole_sequences() {
    let batch = batches_of(1, 48).pop().unwrap();
    let counted = |b: &Batch| b.targets.iter().filter(|&&x| x >= 0).count() as f64;
    check_summed_gradients(&batch, Split::Sequence, |mine, _| {
        counted(mine) / counted(&batch)
    });
}

/// Sequence-parallel learners (2 and 3 ranks, with and without ZeRO-1, two micro-batches a
/// step) report one learner's losses and gradient norms on the whole sequences over three
/// steps (1e-5) and hold the same weights bit for bit.
#[test]
fn sequence_parallel_ranks_train_like_one_learner() {
    let Some(gpu) = gpu() else { return };
    let batches = batches_of(3, 48);
    let want = run(&mut learner(gpu), &batches, 2);
    for world in [2, 3] {
        for zero in [false, true] {
            let got = on_shared_gpu(world, |group, gpu| {
                let mut sp = parallel(gpu, group, Split::Sequence, zero);
                run(&mut sp, &batches, 2)
            });
            let how = format!("world {world}, zero {zero}");
            for (rank, (losses, norms, params)) in got.iter().enumerate() {
                close_all(&format!("{how} rank {rank}: losses"), losses, &want.0);
                close_all(&format!("{how} rank {rank}: norms"), norms, &want.1);
                assert_eq!(params, &got[0].2, "{how}: rank {rank} drifted from rank 0");
            }
        }
    }
}

/// Segments shorter than the short convolution's history are refused by name.
#[test]
fn sequence_parallel_segments_shorter_than_the_convolution_are_named() {
    let Some(_) = gpu() else { return };
    let batch = batches_of(1, 4).pop().unwrap();
    let errs = on_shared_gpu(2, |group, gpu| {
        let mut sp = parallel(gpu, group, Split::Sequence, false);
        sp.zero_grads().unwrap();
        sp.accumulate(&batch, 1.0).unwrap_err().to_string()
    });
    for e in errs {
        assert!(e.contains("segments of 2 tokens are shorter"), "{e}");
    }
}

#[test]
fn misuse_of_a_distributed_model_is_named() {
    let Some(_) = gpu() else { return };
    let batch = batches(1).pop().unwrap();
    let got = on_shared_gpu(1, |group, gpu| {
        let mut l = learner(gpu);
        l.model
            .distribute(Box::new(group), Split::Batch, BUCKET_BYTES, true)
            .unwrap();
        let again = l
            .model
            .distribute(
                Box::new(HostStagedGroup::new(1).pop().unwrap()),
                Split::Batch,
                BUCKET_BYTES,
                true,
            )
            .unwrap_err()
            .to_string();
        l.zero_grads().unwrap();
        l.model.reduce_in_backward();
        l.accumulate(&batch, 0.5).unwrap();
        let late = l.accumulate(&batch, 0.5).unwrap_err().to_string();
        // A new step starts clean.
        l.zero_grads().unwrap();
        let fresh = l.accumulate(&batch, 1.0).map(|_| ());
        (again, late, fresh)
    });
    let (again, late, fresh) = &got[0];
    assert!(again.contains("already distributed"), "{again}");
    assert!(
        late.contains("after the gradients' sum over the ranks began"),
        "{late}"
    );
    assert!(fresh.is_ok(), "{fresh:?}");
}

#[test]
fn one_rank_over_nccl_steps_like_one_learner() {
    let Some(gpu) = gpu_and_nccl() else { return };
    let batches = batches(3);
    let plain = run(&mut learner(gpu), &batches, 1);
    for zero in [false, true] {
        let gpu = Gpu::new(0).unwrap();
        let group = NcclGroup::new(&gpu, 0, 1, new_id().unwrap()).unwrap();
        let mut dp = parallel(gpu, group, Split::Batch, zero);
        let over_nccl = run(&mut dp, &batches, 1);
        close_all(&format!("zero {zero}: losses"), &over_nccl.0, &plain.0);
        close_all(&format!("zero {zero}: norms"), &over_nccl.1, &plain.1);
        for (i, (a, b)) in plain.2.iter().zip(&over_nccl.2).enumerate() {
            let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
            let size: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
            assert!(
                diff.sqrt() <= 1e-5 * size.sqrt(),
                "zero {zero}: parameter {i}"
            );
        }
    }
}

/// Two ranks over NCCL on GPUs 0 and 1, with and without ZeRO-1: the losses and norms of one
/// learner on the whole batches, and the same weights on both ranks.
#[test]
#[ignore]
fn two_ranks_on_two_gpus_train_like_one_learner() {
    let Some(gpu) = gpu_and_nccl() else { return };
    if gpu_count() < 2 {
        eprintln!("skipped: one GPU (NCCL refuses two ranks on one)");
        return;
    }
    let batches = batches(3);
    let plain = run(&mut learner(gpu), &batches, 2);
    for zero in [false, true] {
        let (world, id) = (2, new_id().unwrap());
        let got: Vec<_> = std::thread::scope(|s| {
            let ranks: Vec<_> = (0..world)
                .map(|rank| {
                    let batches = &batches;
                    s.spawn(move || {
                        let gpu = Gpu::new(rank).unwrap();
                        let group = NcclGroup::new(&gpu, rank, world, id).unwrap();
                        let mut dp = parallel(gpu, group, Split::Batch, zero);
                        run(&mut dp, batches, 2)
                    })
                })
                .collect();
            ranks.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for (rank, (losses, norms, params)) in got.iter().enumerate() {
            close_all(
                &format!("zero {zero} rank {rank}: losses"),
                losses,
                &plain.0,
            );
            close_all(&format!("zero {zero} rank {rank}: norms"), norms, &plain.1);
            assert_eq!(
                params, &got[0].2,
                "zero {zero}: rank {rank} drifted from rank 0"
            );
        }
    }
}

fn train_args(out: &std::path::Path, stop_at: Option<u64>, grad_accum: usize) -> TrainArgs {
    TrainArgs {
        steps: 6,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup: 1,
        weight_decay: 0.1,
        decay_all: false,
        clip: 0.5,
        grad_accum,
        seed: 9,
        save_every: 0,
        eval_every: 0,
        out: out.to_path_buf(),
        stop_at,
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

/// `train_ranks` with two ZeRO-1 ranks sharing GPU 0 stops after 4 of 6 steps; every rank
/// gathers the optimizer for the checkpoint that rank 0 writes; one plain GPU learner resumes
/// it. The 6 losses are those of one learner running straight through (1e-5).
#[test]
fn zero_checkpoints_resume_on_one_gpu() {
    let Some(gpu) = gpu() else { return };
    let task = Mqar {
        vocab_size: 64,
        seq_len: 32,
        num_pairs: 4,
        batch_size: 8,
    };
    let dir = std::env::temp_dir().join(format!("fla-gpu-zero-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (one, two) = (dir.join("one"), dir.join("two"));
    let mut no_eval = |_: &mut dyn Scorer| Ok(Vec::new());
    train(
        &mut learner(gpu),
        &mut task.clone(),
        &mut no_eval,
        &train_args(&one, None, 2),
        false,
    )
    .unwrap();

    let groups = Mutex::new(
        HostStagedGroup::new(2)
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
    );
    let make = |rank: usize| -> fla_tensor::Result<Box<dyn Learner>> {
        let group = groups.lock().unwrap()[rank]
            .take()
            .expect("one learner per rank");
        Ok(Box::new(parallel(Gpu::new(0)?, group, Split::Batch, true)))
    };
    train_ranks(
        2,
        &make,
        &task,
        &mut no_eval,
        &train_args(&two, Some(4), 2),
        false,
        &|rank, e| panic!("rank {rank} failed: {e}"),
    )
    .unwrap();
    assert!(
        two.join("checkpoint/trainer.json").exists(),
        "rank 0 wrote no checkpoint"
    );
    let gpu = Gpu::new(0).unwrap();
    train(
        &mut learner(gpu),
        &mut task.clone(),
        &mut no_eval,
        &train_args(&two, None, 2),
        true,
    )
    .unwrap();
    let (want, got) = (recorded_losses(&one), recorded_losses(&two));
    assert_eq!(
        got.len(),
        6,
        "four steps on two ranks, two resumed on one: {got:?}"
    );
    close_all("losses", &got, &want);
    let _ = std::fs::remove_dir_all(&dir);
}
