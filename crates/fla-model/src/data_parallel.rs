//! Data parallelism (docs/DISTRIBUTED.md): every rank holds the whole model and its optimizer
//! state, computes the gradients of its own share of each batch, and the ranks average those
//! gradients, bucket by bucket from the last parameter (the order the backward finishes
//! them), before identical optimizer steps. The ranks talk through a [`Collective`]: NCCL
//! between GPUs; here, [`ThreadGroup`], threads of one process, the reference the GPU path is
//! checked against.

use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

use fla_tensor::{Error, Result, Tensor};

use crate::dist::{buckets, shard};
use crate::learner::{CpuLearner, Learner, OptState, Scorer};
use crate::train::{train, Batch, Evaluate, Metrics, Task, TrainArgs};
use crate::Model;

/// The one collective that data parallelism needs. Every rank of the group calls it with
/// buffers of the same length, in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Replaces `buf` on every rank by the sum over the ranks, element by element.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
}

/// The ranks of a group as threads of one process. The sum adds the ranks' buffers in rank
/// order, so every rank gets the same bits on every run.
pub struct ThreadGroup {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

struct Shared {
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

impl ThreadGroup {
    /// The `world` members of a new group, rank 0 first: hand one to each thread.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        assert!(world > 0, "a group needs a rank");
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![Vec::new(); world]),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let lock = || {
            self.shared
                .slots
                .lock()
                .map_err(|_| Error::Invalid("another rank of the group panicked".into()))
        };
        lock()?[self.rank] = buf.to_vec();
        self.shared.barrier.wait(); // every rank's buffer in its slot
        let summed = lock().and_then(|slots| {
            if let Some(bad) = slots.iter().position(|s| s.len() != buf.len()) {
                return Err(Error::Invalid(format!(
                    "all-reduce of {} floats on rank {}, of {} on rank {bad}",
                    buf.len(),
                    self.rank,
                    slots[bad].len()
                )));
            }
            buf.fill(0.0);
            for s in slots.iter() {
                buf.iter_mut().zip(s).for_each(|(a, &b)| *a += b);
            }
            Ok(())
        });
        // Every rank has read the slots before any is refilled (an error too waits here, so
        // that no rank is left at the barrier).
        self.shared.barrier.wait();
        summed
    }
}

/// Rank `rank`'s share of a batch: its sequences `shard(b, world, rank)`. Shares must be equal
/// for the average of the ranks' mean losses to be the batch's mean loss, so `b` must be a
/// multiple of `world`.
pub fn share(batch: &Batch, world: usize, rank: usize) -> Result<Batch> {
    if !batch.b.is_multiple_of(world) {
        return Err(Error::Invalid(format!(
            "a batch of {} sequences does not split evenly over {world} ranks",
            batch.b
        )));
    }
    let rows = shard(batch.b, world, rank);
    let tokens = rows.start * batch.t..rows.end * batch.t;
    Ok(Batch {
        ids: batch.ids[tokens.clone()].to_vec(),
        targets: batch.targets[tokens].to_vec(),
        b: rows.len(),
        t: batch.t,
    })
}

/// Trains on `world` ranks, threads of this process, in step. Rank r's learner comes from
/// `learner(r)` (a data-parallel learner of a group of `world`, on this thread); every rank
/// runs [`train`] on its own copy of `task` with the same seed, so all draw the same batches
/// and each computes on its share. Rank 0 runs on this thread and leads: it writes the files,
/// evaluates and prints progress (`args.lead`); the others write nothing. Returns rank 0's
/// last evaluation, or the first error by rank.
///
/// A rank that fails leaves the others waiting in their next collective, so `fail` is called
/// with its rank and error as soon as it fails: the CLI ends the process there (its files
/// are written atomically: nothing is lost).
pub fn train_ranks<T: Task + Clone + Send>(
    world: usize,
    learner: &(dyn Fn(usize) -> Result<Box<dyn Learner>> + Sync),
    task: &T,
    evaluate: &mut Evaluate<'_>,
    args: &TrainArgs,
    resume: bool,
    fail: &(dyn Fn(usize, &Error) + Sync),
) -> Result<Metrics> {
    if world == 0 {
        return Err(Error::Invalid("training needs at least one rank".into()));
    }
    let run = |rank: usize, task: &mut T, evaluate: &mut Evaluate<'_>, args: &TrainArgs| {
        let done = learner(rank).and_then(|mut l| train(l.as_mut(), task, evaluate, args, resume));
        if let Err(e) = &done {
            fail(rank, e);
        }
        done
    };
    std::thread::scope(|s| {
        let others: Vec<_> = (1..world)
            .map(|rank| {
                let mut task = task.clone();
                let args = TrainArgs {
                    lead: false,
                    progress: false,
                    ..args.clone()
                };
                s.spawn(move || run(rank, &mut task, &mut |_| Ok(Vec::new()), &args))
            })
            .collect();
        let mut result = run(0, &mut task.clone(), evaluate, args);
        for (i, rank) in others.into_iter().enumerate() {
            let done = rank
                .join()
                .unwrap_or_else(|_| Err(Error::Invalid(format!("rank {} panicked", i + 1))));
            if let (Ok(_), Err(e)) = (&result, done) {
                result = Err(e);
            }
        }
        result
    })
}

