//! The offline-transfer file format (a USB stick between facilities when no network exists).
//!
//! Layout: the magic line `MUSUBI-TRANSFER/2\n`, then records, each a 4-byte big-endian length and
//! that many bytes of CBOR: first a [`TransferHeader`], then [`PushItem`]s (signed operations, sealed
//! key grants, encrypted bundles: the file is exactly as encrypted as the bundles in it), then an
//! empty record (length 0) followed by the trailer: item count (8 bytes, big-endian) and the BLAKE3
//! hash of every record before it (32 bytes), so truncation and corruption are detected.
//! Every record is at most [`TRANSFER_RECORD_BYTES_MAX`] bytes; the file itself is bounded by disk.
//!
//! This module only encodes and decodes bytes; the caller reads and writes the file.

use serde::{Deserialize, Serialize};

use crate::directory::SignedDirectory;
use crate::ids::{DeploymentId, DeviceId};
use crate::limits::TRANSFER_RECORD_BYTES_MAX;
use crate::protocol::PushItem;

/// The first bytes of every transfer file.
pub const MAGIC: &[u8] = b"MUSUBI-TRANSFER/2\n";

/// Who wrote the file, for which deployment, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferHeader {
    /// The deployment the items belong to.
    pub deployment: DeploymentId,
    /// The device that wrote the file.
    pub device: DeviceId,
    /// When, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The writer's directory (so revocations travel with the file); `None` from a writer that has none.
    pub directory: Option<SignedDirectory>,
}

/// Errors reading a transfer file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    /// The bytes do not start with [`MAGIC`].
    #[error("not a Musubi transfer file (it should start with {:?})", String::from_utf8_lossy(MAGIC).trim_end())]
    NotATransferFile,
    /// A record is longer than [`TRANSFER_RECORD_BYTES_MAX`].
    #[error("a record of {0} bytes is over the limit of {TRANSFER_RECORD_BYTES_MAX}")]
    RecordTooLarge(usize),
    /// A record is not CBOR of the expected type.
    #[error("damaged record {index}: {reason}")]
    Damaged {
        /// Record number (0 is the header).
        index: u64,
        /// What failed.
        reason: String,
    },
    /// The file ended before its trailer (cut short while copying?).
    #[error(
        "the file is truncated after {0} item(s); what was read is usable, copy the file again for the rest"
    )]
    Truncated(u64),
    /// The trailer's count or hash does not match.
    #[error("the file's checksum does not match its contents (damaged copy)")]
    ChecksumMismatch,
}

fn cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("writing to a Vec cannot fail");
    out
}

/// Writes a transfer file incrementally: call [`TransferEncoder::item`] per item, then [`TransferEncoder::finish`].
#[derive(Debug)]
pub struct TransferEncoder {
    hasher: blake3::Hasher,
    count: u64,
}

impl TransferEncoder {
    /// Starts a file; returns the encoder and the bytes to write first (magic and header record).
    pub fn start(header: &TransferHeader) -> (Self, Vec<u8>) {
        let mut enc = TransferEncoder {
            hasher: blake3::Hasher::new(),
            count: 0,
        };
        let mut out = MAGIC.to_vec();
        out.extend(enc.record(&cbor(header)));
        (enc, out)
    }

    fn record(&mut self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 4);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        self.hasher.update(&out);
        out
    }

    /// The bytes of one item's record. Errors: the item is over [`TRANSFER_RECORD_BYTES_MAX`].
    pub fn item(&mut self, item: &PushItem) -> Result<Vec<u8>, TransferError> {
        let body = cbor(item);
        if body.len() > TRANSFER_RECORD_BYTES_MAX {
            return Err(TransferError::RecordTooLarge(body.len()));
        }
        self.count += 1;
        Ok(self.record(&body))
    }

    /// The closing bytes (empty record, count, hash).
    pub fn finish(self) -> Vec<u8> {
        let mut out = 0u32.to_be_bytes().to_vec();
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(self.hasher.finalize().as_bytes());
        out
    }
}

/// What the decoder found next.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// The header (always first).
    Header(Box<TransferHeader>),
    /// An item, and the length of its record in bytes (about what it costs in memory).
    Item(Box<PushItem>, usize),
    /// The trailer verified: the file is complete.
    End {
        /// How many items the file holds.
        items: u64,
    },
}

/// Reads a transfer file from bytes fed in any chunks (sans-IO).
#[derive(Debug, Default)]
pub struct TransferDecoder {
    buf: Vec<u8>,
    pos: usize,
    magic_ok: bool,
    header_done: bool,
    ended: bool,
    index: u64,
    hasher: blake3::Hasher,
}

