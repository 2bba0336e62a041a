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
}
