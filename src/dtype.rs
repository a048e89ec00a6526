//! Element types that cross the kernel ABI.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

use crate::ffi;

/// Floating-point element types of moekit's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// bfloat16 (8 exponent bits, 7 mantissa bits).
    BF16,
    /// IEEE binary16.
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
        }
    }

    pub(crate) fn code(self) -> i32 {
        (match self {
            Dtype::F32 => ffi::MOEKIT_DTYPE_F32,
            Dtype::BF16 => ffi::MOEKIT_DTYPE_BF16,
            Dtype::F16 => ffi::MOEKIT_DTYPE_F16,
        }) as i32
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// A floating-point element type a kernel can read or write: `f32`, [`half::bf16`] or
/// [`half::f16`]. Sealed: the kernels are instantiated for exactly these.
pub trait Element:
    DeviceRepr
    + ValidAsZeroBits
    + Copy
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + sealed::Sealed
    + 'static
{
    /// The dtype tag passed to the kernels.
    const DTYPE: Dtype;
    /// Converts to f32 exactly.
    fn to_f32(self) -> f32;
    /// Converts from f32, rounding to nearest even.
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}
