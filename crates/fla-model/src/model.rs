//! The GLA Transformer (fla's GLAForCausalLM) on the CPU: forward with a tape of the
//! activations, and the backward of every parameter from it.
//!
//! Block (pre-norm): x += o_proj(attn(attn_norm(x))); x += down(silu(gate(h)) ⊙ up(h)) with
//! h = mlp_norm(x). Attention: q, k, v projections (each through a causal depthwise
//! convolution and SiLU with use_short_conv), key gates logsigmoid(gk_proj(x)) / 16 (clamped
//! at clamp_min), chunkwise GLA with scale head_k_dim^-1/2, then per head RMSNorm(o) ⊙
//! swish(g_proj(x)). Logits = lm_head(norm(x)).

use fla_ops::{gla_backward, gla_forward, Form, GateKind, GlaInputs, Options};
use fla_tensor::{Error, Real, Result, Tensor};

use crate::config::{GlaConfig, GATE_LOGIT_NORMALIZER, GATE_LOW_RANK};
use crate::layout::{LayerSlots, Layout};
use crate::nn::{
    causal_conv, causal_conv_back, conv_window, cross_entropy, linear, linear_back, log_sigmoid,
    rms_norm, rms_norm_back, sigmoid, silu, silu_grad,
};

/// A model: its config, where each parameter sits, and the parameters.
#[derive(Clone, Debug)]
pub struct Model<F> {
    pub config: GlaConfig,
    pub layout: Layout,
    pub params: Vec<Tensor<F>>,
}

/// One of q, k, v: the projection, and with use_short_conv the convolution's output before
/// SiLU; `out` is what attention sees.
struct Branch<F> {
    lin: Vec<F>,
    conv: Option<Vec<F>>,
}

struct LayerTape<F> {
    x_in: Vec<F>,
    h1: Vec<F>,
    rstd1: Vec<F>,
    branches: [Branch<F>; 3],
    gk_low: Vec<F>,
    gk_raw: Vec<F>,
    gla: GlaInputs<F>,
    o: Vec<F>,
    rstd_o: Vec<F>,
    on: Vec<F>,
    g_pre: Option<Vec<F>>,
    o_gated: Vec<F>,
    x_mid: Vec<F>,
    h2: Vec<F>,
    rstd2: Vec<F>,
    gate: Vec<F>,
    up: Vec<F>,
    m: Vec<F>,
}

/// What the forward keeps for the backward and for generation.
pub struct Tape<F> {
    pub b: usize,
    pub t: usize,
    ids: Vec<usize>,
    layers: Vec<LayerTape<F>>,
    x_last: Vec<F>,
    hf: Vec<F>,
    rstd_f: Vec<F>,
    /// Each layer's final attention state [B, H, K, V].
    pub states: Vec<Tensor<F>>,
}

/// The recurrent state of a batch of sequences for generation: per layer, the last
/// `conv_size - 1` inputs of each short convolution and the attention state [B, H, K, V].
/// Its size does not grow with the length.
#[derive(Clone, Debug)]
pub struct Cache<F> {
    pub b: usize,
    /// Tokens consumed so far per sequence.
    pub len: usize,
    layers: Vec<LayerCache<F>>,
}

#[derive(Clone, Debug)]
struct LayerCache<F> {
    windows: Vec<Vec<F>>,
    state: Option<Tensor<F>>,
}

impl<F: Real> Cache<F> {
    /// An empty cache (no tokens yet) for `b` sequences.
    pub fn new(model: &Model<F>, b: usize) -> Cache<F> {
        let c = &model.config;
        let widths = [c.key_dim(), c.key_dim_per_group(), c.value_dim_per_group()];
        let past = c.conv_size.saturating_sub(1);
        let layers = (0..c.num_hidden_layers)
            .map(|_| LayerCache {
                windows: if c.use_short_conv {
                    widths.iter().map(|w| vec![F::ZERO; b * past * w]).collect()
                } else {
                    Vec::new()
                },
                state: None,
            })
            .collect();
        Cache { b, len: 0, layers }
    }
}

/// Repeats each of `kv` heads of width `d` over `groups` consecutive heads (fla's
/// `repeat(x, '... (h d) -> ... (h g) d')`).
fn expand<F: Real>(x: &[F], kv: usize, d: usize, groups: usize) -> Vec<F> {
    if groups == 1 {
        return x.to_vec();
    }
    let mut out = Vec::with_capacity(x.len() * groups);
    for row in x.chunks(kv * d) {
        for head in row.chunks(d) {
            for _ in 0..groups {
                out.extend_from_slice(head);
            }
        }
    }
    out
}

