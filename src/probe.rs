//! Device probes: a 16-byte vectorized device-to-device copy, the memory roofline every
//! memory-bound kernel of the crate is reported against; a row reader with the gating kernels'
//! geometry, the floor of a gate's measured time (reading its logits, no selection); and an empty
//! kernel, the floor of any launch's measured time.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::context::{check_aligned16, check_status, prepare_launch, raw_stream};
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

/// Longest row [`read_rows`] takes, in bytes (a 2048-expert f32 logits row).
pub const READ_ROWS_MAX_BYTES: usize = ffi::MOEKIT_READ_ROWS_MAX_BYTES as usize;

/// Reads `src` as rows of `row_bytes` bytes (row-major, `src.len() / row_bytes` rows) the way the
/// gating kernels read their logits — one warp per row, four rows per 128-thread block, every
/// 16-byte vector of a row loaded at once — and writes `dst[row]` = the XOR of the row's
/// little-endian 32-bit words ([`crate::reference::probe::read_rows`]). The floor under any gate:
/// the same reads with no selection work.
///
/// `row_bytes`: a multiple of 16 from 16 to [`READ_ROWS_MAX_BYTES`] that divides `src.len()`;
/// `src` 16-byte aligned; `dst` at least one u32 per row.
pub fn read_rows(
    stream: &CudaStream,
    src: &impl DevicePtr<u8>,
    row_bytes: usize,
    dst: &mut impl DevicePtrMut<u32>,
) -> Result<()> {
    if row_bytes < 16 || row_bytes % 16 != 0 || row_bytes > READ_ROWS_MAX_BYTES {
        return Err(Error::invalid(
            "row_bytes",
            format!("{row_bytes}; must be a multiple of 16 from 16 to {READ_ROWS_MAX_BYTES}"),
        ));
    }
    if src.len() % row_bytes != 0 {
        return Err(Error::invalid(
            "src",
            format!(
                "{} bytes is not a whole number of {row_bytes}-byte rows",
                src.len()
            ),
        ));
    }
    let rows = src.len() / row_bytes;
    if dst.len() < rows {
        return Err(Error::shape("dst", format!("at least {rows}"), dst.len()));
    }
    if rows == 0 {
        return Ok(());
    }
    prepare_launch(stream)?;
    let (src_ptr, _src_guard) = src.device_ptr(stream);
    let (dst_ptr, _dst_guard) = dst.device_ptr_mut(stream);
    check_aligned16("src", src_ptr)?;
    let params = ffi::moekit_read_rows_params {
        src: src_ptr as *const _,
        dst: dst_ptr as *mut u32,
        rows: rows as i64,
        row_bytes: row_bytes as i32,
        _pad0: 0,
    };
    // SAFETY: src addresses rows x row_bytes bytes (checked above), 16-byte aligned; dst at least
    // `rows` u32; the guards keep both alive and ordered on `stream` until the launch is enqueued.
    let status = unsafe { ffi::moekit_read_rows(&params, raw_stream(stream)) };
    check_status(status, "launching the row-read probe")
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
