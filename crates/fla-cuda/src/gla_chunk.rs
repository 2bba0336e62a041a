//! The two-level chunk form on the GPU (kernels/gla_chunk.cu): what every chunk gives on its
//! own from one block per chunk, the state at every chunk boundary from one block per state
//! tile sweeping a sequence's chunks, everything else one block per chunk; where enough
//! sequences and heads fill the GPU, the sweeps also make the outputs (o, dv) as they go.
//! Gates that act on keys only (none, scalar, key); the others take the fused kernels.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use fla_ops::GateKind;
use fla_tensor::{Error, Result};

use crate::device::{device_err, Gpu};
use crate::gla::{forced_tile, Buf, DeviceGla};
use crate::gla_bwd::{ptr_mut, DeviceGrads, DeviceUpstream, Work};

const SRC: &str = concat!(
    include_str!("../kernels/common.cuh"),
    "\n",
    include_str!("../kernels/gla_chunk.cu")
);
/// Rows per chunk: 64 or 128, in the order tried (`chunk_order`).
const CHUNK_ROWS: [usize; 2] = [64, 128];

/// The chunk sizes to try, best first: 64 rows, then 128 (for kernels that do not fit a block
/// at 64). A state every 128 rows halves the states' round trips, but the kernels for 128 rows
/// run one block of 512 threads an SM where those for 64 run two of 256, and take the wider
/// attention matrix. On the H100 (bench/results/sweep-bv-h100.txt) 64 rows won forward +
/// backward at every shape measured: K=V=128 (2.24-2.36 against 2.49-2.59 ms at H=16) and,
/// once the sweeps took state tiles of 128 columns, K=256, V=512 (2.75-2.77 against
/// 2.79-2.89 at H=4), where 128 rows are 1-4% faster forward alone. FLA_CHUNK puts a size
/// first.
fn chunk_order() -> Vec<usize> {
    let mut order = CHUNK_ROWS.to_vec();
    if let Some(c) = forced_chunk() {
        order.retain(|&x| x != c);
        order.insert(0, c);
    }
    order
}

/// Threads per block of the kernels for chunks of `chunk` rows: four per row (gla_chunk.cu).
fn threads(chunk: usize) -> u32 {
    4 * chunk as u32
}

/// Threads per block of the sweeps: four warps, each keeping its 16 x 32 tiles of a state
/// tile of up to 64 x 128 (four at 64 x 128).
const SWEEP_THREADS: u32 = 128;

/// The most chunks a sweep keeps in flight.
const MAX_SWEEP_STAGES: usize = 8;

/// The most chunks a sweep with outputs keeps in flight (each is a chunk's rows of Q̃, K̂, A
/// and a value tile: 54 KB at K=V=128).
const MAX_SWEEP_OUT_STAGES: usize = 4;

