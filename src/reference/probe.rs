//! Reference of the bandwidth probe.

/// What [`crate::probe::copy_bytes`] must produce: `dst == src`.
pub fn copy_bytes(src: &[u8]) -> Vec<u8> {
    src.to_vec()
}
