//! ISO 7816-4 command and response APDUs over a [`Transport`] (a PC/SC card, or a test double).
//!
//! Handles what T=0 and T=1 cards and readers answer: `61xx` (more data: GET RESPONSE), `6Cxx`
//! (wrong Le: resend with the length the card names), `6282` (end of file before Le bytes), and
//! files longer than one short APDU, read in chunks by offset. Status words become [`CardError`]s
//! that say what happened in words a receptionist can act on.
//!
//! Commands are built only by the card modules of this crate ([`Command`] has no public
//! constructor for an arbitrary file id), so which files can be selected is decided here, not by callers.

use super::CardError;

/// Largest response this module assembles from GET RESPONSE rounds, in bytes.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// Most GET RESPONSE / wrong-length rounds for one command.
pub const RESPONSE_ROUNDS_MAX: usize = 64;
/// Bytes asked for by one READ BINARY (short APDU, `Le = 00`).
pub const READ_CHUNK_BYTES: usize = 256;

/// The transmission protocol the reader negotiated with the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Character protocol: case 4 commands carry no Le; data comes back through GET RESPONSE.
    T0,
    /// Block protocol (and contactless cards through PC/SC readers).
    T1,
}

/// Something that carries APDUs to a card: a PC/SC card handle, or a test double.
pub trait Transport {
    /// Sends one command APDU, returns the response APDU (data followed by SW1 SW2).
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, CardError>;
    /// The protocol in use.
    fn protocol(&self) -> Protocol;
}

/// A command APDU (short form: Lc and Le of one byte each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Command {
    /// What it is, for errors and logs ("SELECT JPKI AP").
    pub(crate) name: &'static str,
    cla: u8,
    ins: u8,
    p1: u8,
    p2: u8,
    data: Vec<u8>,
    /// Expected length: `Some(0)` means up to 256 bytes.
    le: Option<u8>,
}

impl Command {
    /// SELECT by DF name (application id), no response data (`P2 = 0C`).
    pub(crate) fn select_df(name: &'static str, aid: &[u8]) -> Self {
        Self::new(name, 0x00, 0xA4, 0x04, 0x0C, aid.to_vec(), None)
    }

    /// SELECT an EF under the current DF by its two-byte id, no response data.
    ///
    /// Only the card modules call this, each with its own closed set of file ids.
    pub(super) fn select_ef(name: &'static str, fid: [u8; 2]) -> Self {
        Self::new(name, 0x00, 0xA4, 0x02, 0x0C, fid.to_vec(), None)
    }

    /// READ BINARY of the current EF at `offset` (15 bits), up to `le` bytes (0 = 256).
    pub(crate) fn read_binary(name: &'static str, offset: u16, le: u8) -> Self {
        let [p1, p2] = (offset & 0x7FFF).to_be_bytes();
        Self::new(name, 0x00, 0xB0, p1, p2, vec![], Some(le))
    }

    /// VERIFY without data: asks how many tries the PIN of the current EF has left (`63Cx`).
    pub(crate) fn verify_status(name: &'static str) -> Self {
        Self::new(name, 0x00, 0x20, 0x00, 0x80, vec![], None)
    }

    /// VERIFY with the PIN's digits (ASCII).
    pub(crate) fn verify(name: &'static str, pin: &[u8]) -> Self {
        Self::new(name, 0x00, 0x20, 0x00, 0x80, pin.to_vec(), None)
    }

    /// GET DATA of the reader (PC/SC part 3): the contactless card's UID / IDm.
    pub(crate) fn get_uid() -> Self {
        Self::new("GET DATA (UID)", 0xFF, 0xCA, 0x00, 0x00, vec![], Some(0))
    }

    /// A proprietary command with data and an expected response (e.g. JPKI COMPUTE DIGITAL SIGNATURE).
    pub(crate) fn proprietary(name: &'static str, header: [u8; 4], data: Vec<u8>, le: u8) -> Self {
        Self::new(
            name,
            header[0],
            header[1],
            header[2],
            header[3],
            data,
            Some(le),
        )
    }

    fn new(
        name: &'static str,
        cla: u8,
        ins: u8,
        p1: u8,
        p2: u8,
        data: Vec<u8>,
        le: Option<u8>,
    ) -> Self {
        assert!(
            data.len() <= 255,
            "short APDUs carry at most 255 bytes of data"
        );
        Self {
            name,
            cla,
            ins,
            p1,
            p2,
            data,
            le,
        }
    }

    /// The instruction byte.
    pub(crate) fn ins(&self) -> u8 {
        self.ins
    }