/// A choice that the environment variable `var` forces (1 or 0), for testing both paths and
/// comparing them; unset, the kernels' rule decides. FLA_SWEEP_OUT=1 runs the sweeps with
/// outputs wherever they serve, 0 never; FLA_SWEEP_WHOLE=1 makes the sweeps store their states
/// in whole sectors (through shared memory), 0 straight from the fragments.
fn forced_switch(var: &str) -> Option<bool> {
    match std::env::var(var).ok()?.as_str() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Chunks in flight that FLA_SWEEP_STAGES (2 to 12) asks a sweep for, for tuning.
fn forced_sweep_stages() -> Option<usize> {
    let x = std::env::var("FLA_SWEEP_STAGES").ok()?.parse().ok()?;
    (2..=12).contains(&x).then_some(x)
}

/// Rows per chunk that FLA_CHUNK (64 or 128) asks for, for tuning and for testing both.
fn forced_chunk() -> Option<usize> {
    let x = std::env::var("FLA_CHUNK").ok()?.parse().ok()?;
    CHUNK_ROWS.contains(&x).then_some(x)
}

/// A state tile of 128 value columns, where V allows it and the kernel's blocks at that
/// width (`blocks`) still number more than three for every four SMs: fewer blocks then read
/// each chunk's rows. On the H100 it lost 15-40% with 64 blocks (bench/results/sweep-bv-h100.txt).
fn wide_tile(gpu: &Gpu, dv: usize, blocks: impl Fn(usize) -> usize) -> Option<usize> {
    (dv.is_multiple_of(128) && 4 * blocks(128) > 3 * gpu.sms()).then_some(128)
}

/// Whether the two-level kernels take this gate kind.
pub(crate) fn supports(gate: GateKind) -> bool {
    matches!(gate, GateKind::None | GateKind::Scalar | GateKind::Key)
}

/// Where each sequence's chunks start in the list of all chunks, and each chunk's sequence.
pub(crate) struct Chunks {
    pub(crate) off: CudaSlice<i32>,
    pub(crate) seq: CudaSlice<i32>,
    pub(crate) count: usize,
}

impl Chunks {
    pub(crate) fn new(gpu: &Gpu, lens: &[usize], chunk: usize) -> Result<Chunks> {
        let mut off = vec![0i32];
        let mut seq = Vec::new();
        for (n, &len) in lens.iter().enumerate() {
            let c = len.div_ceil(chunk);
            off.push(off[n] + c as i32);
            seq.extend(std::iter::repeat_n(n as i32, c));
        }
        let count = seq.len();
        // cudarc refuses empty uploads: a sequence-less call keeps one unused entry.
        seq.push(0);
        let upload = |x: &[i32]| gpu.stream.clone_htod(x).map_err(device_err("upload"));
        Ok(Chunks {
            off: upload(&off)?,
            seq: upload(&seq)?,
            count,
        })
    }
}

/// What the two-level forward leaves for the backward.
pub(crate) struct TwoLevel {
    plan: Plan,
    chunks: Chunks,
    /// The state at the start of every chunk [chunks, H, K, V].
    states: Buf,
    /// Every chunk's total gate Γ [chunks, H, K] (f32; unused without gates).
    gam: CudaSlice<f32>,
    /// Every chunk's attention matrix A, scale included [tokens, H, chunk rows] (only the
    /// 16-byte vectors that reach the diagonal or below are written).
    attn: Buf,
    /// Q̃ = q ⊙ e^G [tokens, H, K] for chunk_out and chunk_dstates (None without a gate: q).
    qg: Option<Buf>,
    /// K̂ = k ⊙ e^(Γ-G) [tokens, H, K] for chunk_states and chunk_dv (None without a gate: k).
    kh: Option<Buf>,
}

/// The widest of 128, 64, 48, 32, 16 that divides `size` and is at most `max`.
fn tile(size: usize, max: usize) -> usize {
    [128, 64, 48, 32, 16]
        .into_iter()
        .find(|&t| t <= max && size.is_multiple_of(t))
        .expect("head sizes are multiples of 16")
}

/// `tile(size, max)`, unless the environment variable `var` forces a tile that divides `size`
/// (tuning; see `forced_tile`).
fn tuned_tile(var: &str, size: usize, max: usize) -> usize {
    forced_tile(var)
        .filter(|&t| size.is_multiple_of(t))
        .unwrap_or(tile(size, max))
}

/// Bytes of one kernel's shared memory: its regions in the kernel's order, each rounded up
/// to 16 bytes as `Carve::take` does.
fn carve(regions: &[usize]) -> usize {
    regions.iter().map(|b| b.next_multiple_of(16)).sum()
}

/// Bytes of the warps' scratch in a block of `threads`, each warp's for `tiles` 16 x 32 tiles
/// on their way out in whole sectors (stage_tile in gla_chunk.cu: rows of 32 elements and 16
/// bytes of padding).
fn scratch_bytes(threads: u32, tiles: usize, io: usize) -> usize {
    threads as usize / 32 * tiles * 16 * (32 + 16 / io) * io
}

/// The kernels of gla_chunk.cu, in the order of their KERNEL numbers.
const KERNELS: [&str; 8] = [
    "chunk_local",
    "chunk_states",
    "chunk_out",
    "chunk_dstates",
    "chunk_dv",
    "chunk_dqk",
    "chunk_states_out",
    "chunk_dstates_dv",
];

/// The rows per chunk of one kernel, its tiles, the chunks (sweeps) or value tiles
/// (chunk_dqk) it keeps in flight, its threads and its shared memory.
#[derive(Clone)]
struct Shape {
    chunk: usize,
    bk: usize,
    bv: usize,
    stages: usize,
    threads: u32,
    smem: usize,
    /// A sweep writes every chunk's state (else only the final one: KEEP_SLOTS=0).
    keep_slots: bool,
    /// A sweep stores the states in whole sectors, through shared memory (WHOLE_SECTORS).
    whole_sectors: bool,
}

impl Shape {
    fn new(kernel: &str, d: &DeviceGla, chunk: usize, bk: usize, bv: usize) -> Shape {
        Shape::staged(kernel, d, chunk, bk, bv, 1)
    }

    /// `kernel` with the widest K tile up to `max_bk` (FLA_CHUNK_BK forces one) whose shared
    /// memory fits a block.
    fn key_tiled(
        gpu: &Gpu,
        kernel: &str,
        d: &DeviceGla,
        chunk: usize,
        max_bk: usize,
        bv: usize,
    ) -> Shape {
        let mut bk = tuned_tile("FLA_CHUNK_BK", d.dk, max_bk);
        loop {
            let shape = Shape::new(kernel, d, chunk, bk, bv);
            if shape.fits(gpu) || bk == 16 {
                return shape;
            }
            bk = tile(d.dk, bk / 2);
        }
    }

    /// chunk_dqk with 3 value steps of `bv` in flight, or 2 where 3 do not fit a block or 2 fit
    /// more blocks on an SM; narrower steps where even 2 do not fit.
    fn dqk(gpu: &Gpu, d: &DeviceGla, chunk: usize, bk: usize, mut bv: usize) -> Shape {
        loop {
            let three = Shape::staged("chunk_dqk", d, chunk, bk, bv, 3);
            let two = Shape::staged("chunk_dqk", d, chunk, bk, bv, 2);
            if three.fits(gpu) && gpu.blocks_per_sm(three.smem) >= gpu.blocks_per_sm(two.smem) {
                return three;
            }
            if two.fits(gpu) || bv == 16 {
                return two;
            }
            bv = tile(d.dv, bv / 2);
        }
    }

    /// A sweep (chunk_states or chunk_dstates) over state tiles of up to 64 x 128, with the
    /// most chunks in flight, up to 8, that keep two blocks on an SM (FLA_SWEEP_STAGES forces a
    /// number). On the H100 two blocks of 6 chunks beat three of 4 at every T (H=16,
    /// K=V=128: 0.28-0.30 against 0.32-0.36 ms), and with chunks of 128 rows two blocks of 3
    /// beat one of 4 to 6. The value width (FLA_SWEEP_BV forces one) is 128 where that still
    /// makes more than three blocks (sequences x heads x tiles) for every four SMs: fewer
    /// blocks then read each chunk's K̂ (Q̃ backwards). Forward + backward went from 2.81-2.82
    /// to 2.75-2.77 ms at H=4, K=256, V=512, and from 2.36 to 2.24 at H=16, K=V=128, T=8192
    /// (128 blocks); with 64 blocks it lost 15-22% (bench/results/sweep-bv-h100.txt). Else 64,
    /// halved while the blocks would fill at most half the SMs: at 4 heads of 128 x 256 and
    /// T=16384, 32 columns took forward + backward from 1.28 to 1.16 ms.
    ///
    /// Where the blocks outnumber the SMs the states leave in whole sectors, through shared
    /// memory (FLA_SWEEP_WHOLE forces either way): there the L2's throughput bounds the sweep,
    /// and whole sectors took each sweep at H=4, K=256, V=512, T=4096 from 0.47-0.49 to
    /// 0.38 ms and forward + backward from 2.75-2.78 to 2.54-2.60 ms at T ≤ 8192. With
    /// fewer blocks the sweep waits on each step's latency, and the round trip through shared
    /// memory cost 3-8% (bench/results/sweep-whole-h100.txt).
    fn sweep(gpu: &Gpu, kernel: &str, d: &DeviceGla, chunk: usize) -> Shape {
        let bk = tile(d.dk, 64);
        let blocks = |bv: usize| d.n_seqs * d.h * (d.dk / bk) * (d.dv / bv);
        let bv = forced_tile("FLA_SWEEP_BV")
            .filter(|&t| d.dv.is_multiple_of(t))
            .or_else(|| wide_tile(gpu, d.dv, blocks))
            .unwrap_or_else(|| {
                let mut bv = tile(d.dv, 64);
                while bv > 16 && 2 * blocks(bv) <= gpu.sms() {
                    bv = tile(d.dv, bv / 2);
                }
                bv
            });
        let whole = forced_switch("FLA_SWEEP_WHOLE").unwrap_or(blocks(bv) > gpu.sms());
        let shape = |stages| {
            let s = Shape::staged(kernel, d, chunk, bk, bv, stages);
            if whole {
                s.with_whole_sectors(d.dtype.bytes())
            } else {
                s
            }
        };
        if let Some(stages) = forced_sweep_stages() {
            return shape(stages);
        }
        (2..=MAX_SWEEP_STAGES)
            .rev()
            .map(shape)
            .find(|s| gpu.blocks_per_sm(s.smem) >= 2)
            .unwrap_or_else(|| shape(2))
    }

    /// A sweep with outputs (chunk_states_out or chunk_dstates_dv), where one serves (chunks of
    /// 64 rows, K ≤ 128) and its blocks of 64 value columns (sequences x heads x tiles) fill
    /// all but one SM in 16. On the H100 at H=16, K=V=128 it took forward + backward from
    /// 2.31-2.46 to 2.24-2.31 ms at T ≤ 4096 (256 blocks or more); at T=8192 (128 blocks on
    /// 132 SMs) it lost 9-19% before its stores took whole sectors and wins 10% since (1.89
    /// against 2.09 ms, bench/results/dqk-diag-h100.txt); with 64 blocks (T=16384) it loses
    /// 19%. Narrower tiles, which make more blocks, lost at every T. Where it
    /// serves, its tile is 128 columns wide as the sweeps' (`wide_tile`): at H=16, T ≤ 4096,
    /// 2.13-2.22 against 2.23-2.30 ms (bench/results/sweep-bv-h100.txt). It keeps in
    /// flight the most chunks, up to 4, among those that fit the most blocks on an SM.
    /// FLA_SWEEP_OUT, FLA_SWEEP_BV and FLA_SWEEP_STAGES force the choice, the tile, the chunks.
    fn sweep_out(gpu: &Gpu, kernel: &str, d: &DeviceGla, chunk: usize) -> Option<Shape> {
        if chunk != 64 || d.dk > 128 {
            return None;
        }
        let blocks = |bv: usize| d.n_seqs * d.h * (d.dv / bv);
        let narrow = tile(d.dv, 64);
        if !forced_switch("FLA_SWEEP_OUT").unwrap_or(16 * blocks(narrow) >= 15 * gpu.sms()) {
            return None;
        }
        let bv = forced_tile("FLA_SWEEP_BV")
            .filter(|&t| d.dv.is_multiple_of(t))
            .or_else(|| wide_tile(gpu, d.dv, blocks))
            .unwrap_or(narrow);
        let shape = |stages| Shape::staged(kernel, d, chunk, d.dk, bv, stages);
        if let Some(stages) = forced_sweep_stages() {
            return Some(shape(stages)).filter(|s| s.fits(gpu));
        }
        (2..=MAX_SWEEP_OUT_STAGES)
            .map(shape)
            .filter(|s| s.fits(gpu))
            .max_by_key(|s| (gpu.blocks_per_sm(s.smem), s.stages))
    }

    fn staged(
        kernel: &str,
        d: &DeviceGla,
        chunk: usize,
        bk: usize,
        bv: usize,
        stages: usize,
    ) -> Shape {
        let io = d.dtype.bytes();
        let pad = 16 / io;
        let c = chunk;
        let (ks, vs, a_s) = ((bk + pad) * io, (bv + pad) * io, (c + pad) * io);
        // The scratch RED of the kernel: 4 floats and cumsum_gates' TPC x BK part totals.
        let tpc = [16, 8, 4, 2, 1]
            .into_iter()
            .find(|&t| t <= threads(chunk) as usize / bk)
            .unwrap_or(1);
        let red = (4 + tpc * bk) * 4;
        // f32 gate tiles, rows padded by 8 (GS in the kernels).
        let gates = if d.gate == GateKind::None {
            0
        } else {
            c * (bk + 8) * 4
        };
        let regions: Vec<usize> = match kernel {
            "chunk_local" => vec![c * ks, c * ks, gates, c * 4, red],
            "chunk_states" | "chunk_dstates" => {
                let gam = if d.gate == GateKind::None { 0 } else { bk * 4 };
                vec![stages * (c * ks + c * vs), stages * gam]
            }
            "chunk_states_out" | "chunk_dstates_dv" => {
                let gam = if d.gate == GateKind::None { 0 } else { bk * 4 };
                // Two tiles of 16 columns of the state, [K][16 + pad], per 16 columns.
                let cols = 2 * (bv / 16) * bk * (16 + pad) * io;
                vec![stages * (2 * c * ks + c * vs + c * a_s), stages * gam, cols]
            }
            "chunk_out" => vec![c * ks, bk * vs, c * a_s, c * vs],
            "chunk_dv" => vec![c * ks, bk * vs, c * a_s, c * vs],
            // After the walk, dA and Q̃, K̃ or each warp's tiles of dq and dk on their way out.
            "chunk_dqk" => vec![
                (stages * (2 * c * vs + 2 * bk * vs))
                    .max(c * a_s + (2 * c * ks).max(scratch_bytes(threads(chunk), 2, io))),
                c * ks,
                c * ks,
                gates,
                bk * 4,
                c * 4,
                c / 16 * bk * 4,
                red,
            ],
            _ => unreachable!("no kernel {kernel}"),
        };
        let threads = match kernel {
            "chunk_states" | "chunk_dstates" => SWEEP_THREADS,
            // K / 32 warps per 16 columns of the state, each holding 32 keys.
            "chunk_states_out" | "chunk_dstates_dv" => (2 * bk.div_ceil(32) * bv) as u32,
            _ => threads(chunk),
        };
        Shape {
            chunk,
            bk,
            bv,
            stages,
            threads,
            smem: carve(&regions),
            keep_slots: true,
            whole_sectors: false,
        }
    }

    /// This sweep storing its states in whole sectors: each warp's scratch for a 16 x 32 tile
    /// on its way out (stage_tile in gla_chunk.cu) follows its other shared memory.
    fn with_whole_sectors(self, io: usize) -> Shape {
        Shape {
            smem: self.smem + scratch_bytes(self.threads, 1, io),
            whole_sectors: true,
            ..self
        }
    }

    /// This sweep built to write only the final state (ht, or dh0 backwards): sequence
    /// parallelism's first passes.
    fn final_only(&self) -> Shape {
        Shape {
            keep_slots: false,
            ..self.clone()
        }
    }

    fn fits(&self, gpu: &Gpu) -> bool {
        self.smem <= gpu.max_smem()
    }
}

/// The shapes of the kernels for chunks of one size: the sweeps with outputs where they serve,
/// else the sweeps and the per-chunk output kernels.
struct Plan {
    local: Shape,
    states: Shape,
    out: Shape,
    dstates: Shape,
    dv: Shape,
    dqk: Shape,
    states_out: Option<Shape>,
    dstates_dv: Option<Shape>,
}

impl Plan {
    fn new(gpu: &Gpu, d: &DeviceGla, chunk: usize) -> Plan {
        let (dk, dv) = (d.dk, d.dv);
        let bv = tuned_tile("FLA_CHUNK_BV", dv, 128);
        // One key tile up to 128 keys; past that, tiles of 64 (at 128 the larger shared memory
        // costs chunk_local a block on an SM and more time than it saves).
        let local_bk = if dk <= 128 { 128 } else { 64 };
        // chunk_dqk: value steps of up to 64 (FLA_DQK_BV forces one), 2 or 3 in flight:
        // fewer, longer steps beat more blocks an SM with steps of 16.
        let dqk_bv = tuned_tile("FLA_DQK_BV", dv, 64);
        Plan {
            local: Shape::key_tiled(gpu, "chunk_local", d, chunk, local_bk, bv),
            states: Shape::sweep(gpu, "chunk_states", d, chunk),
            out: Shape::key_tiled(gpu, "chunk_out", d, chunk, 128, bv),
            dstates: Shape::sweep(gpu, "chunk_dstates", d, chunk),
            dv: Shape::key_tiled(gpu, "chunk_dv", d, chunk, 128, bv),
            dqk: Shape::dqk(gpu, d, chunk, tile(dk, 64), dqk_bv),
            states_out: Shape::sweep_out(gpu, "chunk_states_out", d, chunk),
            dstates_dv: Shape::sweep_out(gpu, "chunk_dstates_dv", d, chunk),
        }
    }

    /// The plan for the first chunk size of `chunk_order` whose kernels all fit a block's
    /// shared memory.
    fn choose(gpu: &Gpu, d: &DeviceGla) -> Result<Plan> {
        chunk_order()
            .into_iter()
            .map(|c| Plan::new(gpu, d, c))
            .find(|p| p.shapes().iter().all(|s| s.fits(gpu)))
            .ok_or_else(|| {
                Error::Device(format!(
                    "head sizes K={}, V={} do not fit the GPU's shared memory",
                    d.dk, d.dv
                ))
            })
    }

    fn shapes(&self) -> [&Shape; 6] {
        [
            &self.local,
            &self.states,
            &self.out,
            &self.dstates,
            &self.dv,
            &self.dqk,
        ]
    }

    fn chunk(&self) -> usize {
        self.local.chunk
    }
}

fn s_event(
    gpu: &Gpu,
    flags: Option<cudarc::driver::sys::CUevent_flags>,
) -> Result<cudarc::driver::CudaEvent> {
    gpu.stream.record_event(flags).map_err(device_err("event"))
}

impl DeviceGla {
    fn two_level_defines(
        &self,
        kernel: &str,
        shape: &Shape,
        has_dht: bool,
        min_blocks: usize,
    ) -> Vec<(&'static str, i64)> {
        let index = KERNELS
            .iter()
            .position(|&k| k == kernel)
            .expect("a kernel of gla_chunk.cu");
        let mut d = self.defines(shape.chunk, shape.threads);
        d.extend([
            ("KERNEL", index as i64),
            ("MIN_BLOCKS", min_blocks as i64),
            ("BK", shape.bk as i64),
            ("BV", shape.bv as i64),
            ("STAGES", shape.stages as i64),
            ("HAS_DHT", i64::from(has_dht)),
        ]);
        if !shape.keep_slots {
            d.push(("KEEP_SLOTS", 0));
        }
        if shape.whole_sectors {
            d.push(("WHOLE_SECTORS", 1));
        }
        d
    }

    /// A sweep's grid: (sequences x state tiles, heads).
    fn sweep_grid(&self, shape: &Shape) -> (usize, usize, usize) {
        let tiles = (self.dk / shape.bk) * (self.dv / shape.bv);
        (self.n_seqs * tiles, self.h, 1)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_chunk_kernel(
        &self,
        gpu: &Gpu,
        name: &str,
        shape: &Shape,
        has_dht: bool,
        grid: (usize, usize, usize),
        ptrs: &[u64],
        scale: bool,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // Registers held to the occupancy that shared memory allows, at most 768 threads an SM
        // (85 registers a thread).
        let nt = shape.threads;
        let min_blocks = gpu.blocks_per_sm(shape.smem).min(768 / nt as usize).max(1);
        let defines = self.two_level_defines(name, shape, has_dht, min_blocks);
        let trace = std::env::var_os("FLA_TRACE_KERNELS").is_some();
        if trace {
            eprintln!("{name}: compiling or loading");
        }
        let f = gpu.function(SRC, name, &defines, shape.smem)?;
        if trace {
            // Registers, and local memory (spills) per thread, as the compiler left them.
            let (regs, local) = (f.num_regs(), f.local_size_bytes());
            eprintln!(
                "{name}: {} registers, {} bytes of local memory, {} bytes of shared memory",
                regs.unwrap_or(-1),
                local.unwrap_or(-1),
                shape.smem
            );
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (nt, 1, 1),
            shared_mem_bytes: shape.smem as u32,
        };
        let h = self.h as i32;
        let mut l = gpu.stream.launch_builder(&f);
        for p in ptrs {
            l.arg(p);
        }
        l.arg(&h);
        if scale {
            l.arg(&self.scale);
        }
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = if trace {
            Some(s_event(gpu, timed)?)
        } else {
            None
        };
        unsafe { l.launch(cfg) }.map_err(device_err("chunk kernel launch"))?;
        if let Some(start) = start {
            // Each launch waited for and timed, for finding a slow or failing kernel.
            let end = s_event(gpu, timed)?;
            end.synchronize().map_err(device_err(name))?;
            let ms = start.elapsed_ms(&end).map_err(device_err("event"))?;
            eprintln!(
                "{name} grid {grid:?} chunk {} tiles {}x{} {ms:.4} ms",
                shape.chunk, shape.bk, shape.bv
            );
        }
        Ok(())
    }

    /// The forward in two levels: states, attention matrices, outputs.
    pub(crate) fn forward_two_level(&mut self, gpu: &Gpu) -> Result<()> {
        self.two_level_local(gpu)?;
        self.two_level_sweep(gpu, true)
    }

    /// chunk_local: what every chunk gives on its own (A, Q̃, K̂, Γ), kept for the sweeps and
    /// the backward. Nothing it writes depends on the initial state.
    pub(crate) fn two_level_local(&mut self, gpu: &Gpu) -> Result<()> {
        let plan = Plan::choose(gpu, self)?;
        let chunk = plan.chunk();
        let chunks = Chunks::new(gpu, &self.lens, chunk)?;
        let n_chunks = chunks.count;
        // chunk_local writes every element of these (of attn, every element that is read);
        // the sweep writes the states.
        let states = Buf::uninit(
            gpu,
            (n_chunks * self.h * self.dk * self.dv).max(1),
            self.dtype,
        )?;
        let attn = Buf::uninit(gpu, (self.b * self.t * self.h * chunk).max(1), self.dtype)?;
        let gam = crate::gla::uninit(gpu, (n_chunks * self.h * self.dk).max(1))?;
        let gated = |d: &DeviceGla| match d.gate {
            GateKind::None => Ok(None),
            _ => Buf::uninit(gpu, (d.b * d.t * d.h * d.dk).max(1), d.dtype).map(Some),
        };
        let (qg, kh) = (gated(self)?, gated(self)?);
        let mut tl = TwoLevel {
            plan,
            chunks,
            states,
            gam,
            attn,
            qg,
            kh,
        };
        let [q, k, _, g, _, _, _] = self.input_ptrs(gpu);
        let s = &gpu.stream;
        let cu = self.cu_seqlens.device_ptr(s).0;
        let (off, seq) = (tl.chunks.off.device_ptr(s).0, tl.chunks.seq.device_ptr(s).0);
        let a = tl.attn.ptr_mut(gpu);
        let gam = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut tl.gam, s).0;
        let qg = tl.qg.as_mut().map_or(0, |b| b.ptr_mut(gpu));
        let kh = tl.kh.as_mut().map_or(0, |b| b.ptr_mut(gpu));
        self.launch_chunk_kernel(
            gpu,
            "chunk_local",
            &tl.plan.local,
            false,
            (n_chunks, self.h, 1),
            &[q, k, g, a, qg, kh, gam, cu, off, seq],
            true,
        )?;
        self.two_level = Some(tl);
        Ok(())
    }

    /// The state sweep from h0 after [`DeviceGla::two_level_local`]: with `outputs`, every
    /// chunk's starting state, ht and o; without, ht alone (sequence parallelism's first pass).
    pub(crate) fn two_level_sweep(&mut self, gpu: &Gpu, outputs: bool) -> Result<()> {
        let missing = || Error::Invalid("the state sweep needs chunk_local first".into());
        let st = self
            .two_level
            .as_mut()
            .ok_or_else(missing)?
            .states
            .ptr_mut(gpu);
        let o = self.o.ptr_mut(gpu);
        let s = &gpu.stream;
        let ht = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut self.ht, s).0;
        let tl = self.two_level.as_ref().ok_or_else(missing)?;
        let n_chunks = tl.chunks.count;
        let [q, k, v, _, _, _, h0] = self.input_ptrs(gpu);
        let cu = self.cu_seqlens.device_ptr(s).0;
        let (off, seq) = (tl.chunks.off.device_ptr(s).0, tl.chunks.seq.device_ptr(s).0);
        let a = tl.attn.ptr(gpu);
        let gam = tl.gam.device_ptr(s).0;
        let qg = tl.qg.as_ref().map_or(q, |b| b.ptr(gpu));
        let kh = tl.kh.as_ref().map_or(k, |b| b.ptr(gpu));
        let p = &tl.plan;
        if let (Some(shape), true) = (&p.states_out, outputs) {
            return self.launch_chunk_kernel(
                gpu,
                "chunk_states_out",
                shape,
                false,
                (self.n_seqs * (self.dv / shape.bv), self.h, 1),
                &[qg, kh, v, a, o, st, gam, h0, ht, cu, off],
                true,
            );
        }
        if !outputs {
            return self.launch_chunk_kernel(
                gpu,
                "chunk_states",
                &p.states.final_only(),
                false,
                self.sweep_grid(&p.states),
                &[kh, v, 0, gam, h0, ht, cu, off],
                false,
            );
        }
        self.launch_chunk_kernel(
            gpu,
            "chunk_states",
            &p.states,
            false,
            self.sweep_grid(&p.states),
            &[kh, v, st, gam, h0, ht, cu, off],
            false,
        )?;
        self.launch_chunk_kernel(
            gpu,
            "chunk_out",
            &p.out,
            false,
            (n_chunks * (self.dv / p.out.bv), self.h, 1),
            &[qg, v, st, a, o, cu, off, seq],
            true,
        )
    }

    /// The backward state sweep alone, after the two-level forward: from the upstream `dht`
    /// (a device address, or 0 for none), the gradient reaching h0 into `dh0` (f32
    /// [sequences, H, K, V]). The kernels write dh0 only where h0 is present.
    pub(crate) fn two_level_dh0(&self, gpu: &Gpu, d_o: &Buf, dht: u64, dh0: u64) -> Result<()> {
        let tl = self
            .two_level
            .as_ref()
            .ok_or_else(|| Error::Invalid("the GPU backward needs the forward run first".into()))?;
        if self.h0.is_none() {
            return Err(Error::Invalid(
                "the state gradient alone needs an initial state".into(),
            ));
        }
        let s = &gpu.stream;
        let cu = self.cu_seqlens.device_ptr(s).0;
        let off = tl.chunks.off.device_ptr(s).0;
        let qg = tl.qg.as_ref().unwrap_or(&self.q).ptr(gpu);
        let gam = tl.gam.device_ptr(s).0;
        // No chunk's dS' is kept.
        self.launch_chunk_kernel(
            gpu,
            "chunk_dstates",
            &tl.plan.dstates.final_only(),
            dht != 0,
            self.sweep_grid(&tl.plan.dstates),
            &[qg, d_o.ptr(gpu), 0, gam, dht, dh0, cu, off],
            true,
        )
    }

    /// Every chunk's total gate Γ [chunks, H, K] and where each sequence's chunks start, from
    /// the last two-level forward.
    pub(crate) fn chunk_gates(&self) -> Option<(&CudaSlice<f32>, &CudaSlice<i32>)> {
        self.two_level.as_ref().map(|tl| (&tl.gam, &tl.chunks.off))
    }

    /// The backward in two levels, after [`DeviceGla::forward_two_level`], with its chunks.
    pub(crate) fn backward_two_level(&mut self, gpu: &Gpu, up: &DeviceUpstream) -> Result<()> {
        self.backward_two_level_from(gpu, &up.d_o, up.dht.as_ref())
    }

    /// The backward in two levels from do and, if given, dht.
    pub(crate) fn backward_two_level_from(
        &mut self,
        gpu: &Gpu,
        d_o: &Buf,
        dht: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        if !matches!(
            self.grads,
            Some(DeviceGrads {
                work: Work::TwoLevel,
                ..
            })
        ) {
            self.grads = Some(self.alloc_grads(gpu, Work::TwoLevel)?);
        }
        let tl = self
            .two_level
            .as_ref()
            .ok_or_else(|| Error::Invalid("the GPU backward needs the forward run first".into()))?;
        let n_chunks = tl.chunks.count;
        // chunk_dstates writes every element.
        let mut dstates = Buf::uninit(
            gpu,
            (n_chunks * self.h * self.dk * self.dv).max(1),
            self.dtype,
        )?;
        let [q, k, v, g, _, _, _] = self.input_ptrs(gpu);
        let s = &gpu.stream;
        let cu = self.cu_seqlens.device_ptr(s).0;
        let (off, seq) = (tl.chunks.off.device_ptr(s).0, tl.chunks.seq.device_ptr(s).0);
        let (st, a) = (tl.states.ptr(gpu), tl.attn.ptr(gpu));
        let gam = tl.gam.device_ptr(s).0;
        let qg = tl.qg.as_ref().map_or(q, |b| b.ptr(gpu));
        let kh = tl.kh.as_ref().map_or(k, |b| b.ptr(gpu));
        let dst = dstates.ptr_mut(gpu);
        let (d_o, has_dht) = (d_o.ptr(gpu), dht.is_some());
        let dht = dht.map_or(0, |x| x.device_ptr(s).0);
        let (dk_, dv_) = (self.dk, self.dv);
        let gr = self.grads.as_mut().expect("allocated above");
        if let Some(x) = gr.dg_scalar.as_mut() {
            s.memset_zeros(x).map_err(device_err("memset"))?;
        }
        let (dq, dk, dv) = (gr.dq.ptr_mut(gpu), gr.dk.ptr_mut(gpu), gr.dv.ptr_mut(gpu));
        let dgk = gr.dgk.as_mut().map_or(0, |x| x.ptr_mut(gpu));
        let dgs = ptr_mut(&mut gr.dg_scalar, gpu);
        let dh0 = ptr_mut(&mut gr.dh0, gpu);

        let p = &tl.plan;
        if let Some(shape) = &p.dstates_dv {
            self.launch_chunk_kernel(
                gpu,
                "chunk_dstates_dv",
                shape,
                has_dht,
                (self.n_seqs * (dv_ / shape.bv), self.h, 1),
                &[kh, qg, d_o, a, dv, dst, gam, dht, dh0, cu, off],
                true,
            )?;
        } else {
            self.launch_chunk_kernel(
                gpu,
                "chunk_dstates",
                &p.dstates,
                has_dht,
                self.sweep_grid(&p.dstates),
                &[qg, d_o, dst, gam, dht, dh0, cu, off],
                true,
            )?;
            self.launch_chunk_kernel(
                gpu,
                "chunk_dv",
                &p.dv,
                has_dht,
                (n_chunks * (dv_ / p.dv.bv), self.h, 1),
                &[kh, d_o, a, dst, dv, cu, off, seq],
                false,
            )?;
        }
        self.launch_chunk_kernel(
            gpu,
            "chunk_dqk",
            &p.dqk,
            has_dht,
            (n_chunks * (dk_ / p.dqk.bk), self.h, 1),
            &[q, k, v, g, d_o, st, dst, dq, dk, dgk, dgs, cu, off, seq],
            true,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_order;

    #[test]
    fn chunks_of_64_rows_first_unless_forced() {
        match std::env::var("FLA_CHUNK").as_deref() {
            Ok("128") => assert_eq!(chunk_order(), [128, 64]),
            _ => assert_eq!(chunk_order(), [64, 128]),
        }
    }
}