/// A CPU learner that averages its gradients over a group before each step. Every rank is
/// given the whole batches and computes on its own share of each ([`share`]), so all ranks
/// take the steps that one learner takes on the whole batches.
pub struct DataParallel<C: Collective> {
    inner: CpuLearner,
    comm: C,
    /// Parameter ranges, last first, each of at least `bucket_bytes` (but the first).
    buckets: Vec<Range<usize>>,
}

impl<C: Collective> DataParallel<C> {
    /// `bucket_bytes`: the all-reduce's unit (NCCL runs best at a few MB).
    pub fn new(inner: CpuLearner, comm: C, bucket_bytes: usize) -> DataParallel<C> {
        let sizes: Vec<usize> = inner.grads().iter().map(|g| g.len() * 4).collect();
        let buckets = buckets(&sizes, bucket_bytes);
        DataParallel {
            inner,
            comm,
            buckets,
        }
    }

    /// This rank's gradients (after [`DataParallel::average_grads`]: the group's average).
    pub fn grads(&self) -> &[Tensor<f32>] {
        self.inner.grads()
    }

    /// Replaces every rank's gradients by their average over the group, bucket by bucket.
    pub fn average_grads(&mut self) -> Result<()> {
        let scale = 1.0 / self.comm.world() as f32;
        for bucket in self.buckets.clone() {
            self.reduce_bucket(bucket, scale)?;
        }
        Ok(())
    }

    /// Sums one bucket's gradients over the ranks as one flat buffer, and scales by `scale`.
    fn reduce_bucket(&mut self, params: Range<usize>, scale: f32) -> Result<()> {
        let grads: &mut [Tensor<f32>] = &mut self.inner.grads_mut()[params];
        let mut flat: Vec<f32> = grads
            .iter()
            .flat_map(|g| g.data().iter().copied())
            .collect();
        self.comm.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for g in grads.iter_mut() {
            let n = g.len();
            g.data_mut()
                .iter_mut()
                .zip(&flat[at..at + n])
                .for_each(|(x, &s)| *x = s * scale);
            at += n;
        }
        Ok(())
    }
}

impl<C: Collective> Learner for DataParallel<C> {
    fn zero_grads(&mut self) -> Result<()> {
        self.inner.zero_grads()
    }

    /// The loss of this rank's share of `batch`, averaged over the ranks (the batch's mean
    /// loss).
    fn accumulate(&mut self, batch: &Batch, scale: f64) -> Result<f64> {
        let mine = share(batch, self.comm.world(), self.comm.rank())?;
        let loss = self.inner.accumulate(&mine, scale)?;
        let mut x = [loss as f32];
        self.comm.all_reduce_sum(&mut x)?;
        Ok(f64::from(x[0]) / self.comm.world() as f64)
    }

    /// The gradients averaged over the ranks, then the inner learner's clip and step (the same
    /// on every rank).
    fn clip_and_step(&mut self, lr: f64, max_norm: f64) -> Result<f64> {
        self.average_grads()?;
        self.inner.clip_and_step(lr, max_norm)
    }

    fn steps(&self) -> u64 {
        self.inner.steps()
    }

    fn snapshot(&self) -> Result<Model<f32>> {
        self.inner.snapshot()
    }

    fn optimizer(&self) -> Result<OptState> {
        self.inner.optimizer()
    }

    fn restore(&mut self, model: Model<f32>, opt: OptState) -> Result<()> {
        self.inner.restore(model, opt)
    }

    fn scorer(&mut self) -> &mut dyn Scorer {
        self.inner.scorer()
    }
}
