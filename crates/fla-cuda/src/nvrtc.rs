//! Kernel sources compiled at first use by NVRTC for the device's architecture, to a cubin
//! cached on disk under a key made of the source, the options and the NVRTC version.

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result, sys};
use fla_tensor::{Error, Result};

/// FNV-1a, 64 bits: a stable hash for cache keys (std's hasher may change between releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// `$FLA_CACHE_DIR`, else `$XDG_CACHE_HOME/fla/kernels`, else `~/.cache/fla/kernels`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("FLA_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("fla").join("kernels"))
}

pub fn version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Device(format!("libnvrtc does not answer its version: {e:?}")))?;
    Ok((major, minor))
}

/// The cubin of `source` for `arch` (e.g. "sm_90a") with `options`; from the disk cache when
/// it holds one. A cache that cannot be written is skipped, never an error.
pub fn compile(source: &str, arch: &str, options: &[String]) -> Result<Vec<u8>> {
    let (major, minor) = version()?;
    let nvrtc = format!("{major}.{minor}");
    let opts: Vec<&[u8]> = options.iter().map(|o| o.as_bytes()).collect();
    let mut parts = vec![source.as_bytes(), arch.as_bytes(), nvrtc.as_bytes()];
    parts.extend(opts);
    let key = format!("{:016x}-{arch}.cubin", fnv1a(&parts));
    let cached = cache_dir().map(|d| d.join(&key));
    if let Some(Ok(bytes)) = cached.as_ref().map(std::fs::read) {
        return Ok(bytes);
    }
    let started = std::time::Instant::now();
    let cubin = compile_uncached(source, arch, options)?;
    if std::env::var_os("FLA_TRACE_KERNELS").is_some() {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        eprintln!(
            "nvrtc: {ms:.0} ms to compile for {arch} with {}",
            options.join(" ")
        );
    }
    if let Some(path) = cached {
        store(&path, &cubin);
    }
    Ok(cubin)
}

/// Writes the cache file atomically (temp file, then rename); failures are ignored.
fn store(path: &std::path::Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn compile_uncached(source: &str, arch: &str, options: &[String]) -> Result<Vec<u8>> {
    let src = CString::new(source).expect("kernel sources hold no NUL");
    let prog = result::create_program(&src, None)
        .map_err(|e| Error::Device(format!("NVRTC could not create a program: {e:?}")))?;
    let mut opts = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    opts.extend(options.iter().cloned());
    let out = (|| {
        if let Err(e) = unsafe { result::compile_program(prog, &opts) } {
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| {
                    unsafe { CStr::from_ptr(l.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            return Err(Error::Device(format!(
                "NVRTC failed ({e:?}) for {arch} with {opts:?}:\n{log}"
            )));
        }
        let mut size = 0usize;
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
            .result()
            .map_err(|e| Error::Device(format!("NVRTC gave no cubin for {arch}: {e:?}")))?;
        let mut cubin = vec![0u8; size];
        unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| Error::Device(format!("NVRTC gave no cubin for {arch}: {e:?}")))?;
        Ok(cubin)
    })();
    let _ = unsafe { result::destroy_program(prog) };
    out
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    #[test]
    fn cache_keys_separate_parts() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[b"x"]), fnv1a(&[b"x"]));
    }
}
