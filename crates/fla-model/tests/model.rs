//! The whole model's gradients against central finite differences (f64), and checkpoints.

use fla_model::checkpoint::{load_model, save_model};
use fla_model::{GlaConfig, Model, Rng, Role};

fn config(extra: &str) -> GlaConfig {
    let text = format!(
        r#"{{"model_type":"gla","hidden_size":16,"num_hidden_layers":2,"num_heads":2,
            "vocab_size":11,"intermediate_size":24,"initializer_range":0.3{extra}}}"#
    );
    GlaConfig::from_json(&text).unwrap()
}

/// A model whose norms and biases are random too, so their gradients are exercised.
fn random_model(cfg: GlaConfig, seed: u64) -> Model<f64> {
    let mut m = Model::<f64>::new(cfg, seed);
    let mut rng = Rng::new(seed + 1);
    for (spec, p) in m.layout.specs.iter().zip(m.params.iter_mut()) {
        if matches!(spec.role, Role::Norm | Role::Bias) {
            p.data_mut()
                .iter_mut()
                .for_each(|x| *x += 0.3 * rng.normal());
        }
    }
    m
}

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab)).collect()
}

/// Central differences of the loss for a few entries of every parameter.
fn check_gradients(cfg: GlaConfig, b: usize, t: usize) {
    let model = random_model(cfg, 3);
    let tokens = ids(b * t, model.config.vocab_size, 5);
    let out = model.lm_loss(&tokens, b, t, true).unwrap();
    let grads = out.grads.unwrap();
    let mut rng = Rng::new(9);
    let mut worst = 0.0f64;
    for (i, spec) in model.layout.specs.iter().enumerate() {
        let len = model.params[i].len();
        for _ in 0..6.min(len) {
            let j = rng.below(len);
            let eps = 1e-5;
            let mut m = model.clone();
            m.params[i].data_mut()[j] += eps;
            let up = m.lm_loss(&tokens, b, t, false).unwrap().loss;
            m.params[i].data_mut()[j] -= 2.0 * eps;
            let down = m.lm_loss(&tokens, b, t, false).unwrap().loss;
            let fd = (up - down) / (2.0 * eps);
            let an = grads[i].data()[j];
            let err = (fd - an).abs() / (1e-4 + an.abs().max(fd.abs()));
            worst = worst.max(err);
            assert!(
                err < 1e-5,
                "{}[{j}]: finite difference {fd:e}, backward {an:e}",
                spec.name
            );
        }
    }
    println!("worst relative gradient error {worst:.2e}");
}

#[test]
fn gradients_short_conv_gqa_untied() {
    check_gradients(
        config(r#","use_short_conv":true,"conv_size":3,"num_kv_heads":1"#),
        2,
        7,
    );
}

#[test]
fn gradients_tied_no_output_gate_no_affine() {
    check_gradients(
        config(r#","tie_word_embeddings":true,"use_output_gate":false,"elementwise_affine":false"#),
        1,
        9,
    );
}

#[test]
fn gradients_across_chunks_with_clamped_gates() {
    // T = 70 spans two chunks of 64; clamp_min sits inside the range of the gates.
    check_gradients(config(r#","clamp_min":-0.05,"num_hidden_layers":1"#), 1, 70);
}

#[test]
fn save_load_round_trip_and_bad_directories() {
    let dir = std::env::temp_dir().join(format!("fla-model-rt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = Model::<f32>::new(config(r#","use_short_conv":true"#), 1);
    save_model(&model, &dir).unwrap();
    let back: Model<f32> = load_model(&dir).unwrap();
    let tokens = ids(12, 11, 2);
    let a = model.forward(&tokens, 2, 6).unwrap().0;
    let b = back.forward(&tokens, 2, 6).unwrap().0;
    assert_eq!(a, b);
    assert_eq!(back.config, model.config);

    let err = |d: &std::path::Path| load_model::<f32>(d).unwrap_err().to_string();
    // A config whose sizes do not match the weights.
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"vocab_size\": 11", "\"vocab_size\": 12"),
    )
    .unwrap();
    let e = err(&dir);
    assert!(
        e.contains("model.embeddings.weight") && e.contains("[12, 16]"),
        "{e}"
    );
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"gla\", ").unwrap();
    assert!(
        err(&dir).contains("config.json: config.json is not valid JSON"),
        "{}",
        err(&dir)
    );
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"not a tensor file").unwrap();
    assert!(err(&dir).contains("not a safetensors file"));
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(err(&dir).contains("no model.safetensors"));
    assert!(err(&dir.join("absent")).contains("config.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn out_of_vocabulary_ids_are_refused() {
    let model = Model::<f32>::new(config(""), 1);
    let e = model.forward(&[1, 2, 11], 1, 3).err().unwrap().to_string();
    assert!(
        e.contains("token 11") && e.contains("vocabulary of 11"),
        "{e}"
    );
}

#[test]
fn decoding_through_the_cache_matches_the_full_forward() {
    for extra in [
        r#","use_short_conv":true,"conv_size":3,"num_kv_heads":1"#,
        "",
    ] {
        let model = random_model(config(extra), 4);
        let (b, t, prompt) = (2, 75, 67);
        let tokens = ids(b * t, 11, 6);
        let (full, _) = model.forward(&tokens, b, t).unwrap();
        let v = model.config.vocab_size;
        let mut cache = fla_model::Cache::new(&model, b);
        let head: Vec<usize> = (0..b)
            .flat_map(|i| tokens[i * t..i * t + prompt].to_vec())
            .collect();
        let mut last = model.decode(&head, prompt, &mut cache).unwrap();
        for pos in prompt..t {
            for i in 0..b {
                let want = &full[(i * t + pos - 1) * v..(i * t + pos) * v];
                let got = &last[i * v..(i + 1) * v];
                let err = got
                    .iter()
                    .zip(want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(err < 1e-10, "position {pos}, sequence {i}: {err:e}");
            }
            let step: Vec<usize> = (0..b).map(|i| tokens[i * t + pos]).collect();
            last = model.decode(&step, 1, &mut cache).unwrap();
        }
        assert_eq!(cache.len, t);
    }
}
