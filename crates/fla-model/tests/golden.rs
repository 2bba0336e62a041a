//! Parity with fla 0.6.0's own GLAForCausalLM: directories written by its save_pretrained,
//! with the logits, loss, gradients and greedy continuation fla computed (f32, TF32 off,
//! attention through fla's naive recurrence). Made by bench/fla_golden.py on the lent GPU.

use std::path::PathBuf;

use fla_model::checkpoint::load_model;
use fla_model::{generate, Sampling};
use fla_tensor::{read_int_tensor, read_safetensors};

fn case(name: &str, prompt: usize) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let model = load_model::<f32>(&dir).unwrap();
    let (ids, shape) = read_int_tensor(&dir.join("ids.safetensors"), "input_ids").unwrap();
    let ids: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    let (b, t) = (shape[0], shape[1]);
    let want = read_safetensors(&dir.join("expected.safetensors"))
        .unwrap()
        .tensors;
    let out = model.lm_loss(&ids, b, t, true).unwrap();

    let loss_want = want["loss"].data()[0] as f64;
    let loss_err = (out.loss - loss_want).abs() / loss_want.abs();
    assert!(
        loss_err < 1e-4,
        "{name}: loss {} vs fla {loss_want}",
        out.loss
    );
    let mut worst = 0.0f64;
    for (spec, g) in model.layout.specs.iter().zip(out.grads.unwrap()) {
        let w = &want[&format!("grad.{}", spec.name)];
        let err = g.rel_err(w);
        worst = worst.max(err);
        assert!(
            err < 1e-3,
            "{name}: gradient of {} relative error {err:e}",
            spec.name
        );
    }
    let logits = fla_tensor::Tensor::new(vec![b, t, model.config.vocab_size], out.logits).unwrap();
    let err = logits.rel_err(&want["logits"]);
    assert!(err < 1e-4, "{name}: logits relative error {err:e}");
    println!("{name}: logits {err:.1e}, loss {loss_err:.1e}, worst gradient {worst:.1e}");

    let (greedy, _) = read_int_tensor(&dir.join("ids.safetensors"), "greedy_ids").unwrap();
    let greedy: Vec<usize> = greedy.iter().map(|&i| i as usize).collect();
    let ours = generate(
        &model,
        &[ids[..prompt].to_vec()],
        greedy.len() - prompt,
        &Sampling::default(),
        None,
        |_| {},
    )
    .unwrap();
    assert_eq!(
        ours[0], greedy,
        "{name}: greedy continuation differs from fla's"
    );
}

#[test]
fn fla_parity_short_conv_grouped_heads() {
    case("conv-gqa", 8);
}

#[test]
fn fla_parity_tied_clamped() {
    case("tied-clamp", 5);
}
