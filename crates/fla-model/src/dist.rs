//! The parts of multi-GPU training that need no GPU (docs/DISTRIBUTED.md): where a rank stands
//! (the RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT environment), handing the
//! communicator's id from rank 0 to the others over TCP, the gradient buckets that the
//! backward hands to the all-reduce, and the optimizer's shards under ZeRO-1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::time::{Duration, Instant};

use fla_tensor::{Error, Result};

/// Bytes of a communicator's unique id (NCCL's `ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// This process's place in a run over several processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU of this host that the rank drives.
    pub local_rank: usize,
    /// Where rank 0 hands out the communicator's id.
    pub master_addr: String,
    pub master_port: u16,
}

impl Launch {
    /// From the process environment; `None` when WORLD_SIZE is not set (a one-process run).
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(|name| std::env::var(name).ok())
    }

    /// From any source of variables (the environment, or a test's map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |name: &str, text: &str| -> Result<usize> {
            text.trim()
                .parse()
                .map_err(|_| Error::Invalid(format!("{name}={text:?} is not a whole number")))
        };
        let needed = |name: &str| {
            var(name).ok_or_else(|| {
                Error::Invalid(format!("WORLD_SIZE is set but {name} is not (a multi-process run needs RANK, MASTER_ADDR and MASTER_PORT too)"))
            })
        };
        let world_size = number("WORLD_SIZE", &world)?;
        let rank = number("RANK", &needed("RANK")?)?;
        let local_rank = match var("LOCAL_RANK") {
            Some(x) => number("LOCAL_RANK", &x)?,
            None => rank,
        };
        let master_addr = needed("MASTER_ADDR")?;
        let port = needed("MASTER_PORT")?;
        let master_port = port
            .trim()
            .parse()
            .map_err(|_| Error::Invalid(format!("MASTER_PORT={port:?} is not a port number")))?;
        if world_size == 0 || rank >= world_size {
            return Err(Error::Invalid(format!(
                "RANK={rank} with WORLD_SIZE={world_size}: ranks run from 0 to WORLD_SIZE - 1"
            )));
        }
        Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        }))
    }
}

/// Hands the communicator's id from rank 0 to every rank: rank 0 passes `Some(id)`, listens
/// at MASTER_ADDR:MASTER_PORT and sends the id to each of the other ranks as it connects;
/// they pass `None` and connect (retrying until `wait` has passed, as rank 0 may start
/// later). Every rank returns the id.
pub fn share_id(
    launch: &Launch,
    id: Option<[u8; ID_BYTES]>,
    wait: Duration,
) -> Result<[u8; ID_BYTES]> {
    let at = format!("{}:{}", launch.master_addr, launch.master_port);
    let net = |what: &str, e: std::io::Error| Error::Device(format!("{what} {at}: {e}"));
    match (launch.rank, id) {
        (0, Some(id)) => {
            let listener = TcpListener::bind(&at).map_err(|e| net("cannot listen at", e))?;
            for _ in 1..launch.world_size {
                let (mut peer, _) = listener
                    .accept()
                    .map_err(|e| net("no rank connected to", e))?;
                peer.write_all(&id)
                    .map_err(|e| net("cannot send the id from", e))?;
            }
            Ok(id)
        }
        (0, None) => Err(Error::Invalid(
            "rank 0 hands out the id: it must have one".into(),
        )),
        (_, Some(_)) => Err(Error::Invalid("only rank 0 hands out an id".into())),
        (_, None) => {
            let started = Instant::now();
            let mut peer = loop {
                let addrs = at.to_socket_addrs().map_err(|e| net("cannot resolve", e))?;
                let tried = addrs
                    .into_iter()
                    .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok());
                match tried {
                    Some(s) => break s,
                    None if started.elapsed() < wait => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    None => {
                        return Err(Error::Device(format!(
                            "rank {} found no rank 0 at {at} within {wait:?}",
                            launch.rank
                        )))
                    }
                }
            };
            let mut id = [0u8; ID_BYTES];
            peer.read_exact(&mut id).map_err(|e| net("no id from", e))?;
            Ok(id)
        }
    }
}

/// The gradient buckets: parameters (given by their sizes in bytes, in layout order) grouped
/// into runs of consecutive parameters of at least `target` bytes (the last run may be
/// smaller), listed in the order the backward finishes them, last parameter first. Each
/// bucket is a range of parameter indices.
pub fn buckets(sizes: &[usize], target: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut end, mut bytes) = (sizes.len(), 0usize);
    for i in (0..sizes.len()).rev() {
        bytes += sizes[i];
        if bytes >= target.max(1) {
            out.push(i..end);
            end = i;
            bytes = 0;
        }
    }
    if end > 0 {
        out.push(0..end);
    }
    out
}

