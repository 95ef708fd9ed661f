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
