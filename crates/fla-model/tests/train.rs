//! Training: MQAR learns well above chance within a fixed budget, and a run stopped and
//! resumed from its checkpoint gives exactly the loss curve of the uninterrupted run.

use std::path::{Path, PathBuf};

use fla_model::learner::{CpuLearner, Scorer};
use fla_model::mqar::Mqar;
use fla_model::train::{train, TrainArgs};
use fla_model::{GlaConfig, Model};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fla-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config() -> GlaConfig {
    GlaConfig::from_json(
        r#"{"model_type":"gla","hidden_size":64,"num_hidden_layers":2,"num_heads":2,
            "use_short_conv":true,"vocab_size":64}"#,
    )
    .unwrap()
}

fn args(out: &Path, steps: u64) -> TrainArgs {
    TrainArgs {
        steps,
        lr: 3e-3,
        min_lr_ratio: 0.1,
        warmup: 20,
        weight_decay: 0.1,
        decay_all: false,
        clip: 1.0,
        grad_accum: 1,
        seed: 0,
        save_every: 0,
        eval_every: 0,
        out: out.to_path_buf(),
        stop_at: None,
        progress: false,
        lead: true,
    }
}

fn cpu(seed: u64) -> CpuLearner {
    CpuLearner::new(Model::new(config(), seed), 0.1, false)
}

fn task(batch_size: usize) -> Mqar {
    Mqar {
        vocab_size: 64,
        seq_len: 64,
        num_pairs: 8,
        batch_size,
    }
}

#[test]
fn mqar_accuracy_rises_far_above_chance() {
    let out = tmp("mqar");
    let eval = task(32);
    let mut evaluate =
        |m: &mut dyn Scorer| Ok(vec![("accuracy".into(), eval.evaluate(m, 256, 1)?.0)]);
    let before = eval
        .evaluate(&mut Model::<f32>::new(config(), 0), 256, 1)
        .unwrap()
        .0;
    let evals = train(
        &mut cpu(0),
        &mut task(32),
        &mut evaluate,
        &args(&out, 400),
        false,
    )
    .unwrap();
    let acc = evals[0].1;
    println!("MQAR accuracy {before:.3} -> {acc:.3} after 400 steps (chance 0.125)");
    assert!(before < 0.2 && acc > 0.6, "accuracy {before} -> {acc}");
    // The run left a loadable model, a checkpoint and its curve.
    for f in [
        "config.json",
        "model.safetensors",
        "metrics.jsonl",
        "loss.svg",
        "checkpoint/optimizer.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn resume_continues_the_same_run_exactly() {
    let (whole, split) = (tmp("whole"), tmp("split"));
    let mut none = |_: &mut dyn Scorer| Ok(vec![]);
    let mut a = args(&whole, 30);
    a.grad_accum = 2;
    train(&mut cpu(0), &mut task(4), &mut none, &a, false).unwrap();
    let mut b = args(&split, 30);
    b.grad_accum = 2;
    b.stop_at = Some(13);
    train(&mut cpu(0), &mut task(4), &mut none, &b, false).unwrap();
    assert_eq!(losses(&split).len(), 13);
    // A resumed run starts from the checkpoint, whatever model it is handed.
    b.stop_at = None;
    train(&mut cpu(99), &mut task(4), &mut none, &b, true).unwrap();
    assert_eq!(losses(&split), losses(&whole));
    let (m1, m2) = (
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(split.join("model.safetensors")).unwrap(),
    );
    assert!(m1 == m2, "final weights differ");
    let leftovers: Vec<_> = std::fs::read_dir(&split)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_dir_all(&split).unwrap();
}

#[test]
fn resume_without_a_checkpoint_says_so() {
    let out = tmp("none");
    let mut none = |_: &mut dyn Scorer| Ok(vec![]);
    let e = train(&mut cpu(0), &mut task(2), &mut none, &args(&out, 3), true)
        .err()
        .unwrap();
    assert!(e.to_string().contains("no checkpoint"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}
