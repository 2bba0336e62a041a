//! Data parallelism on GPUs over NCCL. One rank over NCCL must take the steps of a plain GPU
//! learner: the same losses and gradient norms, and weights within 1e-5 per tensor after three
//! steps (not the same bits: the model's backward sums some gradients with f32 atomics, whose
//! order varies from run to run).
//! Two ranks as threads on GPUs 0 and 1 (run by hand with `--ignored` on a machine with two:
//! NCCL refuses two ranks on one GPU) must average to one learner's gradients on the whole
//! batch (f32, 1e-5).
//! Without a GPU or NCCL each test prints that it skipped; FLA_REQUIRE_CUDA=1 and
//! FLA_REQUIRE_NCCL=1 make those failures.

#[path = "../../fla-cuda/tests/support/gpu_and_nccl.rs"]
mod support;

use fla_cuda::{new_id, DType, Gpu, NcclGroup};
use fla_model::data_parallel::share;
use fla_model::gpu::GpuModel;
use fla_model::gpu_data_parallel::GpuDataParallel;
use fla_model::learner::{GpuLearner, Learner};
use fla_model::mqar::Mqar;
use fla_model::rng::Rng;
use fla_model::train::{Batch, Task};
use fla_model::{GlaConfig, Model};
use support::gpu_and_nccl;

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

fn batches(steps: usize) -> Vec<Batch> {
    let mut task = Mqar {
        vocab_size: 64,
        seq_len: 32,
        num_pairs: 4,
        batch_size: 4,
    };
    let mut rng = Rng::new(9);
    (0..steps).map(|_| task.batch(&mut rng)).collect()
}

/// The losses, gradient norms and final weights of `learner` stepping on `batches`.
fn run(learner: &mut dyn Learner, batches: &[Batch]) -> (Vec<f64>, Vec<f64>, Vec<Vec<f32>>) {
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for batch in batches {
        learner.zero_grads().unwrap();
        losses.push(learner.accumulate(batch, 1.0).unwrap());
        norms.push(learner.clip_and_step(3e-3, 0.5).unwrap());
    }
    let params = learner.snapshot().unwrap().params;
    (
        losses,
        norms,
        params.iter().map(|p| p.data().to_vec()).collect(),
    )
}

#[test]
fn one_rank_over_nccl_steps_like_one_learner() {
    let Some(gpu) = gpu_and_nccl() else { return };
    let batches = batches(3);
    let plain = run(&mut learner(gpu), &batches);
    let gpu = Gpu::new(0).unwrap();
    let group = NcclGroup::new(&gpu, 0, 1, new_id().unwrap()).unwrap();
    let mut dp = GpuDataParallel::new(learner(gpu), group);
    let over_nccl = run(&mut dp, &batches);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
    for (what, a, b) in [
        ("loss", &plain.0, &over_nccl.0),
        ("norm", &plain.1, &over_nccl.1),
    ] {
        assert!(
            a.iter().zip(b).all(|(&x, &y)| close(x, y)),
            "{what}: {a:?} vs {b:?}"
        );
    }
    for (i, (a, b)) in plain.2.iter().zip(&over_nccl.2).enumerate() {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let size: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
        assert!(diff.sqrt() <= 1e-5 * size.sqrt(), "parameter {i}");
    }
}

#[test]
#[ignore]
fn two_ranks_on_two_gpus_average_like_one_learner() {
    let Some(gpu) = gpu_and_nccl() else { return };
    if gpu_count() < 2 {
        eprintln!("skipped: one GPU (NCCL refuses two ranks on one)");
        return;
    }
    let batch = batches(1).pop().unwrap();
    let mut whole = learner(gpu);
    whole.zero_grads().unwrap();
    let loss = whole.accumulate(&batch, 1.0).unwrap();
    let want = whole.model.gradients().unwrap();
    let (world, id) = (2, new_id().unwrap());
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let mine = share(&batch, world, rank).unwrap();
            std::thread::spawn(move || {
                let gpu = Gpu::new(rank).unwrap();
                let group = NcclGroup::new(&gpu, rank, world, id).unwrap();
                let mut l = learner(gpu);
                l.zero_grads().unwrap();
                let loss = l.accumulate(&mine, 1.0).unwrap();
                l.model.sum_grads(&group).unwrap();
                (loss, l.model.gradients().unwrap())
            })
        })
        .collect();
    let got: Vec<_> = ranks.into_iter().map(|t| t.join().unwrap()).collect();
    let mean_loss = got.iter().map(|(l, _)| l).sum::<f64>() / world as f64;
    assert!(
        (mean_loss - loss).abs() < 1e-5 * loss,
        "loss {mean_loss} vs {loss}"
    );
    for (rank, (_, grads)) in got.iter().enumerate() {
        for (i, (g, w)) in grads.iter().zip(&want).enumerate() {
            let avg: Vec<f32> = g.data().iter().map(|x| x / world as f32).collect();
            let avg = fla_tensor::Tensor::new(g.shape().to_vec(), avg).unwrap();
            let e = avg.rel_err(w);
            assert!(e < 1e-5, "rank {rank} gradient {i}: {e:e}");
        }
    }
}
