//! Message framing on the inbound side, as one streaming state machine over the client's raw
//! bytes: where DATA ends, dot-unstuffing, and line-end normalisation.
//!
//! - Only CRLF "." CRLF ends DATA (RFC 5321 §4.1.1.4). `\n.\n`, `\r.\r`, `\r\n.\n`, `\n.\r\n`,
//!   `\r\n.\r`, `\r\n.\r\r\n` (a run of CR), `\r\n\0.\r\n` ... are message text (SMTP smuggling,
//!   SEC Consult 2023). smtp-proto 0.2.5's receiver counted any run of CR after CRLF "." as part
//!   of the end marker, which let one transmission become two messages.
//! - A "." that starts a line (after a real CRLF) is removed (RFC 5321 §4.5.2).
//! - Every bare LF and bare CR becomes CRLF, so no later hop can read either as a line end.
//!   A bare line end is not a line start for dot-unstuffing or for the end marker.
//!
//! BDAT (RFC 3030) needs no end marker, only the normalisation: [`LineEnds`].
//!
//! This file depends on nothing else in the crate: `fuzz/` compiles it on its own and compares
//! it with [`reference`], a whole-buffer model, over arbitrary chunkings.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// After a CRLF, or at the start of the data: a "." here is stuffing or the end marker.
    LineStart,
    /// CRLF "." seen.
    Dot,
    /// CRLF "." CR seen: only an LF now ends the data.
    DotCr,
    /// Inside a line.
    Text,
    /// Inside a line with a CR held back until the next byte says whether it ends the line.
    Cr,
    /// The end marker was consumed.
    Done,
}

/// DATA content decoder: finds the end of data, unstuffs dots and normalises line ends.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    state: State,
}

impl Default for DataDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DataDecoder {
    /// A decoder for the bytes after `354`: the first line starts at once.
    pub fn new() -> DataDecoder {
        DataDecoder {
            state: State::LineStart,
        }
    }

    /// True once the end marker has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, appending message content to `out`, and returns how many bytes of
    /// `input` it used: all of them until the end marker is found; after it the rest of `input`
    /// belongs to the client's next commands (pipelining) and is left alone. Bytes that might
    /// still turn out to be part of the end marker (a line-start ".", a CR) are held back
    /// inside the decoder, never written to `out` early.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Done => return i,
                State::Text => {
                    // Most of a message is line text: copy it up to the next CR or LF in one go.
                    let rest = &input[i..];
                    let n = rest
                        .iter()
                        .position(|&b| b == b'\r' || b == b'\n')
                        .unwrap_or(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    i += n;
                    if let Some(&b) = input.get(i) {
                        self.text(b, out);
                        i += 1;
                    }
                }
                _ => {
                    let b = input[i];
                    i += 1;
                    self.step(b, out);
                }
            }
        }
        i
    }

    fn step(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.state {
            State::LineStart if b == b'.' => self.state = State::Dot,
            State::Dot if b == b'\r' => self.state = State::DotCr,
            State::DotCr if b == b'\n' => self.state = State::Done,
            State::DotCr => {
                // The dot was stuffing and its CR a bare CR: "\r\n.\r\r\n" is not an end.
                out.extend_from_slice(b"\r\n");
                self.text(b, out);
            }
            State::Cr => match b {
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.state = State::LineStart;
                }
                b'\r' => out.extend_from_slice(b"\r\n"),
                _ => {
                    out.extend_from_slice(b"\r\n");
                    out.push(b);
                    self.state = State::Text;
                }
            },
            // LineStart without a dot, Dot without CR (the dot is dropped), Text.
            State::LineStart | State::Dot | State::Text => self.text(b, out),
            State::Done => {}
        }
    }

    /// One byte inside a line.
    fn text(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\r' => self.state = State::Cr,
            b'\n' => {
                // Bare LF: written as CRLF, but not a line start.
                out.extend_from_slice(b"\r\n");
                self.state = State::Text;
            }
            _ => {
                out.push(b);
                self.state = State::Text;
            }
        }
    }
}

/// Line-end normalisation for BDAT chunks, across chunk boundaries.
#[derive(Debug, Clone, Default)]
pub struct LineEnds {
    /// The previous chunk ended with a CR whose meaning the next byte decides.
    cr: bool,
}

impl LineEnds {
    pub fn new() -> LineEnds {
        LineEnds { cr: false }
    }

    /// Appends `input` to `out` with bare CR and bare LF turned into CRLF. A CR at the end of
    /// `input` is held back until the next call or [`LineEnds::finish`].
    pub fn normalise(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + 2);
        let mut rest = input;
        if self.cr {
            let Some((&first, tail)) = rest.split_first() else {
                return;
            };
            // The held-back CR, with its LF (real or added).
            out.extend_from_slice(b"\r\n");
            self.cr = false;
            if first == b'\n' {
                rest = tail;
            }
        }
        while let Some(p) = rest.iter().position(|&b| b == b'\r' || b == b'\n') {
            out.extend_from_slice(&rest[..p]);
            if rest[p] == b'\r' && p + 1 == rest.len() {
                self.cr = true;
                return;
            }
            out.extend_from_slice(b"\r\n");
            let crlf = rest[p] == b'\r' && rest[p + 1] == b'\n';
            rest = &rest[p + 1 + usize::from(crlf)..];
        }
        out.extend_from_slice(rest);
    }

    /// At the end of the message: a CR still held back was a bare CR.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.cr) {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The whole-buffer model the streaming decoders are checked against (unit tests and the fuzz
