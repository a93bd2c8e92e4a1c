//! Follows the tar headers in an uncompressed layer stream as it passes, without parsing the
//! archive: the indexer uses it for a density hint (the size of the entry at an offset), the
//! builder to refuse hostile metadata entries before the tar reader buffers them. A stream that
//! is not tar just yields meaningless headers; nothing here trusts them.

#[derive(Default)]
pub(crate) struct TarTrack {
    /// Offset of the next header.
    next_header: u64,
    /// The part of the next header seen so far.
    carry: Vec<u8>,
    /// Size of the entry whose header and data end at `entry_end`.
    entry_size: u64,
    entry_end: u64,
}

impl TarTrack {
    /// Notes `out`, the uncompressed bytes at offset `at`; calls `header(typeflag, size)` for
    /// each header completed, and stops at its first error.
    pub(crate) fn feed<E>(
        &mut self,
        at: u64,
        out: &[u8],
        mut header: impl FnMut(u8, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = at + out.len() as u64;
        loop {
            // The next header byte not yet seen.
            let pos = self.next_header + self.carry.len() as u64;
            if pos >= end || pos < at {
                return Ok(());
            }
            let start = (pos - at) as usize;
            let take = (512 - self.carry.len()).min(out.len() - start);
            self.carry.extend_from_slice(&out[start..start + take]);
            if self.carry.len() < 512 {
                return Ok(());
            }
            let size = tar_size(&self.carry);
            let flag = self.carry[156];
            self.carry.clear();
            let data_end = self
                .next_header
                .saturating_add(512)
                .saturating_add(size.saturating_add(511) & !511);
            self.entry_size = size;
            self.entry_end = data_end;
            self.next_header = data_end;
            header(flag, size)?;
        }
    }

    /// Size of the entry whose header or data holds `offset` (0 when unknown).
    pub(crate) fn entry_size_at(&self, offset: u64) -> u64 {
        if offset < self.entry_end {
            self.entry_size
        } else {
            0
        }
    }
}

/// The size field of a tar header: octal digits, or base-256 when the high bit is set.
fn tar_size(h: &[u8]) -> u64 {
    let f = &h[124..136];
    if f[0] & 0x80 != 0 {
        return f[1..].iter().fold(0u64, |v, &b| {
            v.saturating_mul(256).saturating_add(u64::from(b))
        });
    }
    f.iter()
        .skip_while(|&&b| b == b' ' || b == 0)
        .take_while(|&&b| (b'0'..=b'7').contains(&b))
        .fold(0u64, |v, &b| {
            v.saturating_mul(8).saturating_add(u64::from(b - b'0'))
        })
}
