//! A bundle's Automerge changes, decoded one chunk at a time with bounds, and bound to the device
//! that signed the bundle (DESIGN invariant 8; issue "Hostile bundles").
//!
//! A [`Payload::Changes`](crate::bundle::Payload) holds Automerge change chunks one after another
//! (the Automerge binary format, "Chunk container": 4 magic bytes `85 6f 4a 83`, a 4-byte checksum,
//! a chunk type byte, the data length as unsigned LEB128, then the data). Handing a writer's bytes
//! to Automerge as they are costs whatever the writer chose: a compressed chunk (type 2, raw
//! DEFLATE) of 1 MiB inflated to gigabytes in memory, and one malformed chunk made
//! `load_incremental` drop every other bundle loaded with it. [`decode_changes`] reads the chunk
//! framing, inflates a compressed chunk through a reader that stops at
//! [`CHANGES_INFLATED_BYTES_MAX`], lets Automerge parse each change on its own
//! ([`automerge::Change`], which walks every operation, run-length counts included, before the count
//! is known), counts its operations against [`CHANGES_OPS_MAX`], and checks that its
//! actor is one of the signing device's ([`device_actor`]). A bundle that fails any of these is
//! quarantined by the caller, and the document stays readable with everything else.

use std::io::Read;

use automerge::{ActorId, Change};

use crate::ids::DeviceId;
use crate::limits::{CHANGES_INFLATED_BYTES_MAX, CHANGES_OPS_MAX};

/// The magic bytes that start every Automerge chunk.
pub const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Chunk type of an uncompressed change.
pub const CHUNK_CHANGE: u8 = 1;
/// Chunk type of a DEFLATE-compressed change.
pub const CHUNK_COMPRESSED_CHANGE: u8 = 2;

/// Random bytes after the device id in an actor id: one per opened document, so two processes of
/// one device (the desktop app and the CLI) never reuse a sequence number of the same actor.
pub const ACTOR_SESSION_BYTES: usize = 8;

/// Why a bundle's changes are not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangesError {
    /// The payload holds no change.
    #[error("the bundle holds no change")]
    Empty,
    /// A chunk is cut short or its framing is wrong.
    #[error("chunk {index} is malformed: {what}")]
    Framing {
        /// The chunk's index in the bundle (from 0).
        index: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// A chunk that is not a change (a whole document, or a chunk type this version does not know).
    #[error("chunk {index} has type {chunk_type}, not a change")]
    NotAChange {
        /// The chunk's index in the bundle.
        index: usize,
        /// Its type byte.
        chunk_type: u8,
    },
    /// Inflating the bundle's compressed changes gives more than [`CHANGES_INFLATED_BYTES_MAX`].
    #[error("the bundle's changes inflate to more than {CHANGES_INFLATED_BYTES_MAX} bytes")]
    InflatedTooLarge,
    /// A change holds text marks (`MarkBegin`/`MarkEnd`), which no Musubi document writes.
    #[error(
        "change {index} of the bundle holds text marks, which no Musubi document uses (Automerge 0.12 can abort the process applying malformed ones)"
    )]
    Marks {
        /// Which change (0-based).
        index: usize,
    },
    /// The bundle's changes hold more than [`CHANGES_OPS_MAX`] operations.
    #[error("the bundle's changes hold {ops} operations, over the limit of {CHANGES_OPS_MAX}")]
    TooManyOps {
        /// Operations counted so far.
        ops: usize,
    },
    /// Automerge refused a change.
    #[error("chunk {index} is not a valid Automerge change: {message}")]
    Automerge {
        /// The chunk's index.
        index: usize,
        /// Automerge's message.
        message: String,
    },
    /// A change's actor is not one of the signing device's.
    #[error("chunk {index} is written as actor {actor}, which is not a device actor of {author}")]
    ForeignActor {
        /// The chunk's index.
        index: usize,
        /// The actor, hex.
        actor: String,
        /// The device that signed the bundle.
        author: DeviceId,
    },
}

/// The actor id a device writes with: its device id's bytes (the libp2p peer id) followed by
/// [`ACTOR_SESSION_BYTES`] random bytes chosen when a document is opened.
pub fn device_actor(device: &DeviceId, session: [u8; ACTOR_SESSION_BYTES]) -> ActorId {
    let mut bytes = device.0.to_bytes();
    bytes.extend_from_slice(&session);
    ActorId::from(bytes)
}

/// Whether `actor` is one of `device`'s actors ([`device_actor`] with any session bytes).
pub fn actor_is_bound(actor: &ActorId, device: &DeviceId) -> bool {
    let id = device.0.to_bytes();
    let bytes = actor.to_bytes();
    bytes.len() == id.len() + ACTOR_SESSION_BYTES && bytes.starts_with(&id)
}