/// target): find the first CRLF.CRLF, unstuff CRLF-delimited lines, normalise line ends.
#[cfg(any(test, fuzzing))]
pub mod reference {
    /// For the bytes after `354`: `(Some(used), content)` when the end marker is in `input`
    /// (`used` counts the marker), `(None, content)` for all of `input` otherwise (a CR or
    /// line-start dot at the very end counted as content).
    pub fn decode_data(input: &[u8]) -> (Option<usize>, Vec<u8>) {
        // The data starts at a line start: as if a CRLF came before it.
        let mut framed = b"\r\n".to_vec();
        framed.extend_from_slice(input);
        let end = framed.windows(5).position(|w| w == b"\r\n.\r\n");
        let (raw, used) = match end {
            // Content keeps the CRLF before the dot.
            Some(p) => (&framed[2..p + 2], Some(p + 3)),
            None => (&framed[2..], None),
        };
        (used, normalise(&unstuff(raw)))
    }

    /// Removes the first "." of every line, lines being ended by CRLF only.
    pub fn unstuff(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(raw.len());
        let mut line_start = true;
        for (i, &b) in raw.iter().enumerate() {
            if !(line_start && b == b'.') {
                out.push(b);
            }
            line_start = b == b'\n' && i > 0 && raw[i - 1] == b'\r';
        }
        out
    }

    /// Every CR not followed by LF and every LF not preceded by CR becomes CRLF.
    pub fn normalise(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len());
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\r' if bytes.get(i + 1) == Some(&b'\n') => out.push(b'\r'),
                b'\r' => out.extend_from_slice(b"\r\n"),
                b'\n' if i > 0 && bytes[i - 1] == b'\r' => out.push(b'\n'),
                b'\n' => out.extend_from_slice(b"\r\n"),
                _ => out.push(b),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces cut at `cuts`; returns (used, done, content).
    fn decode_in_pieces(input: &[u8], cuts: &[usize]) -> (usize, bool, Vec<u8>) {
        let mut d = DataDecoder::new();
        let mut out = Vec::new();
        let mut used = 0;
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&input.len())) {
            let to = to.clamp(from, input.len());
            let n = d.decode(&input[from..to], &mut out);
            used += n;
            if d.is_done() {
                break;
            }
            assert_eq!(n, to - from, "all input used before the end");
            from = to;
        }
        (used, d.is_done(), out)
    }

    fn check_against_model(input: &[u8], cuts: &[usize]) {
        let (used, done, out) = decode_in_pieces(input, cuts);
        match reference::decode_data(input) {
            (Some(ref_used), ref_out) => {
                assert!(done, "{input:?} {cuts:?}: end not found");
                assert_eq!(used, ref_used, "{input:?} {cuts:?}");
                assert_eq!(out, ref_out, "{input:?} {cuts:?}");
            }
            (None, ref_out) => {
                assert!(!done, "{input:?} {cuts:?}: false end");
                assert_eq!(used, input.len());
                assert!(
                    ref_out.starts_with(&out) && ref_out.len() - out.len() <= 2,
                    "{input:?} {cuts:?}: {out:?} vs {ref_out:?}"
                );
            }
        }
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_data() {
        for (input, content) in [
            (&b".\r\n"[..], &b""[..]),
            (b"a\r\n.\r\n", b"a\r\n"),
            (b"..x\r\n.\r\n", b".x\r\n"),
            (b"a\n.\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r.\rb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r\n.\r\r\nb\r\n.\r\n", b"a\r\n\r\n\r\nb\r\n"),
            (b"a\r\n.\r\r\r\nb\r\n.\r\n", b"a\r\n\r\n\r\n\r\nb\r\n"),
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
            (b"a\n.\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
            (b"a\r\n\0.\r\nb\r\n.\r\n", b"a\r\n\0.\r\nb\r\n"),
            (b"a\r\n.\0\r\n.\r\n", b"a\r\n\0\r\n"),
        ] {
            let (used, done, out) = decode_in_pieces(input, &[]);
            assert!(done, "{input:?}");
            assert_eq!(used, input.len(), "{input:?}");
            assert_eq!(out, content, "{input:?}");
        }
    }

    #[test]
    fn bytes_after_the_end_are_left_for_the_next_command() {
        let input = b"x\r\n.\r\nQUIT\r\n";
        for cut in 0..input.len() {
            let (used, done, out) = decode_in_pieces(input, &[cut]);
            assert!(done);
            assert_eq!(used, 6, "cut at {cut}");
            assert_eq!(out, b"x\r\n");
        }
    }

    /// Every input up to 7 bytes over the alphabet that matters, cut at every position, against
    /// the whole-buffer model (the fuzz target does the same for longer inputs).
    #[test]
    fn exhaustive_short_inputs_match_the_model() {
        const ALPHABET: [u8; 5] = [b'\r', b'\n', b'.', b'x', 0];
        for len in 0..=7u32 {
            for mut code in 0..ALPHABET.len().pow(len) {
                let mut input = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    input.push(ALPHABET[code % ALPHABET.len()]);
                    code /= ALPHABET.len();
                }
                check_against_model(&input, &[]);
                for cut in 1..input.len() {
                    check_against_model(&input, &[cut]);
                }
            }
        }
    }

    #[test]
    fn bdat_line_ends_match_the_model_across_chunks() {
        let input = b"a\nb\r\r\nc\r.\rd\r";
        for cut in 0..=input.len() {
            let mut n = LineEnds::new();
            let mut out = Vec::new();
            n.normalise(&input[..cut], &mut out);
            n.normalise(&input[cut..], &mut out);
            n.finish(&mut out);
            assert_eq!(out, reference::normalise(input), "cut at {cut}");
        }
        assert_eq!(
            reference::normalise(input),
            b"a\r\nb\r\n\r\nc\r\n.\r\nd\r\n"
        );
    }
}
