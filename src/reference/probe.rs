//! Reference of the device probes.

/// What [`crate::probe::copy_bytes`] must produce: `dst == src`.
pub fn copy_bytes(src: &[u8]) -> Vec<u8> {
    src.to_vec()
}

/// What [`crate::probe::read_rows`] must produce: for each `row_bytes`-byte row of `src`, the XOR
/// of its little-endian 32-bit words.
pub fn read_rows(src: &[u8], row_bytes: usize) -> Vec<u32> {
    src.chunks_exact(row_bytes)
        .map(|row| {
            row.chunks_exact(4).fold(0u32, |x, w| {
                x ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]])
            })
        })
        .collect()
}
