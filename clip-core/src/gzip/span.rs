//! Inflating one span from its checkpoint.

use super::inflater::{Inflater, GZIP, RAW};
use super::GzipError;

/// The compressed byte range `[start, end)` that holds a span starting at a checkpoint with
/// `compressed`/`bits` and ending where the next span starts (`next_compressed`; for the last span,
/// the end of the blob). A checkpoint that starts mid-byte needs the byte before it too.
pub fn compressed_range(compressed: u64, bits: u8, next_compressed: u64) -> (u64, u64) {
    let start = compressed - u64::from(bits > 0);
    (start, next_compressed.max(start))
}

/// Inflates exactly `out_len` bytes from `data` (the bytes of [`compressed_range`]), starting at a
/// checkpoint with `bits` leftover bits and the given `window`.
pub fn inflate_span(
    data: &[u8],
    bits: u8,
    window: &[u8],
    out_len: usize,
) -> Result<Vec<u8>, GzipError> {
    Ok(inflate_spans(data, bits, window, &[out_len])?
        .pop()
        .unwrap_or_default())
}

/// Inflates consecutive spans in one pass from the first one's checkpoint: `lens[i]` bytes into
/// the i-th output. Each output is its own allocation (no run-sized buffer, no copies).
pub fn inflate_spans(
    data: &[u8],
    bits: u8,
    window: &[u8],
    lens: &[usize],
) -> Result<Vec<Vec<u8>>, GzipError> {
    let mut s = SpanInflater::new(bits, window, lens)?;
    let outs = s.feed(data)?;
    s.finish()?;
    Ok(outs)
}

/// [`inflate_spans`] fed as the compressed bytes arrive: each span is handed out as soon as
/// the bytes that produce it are in, so the first span of a long run does not wait for the
/// run's last byte.
pub struct SpanInflater {
    inflater: Option<Inflater>,
    bits: u8,
    window: Vec<u8>,
    /// Output lengths of the spans not yet complete, in order.
    lens: std::collections::VecDeque<usize>,
    /// The span being filled (if started), and how much of it is.
    out: Option<Vec<u8>>,
    filled: usize,
    /// Bytes fed so far, and produced in completed spans (for messages).
    fed: u64,
    done: u64,
    total: u64,
    /// Bytes of a gzip member trailer still to skip before the next member's header.
    skip: usize,
}

impl SpanInflater {
    pub fn new(bits: u8, window: &[u8], lens: &[usize]) -> Result<Self, GzipError> {
        if bits > 7 {
            return Err(GzipError::Zlib(format!(
                "invalid checkpoint bit offset {bits}"
            )));
        }
        Ok(SpanInflater {
            inflater: None,
            bits,
            window: window.to_vec(),
            lens: lens.iter().copied().collect(),
            out: None,
            filled: 0,
            fed: 0,
            done: 0,
            total: lens.iter().map(|&l| l as u64).sum(),
            skip: 0,
        })
    }

    /// True when every span is complete.
    pub fn is_done(&self) -> bool {
        self.lens.is_empty()
    }

    /// Inflates what `data` (the next compressed bytes) yields; returns the spans it completed.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<Vec<u8>>, GzipError> {
        self.fed += input.len() as u64;
        let mut outs = Vec::new();
        let mut stalls = 0;
        while let Some(&out_len) = self.lens.front() {
            if self.skip > 0 {
                let n = self.skip.min(input.len());
                input = &input[n..];
                self.skip -= n;
                if self.skip > 0 {
                    break;
                }
                if let Some(inflater) = &mut self.inflater {
                    inflater.reset(GZIP)?;
                }
            }
            if self.filled == out_len {
                // Complete (an empty span needs no input at all).
                self.done += out_len as u64;
                self.lens.pop_front();
                outs.push(self.out.take().unwrap_or_default());
                self.filled = 0;
                continue;
            }
            if input.is_empty() {
                break;
            }
            let inflater = match &mut self.inflater {
                Some(inflater) => inflater,
                None => {
                    // Started by the first byte: it holds the checkpoint's leftover bits.
                    let mut inflater = Inflater::new(RAW)?;
                    if self.bits > 0 {
                        inflater.prime(self.bits, input[0] >> (8 - self.bits))?;
                        input = &input[1..];
                    }
                    inflater.set_dictionary(&self.window)?;
                    self.window = Vec::new();
                    self.inflater.insert(inflater)
                }
            };
            let out = self.out.get_or_insert_with(|| vec![0u8; out_len]);
            let at = self.fed - input.len() as u64;
            let step = inflater
                .inflate(input, &mut out[self.filled..], libz_rs_sys::Z_NO_FLUSH)
                .map_err(|message| GzipError::Corrupt {
                    compressed: at,
                    message,
                })?;
            input = &input[step.consumed..];
            self.filled += step.produced;
            if step.stream_end && self.filled < out_len {
                // The span crosses into the next gzip member: skip the 8-byte trailer and let
                // zlib parse the next member's header.
                self.skip = 8;
                continue;
            }
            if step.consumed == 0 && step.produced == 0 {
                stalls += 1;
                if stalls > 4 {
                    return Err(self.short());
                }
            } else {
                stalls = 0;
            }
        }
        Ok(outs)
    }

    /// Every compressed byte has been fed: an error if some span is still incomplete.
    pub fn finish(&self) -> Result<(), GzipError> {
        match self.is_done() {
            true => Ok(()),
            false => Err(self.short()),
        }
    }

    fn short(&self) -> GzipError {
        GzipError::ShortSpan {
            got: self.done + self.filled as u64,
            expected: self.total,
        }
    }
}
