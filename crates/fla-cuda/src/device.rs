//! One GPU: its context and stream, its architecture, and the kernels loaded on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute_enum as Attr;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use fla_tensor::{Error, Result};

use crate::nvrtc;

/// Where to run: `auto` takes the first GPU when one is usable, else the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(Error::Invalid(format!(
                    "unknown device `{s}`: expected auto, cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

pub(crate) fn device_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e:?}"))
}

pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    name: String,
    arch: String,
    max_smem: usize,
    smem_per_sm: usize,
    sms: usize,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
}

impl Gpu {
    /// Opens GPU `ordinal`, or says in one line what is missing: the driver library, the
    /// device, NVRTC, or a GPU older than sm_80 (the kernels use bf16 tensor-core MMA).
    pub fn new(ordinal: usize) -> Result<Gpu> {
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no NVIDIA driver library (libcuda.so) on this machine".into(),
            ));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(Error::Device(
                "no NVRTC library (libnvrtc.so) found: install the CUDA runtime compiler or add it to LD_LIBRARY_PATH".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(device_err("the driver lists no GPUs"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device(format!(
                "no GPU cuda:{ordinal} (this machine has {count})"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(device_err("cannot open the GPU"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(device_err("no compute capability"))?;
        if major < 8 {
            return Err(Error::Device(format!(
                "GPU compute capability {major}.{minor} is not supported (sm_80 or newer needed)"
            )));
        }
        let arch = match (major, minor) {
            (9, 0) => "sm_90a".to_string(),
            _ => format!("sm_{major}{minor}"),
        };
        let max_smem = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(device_err("no shared-memory limit"))? as usize;
        let smem_per_sm = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)
            .map_err(device_err("no shared-memory size"))? as usize;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(device_err("no multiprocessor count"))? as usize;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        keep_freed_memory(&ctx)?;
        // Every stream's order is kept by hand: the kernels take raw addresses, and a second
        // stream (a communicator's) must not make cudarc wait on every buffer it has touched.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Gpu {
            ctx,
            stream,
            name,
            arch,
            max_smem,
            smem_per_sm,
            sms,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// The GPU's name and architecture, e.g. "NVIDIA H100 80GB HBM3 (sm_90a)".
    pub fn describe(&self) -> String {
        format!("{} ({})", self.name, self.arch)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The most dynamic shared memory one block may take.
    pub fn max_smem(&self) -> usize {
        self.max_smem
    }

    /// How many blocks of `smem` bytes of dynamic shared memory fit on one multiprocessor
    /// (each block also takes 1 KB that the driver reserves), at least one.
    pub fn blocks_per_sm(&self, smem: usize) -> usize {
        (self.smem_per_sm / (smem + 1024)).max(1)
    }

    /// The number of streaming multiprocessors.
    pub fn sms(&self) -> usize {
        self.sms
    }

    /// Kernel `name` of `source` compiled with `defines` (one module per source and set of
    /// defines, holding all its kernels), allowed `smem` bytes of dynamic shared memory.
    pub(crate) fn function(
        &self,
        source: &'static str,
        name: &str,
        defines: &[(&str, i64)],
        smem: usize,
    ) -> Result<CudaFunction> {
        let options: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
        // A source is a static string, so its address names it within the process.
        let key = format!("{:p}:{}", source.as_ptr(), options.join(" "));
        let module = {
            let mut modules = self.modules.lock().unwrap();
            match modules.get(&key) {
                Some(m) => m.clone(),
                None => {
                    let cubin = nvrtc::compile(source, &self.arch, &options)?;
                    let m = self
                        .ctx
                        .load_module(Ptx::from_binary(cubin))
                        .map_err(device_err("cannot load the compiled kernels"))?;
                    modules.insert(key, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(device_err("kernel missing from its module"))?;
        if smem > self.max_smem {
            return Err(Error::Device(format!(
                "kernel {name} needs {smem} bytes of shared memory, the GPU allows {}",
                self.max_smem
            )));
        }
        f.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(device_err("cannot raise the shared-memory limit"))?;
        Ok(f)
    }

    /// The median time in ms of `reps` runs of `f`, each between two device events, after
    /// `warmup` untimed runs (compilation and first-touch stay out of the numbers).
    pub fn time_ms(
        &self,
        warmup: usize,
        reps: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = self
                .stream
                .record_event(flags)
                .map_err(device_err("event"))?;
            f()?;
            let end = self
                .stream
                .record_event(flags)
                .map_err(device_err("event"))?;
            end.synchronize().map_err(device_err("a kernel failed"))?;
            times.push(f64::from(
                start.elapsed_ms(&end).map_err(device_err("event"))?,
            ));
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(device_err("a kernel failed"))
    }
}

/// Makes the device's stream-ordered memory pool keep what is freed instead of handing it
/// back to the system at every synchronisation (the driver's default release threshold is
/// 0), so that a training step reuses the previous step's activation memory rather than
/// unmapping and remapping gigabytes each time.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    let err = device_err("cannot configure the GPU memory pool");
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(&err)?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(&err)
    }
}

/// The usable GPU for a choice: None for the CPU, an error when CUDA was asked for and
/// cannot run.
pub fn open(choice: DeviceChoice) -> Result<Option<Gpu>> {
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Cuda(n) => Gpu::new(n).map(Some),
        DeviceChoice::Auto => Ok(Gpu::new(0).ok()),
    }
}
