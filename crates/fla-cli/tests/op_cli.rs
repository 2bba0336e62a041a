//! `fla op` end to end: a safetensors file assembled by hand from the format's spec (8-byte
//! header length, JSON header, little-endian data), run through the binary, compared with the
//! library; and the one-line errors for bad files.

use std::path::{Path, PathBuf};
use std::process::Command;

use fla_ops::{gla_backward, gla_forward, Form, GateKind, GlaInputs, Options};
use fla_tensor::{read_safetensors, Tensor};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fla-op-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Writes f32 tensors (and `scale` metadata) as safetensors, without the safetensors crate.
fn write_by_hand(path: &Path, tensors: &[(&str, &Tensor<f32>)], scale: Option<&str>) {
    let mut header = Vec::new();
    let mut data = Vec::new();
    if let Some(s) = scale {
        header.push(format!("\"__metadata__\":{{\"scale\":\"{s}\"}}"));
    }
    for (name, t) in tensors {
        let start = data.len();
        data.extend(t.data().iter().flat_map(|x| x.to_le_bytes()));
        let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
        header.push(format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{start},{}]}}",
            shape.join(","),
            data.len()
        ));
    }
    let mut h = format!("{{{}}}", header.join(",")).into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

fn rand(shape: &[usize], seed: u64, gate: bool) -> Tensor<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            if gate {
                -0.05 - 0.5 * u
            } else {
                2.0 * u - 1.0
            }
        })
        .collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

fn fla(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fla"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn op_reads_a_hand_written_file_and_matches_the_library() {
    let (b, t, h, k, v) = (1, 23, 2, 8, 6);
    let (q, kk, vv) = (
        rand(&[b, t, h, k], 1, false),
        rand(&[b, t, h, k], 2, false),
        rand(&[b, t, h, v], 3, false),
    );
    let (g, u, h0) = (
        rand(&[b, t, h, k], 4, true),
        rand(&[h, k], 5, false),
        rand(&[3, h, k, v], 6, false),
    );
    let (d_o, dht) = (rand(&[b, t, h, v], 7, false), rand(&[3, h, k, v], 8, false));
    let input = tmp("in.safetensors");
    let output = tmp("out.safetensors");
    let named = [
        ("q", &q),
        ("k", &kk),
        ("v", &vv),
        ("g", &g),
        ("u", &u),
        ("h0", &h0),
        ("do", &d_o),
        ("dht", &dht),
    ];
    write_by_hand(&input, &named, Some("0.25"));
    let r = fla(&[
        "op",
        "--gate",
        "key-bonus",
        "--form",
        "fused-chunk",
        "--chunk-size",
        "8",
        "--cu-seqlens",
        "0,5,17,23",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        r.status.success(),
        "fla op failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let out = read_safetensors(&output).unwrap();
    let mut x = GlaInputs::new(q, kk, vv);
    x.g = Some(g);
    x.u = Some(u);
    x.h0 = Some(h0);
    x.scale = Some(0.25);
    x.cu_seqlens = Some(vec![0, 5, 17, 23]);
    let opts = Options {
        form: Form::Naive,
        chunk_size: 64,
    };
    let y = gla_forward(GateKind::KeyBonus, &x, &opts).unwrap();
    let gr = gla_backward(GateKind::KeyBonus, &x, &d_o, Some(&dht), &opts).unwrap();
    let want = [
        ("o", &y.o),
        ("ht", &y.ht),
        ("dq", &gr.dq),
        ("dk", &gr.dk),
        ("dv", &gr.dv),
        ("dg", gr.dg.as_ref().unwrap()),
        ("du", gr.du.as_ref().unwrap()),
        ("dh0", gr.dh0.as_ref().unwrap()),
    ];
    for (name, w) in want {
        let got = out
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("output has no `{name}`"));
        let err = got.rel_err(w);
        assert!(err < 1e-5, "{name}: relative error {err:e}");
    }
    assert!(!out.tensors.contains_key("dgv"));
}

#[test]
fn op_reports_bad_input_in_one_line() {
    let input = tmp("bad.safetensors");
    let out = tmp("never.safetensors");
    let run = |gate: &str| {
        let r = fla(&[
            "op",
            "--gate",
            gate,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(!r.status.success());
        String::from_utf8_lossy(&r.stderr).trim().to_string()
    };
    write_by_hand(
        &input,
        &[
            ("q", &rand(&[1, 4, 1, 2], 1, false)),
            ("v", &rand(&[1, 4, 1, 3], 2, false)),
        ],
        None,
    );
    assert!(
        run("none").contains("tensor `k` is missing"),
        "{}",
        run("none")
    );
    write_by_hand(
        &input,
        &[
            ("q", &rand(&[1, 4, 1, 2], 1, false)),
            ("k", &rand(&[1, 4, 1, 3], 1, false)),
            ("v", &rand(&[1, 4, 1, 3], 2, false)),
        ],
        None,
    );
    assert_eq!(
        run("none"),
        "error: tensor `k` has shape [1, 4, 1, 3], expected [B, T, H, K] = [1, 4, 1, 2]"
    );
    std::fs::write(&input, b"not a safetensors file").unwrap();
    assert!(run("none").contains("not a safetensors file"));
    std::fs::remove_file(&input).unwrap();
    assert!(run("none").contains("No such file"));
    assert!(!out.exists(), "a failed run must not write the output");
}
