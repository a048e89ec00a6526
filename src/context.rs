//! The device handle and the checks every launch goes through.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream};

use crate::error::{DuringExt, Error, Result};
use crate::ffi;

/// A Hopper GPU and a stream on it, checked once: the driver loads, the device exists, it has
/// compute capability 9.0 (the kernels are built for `sm_90a`), and the linked kernel library
/// matches its bindings.
///
/// Launch functions take any [`CudaStream`] of a checked device; [`Context::stream`] is a
/// non-blocking stream created with the context.
#[derive(Debug, Clone)]
pub struct Context {
    cuda: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    sm_count: usize,
    l2_bytes: usize,
}

impl Context {
    /// Opens device `ordinal` (0 for the first GPU).
    pub fn new(ordinal: usize) -> Result<Self> {
        if !cfg!(moekit_kernels_built) {
            return Err(Error::KernelsNotBuilt);
        }
        // SAFETY: only probes whether libcuda can be dlopen'ed; cudarc panics on first use otherwise.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoGpu(
                "the NVIDIA driver library libcuda.so could not be loaded".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoGpu(format!("the CUDA driver reports no device ({e})")))?;
        if count <= 0 {
            return Err(Error::NoGpu("the CUDA driver reports no device".into()));
        }
        if ordinal >= count as usize {
            return Err(Error::invalid(
                "ordinal",
                format!("device {ordinal} requested, {count} present"),
            ));
        }
        let cuda = CudaContext::new(ordinal).during("creating the CUDA context")?;
        let name = cuda.name().unwrap_or_else(|_| "unknown GPU".into());
        check_capability(&cuda, &name)?;
        check_abi()?;
        let attr = |a| cuda.attribute(a).during("reading a device attribute");
        let sm_count =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let l2_bytes = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize;
        let stream = cuda.new_stream().during("creating a stream")?;
        Ok(Self {
            cuda,
            stream,
            name,
            sm_count,
            l2_bytes,
        })
    }

    /// The cudarc context (the device's primary context, shared with the CUDA runtime).
    pub fn cuda(&self) -> &Arc<CudaContext> {
        &self.cuda
    }

    /// The context's stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Another non-blocking stream on the same device.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.cuda.new_stream().during("creating a stream")
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Number of streaming multiprocessors (132 on an H200).
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// L2 cache size in bytes (60 MB on an H200).
    pub fn l2_bytes(&self) -> usize {
        self.l2_bytes
    }

    /// Waits for all work on the context's stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().during("synchronizing the stream")
    }
}

fn check_capability(cuda: &CudaContext, name: &str) -> Result<()> {
    let (major, minor) = cuda
        .compute_capability()
        .during("reading the compute capability")?;
    if (major, minor) != (9, 0) {
        return Err(Error::unsupported(
            format!("{name} has compute capability {major}.{minor}"),
            "the kernels are built for sm_90a and run only on compute capability 9.0 (H100, H200)",
        ));
    }
    Ok(())
}

fn check_abi() -> Result<()> {
    // SAFETY: a pure function of the linked library, no arguments.
    let library = unsafe { ffi::moekit_abi_version() };
    let bindings = ffi::MOEKIT_ABI_VERSION as i32;
    if library != bindings {
        return Err(Error::AbiMismatch { library, bindings });
    }
    Ok(())
}

/// Per-device result of the capability check, so launches on streams that did not come from a
/// [`Context`] are checked once per device: 0 unknown, 1 supported, 2 not.
static DEVICE_CHECKED: [AtomicU8; 64] = [const { AtomicU8::new(0) }; 64];

/// Makes `stream`'s context current on this thread (the CUDA runtime inside the kernel library
/// launches into the current context) after checking, once per device, that it is a Hopper GPU.
pub(crate) fn prepare_launch(stream: &CudaStream) -> Result<()> {
    if !cfg!(moekit_kernels_built) {
        return Err(Error::KernelsNotBuilt);
    }
    let cuda = stream.context();
    let ordinal = cuda.ordinal();
    let state = DEVICE_CHECKED
        .get(ordinal)
        .map(|s| s.load(Ordering::Relaxed))
        .unwrap_or(0);
    if state != 1 {
        let name = cuda.name().unwrap_or_else(|_| "unknown GPU".into());
        let checked = check_capability(cuda, &name).and_then(|_| check_abi());
        if let Some(s) = DEVICE_CHECKED.get(ordinal) {
            s.store(if checked.is_ok() { 1 } else { 2 }, Ordering::Relaxed);
        }
        checked?;
    }
    cuda.bind_to_thread()
        .during("making the stream's context current")
}

/// Converts a launcher's status into a `Result`.
pub(crate) fn check_status(status: ffi::moekit_status, during: &str) -> Result<()> {
    match status {
        0 => Ok(()),
        s if s > 0 => {
            // SAFETY: cudaGetErrorName/String return static strings for any code.
            let (name, description) = unsafe {
                (
                    CStr::from_ptr(ffi::moekit_cuda_error_name(s)),
                    CStr::from_ptr(ffi::moekit_cuda_error_string(s)),
                )
            };
            Err(Error::Cuda {
                code: s,
                name: name.to_string_lossy().into_owned(),
                description: description.to_string_lossy().into_owned(),
                during: during.to_string(),
            })
        }
        s if s == ffi::MOEKIT_ERR_UNSUPPORTED => Err(Error::unsupported(
            format!("the kernel launcher refused the configuration while {during}"),
            "see the launcher's header in kernels/include/moekit",
        )),
        _ => Err(Error::invalid(
            "params",
            format!("the kernel launcher refused its arguments while {during} (a moekit bug: the Rust checks should have caught this)"),
        )),
    }
}

/// The raw stream handle for the C ABI (`cudaStream_t` and `CUstream` are the same pointer).
pub(crate) fn raw_stream(stream: &CudaStream) -> ffi::moekit_stream {
    stream.cu_stream() as ffi::moekit_stream
}

/// The device address inside an optional `(pointer, guard)` pair, or null.
pub(crate) fn ptr_or_null<G>(p: &Option<(sys::CUdeviceptr, G)>) -> sys::CUdeviceptr {
    p.as_ref().map_or(0, |(ptr, _)| *ptr)
}

/// Refuses a device pointer (of bf16 elements) that is not 16-byte aligned: the kernels move rows in
/// 16-byte vectors and TMA boxes.
pub(crate) fn check_aligned16(arg: &'static str, ptr: sys::CUdeviceptr) -> Result<()> {
    if ptr % 16 != 0 {
        return Err(Error::invalid(
            arg,
            "must start 16-byte aligned: slice at a multiple of 8 elements",
        ));
    }
    Ok(())
}
