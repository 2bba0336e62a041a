//! The model commands end to end: init, forward, train (MQAR and text, with resume),
//! eval, generate, tokenizer training; and one clear line for bad input, leaving existing
//! files alone.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fla(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fla"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fla-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An `input_ids` safetensors file of int64 [b, t].
fn ids_file(path: &Path, ids: &[i64], b: usize, t: usize) {
    let header = format!(
        r#"{{"input_ids":{{"dtype":"I64","shape":[{b},{t}],"data_offsets":[0,{}]}}}}"#,
        8 * ids.len()
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    ids.iter().for_each(|i| bytes.extend(i.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn init_forward_and_bad_input() {
    let d = tmp("fwd");
    let cfg = d.join("config.json");
    std::fs::write(&cfg, r#"{"model_type":"gla","hidden_size":32,"num_hidden_layers":1,"num_heads":2,"vocab_size":20}"#).unwrap();
    let model = d.join("model");
    let (ok, _, err) = fla(&["init", "--config", s(&cfg), "--output", s(&model)]);
    assert!(ok, "{err}");
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    // An existing model is not overwritten.
    let (ok, _, err) = fla(&["init", "--config", s(&cfg), "--output", s(&model)]);
    assert!(!ok && err.contains("already holds a model"), "{err}");
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );

    let input = d.join("ids.safetensors");
    ids_file(&input, &[1, 5, 7, 19, 0, 3], 2, 3);
    let out = d.join("out.safetensors");
    let (ok, _, err) = fla(&[
        "forward",
        "--model",
        s(&model),
        "--input",
        s(&input),
        "--output",
        s(&out),
        "--grads",
    ]);
    assert!(ok, "{err}");
    let file = fla_tensor::read_safetensors(&out).unwrap();
    assert_eq!(file.tensors["logits"].shape(), &[2, 3, 20]);
    assert!(file
        .tensors
        .contains_key("grad.model.layers.0.attn.gk_proj.1.bias"));

    let bad = |args: &[&str], want: &str| {
        let (ok, _, err) = fla(args);
        assert!(
            !ok && err.lines().count() == 1 && err.contains(want),
            "{args:?}: {err}"
        );
    };
    ids_file(&input, &[1, 25], 1, 2);
    bad(
        &[
            "forward",
            "--model",
            s(&model),
            "--input",
            s(&input),
            "--output",
            s(&out),
        ],
        "token 25",
    );
    bad(
        &[
            "forward",
            "--model",
            s(&d),
            "--input",
            s(&input),
            "--output",
            s(&out),
        ],
        "no model.safetensors",
    );
    bad(
        &[
            "forward",
            "--model",
            s(&d.join("absent")),
            "--input",
            s(&input),
            "--output",
            s(&out),
        ],
        "config.json",
    );
    bad(
        &[
            "forward",
            "--model",
            s(&model),
            "--input",
            s(&d.join("none")),
            "--output",
            s(&out),
        ],
        "none",
    );
    std::fs::write(&cfg, r#"{"model_type":"mamba"}"#).unwrap();
    bad(
        &["init", "--config", s(&cfg), "--output", s(&d.join("m2"))],
        "unknown architecture",
    );
    bad(
        &[
            "forward",
            "--model",
            s(&model),
            "--input",
            s(&input),
            "--output",
            s(&out),
            "--precision",
            "f16",
        ],
        "unknown precision",
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn text_training_resume_eval_generate() {
    let d = tmp("lm");
    let text = d.join("a.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let tok = d.join("tokenizer.json");
    let (ok, out, err) = fla(&[
        "tokenizer",
        "train",
        "--data",
        s(&text),
        "--vocab-size",
        "280",
        "--output",
        s(&tok),
    ]);
    assert!(ok && out.contains("tokens"), "{err}");
    let run = d.join("run");
    let common = [
        "train",
        "--data",
        s(&text),
        "--tokenizer",
        s(&tok),
        "--out",
        s(&run),
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--eval-every",
        "3",
        "--quiet",
    ];
    let (ok, _, err) = fla(&[&common[..], &["--stop-at", "3"]].concat());
    assert!(ok, "{err}");
    let (ok, out, err) = fla(&[&common[..], &["--resume"]].concat());
    assert!(ok && out.contains("perplexity"), "{err}");
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        6
    );
    assert!(run.join("tokenizer.json").exists() && run.join("loss.svg").exists());

    let (ok, out, err) = fla(&[
        "eval",
        "--model",
        s(&run),
        "--data",
        s(&text),
        "--seq-len",
        "32",
    ]);
    assert!(ok && out.contains("bits per byte"), "{err}");
    let (ok, out, err) = fla(&[
        "generate",
        "--model",
        s(&run),
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--output-ids",
    ]);
    assert!(ok && out.starts_with("the quick"), "{err}");
    let ids: Vec<usize> = out
        .lines()
        .last()
        .unwrap()
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(ids.len() > 5);
    let (ok, _, err) = fla(&[
        "generate",
        "--model",
        s(&run),
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert!(!ok && err.contains("top-p"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `fla train` as `args` with `vars` set in its environment (and no launch variables but
/// those).
fn fla_env(args: &[&str], vars: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fla"));
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(v);
    }
    let out = cmd.args(args).envs(vars.iter().copied()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Data-parallel launches that cannot run say why in one line, before any training: a batch
/// that does not split over the GPUs, --gpus on the CPU, --gpus with the launch environment,
/// a launch environment with a variable missing, and (without NCCL or a second GPU) the
/// missing library or device.
#[test]
fn data_parallel_launch_errors_are_one_line() {
    let out = tmp("dp-errors");
    let o = s(&out);
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (
            &[
                "train",
                "--gpus",
                "2",
                "--seq-parallel",
                "--seq-len",
                "33",
                "--out",
                o,
            ],
            &[],
            "--seq-len 33 does not split evenly over 2 GPUs",
        ),
        (
            &["train", "--zero", "--out", o],
            &[],
            "--zero and --seq-parallel split the work over ranks",
        ),
        (
            &["train", "--gpus", "3", "--out", o],
            &[],
            "does not split evenly over 3 GPUs",
        ),
        (
            &["train", "--gpus", "2", "--device", "cpu", "--out", o],
            &[],
            "--device cpu",
        ),
        (
            &["train", "--gpus", "2", "--out", o],
            &[
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29511"),
            ],
            "leave it out when WORLD_SIZE is set",
        ),
        (
            &["train", "--out", o],
            &[("WORLD_SIZE", "2"), ("MASTER_ADDR", "x")],
            "RANK",
        ),
    ];
    for (args, vars, want) in cases {
        let (ok, err) = fla_env(args, vars);
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(!ok && errors.len() == 1, "{args:?} {vars:?}: {err}");
        assert!(errors[0].contains(want), "{args:?} {vars:?}: {err}");
    }
    // Here CI has no NCCL and no GPU; on a machine with one GPU the second rank finds none.
    let (ok, err) = fla_env(&["train", "--gpus", "2", "--steps", "1", "--out", o], &[]);
    assert!(!ok && err.contains("error"), "{err}");
    assert!(
        !out.join("checkpoint").exists(),
        "nothing trained, nothing written"
    );
    let _ = std::fs::remove_dir_all(&out);
}