    /// The bytes sent for `protocol` (T=0 drops Le from case 4 commands).
    pub(crate) fn encode(&self, protocol: Protocol) -> Vec<u8> {
        let mut out = vec![self.cla, self.ins, self.p1, self.p2];
        if !self.data.is_empty() {
            out.push(self.data.len() as u8);
            out.extend_from_slice(&self.data);
        }
        if let Some(le) = self.le
            && (self.data.is_empty() || protocol == Protocol::T1)
        {
            out.push(le);
        }
        out
    }

    fn with_le(&self, le: u8) -> Self {
        Self {
            le: Some(le),
            ..self.clone()
        }
    }
}

/// A response APDU: data and status word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Response {
    /// Response data.
    pub(crate) data: Vec<u8>,
    /// SW1 SW2.
    pub(crate) sw: u16,
}

impl Response {
    fn parse(raw: Vec<u8>, command: &'static str) -> Result<Self, CardError> {
        if raw.len() < 2 {
            return Err(CardError::Malformed(format!(
                "{command}: a response of {} byte(s), without a status word",
                raw.len()
            )));
        }
        let mut data = raw;
        let sw2 = data.pop().expect("length checked");
        let sw1 = data.pop().expect("length checked");
        Ok(Self {
            data,
            sw: u16::from_be_bytes([sw1, sw2]),
        })
    }

    /// Whether the status word is `9000`.
    pub(crate) fn ok(&self) -> bool {
        self.sw == 0x9000
    }

    /// Itself when `9000`, else the error its status word means.
    pub(crate) fn check(self, command: &'static str) -> Result<Self, CardError> {
        if self.ok() {
            Ok(self)
        } else {
            Err(CardError::status(command, self.sw))
        }
    }
}

/// Sends `cmd`, following `61xx` with GET RESPONSE and `6Cxx` with a resend using the length the card names.
pub(crate) fn exchange(t: &mut dyn Transport, cmd: &Command) -> Result<Response, CardError> {
    let protocol = t.protocol();
    let mut resp = Response::parse(t.transmit(&cmd.encode(protocol))?, cmd.name)?;
    let mut data = Vec::new();
    for _ in 0..RESPONSE_ROUNDS_MAX {
        let [sw1, sw2] = resp.sw.to_be_bytes();
        match sw1 {
            0x61 => {
                data.extend_from_slice(&resp.data);
                if data.len() > RESPONSE_BYTES_MAX {
                    return Err(CardError::TooLarge {
                        what: cmd.name,
                        max: RESPONSE_BYTES_MAX,
                    });
                }
                let get = Command::new("GET RESPONSE", 0x00, 0xC0, 0x00, 0x00, vec![], Some(sw2));
                resp = Response::parse(t.transmit(&get.encode(protocol))?, cmd.name)?;
            }
            0x6C => {
                // Wrong Le: the card names the right one; the command is resent unchanged otherwise
                // (only commands that read, never VERIFY, can be answered so).
                if cmd.ins() == 0x20 {
                    return Err(CardError::status(cmd.name, resp.sw));
                }
                let again = cmd.with_le(sw2);
                resp = Response::parse(t.transmit(&again.encode(protocol))?, cmd.name)?;
            }
            _ => {
                data.extend_from_slice(&resp.data);
                if data.len() > RESPONSE_BYTES_MAX {
                    return Err(CardError::TooLarge {
                        what: cmd.name,
                        max: RESPONSE_BYTES_MAX,
                    });
                }
                return Ok(Response { data, sw: resp.sw });
            }
        }
    }
    Err(CardError::Malformed(format!(
        "{}: the card kept asking for more rounds than {RESPONSE_ROUNDS_MAX}",
        cmd.name
    )))
}

/// Reads the current EF from offset 0 in chunks, up to `max` bytes.
///
/// `length_of` is told the bytes read so far and returns the file's whole length once it can tell
/// (from a DER or TLV header), so reading stops at the end of the content without probing past it.
pub(crate) fn read_binary_all(
    t: &mut dyn Transport,
    name: &'static str,
    max: usize,
    length_of: impl Fn(&[u8]) -> Option<usize>,
) -> Result<Vec<u8>, CardError> {
    let mut out: Vec<u8> = Vec::new();
    loop {
        let want = match length_of(&out) {
            Some(total) if total > max => return Err(CardError::TooLarge { what: name, max }),
            Some(total) if out.len() >= total => {
                out.truncate(total);
                return Ok(out);
            }
            Some(total) => (total - out.len()).min(READ_CHUNK_BYTES),
            None => READ_CHUNK_BYTES,
        };
        let offset = u16::try_from(out.len())
            .ok()
            .filter(|o| *o <= 0x7FFF)
            .ok_or(CardError::TooLarge { what: name, max })?;
        let le = if want >= 256 { 0 } else { want as u8 };
        let resp = exchange(t, &Command::read_binary(name, offset, le))?;
        match resp.sw {
            0x9000 | 0x6282 => {
                if resp.data.is_empty() {
                    return finish(out, &length_of, name);
                }
                out.extend_from_slice(&resp.data);
                if out.len() > max {
                    return Err(CardError::TooLarge { what: name, max });
                }
                if resp.sw == 0x6282 {
                    return finish(out, &length_of, name);
                }
            }
            // Offset beyond the end of the file: everything is read.
            0x6B00 if !out.is_empty() => return finish(out, &length_of, name),
            sw => return Err(CardError::status(name, sw)),
        }
    }
}