/// Splits `data` (a bundle's changes) into chunks and decodes each as one Automerge change written by
/// `author`.
///
/// Errors: a [`ChangesError`] naming the first chunk that fails; nothing is decoded past it, and no
/// more than [`CHANGES_INFLATED_BYTES_MAX`] bytes are inflated in all.
pub fn decode_changes(data: &[u8], author: &DeviceId) -> Result<Vec<Change>, ChangesError> {
    decode_changes_by(data, author, false)
}

/// [`decode_changes`] for a bundle this device signed itself (`own`): its changes are not expanded
/// to look for text marks, which this device never writes (the expansion costs a load about a
/// tenth of its time). Everything else is checked the same.
///
/// Errors: as [`decode_changes`].
pub fn decode_changes_by(
    data: &[u8],
    author: &DeviceId,
    own: bool,
) -> Result<Vec<Change>, ChangesError> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut inflated_budget = CHANGES_INFLATED_BYTES_MAX;
    let mut ops = 0usize;
    let mut index = 0;
    while !rest.is_empty() {
        let framing = |what| ChangesError::Framing { index, what };
        if rest.len() < 9 || rest[..4] != CHUNK_MAGIC {
            return Err(framing("it does not start with the Automerge magic bytes"));
        }
        let chunk_type = rest[8];
        let mut len_bytes = &rest[9..];
        let len = leb128::read::unsigned(&mut len_bytes)
            .map_err(|_| framing("its length is not an unsigned LEB128 number"))?;
        let header_len = rest.len() - len_bytes.len();
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= len_bytes.len())
            .ok_or_else(|| framing("its length runs past the end of the bundle"))?;
        let (chunk, tail) = rest.split_at(header_len + len);
        let change = match chunk_type {
            CHUNK_CHANGE => Change::try_from(chunk),
            CHUNK_COMPRESSED_CHANGE => {
                // Inflate once with a cap, so a bomb stops here; Automerge then inflates the
                // same bytes again, now known to be bounded.
                let mut sink = std::io::sink();
                let inflated = std::io::copy(
                    &mut flate2::read::DeflateDecoder::new(&chunk[header_len..])
                        .take(inflated_budget as u64 + 1),
                    &mut sink,
                )
                .map_err(|_| framing("its compressed data is not valid DEFLATE"))?;
                if inflated > inflated_budget as u64 {
                    return Err(ChangesError::InflatedTooLarge);
                }
                inflated_budget -= inflated as usize;
                Change::try_from(chunk)
            }
            other => {
                return Err(ChangesError::NotAChange {
                    index,
                    chunk_type: other,
                });
            }
        }
        .map_err(|e| ChangesError::Automerge {
            index,
            message: e.to_string(),
        })?;
        ops = ops.saturating_add(change.len());
        if ops > CHANGES_OPS_MAX {
            return Err(ChangesError::TooManyOps { ops });
        }
        if !actor_is_bound(change.actor_id(), author) {
            return Err(ChangesError::ForeignActor {
                index,
                actor: change.actor_id().to_hex_string(),
                author: *author,
            });
        }
        // Automerge 0.12 can panic applying malformed marks and panic again while unwinding (a
        // panic in a destructor aborts the process, which no `catch_unwind` stops; found by
        // fuzzing, seed 12725757932369830143). Musubi writes no marks, so a change with any is
        // refused before Automerge applies it.
        match if own {
            Some(false)
        } else {
            holds_marks(&change)
        } {
            Some(false) => {}
            Some(true) => return Err(ChangesError::Marks { index }),
            None => {
                return Err(ChangesError::Automerge {
                    index,
                    message: "Automerge cannot expand its operations".into(),
                });
            }
        }
        out.push(change);
        rest = tail;
        index += 1;
    }
    if out.is_empty() {
        return Err(ChangesError::Empty);
    }
    Ok(out)
}

/// Whether `change` holds a text mark operation; `None` when Automerge panics expanding it.
fn holds_marks(change: &Change) -> Option<bool> {
    use automerge::legacy::OpType;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        change
            .decode()
            .operations
            .iter()
            .any(|op| matches!(op.action, OpType::MarkBegin(_) | OpType::MarkEnd(_)))
    }))
    .ok()
}