/// Rank `rank`'s shard of `n` elements split over `world` ranks: contiguous, the first
/// n % world shards one element longer.
pub fn shard(n: usize, world: usize, rank: usize) -> Range<usize> {
    assert!(world > 0 && rank < world, "rank {rank} of {world}");
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Where every parameter lives in one flat f32 vector (the GPU model's master weights,
/// gradients and moments): the buckets' regions one after another in layout order, each
/// padded to a multiple of `world` x [`ALIGN`] elements so that it splits into `world` equal
/// pieces (the shards of ZeRO-1: rank r owns piece r of every bucket). Every parameter and
/// every piece starts [`ALIGN`] elements from the last boundary: the kernels' vector loads and
/// cuBLAS want aligned addresses.
/// Elements between aligned starts (256 bytes of f32).
pub const ALIGN: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatPlan {
    /// Each parameter's first element and length, in layout order.
    pub offsets: Vec<usize>,
    pub lens: Vec<usize>,
    /// In the order the backward finishes them, last parameter first.
    pub buckets: Vec<FlatBucket>,
    pub world: usize,
    /// Elements of the flat vector, padding included.
    pub total: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatBucket {
    /// Parameter indices.
    pub params: Range<usize>,
    /// Elements of the flat vector, a multiple of `world` x [`ALIGN`] long.
    pub region: Range<usize>,
}

/// A run of one parameter's elements inside one rank's piece of a bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub param: usize,
    /// Where it is in the flat vector.
    pub flat: Range<usize>,
    /// Where it is in the rank's shard: its pieces of the buckets one after another in layout
    /// order (the flat vector itself when `world` is 1).
    pub shard: Range<usize>,
}

impl FlatPlan {
    /// Parameters of `lens` elements in buckets of at least `bucket_elems` ([`buckets`]),
    /// each region padded to a multiple of `world` x [`ALIGN`].
    pub fn new(lens: &[usize], bucket_elems: usize, world: usize) -> FlatPlan {
        assert!(world > 0, "a plan for no ranks");
        let mut buckets: Vec<FlatBucket> = buckets(lens, bucket_elems)
            .into_iter()
            .map(|params| FlatBucket {
                params,
                region: 0..0,
            })
            .collect();
        let mut offsets = vec![0; lens.len()];
        let mut at = 0;
        // Regions in layout order: the buckets come last parameter first.
        for b in buckets.iter_mut().rev() {
            let start = at;
            for i in b.params.clone() {
                offsets[i] = at;
                at += lens[i].next_multiple_of(ALIGN);
            }
            at = start + (at - start).next_multiple_of(world * ALIGN);
            b.region = start..at;
        }
        FlatPlan {
            offsets,
            lens: lens.to_vec(),
            buckets,
            world,
            total: at,
        }
    }

    /// Parameter `i`'s elements in the flat vector.
    pub fn param(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i] + self.lens[i]
    }

    /// Elements of each rank's shard.
    pub fn shard_len(&self) -> usize {
        self.total / self.world
    }

    /// Rank `rank`'s piece of `bucket`'s region.
    pub fn piece(&self, bucket: &FlatBucket, rank: usize) -> Range<usize> {
        let len = bucket.region.len() / self.world;
        let start = bucket.region.start + rank * len;
        start..start + len
    }

    /// Where rank `rank`'s piece of `bucket` sits in its shard.
    pub fn piece_in_shard(&self, bucket: &FlatBucket) -> Range<usize> {
        let len = bucket.region.len() / self.world;
        let start = bucket.region.start / self.world;
        start..start + len
    }

    /// The runs of parameters that rank `rank` owns, in layout order: with `world` 1, every
    /// parameter whole at the same place in the shard as in the flat vector.
    pub fn owned(&self, rank: usize) -> Vec<Segment> {
        let mut out = Vec::new();
        for b in self.buckets.iter().rev() {
            let piece = self.piece(b, rank);
            let in_shard = self.piece_in_shard(b).start;
            for i in b.params.clone() {
                let p = self.param(i);
                let (start, end) = (p.start.max(piece.start), p.end.min(piece.end));
                if start < end {
                    let at = in_shard + (start - piece.start);
                    out.push(Segment {
                        param: i,
                        flat: start..end,
                        shard: at..at + (end - start),
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn launch_reads_the_environment() {
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        let l = Launch::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (3, 4, 3));
        assert_eq!((l.master_addr.as_str(), l.master_port), ("10.0.0.1", 29500));
    }

    #[test]
    fn bad_launch_variables_are_named() {
        let base = [("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
        let err = |extra: &[(&str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            Launch::from_vars(vars(&all)).unwrap_err().to_string()
        };
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK"));
        assert!(err(&[("WORLD_SIZE", "two"), ("RANK", "0")]).contains("WORLD_SIZE=\"two\""));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("RANK=2"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "-1")]).contains("LOCAL_RANK")
        );
        let no_port = Launch::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "99999"),
        ]));
        assert!(no_port.unwrap_err().to_string().contains("MASTER_PORT"));
    }

    #[test]
    fn every_rank_gets_rank_zeros_id() {
        // A free port: bind to 0, read it, let it go.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let world = 4;
        let launch = |rank| Launch {
            rank,
            world_size: world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        // The other ranks start first and wait for rank 0.
        let others: Vec<_> = (1..world)
            .map(|r| {
                let l = launch(r);
                std::thread::spawn(move || share_id(&l, None, Duration::from_secs(20)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(share_id(&launch(0), Some(id), Duration::ZERO).unwrap(), id);
        for t in others {
            assert_eq!(t.join().unwrap().unwrap(), id);
        }
        // Nobody at the port: a clear error once the wait is over.
        let lonely = share_id(&launch(1), None, Duration::from_millis(200)).unwrap_err();
        assert!(lonely.to_string().contains("found no rank 0"), "{lonely}");
    }

    #[test]
    fn buckets_cover_the_parameters_from_the_last() {
        let sizes = [5, 1, 1, 8, 2, 2, 2, 30, 1];
        let b = buckets(&sizes, 4);
        assert_eq!(b, vec![7..9, 5..7, 3..5, 0..3]);
        // Each parameter once, the runs adjacent, from the end to the start.
        let mut next = sizes.len();
        for r in &b {
            assert_eq!(r.end, next);
            next = r.start;
        }
        assert_eq!(next, 0);
        assert_eq!(buckets(&sizes, usize::MAX), vec![0..9]);
        assert_eq!(buckets(&[], 4), Vec::<Range<usize>>::new());
    }

    #[test]
    fn shards_split_evenly_and_in_order() {
        for (n, world) in [(10, 3), (3, 4), (0, 2), (1 << 20, 8)] {
            let mut next = 0;
            for r in 0..world {
                let s = shard(n, world, r);
                assert_eq!(s.start, next);
                assert!(s.len() == n / world || s.len() == n / world + 1);
                next = s.end;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    fn flat_plans_pad_buckets_into_equal_pieces() {
        let lens = [5, 1, 1, 8, 2, 2, 2, 30, 1];
        let one = FlatPlan::new(&lens, 4, 1);
        // Each parameter at the next aligned place; the last bucket (parameter 0) ends the
        // vector.
        assert_eq!(one.offsets, (0..9).map(|i| i * ALIGN).collect::<Vec<_>>());
        assert_eq!(one.total, 9 * ALIGN);
        let owned = one.owned(0);
        assert_eq!(owned.len(), lens.len());
        for s in &owned {
            assert_eq!(s.flat, one.param(s.param));
            assert_eq!(s.shard, s.flat);
        }
        for world in [2, 3, 4] {
            let plan = FlatPlan::new(&lens, 4, world);
            assert_eq!(plan.buckets.len(), 4);
            let mut next = 0;
            for b in plan.buckets.iter().rev() {
                assert_eq!(b.region.start, next);
                assert_eq!(b.region.len() % (world * ALIGN), 0);
                let used: usize = b.params.clone().map(|i| lens[i]).sum();
                assert!(b.region.len() >= used);
                for i in b.params.clone() {
                    assert_eq!(plan.offsets[i] % ALIGN, 0);
                    assert!(b.region.contains(&plan.offsets[i]));
                }
                next = b.region.end;
            }
            assert_eq!(next, plan.total);
            // The ranks' segments cover every parameter's elements once, and each rank's
            // segments tile its shard's used places without overlap.
            let mut seen = vec![0u8; plan.total];
            for rank in 0..world {
                let mut in_shard = vec![false; plan.shard_len()];
                for s in plan.owned(rank) {
                    assert_eq!(s.flat.len(), s.shard.len());
                    let p = plan.param(s.param);
                    assert!(p.start <= s.flat.start && s.flat.end <= p.end);
                    seen[s.flat.clone()].iter_mut().for_each(|x| *x += 1);
                    for j in s.shard.clone() {
                        assert!(!in_shard[j]);
                        in_shard[j] = true;
                    }
                    // The piece maps to the shard by one offset per bucket.
                    let b = plan
                        .buckets
                        .iter()
                        .find(|b| b.params.contains(&s.param))
                        .unwrap();
                    assert_eq!(
                        s.flat.start - plan.piece(b, rank).start,
                        s.shard.start - plan.piece_in_shard(b).start
                    );
                }
            }
            for i in 0..lens.len() {
                assert!(seen[plan.param(i)].iter().all(|&x| x == 1));
            }
            assert_eq!(seen.iter().map(|&x| x as usize).sum::<usize>(), 52);
            for rank in 0..world {
                for b in &plan.buckets {
                    assert_eq!(plan.piece(b, rank).start % ALIGN, 0);
                }
            }
        }
    }
}
