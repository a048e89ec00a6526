//! The crate's error type.

use cudarc::driver::DriverError;

/// Everything a moekit call can fail with. Messages say what went wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A CUDA runtime or driver call failed.
    #[error("CUDA error {code} ({name}: {description}) while {during}")]
    Cuda {
        /// `cudaError_t` or `CUresult` value.
        code: i32,
        /// Symbolic name, e.g. `cudaErrorIllegalAddress`.
        name: String,
        /// CUDA's description of the error.
        description: String,
        /// What moekit was doing.
        during: String,
    },
    /// A tensor has the wrong number of elements for the shape the call implies.
    #[error("shape mismatch for `{arg}`: expected {expected}, got {actual}")]
    Shape {
        /// The argument's name.
        arg: &'static str,
        /// What the call needed.
        expected: String,
        /// What it was given.
        actual: String,
    },
    /// An argument is out of its valid range or inconsistent with another one.
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        arg: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The configuration is valid in general but outside what moekit's kernels support.
    #[error("unsupported: {what} (limit: {limit})")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// The limit it exceeds.
        limit: String,
    },
    /// A checkpoint could not be read or does not hold what the call needs.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The crate was compiled without its CUDA kernels (docs-only build).
    #[error(
        "moekit was built without its CUDA kernels (DOCS_RS was set at build time); \
         rebuild with nvcc available (./scripts/install-cuda.sh installs it)"
    )]
    KernelsNotBuilt,
    /// No usable GPU: no driver, no device, or not a Hopper device.
    #[error("no usable CUDA GPU: {0}")]
    NoGpu(String),
    /// The linked kernel library and the generated bindings disagree (a stale build).
    #[error("moekit's kernel library has ABI version {library} but its bindings expect {bindings}: run `cargo clean -p moekit` and rebuild")]
    AbiMismatch {
        /// Version reported by the linked library.
        library: i32,
        /// Version the Rust bindings were generated for.
        bindings: i32,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(arg: &'static str, expected: impl ToString, actual: impl ToString) -> Self {
        Error::Shape {
            arg,
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }

    pub(crate) fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg,
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(what: impl Into<String>, limit: impl Into<String>) -> Self {
        Error::Unsupported {
            what: what.into(),
            limit: limit.into(),
        }
    }

    pub(crate) fn driver(e: DriverError, during: impl Into<String>) -> Self {
        // SAFETY: only probes whether libcuda loads; naming the error needs it (cudarc panics
        // without it).
        let driver = unsafe { cudarc::driver::sys::is_culib_present() };
        let text = |r: std::result::Result<&std::ffi::CStr, DriverError>| {
            r.map(|s| s.to_string_lossy().into_owned()).ok()
        };
        let (name, description) = if driver {
            (text(e.error_name()), text(e.error_string()))
        } else {
            (None, None)
        };
        Error::Cuda {
            code: e.0 as i32,
            name: name.unwrap_or_else(|| format!("{:?}", e.0)),
            description: description
                .unwrap_or_else(|| "no description: the driver is not loaded".into()),
            during: during.into(),
        }
    }
}

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::driver(e, "calling the CUDA driver")
    }
}

/// Adds what was being done to a CUDA driver error.
pub(crate) trait DuringExt<T> {
    fn during(self, what: &str) -> Result<T>;
}

impl<T> DuringExt<T> for std::result::Result<T, DriverError> {
    fn during(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::driver(e, what))
    }
}