/// Backward of [`expand`]: sums each group back onto its head.
fn reduce<F: Real>(x: &[F], kv: usize, d: usize, groups: usize) -> Vec<F> {
    if groups == 1 {
        return x.to_vec();
    }
    let mut out = vec![F::ZERO; x.len() / groups];
    for (dst, row) in out.chunks_mut(kv * d).zip(x.chunks(kv * d * groups)) {
        for (h, head) in dst.chunks_mut(d).enumerate() {
            for g in 0..groups {
                let src = &row[(h * groups + g) * d..(h * groups + g + 1) * d];
                head.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
            }
        }
    }
    out
}

fn add_into<F: Real>(dst: &mut [F], src: &[F]) {
    dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
}

impl<F: Real> Model<F> {
    /// A freshly initialised model (fla's init, seeded).
    pub fn new(config: GlaConfig, seed: u64) -> Model<F> {
        let layout = Layout::new(&config);
        let params = layout.init(&config, seed);
        Model {
            config,
            layout,
            params,
        }
    }

    fn p(&self, slot: usize) -> &[F] {
        self.params[slot].data()
    }

    fn check_ids(&self, ids: &[usize], b: usize, t: usize) -> Result<()> {
        if ids.len() != b * t || b == 0 || t == 0 {
            return Err(Error::Invalid(format!(
                "input_ids: {} ids do not form a batch of {b} x {t} (both positive)",
                ids.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i >= self.config.vocab_size) {
            return Err(Error::Invalid(format!(
                "input_ids holds token {bad}, outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Logits [B*T, vocab] for `ids` (B sequences of T tokens), and the tape.
    pub fn forward(&self, ids: &[usize], b: usize, t: usize) -> Result<(Vec<F>, Tape<F>)> {
        self.run(ids, b, t, None)
    }

    /// Feeds the next `t` tokens of each of the cache's sequences (`ids` [B, t]), updating the
    /// cache; returns the logits after each sequence's last token [B, vocab]. A prompt is
    /// fed once (chunkwise), then one token at a time (recurrent steps).
    pub fn decode(&self, ids: &[usize], t: usize, cache: &mut Cache<F>) -> Result<Vec<F>> {
        let b = cache.b;
        let (logits, _) = self.run(ids, b, t, Some(cache))?;
        cache.len += t;
        let v = self.config.vocab_size;
        Ok((0..b)
            .flat_map(|i| {
                logits[((i + 1) * t - 1) * v..(i + 1) * t * v]
                    .iter()
                    .copied()
            })
            .collect())
    }

    fn run(
        &self,
        ids: &[usize],
        b: usize,
        t: usize,
        mut cache: Option<&mut Cache<F>>,
    ) -> Result<(Vec<F>, Tape<F>)> {
        self.check_ids(ids, b, t)?;
        let c = &self.config;
        let d = c.hidden_size;
        let emb = self.p(self.layout.embeddings);
        let mut x: Vec<F> = ids
            .iter()
            .flat_map(|&i| emb[i * d..(i + 1) * d].iter().copied())
            .collect();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut states = Vec::with_capacity(c.num_hidden_layers);
        for (l, slots) in self.layout.layers.iter().enumerate() {
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let (tape, ht) = self.layer_forward(slots, x, b, t, lc)?;
            x = tape.x_mid.clone();
            let mlp = linear(&tape.m, b * t, self.p(slots.down_proj), d);
            add_into(&mut x, &mlp);
            layers.push(tape);
            states.push(ht);
        }
        let (hf, rstd_f) = rms_norm(&x, d, Some(self.p(self.layout.norm)), c.norm_eps);
        let logits = linear(&hf, b * t, self.p(self.layout.output_slot()), c.vocab_size);
        let tape = Tape {
            b,
            t,
            ids: ids.to_vec(),
            layers,
            x_last: x,
            hf,
            rstd_f,
            states,
        };
        Ok((logits, tape))
    }

    /// One block up to the MLP's down projection (the caller adds it to `x_mid`).
    fn layer_forward(
        &self,
        s: &LayerSlots,
        x_in: Vec<F>,
        b: usize,
        t: usize,
        mut cache: Option<&mut LayerCache<F>>,
    ) -> Result<(LayerTape<F>, Tensor<F>)> {
        let c = &self.config;
        let (n, d, eps) = (b * t, c.hidden_size, c.norm_eps);
        let (h, hk, hv, groups) = (c.num_heads, c.head_k_dim(), c.head_v_dim(), c.kv_groups());
        let (h1, rstd1) = rms_norm(&x_in, d, Some(self.p(s.attn_norm)), eps);
        let widths = [c.key_dim(), c.key_dim_per_group(), c.value_dim_per_group()];
        let projs = [s.q_proj, s.k_proj, s.v_proj];
        let mut outs: Vec<Vec<F>> = Vec::with_capacity(3);
        let branches = [0, 1, 2].map(|i| {
            let lin = linear(&h1, n, self.p(projs[i]), widths[i]);
            let conv = s.convs.map(|cv| {
                let Some(lc) = cache.as_deref_mut() else {
                    return causal_conv(&lin, t, widths[i], self.p(cv[i]), None);
                };
                let y = causal_conv(&lin, t, widths[i], self.p(cv[i]), Some(&lc.windows[i]));
                lc.windows[i] = conv_window(&lc.windows[i], &lin, t, widths[i], c.conv_size);
                y
            });
            outs.push(match &conv {
                Some(pre) => pre.iter().map(|&v| silu(v)).collect(),
                None => lin.clone(),
            });
            Branch { lin, conv }
        });
        let gk_low = linear(&h1, n, self.p(s.gk_proj0), GATE_LOW_RANK);
        let mut gk_raw = linear(&gk_low, n, self.p(s.gk_proj1), widths[1]);
        for row in gk_raw.chunks_mut(widths[1]) {
            add_into(row, self.p(s.gk_bias));
        }
        let norm = F::from_f64(GATE_LOGIT_NORMALIZER);
        let gk: Vec<F> = gk_raw
            .iter()
            .map(|&v| {
                let g = log_sigmoid(v) / norm;
                c.clamp_min.map_or(g, |m| g.max(F::from_f64(m)))
            })
            .collect();
        let kv = c.kv_heads();
        let shape = |w: usize| vec![b, t, h, w];
        let mut gla = GlaInputs::new(
            Tensor::new(shape(hk), outs[0].clone())?,
            Tensor::new(shape(hk), expand(&outs[1], kv, hk, groups))?,
            Tensor::new(shape(hv), expand(&outs[2], kv, hv, groups))?,
        );
        gla.g = Some(Tensor::new(shape(hk), expand(&gk, kv, hk, groups))?);
        let mut opts = Options::default();
        if let Some(lc) = cache.as_deref_mut() {
            gla.h0 = lc.state.take();
            if t == 1 {
                opts.form = Form::Recurrent;
            }
        }
        let out = gla_forward(GateKind::Key, &gla, &opts)?;
        if let Some(lc) = cache {
            lc.state = Some(out.ht.clone());
        }
        let o = out.o.into_data();
        let gw = s.g_norm.map(|i| self.p(i));
        let (on, rstd_o) = rms_norm(&o, hv, gw, eps);
        let g_pre = s.g_proj.map(|gp| linear(&h1, n, self.p(gp), c.value_dim()));
        let o_gated = match &g_pre {
            Some(g) => on.iter().zip(g).map(|(&a, &gv)| a * silu(gv)).collect(),
            None => on.clone(),
        };
        let mut x_mid = linear(&o_gated, n, self.p(s.o_proj), d);
        add_into(&mut x_mid, &x_in);
        let (h2, rstd2) = rms_norm(&x_mid, d, Some(self.p(s.mlp_norm)), eps);
        let inter = c.intermediate();
        let gate = linear(&h2, n, self.p(s.gate_proj), inter);
        let up = linear(&h2, n, self.p(s.up_proj), inter);
        let m = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
        let tape = LayerTape {
            x_in,
            h1,
            rstd1,
            branches,
            gk_low,
            gk_raw,
            gla,
            o,
            rstd_o,
            on,
            g_pre,
            o_gated,
            x_mid,
            h2,
            rstd2,
            gate,
            up,
            m,
        };
        Ok((tape, out.ht))
    }

    /// Gradients of every parameter (in layout order) given d loss / d logits.
    pub fn backward(&self, tape: &Tape<F>, dlogits: &[F]) -> Result<Vec<Tensor<F>>> {
        let c = &self.config;
        let (n, d) = (tape.b * tape.t, c.hidden_size);
        let mut grads: Vec<Tensor<F>> = self.layout.zeros();
        let out = self.layout.output_slot();
        let mut dhf = vec![F::ZERO; n * d];
        linear_back(
            &tape.hf,
            n,
            self.p(out),
            dlogits,
            &mut dhf,
            grads[out].data_mut(),
        );
        let mut dx = vec![F::ZERO; n * d];
        let norm = self.layout.norm;
        rms_norm_back(
            &tape.x_last,
            d,
            Some(self.p(norm)),
            &tape.rstd_f,
            &dhf,
            &mut dx,
            Some(grads[norm].data_mut()),
        );
        for (slots, lt) in self.layout.layers.iter().zip(&tape.layers).rev() {
            dx = self.layer_backward(slots, lt, tape.t, dx, &mut grads)?;
        }
        let de = grads[self.layout.embeddings].data_mut();
        for (row, &id) in dx.chunks(d).zip(&tape.ids) {
            add_into(&mut de[id * d..(id + 1) * d], row);
        }
        Ok(grads)
    }

    /// Backward of one block: d loss / d x_in from d loss / d x_out.
    fn layer_backward(
        &self,
        s: &LayerSlots,
        lt: &LayerTape<F>,
        t: usize,
        dx_out: Vec<F>,
        grads: &mut [Tensor<F>],
    ) -> Result<Vec<F>> {
        let c = &self.config;
        let n = lt.x_in.len() / c.hidden_size;
        let d = c.hidden_size;
        let (h, hk, hv, groups, kv) = (
            c.num_heads,
            c.head_k_dim(),
            c.head_v_dim(),
            c.kv_groups(),
            c.kv_heads(),
        );
        let inter = c.intermediate();
        let b = n / t;
        // MLP.
        let mut dm = vec![F::ZERO; n * inter];
        linear_back(
            &lt.m,
            n,
            self.p(s.down_proj),
            &dx_out,
            &mut dm,
            grads[s.down_proj].data_mut(),
        );
        let dgate: Vec<F> = (0..dm.len())
            .map(|i| dm[i] * lt.up[i] * silu_grad(lt.gate[i]))
            .collect();
        let dup: Vec<F> = (0..dm.len()).map(|i| dm[i] * silu(lt.gate[i])).collect();
        let mut dh2 = vec![F::ZERO; n * d];
        linear_back(
            &lt.h2,
            n,
            self.p(s.gate_proj),
            &dgate,
            &mut dh2,
            grads[s.gate_proj].data_mut(),
        );
        linear_back(
            &lt.h2,
            n,
            self.p(s.up_proj),
            &dup,
            &mut dh2,
            grads[s.up_proj].data_mut(),
        );
        let mut dx_mid = dx_out;
        rms_norm_back(
            &lt.x_mid,
            d,
            Some(self.p(s.mlp_norm)),
            &lt.rstd2,
            &dh2,
            &mut dx_mid,
            Some(grads[s.mlp_norm].data_mut()),
        );
        // Output projection, gate and per-head norm.
        let mut do_gated = vec![F::ZERO; n * c.value_dim()];
        linear_back(
            &lt.o_gated,
            n,
            self.p(s.o_proj),
            &dx_mid,
            &mut do_gated,
            grads[s.o_proj].data_mut(),
        );
        let mut dh1 = vec![F::ZERO; n * d];
        let don: Vec<F> = match (&lt.g_pre, s.g_proj) {
            (Some(g), Some(gp)) => {
                let dg: Vec<F> = (0..g.len())
                    .map(|i| do_gated[i] * lt.on[i] * silu_grad(g[i]))
                    .collect();
                linear_back(&lt.h1, n, self.p(gp), &dg, &mut dh1, grads[gp].data_mut());
                (0..g.len()).map(|i| do_gated[i] * silu(g[i])).collect()
            }
            _ => do_gated,
        };
        let mut d_o = vec![F::ZERO; lt.o.len()];
        let gw = s.g_norm.map(|i| self.p(i));
        let gw_grad = s.g_norm.map(|i| grads[i].data_mut());
        rms_norm_back(&lt.o, hv, gw, &lt.rstd_o, &don, &mut d_o, gw_grad);
        // Attention.
        let d_o = Tensor::new(vec![b, t, h, hv], d_o)?;
        let ga = gla_backward(GateKind::Key, &lt.gla, &d_o, None, &Options::default())?;
        let dg_exp = ga.dg.expect("the key gate has a gradient");
        let d_outs = [
            ga.dq.into_data(),
            reduce(ga.dk.data(), kv, hk, groups),
            reduce(ga.dv.data(), kv, hv, groups),
        ];
        // Key gate: g = max(logsigmoid(raw) / 16, clamp_min); d logsigmoid(x)/dx = σ(-x).
        let dg = reduce(dg_exp.data(), kv, hk, groups);
        let norm = F::from_f64(GATE_LOGIT_NORMALIZER);
        let draw: Vec<F> = dg
            .iter()
            .zip(&lt.gk_raw)
            .map(|(&g, &raw)| {
                let clamped = c
                    .clamp_min
                    .is_some_and(|m| (log_sigmoid(raw) / norm).to_f64() < m);
                if clamped {
                    F::ZERO
                } else {
                    g * sigmoid(-raw) / norm
                }
            })
            .collect();
        let kg = c.key_dim_per_group();
        for row in draw.chunks(kg) {
            add_into(grads[s.gk_bias].data_mut(), row);
        }
        let mut dlow = vec![F::ZERO; n * GATE_LOW_RANK];
        linear_back(
            &lt.gk_low,
            n,
            self.p(s.gk_proj1),
            &draw,
            &mut dlow,
            grads[s.gk_proj1].data_mut(),
        );
        linear_back(
            &lt.h1,
            n,
            self.p(s.gk_proj0),
            &dlow,
            &mut dh1,
            grads[s.gk_proj0].data_mut(),
        );
        // q, k, v: SiLU and convolution, then the projections.
        let projs = [s.q_proj, s.k_proj, s.v_proj];
        for (i, (br, dout)) in lt.branches.iter().zip(&d_outs).enumerate() {
            let width = br.lin.len() / n;
            let dlin = match (&br.conv, s.convs) {
                (Some(pre), Some(cv)) => {
                    let dpre: Vec<F> = dout
                        .iter()
                        .zip(pre)
                        .map(|(&g, &p)| g * silu_grad(p))
                        .collect();
                    let mut dlin = vec![F::ZERO; br.lin.len()];
                    causal_conv_back(
                        &br.lin,
                        t,
                        width,
                        self.p(cv[i]),
                        &dpre,
                        &mut dlin,
                        grads[cv[i]].data_mut(),
                    );
                    dlin
                }
                _ => dout.clone(),
            };
            linear_back(
                &lt.h1,
                n,
                self.p(projs[i]),
                &dlin,
                &mut dh1,
                grads[projs[i]].data_mut(),
            );
        }
        let mut dx_in = dx_mid;
        rms_norm_back(
            &lt.x_in,
            d,
            Some(self.p(s.attn_norm)),
            &lt.rstd1,
            &dh1,
            &mut dx_in,
            Some(grads[s.attn_norm].data_mut()),
        );
        Ok(dx_in)
    }

    /// Mean cross-entropy of next-token prediction (labels = ids shifted by one, the last
    /// position of each sequence ignored, as fla), with the gradients when `grads`.
    pub fn lm_loss(&self, ids: &[usize], b: usize, t: usize, grads: bool) -> Result<LossOut<F>> {
        let targets: Vec<i64> = (0..b * t)
            .map(|i| {
                if i % t + 1 < t {
                    ids[i + 1] as i64
                } else {
                    -100
                }
            })
            .collect();
        self.loss(ids, b, t, &targets, grads)
    }

    /// Mean cross-entropy against explicit per-position targets (negative: ignored).
    pub fn loss(
        &self,
        ids: &[usize],
        b: usize,
        t: usize,
        targets: &[i64],
        grads: bool,
    ) -> Result<LossOut<F>> {
        let (logits, tape) = self.forward(ids, b, t)?;
        let (loss, dlogits) = cross_entropy(&logits, self.config.vocab_size, targets);
        let grads = if grads {
            Some(self.backward(&tape, &dlogits)?)
        } else {
            None
        };
        Ok(LossOut {
            loss,
            logits,
            grads,
        })
    }
}

pub struct LossOut<F> {
    pub loss: f64,
    pub logits: Vec<F>,
    pub grads: Option<Vec<Tensor<F>>>,
}
