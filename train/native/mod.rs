//! Native calls into libtorch that tch does not wrap, through small C++ files compiled by
//! `build.rs` against the headers of the same torch that tch links (see `train/native/*.cpp`).
//! Each C function returns 0 or 1 with a message; this module turns that into `Result`.
use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, CStr};

const ERR_LEN: usize = 1024;

extern "C" {
    fn clover_cuda_allocated_bytes(
        device: c_int,
        current: *mut i64,
        peak: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn clover_cuda_reset_peak(device: c_int, err: *mut c_char, err_len: usize) -> c_int;
}

/// Calls `f` with an error buffer and turns a non-zero return into an error naming `what`.
pub(crate) fn checked(what: &str, f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut err = [0 as c_char; ERR_LEN];
    if f(err.as_mut_ptr(), ERR_LEN) == 0 {
        return Ok(());
    }
    // SAFETY: the C side always NUL-terminates within ERR_LEN.
    let message = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
    let first_line = message.lines().next().unwrap_or("").trim();
    bail!("{what}: {first_line}")
}

/// Bytes the caching allocator has handed out on one CUDA device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaAllocated {
    pub current: i64,
    pub peak: i64,
}

/// The caching allocator's current and peak allocated bytes on CUDA device `index`.
pub fn cuda_allocated_bytes(index: usize) -> Result<CudaAllocated> {
    let (mut current, mut peak) = (0i64, 0i64);
    checked(
        &format!("CUDA allocator statistics of cuda:{index}"),
        |err, len| {
            // SAFETY: the pointers are valid for the call; the C side writes only on success.
            unsafe {
                clover_cuda_allocated_bytes(index as c_int, &mut current, &mut peak, err, len)
            }
        },
    )?;
    Ok(CudaAllocated { current, peak })
}

/// Resets the peak of `cuda_allocated_bytes` to the current allocation.
pub fn cuda_reset_peak(index: usize) -> Result<()> {
    checked(
        &format!("resetting the CUDA allocator peak of cuda:{index}"),
        |err, len| {
            // SAFETY: the buffer is valid for the call.
            unsafe { clover_cuda_reset_peak(index as c_int, err, len) }
        },
    )
}

/// A c10d process group (train/native/c10d.cpp): the TCPStore rendezvous and a Gloo or NCCL
/// backend. Collectives block until done, fail or time out.
pub struct ProcessGroup {
    raw: *mut CloverPg,
}

#[repr(C)]
struct CloverPg {
    _opaque: [u8; 0],
}

extern "C" {
    fn clover_pg_new(
        backend: *const c_char,
        host: *const c_char,
        port: c_int,
        serve: c_int,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        out: *mut *mut CloverPg,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn clover_pg_free(pg: *mut CloverPg);
    fn clover_pg_allreduce(
        pg: *mut CloverPg,
        tensors: *const *mut std::ffi::c_void,
        n: usize,
        average: c_int,
        bucket_bytes: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn clover_pg_broadcast(
        pg: *mut CloverPg,
        tensors: *const *mut std::ffi::c_void,
        n: usize,
        root: c_int,
        bucket_bytes: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn clover_pg_barrier(pg: *mut CloverPg, err: *mut c_char, err_len: usize) -> c_int;
}

/// How a group is joined: rank `rank` of `world`, rendezvous at rank 0's `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec<'a> {
    /// "gloo" or "nccl".
    pub backend: &'a str,
    pub host: &'a str,
    pub port: u16,
    /// Some(prefix) when a launcher's agent serves the store (torchrun): every rank is a
    /// client and keys live under the prefix. None: rank 0 serves it.
    pub agent_store: Option<&'a str>,
    pub rank: usize,
    pub world: usize,
    pub timeout: std::time::Duration,
}

/// The raw `at::Tensor*` of each tensor, as the C side takes them.
fn raw_tensors(tensors: &[&tch::Tensor]) -> Vec<*mut std::ffi::c_void> {
    tensors
        .iter()
        .map(|t| t.as_ptr() as *mut std::ffi::c_void)
        .collect()
}

impl ProcessGroup {
    /// Joins the group (blocks until every rank has joined, or fails after the timeout).
    pub fn join(spec: &GroupSpec) -> Result<Self> {
        let backend = std::ffi::CString::new(spec.backend)?;
        let host = std::ffi::CString::new(spec.host)?;
        let prefix = std::ffi::CString::new(spec.agent_store.unwrap_or(""))?;
        let serve = spec.agent_store.is_none() && spec.rank == 0;
        let mut raw = std::ptr::null_mut();
        let what = format!(
            "rank {} of {}: joining the {} process group at {}:{}",
            spec.rank, spec.world, spec.backend, spec.host, spec.port
        );
        checked(&what, |err, len| {
            // SAFETY: the strings and the out pointer are valid for the call.
            unsafe {
                clover_pg_new(
                    backend.as_ptr(),
                    host.as_ptr(),
                    c_int::from(spec.port),
                    c_int::from(serve),
                    prefix.as_ptr(),
                    spec.rank as c_int,
                    spec.world as c_int,
                    spec.timeout.as_millis() as i64,
                    &mut raw,
                    err,
                    len,
                )
            }
        })?;
        Ok(ProcessGroup { raw })
    }

    /// Sums `tensors` over all ranks in place (`average`: then divides by the world size), one
    /// reduction per bucket of at most `bucket_bytes`.
    pub fn all_reduce(
        &self,
        tensors: &[&tch::Tensor],
        average: bool,
        bucket_bytes: usize,
    ) -> Result<()> {
        let raw = raw_tensors(tensors);
        checked("data-parallel run", |err, len| {
            // SAFETY: `raw` holds live at::Tensor pointers owned by `tensors` for the call.
            unsafe {
                clover_pg_allreduce(
                    self.raw,
                    raw.as_ptr(),
                    raw.len(),
                    c_int::from(average),
                    bucket_bytes as i64,
                    err,
                    len,
                )
            }
        })
    }

    /// Overwrites `tensors` with rank `root`'s, one broadcast per bucket of at most `bucket_bytes`.
    pub fn broadcast(
        &self,
        tensors: &[&tch::Tensor],
        root: usize,
        bucket_bytes: usize,
    ) -> Result<()> {
        let raw = raw_tensors(tensors);
        checked("data-parallel run", |err, len| {
            // SAFETY: as in `all_reduce`.
            unsafe {
                clover_pg_broadcast(
                    self.raw,
                    raw.as_ptr(),
                    raw.len(),
                    root as c_int,
                    bucket_bytes as i64,
                    err,
                    len,
                )
            }
        })
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the buffer is valid for the call.
        checked("data-parallel run", |err, len| unsafe {
            clover_pg_barrier(self.raw, err, len)
        })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from clover_pg_new and is freed once.
        unsafe { clover_pg_free(self.raw) }
    }
}
