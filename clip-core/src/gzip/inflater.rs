//! A safe owner of one zlib inflate stream.

use super::GzipError;
use libz_rs_sys as z;
use std::ffi::CStr;

/// Window bits for a raw deflate stream (no header).
pub const RAW: i32 = -15;
/// Window bits for a gzip member (header and trailer parsed and checked by zlib).
pub const GZIP: i32 = 31;

pub struct Inflater {
    // Boxed: zlib's state keeps a pointer back to the stream, so it must never move.
    strm: Box<z::z_stream>,
}

/// The outcome of one `inflate` call.
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The member's deflate stream ended (`Z_STREAM_END`).
    pub stream_end: bool,
    /// zlib's `data_type` after the call.
    pub data_type: i32,
}

// SAFETY: the stream owns its state exclusively; nothing in it is tied to a thread.
unsafe impl Send for Inflater {}

impl Inflater {
    pub fn new(window_bits: i32) -> Result<Self, GzipError> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a valid, default-initialised z_stream with allocators set by Default.
        let ret = unsafe {
            z::inflateInit2_(
                &mut *strm,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if ret != z::Z_OK {
            return Err(GzipError::Zlib(format!("inflateInit2 failed ({ret})")));
        }
        Ok(Inflater { strm })
    }

    pub fn reset(&mut self, window_bits: i32) -> Result<(), GzipError> {
        // SAFETY: the stream was initialised by inflateInit2_.
        let ret = unsafe { z::inflateReset2(&mut *self.strm, window_bits) };
        check(ret, "inflateReset2")
    }

    pub fn prime(&mut self, bits: u8, value: u8) -> Result<(), GzipError> {
        // SAFETY: initialised stream; bits <= 7.
        let ret = unsafe { z::inflatePrime(&mut *self.strm, bits as i32, value as i32) };
        check(ret, "inflatePrime")
    }

    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), GzipError> {
        if dict.is_empty() {
            return Ok(());
        }
        // SAFETY: dict is a valid slice for its length.
        let ret =
            unsafe { z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as u32) };
        check(ret, "inflateSetDictionary")
    }

    /// The last (up to) 32 KiB of output, the window a checkpoint needs.
    pub fn dictionary(&self) -> Result<Vec<u8>, GzipError> {
        let mut buf = vec![0u8; super::WINDOW_SIZE];
        let mut len: u32 = 0;
        // SAFETY: buf has room for 32 KiB, the most zlib ever returns.
        let ret = unsafe { z::inflateGetDictionary(&*self.strm, buf.as_mut_ptr(), &mut len) };
        check(ret, "inflateGetDictionary")?;
        buf.truncate(len as usize);
        Ok(buf)
    }

    /// One call to `inflate` with `flush` (`Z_BLOCK` or `Z_NO_FLUSH`).
    pub fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> Result<Step, String> {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = output.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len as u32;
        // SAFETY: next_in/next_out point into live slices of the given lengths for this call.
        let ret = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = in_len - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        let data_type = self.strm.data_type;
        self.strm.next_in = std::ptr::null();
        self.strm.next_out = std::ptr::null_mut();
        match ret {
            z::Z_OK | z::Z_BUF_ERROR => Ok(Step {
                consumed,
                produced,
                stream_end: false,
                data_type,
            }),
            z::Z_STREAM_END => Ok(Step {
                consumed,
                produced,
                stream_end: true,
                data_type,
            }),
            z::Z_NEED_DICT => Err("stream needs a preset dictionary".into()),
            _ => Err(self
                .message()
                .unwrap_or_else(|| format!("inflate returned {ret}"))),
        }
    }

    fn message(&self) -> Option<String> {
        if self.strm.msg.is_null() {
            return None;
        }
        // SAFETY: zlib sets msg to a static NUL-terminated string.
        Some(
            unsafe { CStr::from_ptr(self.strm.msg) }
                .to_string_lossy()
                .into_owned(),
        )
    }
}

fn check(ret: i32, what: &str) -> Result<(), GzipError> {
    if ret == z::Z_OK {
        Ok(())
    } else {
        Err(GzipError::Zlib(format!("{what} failed ({ret})")))
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: initialised in new(); inflateEnd frees zlib's state exactly once.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}