impl TransferDecoder {
    /// A decoder at the start of a file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the file.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// The next record, `Ok(None)` when more bytes are needed. After the last byte was fed, call
    /// [`TransferDecoder::finish`] to learn whether the file was complete.
    pub fn next_record(&mut self) -> Result<Option<Decoded>, TransferError> {
        if self.ended {
            return Ok(None);
        }
        if !self.magic_ok {
            if self.avail().len() < MAGIC.len() {
                if !MAGIC.starts_with(self.avail()) {
                    return Err(TransferError::NotATransferFile);
                }
                return Ok(None);
            }
            if &self.avail()[..MAGIC.len()] != MAGIC {
                return Err(TransferError::NotATransferFile);
            }
            self.pos += MAGIC.len();
            self.magic_ok = true;
        }
        let avail = self.avail();
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > TRANSFER_RECORD_BYTES_MAX {
            return Err(TransferError::RecordTooLarge(len));
        }
        if len == 0 {
            if avail.len() < 4 + 8 + 32 {
                return Ok(None);
            }
            let count = u64::from_be_bytes(avail[4..12].try_into().expect("8 bytes"));
            let hash: [u8; 32] = avail[12..44].try_into().expect("32 bytes");
            self.pos += 44;
            self.ended = true;
            let items = self.index.saturating_sub(1);
            if count != items || hash != *self.hasher.finalize().as_bytes() {
                return Err(TransferError::ChecksumMismatch);
            }
            return Ok(Some(Decoded::End { items }));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let start = self.pos;
        let end = start + 4 + len;
        self.hasher.update(&self.buf[start..end]);
        let body = &self.buf[start + 4..end];
        let index = self.index;
        let damaged = |e: ciborium::de::Error<std::io::Error>| TransferError::Damaged {
            index,
            reason: e.to_string(),
        };
        let out = if self.header_done {
            Decoded::Item(Box::new(ciborium::from_reader(body).map_err(damaged)?), len)
        } else {
            Decoded::Header(Box::new(ciborium::from_reader(body).map_err(damaged)?))
        };
        self.header_done = true;
        self.pos += 4 + len;
        self.index += 1;
        Ok(Some(out))
    }

    /// Call after the last byte: errors if the trailer was never reached.
    pub fn finish(&self) -> Result<(), TransferError> {
        if self.ended {
            Ok(())
        } else {
            Err(TransferError::Truncated(self.index.saturating_sub(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Envelope, Payload};
    use crate::crypto::{DeviceSecrets, DocumentKey};
    use crate::ids::{DocumentId, Epoch, FacilityId};

    fn sample_file(n: usize) -> (Vec<u8>, Vec<PushItem>) {
        let dev = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let key = DocumentKey::from_seed([3; 32]);
        let header = TransferHeader {
            deployment: DeploymentId::from_random_bytes([0; 16]),
            device: dev.device_id(),
            created_at_ms: 1,
            directory: None,
        };
        let items: Vec<PushItem> = (0..n)
            .map(|i| PushItem::Bundle {
                envelope: Envelope::seal(
                    &dev,
                    FacilityId::from_random_bytes([1; 16]),
                    DocumentId::from_random_bytes([2; 16]),
                    Epoch(0),
                    &key,
                    &Payload::Changes {
                        data: vec![i as u8; 100],
                    },
                )
                .expect("seal"),
            })
            .collect();
        let (mut enc, mut out) = TransferEncoder::start(&header);
        for it in &items {
            out.extend(enc.item(it).expect("item"));
        }
        out.extend(enc.finish());
        (out, items)
    }

    fn decode_all(bytes: &[u8], chunk: usize) -> (Vec<PushItem>, Result<(), TransferError>) {
        let mut d = TransferDecoder::new();
        let mut items = vec![];
        for c in bytes.chunks(chunk) {
            d.feed(c);
            loop {
                match d.next_record() {
                    Ok(Some(Decoded::Item(i, _))) => items.push(*i),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return (items, Err(e)),
                }
            }
        }
        (items, d.finish())
    }

    #[test]
    fn files_round_trip_in_any_chunking() {
        let (bytes, items) = sample_file(5);
        for chunk in [1, 7, 4096] {
            let (got, end) = decode_all(&bytes, chunk);
            assert_eq!(got, items);
            assert_eq!(end, Ok(()));
        }
    }

    #[test]
    fn truncation_and_corruption_are_reported() {
        let (bytes, _) = sample_file(3);
        let (got, end) = decode_all(&bytes[..bytes.len() - 50], 64);
        assert_eq!(end, Err(TransferError::Truncated(got.len() as u64)));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(decode_all(&bad, 64).1, Err(TransferError::ChecksumMismatch));
        assert_eq!(
            decode_all(b"PK\x03\x04zip", 64).1,
            Err(TransferError::NotATransferFile)
        );
    }
}
