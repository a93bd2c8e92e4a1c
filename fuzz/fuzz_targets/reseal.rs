//! Shared by the index fuzz targets: fuzz input as an index the decoder gets past the checksum of.

use clip_core::index::format;

/// `data` with a valid checksum: a mutated whole index (a seed from fuzz/seeds/, starting with
/// the magic) has its checksum made right again; anything else is taken as the body after the
/// magic and version. `None` for inputs too short to be either.
pub fn reseal(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 16 {
        return None;
    }
    let mut sealed = Vec::with_capacity(data.len() + 48);
    if data.len() >= 48 && data.starts_with(format::MAGIC) {
        sealed.extend_from_slice(&data[..data.len() - 32]);
    } else {
        sealed.extend_from_slice(format::MAGIC);
        sealed.extend_from_slice(&format::VERSION.to_le_bytes());
        sealed.extend_from_slice(data);
    }
    let sum = clip_core::Digest::of(&sealed);
    sealed.extend_from_slice(sum.as_bytes());
    Some(sealed)
}