fn finish(
    out: Vec<u8>,
    length_of: &impl Fn(&[u8]) -> Option<usize>,
    name: &'static str,
) -> Result<Vec<u8>, CardError> {
    match length_of(&out) {
        Some(total) if out.len() >= total => Ok(out[..total].to_vec()),
        Some(total) => Err(CardError::Malformed(format!(
            "{name}: the file ends after {} of {total} bytes",
            out.len()
        ))),
        None => Err(CardError::Malformed(format!(
            "{name}: the file's content has no length header"
        ))),
    }
}

/// The length of a BER-TLV element (see [`tlv_header`]: tags of up to four bytes, definite length)
/// from its first bytes.
pub(crate) fn tlv_length(bytes: &[u8]) -> Option<usize> {
    tlv_header(bytes).map(|h| h.header + h.value)
}

/// The header of one BER-TLV element (ISO/IEC 7816-4 §5.2, X.690 §8.1): tags of up to 4 bytes,
/// lengths in short form or 0x81..0x83 long form. Every count is checked against nothing but the
/// header's own bytes; the caller checks that `header + value` bytes are there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TlvHeader {
    /// Bytes of the tag (1 to 4).
    pub tag: usize,
    /// Bytes of tag and length together.
    pub header: usize,
    /// Bytes of the value.
    pub value: usize,
}

/// Reads a BER-TLV header; `None` when it is truncated, its tag is longer than 4 bytes, or its
/// length form is not one of those above.
pub(crate) fn tlv_header(bytes: &[u8]) -> Option<TlvHeader> {
    let first = *bytes.first()?;
    let mut i = 1;
    if first & 0x1F == 0x1F {
        // Multi-byte tag: continue while bit 8 is set.
        loop {
            let b = *bytes.get(i)?;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i > 3 {
                return None;
            }
        }
    }
    let tag = i;
    let l = *bytes.get(i)?;
    i += 1;
    let value = match l {
        0..=0x7F => l as usize,
        0x81 => {
            let v = *bytes.get(i)? as usize;
            i += 1;
            v
        }
        0x82 => {
            let v = u16::from_be_bytes([*bytes.get(i)?, *bytes.get(i + 1)?]) as usize;
            i += 2;
            v
        }
        0x83 => {
            let v = u32::from_be_bytes([0, *bytes.get(i)?, *bytes.get(i + 1)?, *bytes.get(i + 2)?])
                as usize;
            i += 3;
            v
        }
        _ => return None,
    };
    Some(TlvHeader {
        tag,
        header: i,
        value,
    })
}

