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
    if bits > 7 {
        return Err(GzipError::Zlib(format!(
            "invalid checkpoint bit offset {bits}"
        )));
    }
    let mut inflater = Inflater::new(RAW)?;
    let mut input = data;
    if bits > 0 {
        let (&first, rest) = input
            .split_first()
            .ok_or(GzipError::Truncated { compressed: 0 })?;
        inflater.prime(bits, first >> (8 - bits))?;
        input = rest;
    }
    inflater.set_dictionary(window)?;
    let total: usize = lens.iter().sum();
    let mut outs = Vec::with_capacity(lens.len());
    let mut done = 0;
    for &out_len in lens {
        let mut out = vec![0u8; out_len];
        let mut filled = 0;
        let mut stalls = 0;
        while filled < out_len {
            let step = inflater
                .inflate(input, &mut out[filled..], libz_rs_sys::Z_NO_FLUSH)
                .map_err(|message| GzipError::Corrupt {
                    compressed: (data.len() - input.len()) as u64,
                    message,
                })?;
            input = &input[step.consumed..];
            filled += step.produced;
            if step.stream_end && filled < out_len {
                // The span crosses into the next gzip member: skip the 8-byte trailer and let
                // zlib parse the next member's header.
                if input.len() < 8 {
                    return Err(GzipError::ShortSpan {
                        got: (done + filled) as u64,
                        expected: total as u64,
                    });
                }
                input = &input[8..];
                inflater.reset(GZIP)?;
                continue;
            }
            if step.consumed == 0 && step.produced == 0 {
                stalls += 1;
                if input.is_empty() || stalls > 4 {
                    return Err(GzipError::ShortSpan {
                        got: (done + filled) as u64,
                        expected: total as u64,
                    });
                }
            } else {
                stalls = 0;
            }
        }
        done += out_len;
        outs.push(out);
    }
    Ok(outs)
}
