//! Multi-query associative recall (MQAR; Arora et al., 2023, "Zoology"): a sequence of
//! key-value pairs, then queries that repeat keys; at each queried key the model must
//! predict the value it was paired with. Keys come from the lower half of the vocabulary,
//! values from the upper half (token 0 is unused).

use fla_tensor::Result;

use crate::learner::Scorer;
use crate::rng::Rng;
use crate::train::{Batch, Task};

#[derive(Clone, Debug)]
pub struct Mqar {
    pub vocab_size: usize,
    pub seq_len: usize,
    pub num_pairs: usize,
    pub batch_size: usize,
}

impl Mqar {
    /// One sequence: `num_pairs` pairs (k v), then pairs drawn again from them until the
    /// length is filled; the target at a repeated key is its value, elsewhere none (-100).
    pub fn sequence(&self, rng: &mut Rng) -> (Vec<usize>, Vec<i64>) {
        let half = self.vocab_size / 2;
        let keys: Vec<usize> = rng.permutation(half - 1)[..self.num_pairs]
            .iter()
            .map(|k| k + 1)
            .collect();
        let values: Vec<usize> = (0..self.num_pairs)
            .map(|_| half + rng.below(self.vocab_size - half))
            .collect();
        let mut ids = Vec::with_capacity(self.seq_len);
        let mut targets = vec![-100i64; self.seq_len];
        for i in 0..self.num_pairs {
            ids.extend([keys[i], values[i]]);
        }
        while ids.len() + 1 < self.seq_len {
            let i = rng.below(self.num_pairs);
            targets[ids.len()] = values[i] as i64;
            ids.extend([keys[i], values[i]]);
        }
        ids.resize(self.seq_len, 0);
        (ids, targets)
    }

    /// Checks the sizes leave room for the pairs and at least one query.
    pub fn check(&self) -> fla_tensor::Result<()> {
        if self.num_pairs == 0
            || self.num_pairs >= self.vocab_size / 2
            || 2 * self.num_pairs + 2 > self.seq_len
        {
            return Err(fla_tensor::Error::Invalid(format!(
                "MQAR with {} pairs needs a vocabulary over {} and sequences of at least {} tokens (have {} and {})",
                self.num_pairs,
                2 * self.num_pairs + 1,
                2 * self.num_pairs + 2,
                self.vocab_size,
                self.seq_len
            )));
        }
        Ok(())
    }
}

impl Mqar {
    /// Fraction of queries answered right (argmax) on `n` sequences drawn from `seed`, and
    /// the mean loss on them.
    pub fn evaluate(&self, model: &mut dyn Scorer, n: usize, seed: u64) -> Result<(f64, f64)> {
        let mut rng = Rng::new(seed);
        let (mut right, mut total, mut loss) = (0usize, 0usize, 0.0);
        let per = self.batch_size.max(1);
        let batches = n.div_ceil(per);
        let v = model.vocab();
        for _ in 0..batches {
            let batch = Mqar {
                batch_size: per,
                ..self.clone()
            }
            .batch(&mut rng);
            let (l, logits) = model.score(&batch.ids, batch.b, batch.t, &batch.targets, true)?;
            loss += l / batches as f64;
            for (row, &target) in logits.unwrap_or_default().chunks(v).zip(&batch.targets) {
                if target < 0 {
                    continue;
                }
                let best = (0..v).fold(0, |b, i| if row[i] > row[b] { i } else { b });
                right += (best as i64 == target) as usize;
                total += 1;
            }
        }
        Ok((right as f64 / total.max(1) as f64, loss))
    }
}

impl Task for Mqar {
    fn batch(&mut self, rng: &mut Rng) -> Batch {
        let (mut ids, mut targets) = (Vec::new(), Vec::new());
        for _ in 0..self.batch_size {
            let (i, t) = self.sequence(rng);
            ids.extend(i);
            targets.extend(t);
        }
        Batch {
            ids,
            targets,
            b: self.batch_size,
            t: self.seq_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_point_at_their_values() {
        let task = Mqar {
            vocab_size: 64,
            seq_len: 40,
            num_pairs: 6,
            batch_size: 1,
        };
        let (ids, targets) = task.sequence(&mut Rng::new(3));
        assert_eq!(ids.len(), 40);
        let mut queries = 0;
        for (pos, &t) in targets.iter().enumerate() {
            if t < 0 {
                continue;
            }
            queries += 1;
            assert!(pos >= 12, "queries follow the pairs");
            let first = ids.iter().position(|&x| x == ids[pos]).unwrap();
            assert!(first < 12 && ids[first + 1] as i64 == t && ids[pos + 1] as i64 == t);
        }
        assert_eq!(queries, 14);
    }
}
