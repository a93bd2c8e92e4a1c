//! Hard limits on what an index may describe. Indexes come from registries (hostile input) and
//! drive allocations: the decoder refuses anything beyond these, and the builder never produces
//! it (a genuine layer beyond them cannot be served lazily and is refused with a clear error).
//!
//! A leaf module: it uses nothing of the crate, and the gzip indexer, the index format and
//! builder, and the cache tiers all check against it.

/// The uncompressed bytes of one span: one allocation when the span is read. A deflate block
/// from zlib, Go or pigz produces at most ~8 MiB, and checkpoints fall between blocks.
pub const MAX_SPAN: u64 = 32 << 20;
/// The compressed bytes of one span (one range request).
pub const MAX_SPAN_COMPRESSED: u64 = 2 * MAX_SPAN;
/// One zstd-compressed checkpoint window (32 KiB uncompressed).
pub const MAX_WINDOW_LEN: u32 = 64 << 10;
/// One zstd-compressed plain-zstd checkpoint (a dictionary of up to an 8 MiB window).
pub const MAX_CHECKPOINT_LEN: u32 = 9 << 20;
/// The decompressed entry table.
pub const MAX_TABLE: u64 = 64 << 20;
/// How much larger than its compressed bytes the entry table may claim to be.
pub const MAX_TABLE_RATIO: u64 = 256;
/// Entries in one layer.
pub const MAX_ENTRIES: u64 = 4 << 20;
/// A path or link target, in bytes (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// An extended attribute's name and value (Linux's XATTR_NAME_MAX and XATTR_SIZE_MAX).
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// The bytes of paths, targets and xattrs one table may decode to, per byte of table: front
/// coding shares prefixes, so paths legitimately outgrow the table, but not by this much.
pub const MAX_NAME_RATIO: u64 = 64;
/// A tar metadata entry (GNU long name or link, PAX header), which the tar reader buffers.
pub const MAX_TAR_META: u64 = 1 << 20;
