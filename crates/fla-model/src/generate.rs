//! Generation: the prompt fed chunkwise, then one recurrent step per token through the
//! per-layer state cache (memory constant in the length), with greedy, temperature, top-k
//! and top-p sampling.

use fla_tensor::{Error, Real, Result};

use crate::gpu::{GpuCache, GpuModel};
use crate::model::{Cache, Model};
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 is greedy (the first most likely token).
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn check(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if self.top_p.is_nan() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return Err(Error::Invalid(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The next token from one row of logits.
pub fn sample<F: Real>(logits: &[F], s: &Sampling, rng: &mut Rng) -> usize {
    let argmax = || {
        let mut best = 0;
        for (i, v) in logits.iter().enumerate() {
            if *v > logits[best] {
                best = i;
            }
        }
        best
    };
    if s.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| {
        logits[b]
            .partial_cmp(&logits[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let top = logits[order[0]].to_f64();
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i].to_f64() - top) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    // Nucleus: the shortest prefix of the sorted tokens holding top_p of the probability.
    let mut mass = 0.0;
    let keep = probs
        .iter()
        .position(|&p| {
            mass += p;
            mass >= s.top_p
        })
        .map_or(probs.len(), |i| i + 1);
    let kept: f64 = probs[..keep].iter().sum();
    let mut u = rng.uniform() * kept;
    for (i, &p) in probs[..keep].iter().enumerate() {
        if u < p {
            return order[i];
        }
        u -= p;
    }
    order[keep - 1]
}

/// A model that generation feeds: `t` tokens of each sequence in ([B, t]; first the
/// prompts, then one at a time), the logits after each sequence's last token out [B, vocab].
pub trait Feed {
    fn vocab(&self) -> usize;
    fn feed(&mut self, ids: &[usize], t: usize) -> Result<Vec<f32>>;
}

/// A CPU model with its cache for `b` sequences.
pub struct CpuFeed<'a, F> {
    pub model: &'a Model<F>,
    pub cache: Cache<F>,
}

impl<F: Real> Feed for CpuFeed<'_, F> {
    fn vocab(&self) -> usize {
        self.model.config.vocab_size
    }
    fn feed(&mut self, ids: &[usize], t: usize) -> Result<Vec<f32>> {
        let logits = self.model.decode(ids, t, &mut self.cache)?;
        Ok(logits.iter().map(|x| x.to_f64() as f32).collect())
    }
}

/// The GPU model: the prompts through its chunkwise forward, then recurrent steps.
pub struct GpuFeed<'a> {
    pub model: &'a GpuModel,
    pub cache: Option<GpuCache>,
}

impl Feed for GpuFeed<'_> {
    fn vocab(&self) -> usize {
        self.model.config.vocab_size
    }
    fn feed(&mut self, ids: &[usize], t: usize) -> Result<Vec<f32>> {
        match &mut self.cache {
            None => {
                let b = ids.len() / t.max(1);
                let (logits, cache) = self.model.prefill(ids, b, t)?;
                self.cache = Some(cache);
                Ok(logits)
            }
            Some(cache) if t == 1 => self.model.step(cache, ids),
            Some(_) => Err(Error::Invalid(
                "after the prompt, the GPU model takes one token per step".into(),
            )),
        }
    }
}

/// Continues each of `prompts` (all of one length) by `max_new` tokens with a CPU model;
/// see [`generate_with`].
pub fn generate<F: Real>(
    model: &Model<F>,
    prompts: &[Vec<usize>],
    max_new: usize,
    s: &Sampling,
    eos: Option<usize>,
    on_token: impl FnMut(&[usize]),
) -> Result<Vec<Vec<usize>>> {
    let mut feed = CpuFeed {
        model,
        cache: Cache::new(model, prompts.len()),
    };
    generate_with(&mut feed, prompts, max_new, s, eos, on_token)
}

/// Continues each of `prompts` (all of one length) by `max_new` tokens; `on_token` sees each
/// step's new tokens as they come. Sequences that emit `eos` keep going (batched) but their
/// later tokens are cut from the result. Returns each sequence, prompt included.
pub fn generate_with(
    model: &mut dyn Feed,
    prompts: &[Vec<usize>],
    max_new: usize,
    s: &Sampling,
    eos: Option<usize>,
    mut on_token: impl FnMut(&[usize]),
) -> Result<Vec<Vec<usize>>> {
    s.check()?;
    let b = prompts.len();
    let t = prompts.first().map_or(0, Vec::len);
    if b == 0 || t == 0 || prompts.iter().any(|p| p.len() != t) {
        return Err(Error::Invalid(
            "generation needs one or more non-empty prompts of the same length".into(),
        ));
    }
    let mut rng = Rng::new(s.seed);
    let flat: Vec<usize> = prompts.concat();
    let mut logits = model.feed(&flat, t)?;
    let mut seqs = prompts.to_vec();
    let mut done = vec![false; b];
    let v = model.vocab();
    for step in 0..max_new {
        let next: Vec<usize> = logits
            .chunks(v)
            .map(|row| sample(row, s, &mut rng))
            .collect();
        for (i, &tok) in next.iter().enumerate() {
            if !done[i] {
                seqs[i].push(tok);
                done[i] = eos == Some(tok);
            }
        }
        on_token(&next);
        if done.iter().all(|&d| d) || step + 1 == max_new {
            break;
        }
        logits = model.feed(&next, 1)?;
    }
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_respects_temperature_top_k_and_top_p() {
        let logits = [1.0f64, 3.0, 2.0, 3.0, -1.0];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, &Sampling::default(), &mut rng), 1);
        let top2 = Sampling {
            temperature: 1.0,
            top_k: 2,
            ..Sampling::default()
        };
        let mut seen = [0usize; 5];
        (0..2000).for_each(|_| seen[sample(&logits, &top2, &mut rng)] += 1);
        assert!(
            seen[1] > 800 && seen[3] > 800 && seen[0] + seen[2] + seen[4] == 0,
            "{seen:?}"
        );
        // p(1) = p(3) = 0.42; top-p 0.5 keeps the two of them.
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            ..Sampling::default()
        };
        let mut seen = [0usize; 5];
        (0..2000).for_each(|_| seen[sample(&logits, &nucleus, &mut rng)] += 1);
        assert!(seen[0] + seen[2] + seen[4] == 0, "{seen:?}");
        let hot = Sampling {
            temperature: 100.0,
            ..Sampling::default()
        };
        let mut seen = [0usize; 5];
        (0..5000).for_each(|_| seen[sample(&logits, &hot, &mut rng)] += 1);
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
