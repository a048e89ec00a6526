//! The device bandwidth probe: a 16-byte vectorized device-to-device copy, the memory roofline
//! every memory-bound kernel of the crate is reported against, and an empty kernel, the floor of
//! any launch's measured time.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::context::{check_status, prepare_launch, raw_stream};
use crate::error::{Error, Result};
use crate::ffi;

/// Copies `src` into `dst` (equal lengths, bytes) on `stream`. Uses 16-byte loads and stores when
/// both start 16-byte aligned, byte copies otherwise. A copy of n bytes moves 2n bytes through
/// device memory.
pub fn copy_bytes(
    stream: &CudaStream,
    src: &impl DevicePtr<u8>,
    dst: &mut impl DevicePtrMut<u8>,
) -> Result<()> {
    if src.len() != dst.len() {
        return Err(Error::shape("dst", src.len(), dst.len()));
    }
    prepare_launch(stream)?;
    let (src_ptr, _src_guard) = src.device_ptr(stream);
    let (dst_ptr, _dst_guard) = dst.device_ptr_mut(stream);
    let params = ffi::moekit_copy_params {
        src: src_ptr as *const _,
        dst: dst_ptr as *mut _,
        n_bytes: src.len() as u64,
    };
    // SAFETY: both pointers address `len` bytes of device memory owned by the borrowed buffers,
    // which the guards keep alive (and ordered on `stream`) until after the launch is enqueued;
    // `&mut dst` rules out overlap with `src`.
    let status = unsafe { ffi::moekit_copy_bytes(&params, raw_stream(stream)) };
    check_status(status, "launching the copy probe")
}

/// Launches one block of 32 threads that does nothing.
pub fn empty_launch(stream: &CudaStream) -> Result<()> {
    prepare_launch(stream)?;
    // SAFETY: the kernel takes no arguments and touches no memory.
    let status = unsafe { ffi::moekit_empty_kernel(raw_stream(stream)) };
    check_status(status, "launching the empty kernel")
}

/// Enqueues one thread that spins for `micros` microseconds of device time. Benchmarks put it
/// before a timed launch, so the host's enqueue latency overlaps it and CUDA events around the
/// launch measure the device alone.
pub fn busy_wait(stream: &CudaStream, micros: f64) -> Result<()> {
    prepare_launch(stream)?;
    // SAFETY: the kernel takes a duration and touches no memory.
    let status = unsafe { ffi::moekit_busy_wait((micros * 1e3) as u64, raw_stream(stream)) };
    check_status(status, "launching the busy-wait kernel")
}
