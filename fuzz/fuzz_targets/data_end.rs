//! The end-of-data detector (src/inbound/framing.rs) against its whole-buffer reference model,
//! over arbitrary input cut into arbitrary reads.
//!
//! Input layout: byte 0 and 1 seed the chunking, the rest is what the client sends after
//! `354`. For every input:
//! - DATA: the streaming decoder finds the end marker exactly where the model's search for the
//!   first CRLF.CRLF does (never earlier: no smuggling; never later: pipelined commands stay
//!   commands), uses exactly the bytes up to it, and writes the same unstuffed, normalised
//!   content; without a marker it uses everything and its output is the model's, less at most
//!   the two bytes of a held-back CR or line-start dot;
//! - BDAT: line-end normalisation across the same chunks equals the model's.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/inbound/framing.rs"]
mod framing;

use framing::{DataDecoder, LineEnds, reference};
use libfuzzer_sys::fuzz_target;

/// Chunk lengths from a seed: mostly small, sometimes long, deterministic per input.
fn chunks(seed: u16, len: usize) -> Vec<usize> {
    let mut state = u32::from(seed) | 1;
    let mut out = Vec::new();
    let mut total = 0;
    while total < len {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let max = if state & 0x100 == 0 { 8 } else { 300 };
        let n = (state as usize % max + 1).min(len - total);
        out.push(n);
        total += n;
    }
    out
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let seed = u16::from_le_bytes([input[0], input[1]]);
    let data = &input[2..];
    let cuts = chunks(seed, data.len());

    // DATA.
    let mut decoder = DataDecoder::new();
    let mut out = Vec::new();
    let mut used = 0;
    let mut from = 0;
    for n in &cuts {
        let piece = &data[from..from + n];
        let u = decoder.decode(piece, &mut out);
        assert!(u <= piece.len());
        used += u;
        if decoder.is_done() {
            break;
        }
        assert_eq!(u, piece.len(), "input left unused before the end marker");
        from += n;
    }
    match reference::decode_data(data) {
        (Some(model_used), model_out) => {
            assert!(decoder.is_done(), "end marker missed");
            assert_eq!(used, model_used, "end marker at a different place");
            assert_eq!(out, model_out, "content differs");
        }
        (None, model_out) => {
            assert!(!decoder.is_done(), "end of data without CRLF.CRLF");
            assert_eq!(used, data.len());
            assert!(model_out.starts_with(&out), "content differs");
            assert!(model_out.len() - out.len() <= 2, "too much held back");
        }
    }

    // BDAT.
    let mut line_ends = LineEnds::new();
    let mut out = Vec::new();
    let mut from = 0;
    for n in &cuts {
        line_ends.normalise(&data[from..from + n], &mut out);
        from += n;
    }
    line_ends.finish(&mut out);
    assert_eq!(
        out,
        reference::normalise(data),
        "BDAT normalisation differs"
    );
});