/// What a status word means, in a few words (ISO 7816-4).
pub fn status_meaning(sw: u16) -> &'static str {
    match sw {
        0x9000 => "success",
        0x6282 => "end of file reached before the expected length",
        0x6581 => "memory failure in the card",
        0x6700 => "wrong length",
        0x6881 => "logical channel not supported",
        0x6882 => "secure messaging not supported",
        0x6982 => "security status not satisfied (PIN not verified)",
        0x6983 => "the PIN is blocked",
        0x6984 => "referenced data invalidated",
        0x6985 => "conditions of use not satisfied",
        0x6986 => "command not allowed (no current EF)",
        0x6A80 => "incorrect data",
        0x6A81 => "function not supported",
        0x6A82 => "file or application not found",
        0x6A86 => "incorrect P1 P2",
        0x6A88 => "referenced data not found",
        0x6B00 => "offset outside the file",
        0x6D00 => "instruction not supported",
        0x6E00 => "class not supported",
        0x6F00 => "no precise diagnosis (internal card error)",
        sw if sw & 0xFFF0 == 0x63C0 => "verification failed",
        sw if sw >> 8 == 0x61 => "more data available",
        sw if sw >> 8 == 0x6C => "wrong Le",
        _ => "unexpected status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A card that answers from a script and records what it was sent.
    struct Script {
        protocol: Protocol,
        answers: Vec<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    impl Transport for Script {
        fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, CardError> {
            self.sent.push(command.to_vec());
            if self.answers.is_empty() {
                return Err(CardError::Removed);
            }
            Ok(self.answers.remove(0))
        }
        fn protocol(&self) -> Protocol {
            self.protocol
        }
    }

    #[test]
    fn get_response_rounds_are_joined() {
        let mut s = Script {
            protocol: Protocol::T0,
            answers: vec![
                vec![0x61, 0x03],
                vec![1, 2, 3, 0x61, 0x02],
                vec![4, 5, 0x90, 0x00],
            ],
            sent: vec![],
        };
        let cmd = Command::proprietary("SIGN", [0x80, 0x2A, 0x00, 0x80], vec![9, 9], 0);
        let r = exchange(&mut s, &cmd).expect("exchange");
        assert_eq!(r.data, vec![1, 2, 3, 4, 5]);
        assert_eq!(r.sw, 0x9000);
        // T=0: the case 4 command goes without Le; GET RESPONSE asks for what 61xx named.
        assert_eq!(s.sent[0], vec![0x80, 0x2A, 0x00, 0x80, 2, 9, 9]);
        assert_eq!(s.sent[1], vec![0x00, 0xC0, 0x00, 0x00, 0x03]);
        assert_eq!(s.sent[2], vec![0x00, 0xC0, 0x00, 0x00, 0x02]);
    }

    #[test]
    fn wrong_length_is_resent_with_the_named_le() {
        let mut s = Script {
            protocol: Protocol::T1,
            answers: vec![vec![0x6C, 0x10], vec![7; 0x12]],
            sent: vec![],
        };
        s.answers[1].truncate(0x10);
        s.answers[1].extend_from_slice(&[0x90, 0x00]);
        let r = exchange(&mut s, &Command::read_binary("READ", 0, 0)).expect("exchange");
        assert_eq!(r.data.len(), 0x10);
        assert_eq!(s.sent[1], vec![0x00, 0xB0, 0x00, 0x00, 0x10]);
    }

    #[test]
    fn a_wrong_length_answer_to_verify_is_never_resent() {
        let mut s = Script {
            protocol: Protocol::T1,
            answers: vec![vec![0x6C, 0x04]],
            sent: vec![],
        };
        let err = exchange(&mut s, &Command::verify("VERIFY", b"1234")).expect_err("refused");
        assert!(
            matches!(err, CardError::Status { sw: 0x6C04, .. }),
            "{err:?}"
        );
        assert_eq!(s.sent.len(), 1, "the PIN went to the card once");
    }

    #[test]
    fn long_files_are_read_in_chunks_up_to_their_declared_length() {
        let file: Vec<u8> = [vec![0x30, 0x82, 0x02, 0x00], vec![0xAB; 0x200]].concat();
        let mut answers = vec![];
        let mut off = 0;
        while off < file.len() {
            let end = (off + 256).min(file.len());
            let mut a = file[off..end].to_vec();
            a.extend_from_slice(&[0x90, 0x00]);
            answers.push(a);
            off = end;
        }
        let mut s = Script {
            protocol: Protocol::T1,
            answers,
            sent: vec![],
        };
        let got = read_binary_all(&mut s, "READ", 4096, tlv_length).expect("read");
        assert_eq!(got, file);
        assert_eq!(s.sent.len(), 3);
        assert_eq!(s.sent[1], vec![0x00, 0xB0, 0x01, 0x00, 0x00]);
        assert_eq!(
            s.sent[2],
            vec![0x00, 0xB0, 0x02, 0x00, 0x04],
            "the last chunk asks for what is left"
        );
    }

    #[test]
    fn tlv_lengths() {
        assert_eq!(tlv_length(&[0x30, 0x82, 0x01, 0x00]), Some(4 + 256));
        assert_eq!(tlv_length(&[0xFF, 0x20, 0x81, 0x90]), Some(4 + 0x90));
        assert_eq!(tlv_length(&[0xDF, 0x22, 0x05]), Some(3 + 5));
        assert_eq!(tlv_length(&[0x30]), None);
    }

    #[test]
    fn status_words_are_named() {
        assert_eq!(status_meaning(0x6A82), "file or application not found");
        assert_eq!(status_meaning(0x63C2), "verification failed");
        let e = CardError::status("READ BINARY", 0x6F00);
        assert!(e.to_string().contains("6F00"), "{e}");
    }
}
