//! The GPU layer kernels (fla-cuda's layers.cu and cuBLAS products) against the CPU layers of
//! this crate, computed in f64, on awkward sizes. Without a GPU each test prints that it
//! skipped; with FLA_REQUIRE_CUDA=1 it fails instead. Tolerances (relative, ||a-b||/||b||):
//! 1e-5 for f32 outputs, 1e-2 for outputs stored in bf16; inputs stored in bf16 are compared
//! with the reference on the same rounded values.

use fla_cuda::cudarc::driver::CudaSlice;
use fla_cuda::layers::{buf_ptr, ptr, AdamStep, Layers};
use fla_cuda::{Blas, Buf, DType, Gpu, Operand};
use fla_model::nn;
use fla_model::Rng;

fn gpu() -> Option<Gpu> {
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) if std::env::var("FLA_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("FLA_REQUIRE_CUDA=1 but no usable GPU: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

fn rand(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (scale * r.normal()) as f32).collect()
}

fn up(g: &Gpu, x: &[f32]) -> CudaSlice<f32> {
    g.stream().clone_htod(x).unwrap()
}

fn down(g: &Gpu, x: &CudaSlice<f32>) -> Vec<f32> {
    g.stream().clone_dtoh(x).unwrap()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn rel(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

fn check(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let e = rel(got, want);
    println!("{name}: relative error {e:.2e}");
    assert!(e < tol, "{name}: relative error {e:e} over {tol:e}");
}

fn tol(d: DType) -> f64 {
    match d {
        DType::F32 => 1e-5,
        DType::Bf16 => 1e-2,
    }
}

const DTYPES: [DType; 2] = [DType::F32, DType::Bf16];

#[test]
fn matmul_every_transpose() {
    let Some(g) = gpu() else { return };
    let blas = Blas::new(&g).unwrap();
    let (m, n, k) = (37, 53, 70);
    for d in DTYPES {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = Buf::upload(&g, &rand(m * k, 1, 1.0), d).unwrap();
            let b = Buf::upload(&g, &rand(k * n, 2, 1.0), d).unwrap();
            let (av, bv) = (
                f64s(&a.download(&g).unwrap()),
                f64s(&b.download(&g).unwrap()),
            );
            let c0 = rand(m * n, 3, 1.0);
            let mut c = Buf::upload(&g, &c0, DType::F32).unwrap();
            blas.matmul(
                &g,
                Operand::new(&a, ta),
                Operand::new(&b, tb),
                &mut c,
                (m, n, k),
                0.5,
                1.0,
            )
            .unwrap();
            let at = |i: usize, l: usize| if ta { av[l * m + i] } else { av[i * k + l] };
            let bt = |l: usize, j: usize| if tb { bv[j * k + l] } else { bv[l * n + j] };
            let want: Vec<f64> = (0..m * n)
                .map(|ij| {
                    let (i, j) = (ij / n, ij % n);
                    c0[ij] as f64 + 0.5 * (0..k).map(|l| at(i, l) * bt(l, j)).sum::<f64>()
                })
                .collect();
            check(
                &format!("matmul {d:?} ta={ta} tb={tb}"),
                &c.download(&g).unwrap(),
                &want,
                1e-5,
            );
        }
    }
}

#[test]
fn rms_norm_forward_and_backward() {
    let Some(g) = gpu() else { return };
    // Widths that are multiples of 4 take the kernels' 4-wide accesses; others one at a time.
    for width in [300, 301] {
        rms_norm_case(&g, 37, width);
    }
}

fn rms_norm_case(g: &Gpu, rows: usize, width: usize) {
    let (x, w, dy, dx0) = (
        rand(rows * width, 1, 2.0),
        rand(width, 2, 1.0),
        rand(rows * width, 3, 1.0),
        rand(rows * width, 4, 1.0),
    );
    let (xd, wd) = (f64s(&x), f64s(&w));
    let (y_ref, r_ref) = nn::rms_norm(&xd, width, Some(&wd), 1e-6);
    let mut dx_ref = f64s(&dx0);
    let mut dw_ref = vec![0.0; width];
    nn::rms_norm_back(
        &xd,
        width,
        Some(&wd),
        &r_ref,
        &f64s(&dy),
        &mut dx_ref,
        Some(&mut dw_ref),
    );
    for d in DTYPES {
        let l = Layers::new(d);
        let (xg, wg, dyg, dxg, dwg) = (
            up(g, &x),
            up(g, &w),
            up(g, &dy),
            up(g, &dx0),
            up(g, &vec![0.0; width]),
        );
        let y = Buf::zeros(g, rows * width, d).unwrap();
        let dx_io = Buf::zeros(g, rows * width, d).unwrap();
        let rstd = up(g, &vec![0.0; rows]);
        l.rms_norm_fwd(
            g,
            ptr(g, &xg),
            ptr(g, &wg),
            buf_ptr(g, &y),
            ptr(g, &rstd),
            rows,
            width,
            1e-6,
        )
        .unwrap();
        l.rms_norm_bwd(
            g,
            ptr(g, &xg),
            ptr(g, &wg),
            ptr(g, &rstd),
            ptr(g, &dyg),
            ptr(g, &dxg),
            buf_ptr(g, &dx_io),
            ptr(g, &dwg),
            rows,
            width,
        )
        .unwrap();
        check(
            &format!("rms_norm y {d:?}"),
            &y.download(g).unwrap(),
            &y_ref,
            tol(d),
        );
        check("rms_norm rstd", &down(g, &rstd), &r_ref, 1e-5);
        check("rms_norm dx", &down(g, &dxg), &dx_ref, 1e-5);
        check(
            &format!("rms_norm dx copy {d:?}"),
            &dx_io.download(g).unwrap(),
            &dx_ref,
            tol(d),
        );
        check("rms_norm dw", &down(g, &dwg), &dw_ref, 1e-5);
    }
}

#[test]
fn gated_output_norm_forward_and_backward() {
    let Some(g) = gpu() else { return };
    for (rows, width, d) in DTYPES.into_iter().flat_map(|d| [(45, 48, d), (45, 50, d)]) {
        for gated in [true, false] {
            let l = Layers::new(d);
            let o = Buf::upload(&g, &rand(rows * width, 1, 1.5), d).unwrap();
            let od = f64s(&o.download(&g).unwrap());
            let (gate, w, dout) = (
                rand(rows * width, 2, 2.0),
                rand(width, 3, 1.0),
                rand(rows * width, 4, 1.0),
            );
            let gg = Buf::upload(&g, &gate, d).unwrap();
            let doutg = Buf::upload(&g, &dout, d).unwrap();
            let (gd, wd) = (f64s(&gg.download(&g).unwrap()), f64s(&w));
            let doutd = f64s(&doutg.download(&g).unwrap());
            let (n, r) = nn::rms_norm(&od, width, Some(&wd), 1e-5);
            let act = |i: usize| if gated { nn::silu(gd[i]) } else { 1.0 };
            let out_ref: Vec<f64> = (0..n.len()).map(|i| n[i] * act(i)).collect();
            let dn: Vec<f64> = (0..n.len()).map(|i| doutd[i] * act(i)).collect();
            let (mut do_ref, mut dw_ref) = (vec![0.0; od.len()], vec![0.0; width]);
            nn::rms_norm_back(
                &od,
                width,
                Some(&wd),
                &r,
                &dn,
                &mut do_ref,
                Some(&mut dw_ref),
            );
            let dg_ref: Vec<f64> = (0..n.len())
                .map(|i| doutd[i] * n[i] * nn::silu_grad(gd[i]))
                .collect();

            let wg = up(&g, &w);
            let gp = if gated { buf_ptr(&g, &gg) } else { 0 };
            let out = Buf::zeros(&g, rows * width, d).unwrap();
            let d_o = Buf::zeros(&g, rows * width, d).unwrap();
            let (rstd, dw) = (up(&g, &vec![0.0; rows]), up(&g, &vec![0.0; width]));
            let dg = Buf::zeros(&g, rows * width, d).unwrap();
            l.norm_gate_fwd(
                &g,
                buf_ptr(&g, &o),
                gp,
                ptr(&g, &wg),
                buf_ptr(&g, &out),
                ptr(&g, &rstd),
                rows,
                width,
                1e-5,
            )
            .unwrap();
            l.norm_gate_bwd(
                &g,
                buf_ptr(&g, &o),
                gp,
                ptr(&g, &wg),
                ptr(&g, &rstd),
                buf_ptr(&g, &doutg),
                buf_ptr(&g, &d_o),
                buf_ptr(&g, &dg),
                ptr(&g, &dw),
                rows,
                width,
            )
            .unwrap();
            let name = format!("norm_gate {d:?} width {width} gated={gated}");
            check(
                &format!("{name} out"),
                &out.download(&g).unwrap(),
                &out_ref,
                tol(d),
            );
            check(
                &format!("{name} do"),
                &d_o.download(&g).unwrap(),
                &do_ref,
                tol(d),
            );
            check(&format!("{name} dw"), &down(&g, &dw), &dw_ref, 1e-5);
            if gated {
                check(
                    &format!("{name} dg"),
                    &dg.download(&g).unwrap(),
                    &dg_ref,
                    tol(d),
                );
            }
        }
    }
}

#[test]
fn swiglu_gates_and_conv() {
    let Some(g) = gpu() else { return };
    for d in DTYPES {
        let l = Layers::new(d);
        // SwiGLU.
        let n = 1001;
        let (a, b, dm) = (rand(n, 1, 2.0), rand(n, 2, 1.0), rand(n, 3, 1.0));
        let (ag, bg, dmg) = (
            Buf::upload(&g, &a, d).unwrap(),
            Buf::upload(&g, &b, d).unwrap(),
            Buf::upload(&g, &dm, d).unwrap(),
        );
        let (m, da, db, m2) = (
            Buf::zeros(&g, n, d).unwrap(),
            Buf::zeros(&g, n, d).unwrap(),
            Buf::zeros(&g, n, d).unwrap(),
            Buf::zeros(&g, n, d).unwrap(),
        );
        l.swiglu_fwd(&g, buf_ptr(&g, &ag), buf_ptr(&g, &bg), buf_ptr(&g, &m), n)
            .unwrap();
        l.swiglu_bwd(
            &g,
            buf_ptr(&g, &ag),
            buf_ptr(&g, &bg),
            buf_ptr(&g, &dmg),
            buf_ptr(&g, &da),
            buf_ptr(&g, &db),
            buf_ptr(&g, &m2),
            n,
        )
        .unwrap();
        let (ad, bd, dmd) = (
            f64s(&ag.download(&g).unwrap()),
            f64s(&bg.download(&g).unwrap()),
            f64s(&dmg.download(&g).unwrap()),
        );
        let m_ref: Vec<f64> = (0..n).map(|i| nn::silu(ad[i]) * bd[i]).collect();
        check("swiglu m", &m.download(&g).unwrap(), &m_ref, tol(d));
        check(
            "swiglu m again (backward)",
            &m2.download(&g).unwrap(),
            &m_ref,
            tol(d),
        );
        check(
            "swiglu dgate",
            &da.download(&g).unwrap(),
            &(0..n)
                .map(|i| dmd[i] * bd[i] * nn::silu_grad(ad[i]))
                .collect::<Vec<_>>(),
            tol(d),
        );
        check(
            "swiglu dup",
            &db.download(&g).unwrap(),
            &(0..n).map(|i| dmd[i] * nn::silu(ad[i])).collect::<Vec<_>>(),
            tol(d),
        );

        // Key gates with clamping.
        let (rows, width) = (33, 24);
        let (raw, bias, dgate) = (
            rand(rows * width, 4, 3.0),
            rand(width, 5, 1.0),
            rand(rows * width, 6, 1.0),
        );
        let (rawg, biasg, dgg) = (up(&g, &raw), up(&g, &bias), up(&g, &dgate));
        let (gg, dbg) = (up(&g, &vec![0.0; raw.len()]), up(&g, &vec![0.0; width]));
        let drawg = Buf::zeros(&g, raw.len(), d).unwrap();
        let clamp = -0.1f32;
        l.gate_fwd(
            &g,
            ptr(&g, &rawg),
            ptr(&g, &biasg),
            ptr(&g, &gg),
            raw.len(),
            width,
            16.0,
            clamp,
        )
        .unwrap();
        l.gate_bwd(
            &g,
            ptr(&g, &rawg),
            ptr(&g, &dgg),
            buf_ptr(&g, &drawg),
            ptr(&g, &dbg),
            rows,
            width,
            16.0,
            clamp,
        )
        .unwrap();
        let biased: Vec<f64> = (0..raw.len())
            .map(|i| raw[i] as f64 + bias[i % width] as f64)
            .collect();
        let g_ref: Vec<f64> = biased
            .iter()
            .map(|&x| (nn::log_sigmoid(x) / 16.0).max(clamp as f64))
            .collect();
        let draw_ref: Vec<f64> = (0..raw.len())
            .map(|i| {
                let x = biased[i];
                if nn::log_sigmoid(x) / 16.0 < clamp as f64 {
                    0.0
                } else {
                    dgate[i] as f64 * nn::sigmoid(-x) / 16.0
                }
            })
            .collect();
        let db_ref: Vec<f64> = (0..width)
            .map(|j| (0..rows).map(|r| draw_ref[r * width + j]).sum())
            .collect();
        check("gate g", &down(&g, &gg), &g_ref, 1e-5);
        check("gate draw", &drawg.download(&g).unwrap(), &draw_ref, tol(d));
        check("gate dbias", &down(&g, &dbg), &db_ref, 1e-5);

        // Short convolution with SiLU.
        let (b, t, c, kw) = (2, 19, 40, 4);
        let (x, w) = (rand(b * t * c, 7, 1.0), rand(c * kw, 8, 0.5));
        let doutg = Buf::upload(&g, &rand(b * t * c, 9, 1.0), d).unwrap();
        let (xd, wd, doutd) = (f64s(&x), f64s(&w), f64s(&doutg.download(&g).unwrap()));
        let pre_ref = nn::causal_conv(&xd, t, c, &wd, None);
        let out_ref: Vec<f64> = pre_ref.iter().map(|&p| nn::silu(p)).collect();
        let dpre: Vec<f64> = (0..pre_ref.len())
            .map(|i| doutd[i] * nn::silu_grad(pre_ref[i]))
            .collect();
        let (mut dx_ref, mut dw_ref) = (vec![0.0; xd.len()], vec![0.0; wd.len()]);
        nn::causal_conv_back(&xd, t, c, &wd, &dpre, &mut dx_ref, &mut dw_ref);
        let (xg, wg) = (up(&g, &x), up(&g, &w));
        let (pre, dw) = (up(&g, &vec![0.0; x.len()]), up(&g, &vec![0.0; w.len()]));
        let dx = Buf::zeros(&g, x.len(), d).unwrap();
        let out = Buf::zeros(&g, x.len(), d).unwrap();
        l.conv_silu_fwd(
            &g,
            ptr(&g, &xg),
            0,
            ptr(&g, &wg),
            ptr(&g, &pre),
            buf_ptr(&g, &out),
            (b, t, c),
            kw,
        )
        .unwrap();
        l.conv_silu_bwd(
            &g,
            ptr(&g, &xg),
            ptr(&g, &wg),
            ptr(&g, &pre),
            buf_ptr(&g, &doutg),
            0,
            buf_ptr(&g, &dx),
            ptr(&g, &dw),
            (b, t, c),
            kw,
        )
        .unwrap();
        check("conv pre", &down(&g, &pre), &pre_ref, 1e-5);
        check(
            &format!("conv out {d:?}"),
            &out.download(&g).unwrap(),
            &out_ref,
            tol(d),
        );
        check("conv dx", &dx.download(&g).unwrap(), &dx_ref, tol(d));
        check("conv dw", &down(&g, &dw), &dw_ref, 1e-5);

        // The same sequences as two segments (sequence parallelism): the second reads the
        // first's last kw - 1 rows as its halo, and sends their gradient back.
        let (t1, t2, hr) = (11, t - 11, kw - 1);
        let rows = |v: &[f32], r: std::ops::Range<usize>| -> Vec<f32> {
            (0..b)
                .flat_map(|s| v[(s * t + r.start) * c..(s * t + r.end) * c].to_vec())
                .collect()
        };
        let dout_all = doutg.download(&g).unwrap();
        let (x1, x2, halo) = (
            up(&g, &rows(&x, 0..t1)),
            up(&g, &rows(&x, t1..t)),
            up(&g, &rows(&x, t1 - hr..t1)),
        );
        let dout1 = Buf::upload(&g, &rows(&dout_all, 0..t1), d).unwrap();
        let dout2 = Buf::upload(&g, &rows(&dout_all, t1..t), d).unwrap();
        let zeros = |n: usize| up(&g, &vec![0.0; n]);
        let (pre1, pre2, dw) = (zeros(b * t1 * c), zeros(b * t2 * c), zeros(w.len()));
        let dhalo = zeros(b * hr * c);
        let (out1, out2) = (
            Buf::zeros(&g, b * t1 * c, d).unwrap(),
            Buf::zeros(&g, b * t2 * c, d).unwrap(),
        );
        let (dx1, dx2) = (
            Buf::zeros(&g, b * t1 * c, d).unwrap(),
            Buf::zeros(&g, b * t2 * c, d).unwrap(),
        );
        let wp = ptr(&g, &wg);
        for (xs, hp, pre, out, tt) in [
            (&x1, 0, &pre1, &out1, t1),
            (&x2, ptr(&g, &halo), &pre2, &out2, t2),
        ] {
            l.conv_silu_fwd(
                &g,
                ptr(&g, xs),
                hp,
                wp,
                ptr(&g, pre),
                buf_ptr(&g, out),
                (b, tt, c),
                kw,
            )
            .unwrap();
        }
        l.conv_silu_halo_bwd(
            &g,
            ptr(&g, &halo),
            wp,
            ptr(&g, &pre2),
            buf_ptr(&g, &dout2),
            ptr(&g, &dhalo),
            ptr(&g, &dw),
            (b, t2, c),
            kw,
        )
        .unwrap();
        for (xs, pre, dout, next, dxs, tt) in [
            (&x2, &pre2, &dout2, 0, &dx2, t2),
            (&x1, &pre1, &dout1, ptr(&g, &dhalo), &dx1, t1),
        ] {
            l.conv_silu_bwd(
                &g,
                ptr(&g, xs),
                wp,
                ptr(&g, pre),
                buf_ptr(&g, dout),
                next,
                buf_ptr(&g, dxs),
                ptr(&g, &dw),
                (b, tt, c),
                kw,
            )
            .unwrap();
        }
        // Back to [b, t, c] order: each sequence's first segment, then its second.
        let join = |a: Vec<f32>, z: Vec<f32>| -> Vec<f32> {
            (0..b)
                .flat_map(|s| {
                    let mut v = a[s * t1 * c..(s + 1) * t1 * c].to_vec();
                    v.extend_from_slice(&z[s * t2 * c..(s + 1) * t2 * c]);
                    v
                })
                .collect()
        };
        check(
            "segments pre",
            &join(down(&g, &pre1), down(&g, &pre2)),
            &pre_ref,
            1e-5,
        );
        let outs = join(out1.download(&g).unwrap(), out2.download(&g).unwrap());
        check(&format!("segments out {d:?}"), &outs, &out_ref, tol(d));
        let dxs = join(dx1.download(&g).unwrap(), dx2.download(&g).unwrap());
        check(&format!("segments dx {d:?}"), &dxs, &dx_ref, tol(d));
        check("segments dw", &down(&g, &dw), &dw_ref, 1e-5);
    }
}

#[test]
fn embeddings_cross_entropy_adamw_and_norm() {
    let Some(g) = gpu() else { return };
    let l = Layers::new(DType::F32);
    let s = g.stream();
    // Embeddings, with repeated ids.
    let (vocab, width) = (11, 24);
    let ids: Vec<i32> = vec![3, 0, 10, 3, 7, 3];
    let (e, dx) = (rand(vocab * width, 1, 1.0), rand(ids.len() * width, 2, 1.0));
    let idsg: CudaSlice<i32> = s.clone_htod(&ids).unwrap();
    let idp = fla_cuda::cudarc::driver::DevicePtr::device_ptr(&idsg, s).0;
    let (eg, dxg) = (up(&g, &e), up(&g, &dx));
    let (x, de) = (up(&g, &vec![0.0; dx.len()]), up(&g, &vec![0.0; e.len()]));
    l.embed_fwd(&g, idp, ptr(&g, &eg), ptr(&g, &x), ids.len(), width)
        .unwrap();
    l.embed_bwd(&g, idp, ptr(&g, &dxg), ptr(&g, &de), ids.len(), width)
        .unwrap();
    let x_ref: Vec<f64> = ids
        .iter()
        .flat_map(|&i| {
            e[i as usize * width..(i as usize + 1) * width]
                .iter()
                .map(|&v| v as f64)
        })
        .collect();
    let mut de_ref = vec![0.0; e.len()];
    for (r, &i) in ids.iter().enumerate() {
        for j in 0..width {
            de_ref[i as usize * width + j] += dx[r * width + j] as f64;
        }
    }
    check("embed x", &down(&g, &x), &x_ref, 1e-6);
    check("embed de", &down(&g, &de), &de_ref, 1e-6);

    // Cross-entropy over a vocabulary wider than a block, with ignored rows; row 3 rises
    // along the vocabulary, so that each thread's running maximum moves at every element.
    let (rows, v) = (9, 1000);
    let mut logits = rand(rows * v, 3, 3.0);
    for j in 0..v {
        logits[3 * v + j] = j as f32 * 0.01;
    }
    let targets: Vec<i64> = vec![5, -100, 999, 0, 17, -100, 400, 3, 998];
    let count = targets.iter().filter(|&&t| t >= 0).count();
    let (loss_ref, dl_ref) = nn::cross_entropy(&f64s(&logits), v, &targets);
    let tg: CudaSlice<i32> = s
        .clone_htod(&targets.iter().map(|&t| t as i32).collect::<Vec<_>>())
        .unwrap();
    for d in DTYPES {
        let (lg, lossg) = (up(&g, &logits), up(&g, &vec![0.0; rows]));
        let dl = Buf::zeros(&g, rows * v, d).unwrap();
        Layers::new(d)
            .cross_entropy(
                &g,
                ptr(&g, &lg),
                fla_cuda::cudarc::driver::DevicePtr::device_ptr(&tg, s).0,
                ptr(&g, &lossg),
                buf_ptr(&g, &dl),
                rows,
                v,
                1.0 / count as f32,
            )
            .unwrap();
        let loss: f64 = down(&g, &lossg).iter().map(|&x| x as f64).sum::<f64>() / count as f64;
        assert!(
            (loss - loss_ref).abs() < 1e-5 * loss_ref.abs(),
            "loss {loss} vs {loss_ref}"
        );
        check(
            &format!("cross_entropy dlogits {d:?}"),
            &dl.download(&g).unwrap(),
            &dl_ref,
            tol(d),
        );
    }

    // AdamW against the CPU optimizer, two steps, with a bf16 copy of the weights.
    let n = 777;
    let (p0, g1, g2) = (rand(n, 4, 1.0), rand(n, 5, 1.0), rand(n, 6, 1.0));
    let mut cpu_p = vec![fla_tensor::Tensor::new(vec![n], f64s(&p0)).unwrap()];
    let mut opt = fla_model::optim::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        decays: vec![true],
        step: 0,
        m: vec![fla_tensor::Tensor::zeros(&[n])],
        v: vec![fla_tensor::Tensor::zeros(&[n])],
    };
    let (pg, mg, vg) = (up(&g, &p0), up(&g, &vec![0.0; n]), up(&g, &vec![0.0; n]));
    let copy = Buf::zeros(&g, n, DType::Bf16).unwrap();
    let lb = Layers::new(DType::Bf16);
    for (t, grad) in [&g1, &g2].into_iter().enumerate() {
        let lr = 1e-2;
        opt.update(
            &mut cpu_p,
            &[fla_tensor::Tensor::new(vec![n], f64s(grad)).unwrap()],
            lr,
        );
        let step = (t + 1) as i32;
        let h = AdamStep {
            lr: lr as f32,
            shrink: (1.0 - lr * 0.1) as f32,
            beta1: 0.9,
            beta2: 0.95,
            c1: 1.0 - 0.9f32.powi(step),
            c2: 1.0 - 0.95f32.powi(step),
            eps: 1e-8,
            grad_scale: 1.0,
        };
        let gg = up(&g, grad);
        lb.adamw(
            &g,
            ptr(&g, &pg),
            ptr(&g, &gg),
            ptr(&g, &mg),
            ptr(&g, &vg),
            buf_ptr(&g, &copy),
            n,
            &h,
        )
        .unwrap();
    }
    check("adamw p", &down(&g, &pg), cpu_p[0].data(), 1e-6);
    check(
        "adamw bf16 copy",
        &copy.download(&g).unwrap(),
        cpu_p[0].data(),
        1e-2,
    );

    let sq = up(&g, &[f32::NAN]);
    l.sum_squares(&g, ptr(&g, &pg), ptr(&g, &sq), n).unwrap();
    let want: f64 = down(&g, &pg).iter().map(|&x| (x as f64).powi(2)).sum();
    let got = down(&g, &sq)[0];
    assert!((got as f64 - want).abs() < 1e-5 * want);
    // The same bits again (ranks of data-parallel training clip by it alike).
    l.sum_squares(&g, ptr(&g, &pg), ptr(&g, &sq), n).unwrap();
    assert_eq!(down(&g, &sq)[0].to_bits(), got.to_bits());
}