/// Applies decoded changes to `doc`, turning a panic inside Automerge into an error.
///
/// Automerge 0.12 panics on some changes that decode and verify (found by fuzzing: an
/// `Option::unwrap` in its batch apply, an invalid actor index, a failed assertion). A writer
/// could otherwise crash every member that opens the document. After an error `doc` may hold part
/// of the changes: the caller must drop it.
///
/// Errors: [`ChangesError::Automerge`] with Automerge's error or panic message (`index` is 0).
pub fn apply(doc: &mut automerge::AutoCommit, changes: Vec<Change>) -> Result<(), ChangesError> {
    let refused = |message: String| ChangesError::Automerge { index: 0, message };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| doc.apply_changes(changes))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(refused(e.to_string())),
        Err(panic) => Err(refused(format!(
            "Automerge failed applying them ({})",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic")
        ))),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_change_with_text_marks_is_refused_before_automerge_applies_it() {
        use automerge::transaction::Transactable as _;
        use automerge::{AutoCommit, ObjType, ROOT};
        let me = DeviceSecrets::from_seeds([1; 32], [2; 32]).device_id();
        let mut doc = AutoCommit::new().with_actor(device_actor(&me, [7; 8]));
        let text = doc
            .put_object(ROOT, "remarks", ObjType::Text)
            .expect("text");
        doc.splice_text(&text, 0, 0, "受診予約").expect("splice");
        doc.mark(
            &text,
            automerge::marks::Mark::new("bold".into(), true, 0, 2),
            automerge::marks::ExpandMark::None,
        )
        .expect("mark");
        let bytes: Vec<u8> = doc
            .get_changes(&[])
            .iter()
            .flat_map(|c| c.raw_bytes().to_vec())
            .collect();
        assert!(matches!(
            decode_changes(&bytes, &me),
            Err(ChangesError::Marks { .. })
        ));
    }

    use std::io::Write;

    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT, ReadDoc};
    use proptest::prelude::*;

    use super::*;
    use crate::crypto::DeviceSecrets;

    fn device(seed: u8) -> DeviceId {
        DeviceSecrets::from_seeds([seed; 32], [seed; 32]).device_id()
    }

    /// The changes a device writes when it sets `n` keys, as `Engine::commit` puts them in a bundle.
    fn written(author: &DeviceId, n: usize, value: &str) -> Vec<u8> {
        let mut doc = AutoCommit::new().with_actor(device_actor(author, [7; ACTOR_SESSION_BYTES]));
        let mut out = Vec::new();
        for i in 0..n {
            doc.put(ROOT, format!("k{i}"), value).expect("put");
            doc.commit();
        }
        for mut c in doc.get_changes(&[]) {
            out.extend_from_slice(&c.bytes());
        }
        out
    }

    /// A compressed-change chunk whose DEFLATE data inflates to `inflated` zero bytes.
    fn bomb(inflated: usize) -> Vec<u8> {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        let mut left = inflated;
        while left > 0 {
            let n = left.min(zeros.len());
            enc.write_all(&zeros[..n]).expect("deflate");
            left -= n;
        }
        let body = enc.finish().expect("deflate");
        let mut chunk = CHUNK_MAGIC.to_vec();
        chunk.extend_from_slice(&[0, 0, 0, 0, CHUNK_COMPRESSED_CHANGE]);
        leb128::write::unsigned(&mut chunk, body.len() as u64).expect("leb128");
        chunk.extend_from_slice(&body);
        chunk
    }

    #[test]
    fn a_devices_own_changes_decode_compressed_or_not() {
        let me = device(1);
        // Short values stay uncompressed; a long one is compressed by Automerge (over 256 bytes).
        let small = decode_changes(&written(&me, 3, "x"), &me).expect("small changes");
        assert_eq!(small.len(), 3);
        let long = "とても長い所見。".repeat(200);
        let big = written(&me, 1, &long);
        assert_eq!(
            big[8], CHUNK_COMPRESSED_CHANGE,
            "Automerge compresses a long change"
        );
        let decoded = decode_changes(&big, &me).expect("compressed change");
        let mut doc = AutoCommit::new();
        doc.apply_changes(decoded).expect("apply");
        assert_eq!(
            doc.get(ROOT, "k0")
                .expect("get")
                .map(|(v, _)| v.to_string()),
            Some(format!("\"{long}\""))
        );
    }

    #[test]
    fn changes_written_as_another_device_are_refused() {
        let (me, other) = (device(1), device(2));
        let forged = written(&other, 1, "x");
        assert!(matches!(
            decode_changes(&forged, &me),
            Err(ChangesError::ForeignActor { index: 0, .. })
        ));
        // A random actor (as before actors were bound) is refused too.
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "k", "v").expect("put");
        let mut bytes = Vec::new();
        for mut c in doc.get_changes(&[]) {
            bytes.extend_from_slice(&c.bytes());
        }
        assert!(matches!(
            decode_changes(&bytes, &me),
            Err(ChangesError::ForeignActor { .. })
        ));
    }

    #[test]
    fn a_deflate_bomb_stops_at_the_cap() {
        let me = device(1);
        // 1 MiB of compressed data that inflates to 1 GiB: refused after inflating just past the cap.
        let chunk = bomb(1 << 30);
        assert!(chunk.len() < 2 << 20, "the bomb is small: {}", chunk.len());
        let started = std::time::Instant::now();
        assert_eq!(
            decode_changes(&chunk, &me).err(),
            Some(ChangesError::InflatedTooLarge)
        );
        eprintln!(
            "bomb of {} bytes refused in {:?}",
            chunk.len(),
            started.elapsed()
        );
        // Under the cap, the inflated bytes are not a change: refused by Automerge, not applied.
        assert!(matches!(
            decode_changes(&bomb(1024), &me),
            Err(ChangesError::Automerge { index: 0, .. })
        ));
    }

    #[test]
    fn damaged_framing_and_document_chunks_are_refused() {
        let me = device(1);
        let good = written(&me, 2, "x");
        assert_eq!(decode_changes(&[], &me).err(), Some(ChangesError::Empty));
        assert!(matches!(
            decode_changes(&good[..good.len() - 1], &me),
            Err(ChangesError::Framing { .. } | ChangesError::Automerge { .. })
        ));
        let mut doc = AutoCommit::new().with_actor(device_actor(&me, [1; 8]));
        doc.put(ROOT, "k", "v").expect("put");
        assert!(matches!(
            decode_changes(&doc.save(), &me),
            Err(ChangesError::NotAChange { chunk_type: 0, .. })
        ));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"junk");
        assert!(matches!(
            decode_changes(&trailing, &me),
            Err(ChangesError::Framing { index: 2, .. })
        ));
    }

    /// A writer's change with more operations than a bundle may hold (one per character of a long
    /// text) is refused, not applied.
    #[test]
    fn a_change_with_too_many_operations_is_refused() {
        use automerge::ObjType;
        let me = device(1);
        let mut doc = AutoCommit::new().with_actor(device_actor(&me, [2; ACTOR_SESSION_BYTES]));
        let text = doc
            .put_object(ROOT, "remarks", ObjType::Text)
            .expect("text");
        doc.splice_text(&text, 0, 0, &"x".repeat(CHANGES_OPS_MAX))
            .expect("splice");
        doc.commit();
        let mut bytes = Vec::new();
        for mut c in doc.get_changes(&[]) {
            bytes.extend_from_slice(&c.bytes());
        }
        assert!(matches!(
            decode_changes(&bytes, &me),
            Err(ChangesError::TooManyOps { ops }) if ops > CHANGES_OPS_MAX
        ));
    }

    /// Inputs the fuzzer found (`bench-fuzz`, target `changes`): they decode and verify as changes
    /// of the fuzzing device, and Automerge panics applying them. They are refused, not a crash.
    #[test]
    fn changes_automerge_panics_on_are_refused() {
        let author = DeviceSecrets::from_seeds([3; 32], [4; 32]).device_id();
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz/corpus/changes");
        let mut tried = 0;
        for entry in std::fs::read_dir(&dir).expect("the committed fuzz corpus") {
            let path = entry.expect("an entry").path();
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("regression-"))
            {
                continue;
            }
            let bytes = std::fs::read(&path).expect("a regression input");
            // Refused when decoded (marks, or operations Automerge cannot expand), or else when
            // applied: never a panic that escapes.
            if let Ok(decoded) = decode_changes(&bytes, &author) {
                let mut doc = AutoCommit::new();
                assert!(
                    matches!(
                        apply(&mut doc, decoded),
                        Err(ChangesError::Automerge { .. })
                    ),
                    "{} is refused",
                    path.display()
                );
            }
            tried += 1;
        }
        assert!(tried >= 2, "the regression inputs are in {}", dir.display());
    }

    proptest! {
        /// Any bytes, and any damage to real changes, give changes or an error: never a panic.
        #[test]
        fn arbitrary_or_damaged_payloads_never_panic(
            junk in proptest::collection::vec(any::<u8>(), 0..512),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let me = device(1);
            let _ = decode_changes(&junk, &me);
            let mut good = written(&me, 3, "値");
            let i = at.index(good.len());
            good[i] = byte;
            let _ = decode_changes(&good, &me);
        }
    }
}
