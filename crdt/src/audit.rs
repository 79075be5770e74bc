//! The audit log's entries and their chain (医療情報システムの安全管理に関するガイドライン 第6.0版:
//! アクセスログの記録, ログの改ざん防止): who did what to which document, when, on which device.
//!
//! Pure: the engine stores each [`SignedEntry`] sealed (`app/facility/src/audit.rs`) and calls
//! [`verify_chain`] over what it reads back. An entry names the fields it touched, never their values.
//!
//! The chain: entry `n` carries `prev`, the [`entry_hash`] of entry `n - 1` (zeros for the first one
//! a device writes), and the device signs each entry's CBOR (domain [`crypto::domain::AUDIT`]).
//! Changing an entry breaks its signature; removing one breaks the next entry's `prev`; removing
//! the newest ones is seen against the head the device keeps beside them ([`ChainHead`]).

use serde::{Deserialize, Serialize};

use crate::crypto::{self, DeviceSecrets};
use crate::ids::{DeviceId, DocumentId};

/// What was done. The names ([`AuditAction::as_str`]) are stable: they are what `musubi audit list`
/// prints and filters on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "kebab-case")]
pub enum AuditAction {
    /// A document's view was shown (閲覧).
    Read,
    /// A document was created.
    Create,
    /// Fields of a document were changed (更新).
    Edit,
    /// A document left the device as a file (CSV, FHIR JSON, a transfer file).
    Export,
    /// A document was printed or written as a PDF.
    Print,
    /// A facility was added to a document's members.
    Share,
    /// A facility was removed from a document's members.
    Unshare,
    /// An IC card was read.
    CardRead,
    /// A staff member signed in.
    SignIn,
    /// A staff member signed out.
    SignOut,
    /// A sign-in failed (wrong login, password, card or PIN).
    SignInFailed,
    /// A staff account was created.
    StaffAdd,
    /// A staff account was changed (card bound or unbound).
    StaffChange,
    /// A 安否確認 (safety inquiry) was answered.
    SafetyInquiry,
    /// The audit log itself was listed, verified or exported.
    AuditRead,
    /// An administrator reviewed the log of a period (定期確認); the fields name the period.
    Review,
    /// A session was locked after the staff member was idle (the drafts stay; signing in again
    /// is a `sign-in`).
    Lock,
}

impl AuditAction {
    /// Every action.
    pub const ALL: [Self; 17] = [
        Self::Read,
        Self::Create,
        Self::Edit,
        Self::Export,
        Self::Print,
        Self::Share,
        Self::Unshare,
        Self::CardRead,
        Self::SignIn,
        Self::SignOut,
        Self::SignInFailed,
        Self::StaffAdd,
        Self::StaffChange,
        Self::SafetyInquiry,
        Self::AuditRead,
        Self::Review,
        Self::Lock,
    ];

    /// The stable name (`read`, `edit`, `export`, `print`, `share`, `sign-in`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Create => "create",
            Self::Edit => "edit",
            Self::Export => "export",
            Self::Print => "print",
            Self::Share => "share",
            Self::Unshare => "unshare",
            Self::CardRead => "card-read",
            Self::SignIn => "sign-in",
            Self::SignOut => "sign-out",
            Self::SignInFailed => "sign-in-failed",
            Self::StaffAdd => "staff-add",
            Self::StaffChange => "staff-change",
            Self::SafetyInquiry => "safety-inquiry",
            Self::AuditRead => "audit-read",
            Self::Review => "review",
            Self::Lock => "lock",
        }
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AuditAction {
    type Err = crate::ids::ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s.trim())
            .ok_or_else(|| crate::ids::ParseIdError::new("audit action", s))
    }
}

/// One audit entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its place in the device's chain, from 1.
    pub seq: u64,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The device that wrote it (and signed it).
    pub device: DeviceId,
    /// The staff member signed in (login), if any (a failed sign-in names the login tried).
    pub staff: Option<String>,
    /// The document acted on, if any.
    pub doc: Option<DocumentId>,
    /// What was done.
    pub action: AuditAction,
    /// The fields touched (names, never values), e.g. `purpose` or `roster.csv`.
    pub fields: Vec<String>,
    /// [`entry_hash`] of the previous entry of this device's chain (zeros for the first).
    #[serde(with = "serde_bytes")]
    pub prev: [u8; 32],
}

/// An entry as stored: its CBOR and the device's signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEntry {
    /// CBOR of the [`AuditEntry`].
    #[serde(with = "serde_bytes")]
    pub entry: Vec<u8>,
    /// Ed25519 signature by the entry's device over `entry` (domain [`crypto::domain::AUDIT`]).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// The newest entry of a device's chain: its place and hash (kept beside the entries, so that
/// removing the newest entries shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// The newest entry's `seq`.
    pub seq: u64,
    /// Its [`entry_hash`].
    #[serde(with = "serde_bytes")]
    pub hash: [u8; 32],
}

/// The hash that chains entries: BLAKE3 (derive-key mode, `musubi audit entry v1`) of the signed
/// entry's CBOR (entry and signature both).
pub fn entry_hash(signed: &SignedEntry) -> [u8; 32] {
    let mut bytes = Vec::new();
    ciborium::into_writer(signed, &mut bytes).expect("writing to a Vec cannot fail");
    blake3::derive_key("musubi audit entry v1", &bytes)
}

impl SignedEntry {
    /// Signs `entry` with the device's key. The caller sets `seq`, `prev` and `device`.
    pub fn sign(secrets: &DeviceSecrets, entry: &AuditEntry) -> Self {
        let mut bytes = Vec::new();
        ciborium::into_writer(entry, &mut bytes).expect("writing to a Vec cannot fail");
        let signature = secrets.sign(crypto::domain::AUDIT, &bytes);
        Self {
            entry: bytes,
            signature,
        }
    }

    /// The entry, once its signature verifies for the device it names.
    ///
    /// Errors: [`ChainBreak`] reasons `undecodable` or `bad signature`.
    pub fn open(&self) -> Result<AuditEntry, &'static str> {
        let entry: AuditEntry = ciborium::from_reader(self.entry.as_slice())
            .map_err(|_| "its entry does not decode")?;
        crypto::verify(
            &entry.device,
            crypto::domain::AUDIT,
            &self.entry,
            &self.signature,
        )
        .map_err(|_| "its signature does not verify")?;
        Ok(entry)
    }
}

/// Where a chain stops verifying.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("audit log broken at entry {seq}: {reason}")]
pub struct ChainBreak {
    /// The first entry (row) that does not verify, or the first one missing.
    pub seq: u64,
    /// Why, for people.
    pub reason: String,
}

/// What a verified chain holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainSummary {
    /// Entries verified.
    pub entries: u64,
    /// The first one's `seq` (entries before it were removed by retention, if it is over 1).
    pub first: Option<u64>,
    /// The newest one's `seq`.
    pub last: Option<u64>,
}

/// Verifies one device's chain: `rows` are the stored rows in order of their row number, each the
/// row number and the opened [`SignedEntry`] (or why it could not be opened); `start` is the
/// expected first row and the hash its `prev` must carry (`(1, zeros)`, or what retention kept);
/// `head` is the newest entry the device recorded.
///
/// Errors: the first [`ChainBreak`]: an entry that does not open, decode or verify, that is
/// another device's, whose `seq` is not its row's, a gap, a `prev` that is not the previous
/// entry's hash, a chain that ends before `head` (or differs from it), or entries without a head.
pub fn verify_chain(
    device: &DeviceId,
    start: (u64, [u8; 32]),
    rows: impl IntoIterator<Item = (u64, Result<SignedEntry, String>)>,
    head: Option<ChainHead>,
) -> Result<ChainSummary, ChainBreak> {
    let brk = |seq: u64, reason: String| ChainBreak { seq, reason };
    let (mut expect, mut prev) = start;
    let mut summary = ChainSummary {
        entries: 0,
        first: None,
        last: None,
    };
    for (row, signed) in rows {
        if row != expect {
            return Err(brk(
                expect,
                format!("entry {expect} is missing (the next stored is {row})"),
            ));
        }
        let signed = signed.map_err(|reason| brk(row, reason))?;
        let entry = signed.open().map_err(|r| brk(row, r.to_owned()))?;
        if &entry.device != device {
            return Err(brk(
                row,
                format!("it names another device ({})", entry.device),
            ));
        }
        if entry.seq != row {
            return Err(brk(
                row,
                format!("it says it is entry {} (moved or copied)", entry.seq),
            ));
        }
        if entry.prev != prev {
            return Err(brk(
                row,
                "it does not follow the entry before it (one was changed or removed)".into(),
            ));
        }
        prev = entry_hash(&signed);
        summary.entries += 1;
        summary.first.get_or_insert(row);
        summary.last = Some(row);
        expect = row + 1;
    }
    if head.is_none() && summary.last.is_some() {
        return Err(brk(
            expect,
            "the record of the newest entry is missing (entries may have been removed after it)"
                .into(),
        ));
    }
    if let Some(head) = head {
        match summary.last {
            // Every entry up to the head read, or none left after the start (retention removed
            // them all, and the start is the head).
            _ if expect - 1 == head.seq && prev == head.hash => {}
            Some(last) if last == head.seq => {
                return Err(brk(last, "it is not the newest entry recorded".into()));
            }
            _ => {
                return Err(brk(
                    expect,
                    format!(
                        "the log ends at entry {} but {} were written (the newest were removed)",
                        expect - 1,
                        head.seq
                    ),
                ));
            }
        }
    }
    Ok(summary)
}

/// The facility's audit document ([`crate::ids::DocumentKind::Audit`]): each of its devices copies
/// its signed entries into it, so that the log outlives a lost or wiped device.
///
/// Shape (Automerge): the root map holds `facility` (text, the facility id), optionally
/// `retention_days` (an integer: how long entries are kept, set by an administrator for every
/// device of the facility), `entries`, a map from `"<device>/<seq>"` (the device id in hex, the
/// entry's `seq` as 20 zero-padded digits) to the [`SignedEntry`]'s CBOR (bytes), and `anchors`, a
/// map from the device id to the CBOR of the last of its entries retention removed (where its
/// chain in the document starts again). A flat map with one
/// key per entry: two processes of one device publishing at once write the same key with the
/// same value, and a key never hides another.
///
/// The entries are the device's own signed chain: whoever writes them, they verify only as that
/// device's ([`verify_chain`] over [`synced_chains`]).
pub mod document {
    use std::collections::BTreeMap;

    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, AutomergeError, ObjType, ROOT, ReadDoc, ScalarValue, Value};

    use super::{AuditEntry, SignedEntry};
    use crate::ids::{DeviceId, FacilityId};

    /// Most entries a device copies into the document in one change.
    pub const PUBLISH_BATCH_MAX: usize = 2_000;
    /// Largest entry (CBOR bytes) read from the document.
    pub const ENTRY_BYTES_MAX: usize = 16 * 1024;

    fn key(device: &DeviceId, seq: u64) -> String {
        format!("{device}/{seq:020}")
    }

    fn entries_obj(doc: &AutoCommit) -> Option<automerge::ObjId> {
        match doc.get(ROOT, "entries") {
            Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
            _ => None,
        }
    }

    /// Writes a new audit document's root for `facility`.
    ///
    /// Errors: Automerge's.
    pub fn init(doc: &mut AutoCommit, facility: &FacilityId) -> Result<(), AutomergeError> {
        doc.put(ROOT, "facility", facility.to_string())?;
        doc.put_object(ROOT, "entries", ObjType::Map)?;
        Ok(())
    }

    /// Copies `entries` of `device` into the document (an entry already there is written again
    /// with the same value).
    ///
    /// Errors: Automerge's; `entries` missing from the root (not an audit document).
    pub fn append(
        doc: &mut AutoCommit,
        device: &DeviceId,
        entries: &[(u64, SignedEntry)],
    ) -> Result<(), AutomergeError> {
        let obj = match entries_obj(doc) {
            Some(o) => o,
            None => doc.put_object(ROOT, "entries", ObjType::Map)?,
        };
        for (seq, signed) in entries {
            let mut bytes = Vec::new();
            ciborium::into_writer(signed, &mut bytes).expect("writing to a Vec cannot fail");
            doc.put(&obj, key(device, *seq), ScalarValue::Bytes(bytes))?;
        }
        Ok(())
    }

    /// Removes `device`'s entries up to `through` (retention).
    ///
    /// Errors: Automerge's.
    pub fn remove_through(
        doc: &mut AutoCommit,
        device: &DeviceId,
        through: u64,
    ) -> Result<usize, AutomergeError> {
        let Some(obj) = entries_obj(doc) else {
            return Ok(0);
        };
        let prefix = format!("{device}/");
        let doomed: Vec<String> = doc
            .keys(&obj)
            .filter(|k| {
                k.strip_prefix(&prefix)
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|seq| seq <= through)
            })
            .collect();
        for k in &doomed {
            doc.delete(&obj, k.as_str())?;
        }
        Ok(doomed.len())
    }

    /// How long entries are kept, in days, if an administrator set it.
    pub fn retention_days(doc: &AutoCommit) -> Option<u64> {
        match doc.get(ROOT, "retention_days") {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Uint(n) => Some(*n),
                ScalarValue::Int(n) if *n > 0 => Some(*n as u64),
                _ => None,
            },
            _ => None,
        }
    }

    /// Sets how long entries are kept, in days.
    ///
    /// Errors: Automerge's.
    pub fn set_retention_days(doc: &mut AutoCommit, days: u64) -> Result<(), AutomergeError> {
        doc.put(ROOT, "retention_days", ScalarValue::Uint(days))
    }

    /// The newest `seq` of `device` in the document whose entry is that device's, signed, at that
    /// place (a key holding anything else is passed over: it is not the device's).
    pub fn last_seq(doc: &AutoCommit, device: &DeviceId) -> Option<u64> {
        let obj = entries_obj(doc)?;
        let prefix = format!("{device}/");
        let mut keys: Vec<(u64, String)> = doc
            .keys(&obj)
            .filter_map(|k| {
                let seq = k.strip_prefix(&prefix)?.parse::<u64>().ok()?;
                Some((seq, k))
            })
            .collect();
        keys.sort();
        keys.into_iter().rev().find_map(|(seq, k)| {
            let entry = read_entry(doc, &obj, &k).ok()?.open().ok()?;
            (entry.device == *device && entry.seq == seq).then_some(seq)
        })
    }

    fn read_entry(
        doc: &AutoCommit,
        obj: &automerge::ObjId,
        key: &str,
    ) -> Result<SignedEntry, String> {
        match doc.get(obj, key) {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Bytes(b) if b.len() <= ENTRY_BYTES_MAX => {
                    ciborium::from_reader::<SignedEntry, _>(b.as_slice())
                        .map_err(|_| "it does not decode".to_owned())
                }
                ScalarValue::Bytes(_) => Err("it is too large".to_owned()),
                _ => Err("it is not an entry".to_owned()),
            },
            _ => Err("it is not an entry".to_owned()),
        }
    }

    /// Records `anchor`, the last entry of `device` that retention removed from the document.
    ///
    /// Errors: Automerge's.
    pub fn set_anchor(
        doc: &mut AutoCommit,
        device: &DeviceId,
        anchor: &SignedEntry,
    ) -> Result<(), AutomergeError> {
        let obj = match doc.get(ROOT, "anchors") {
            Ok(Some((Value::Object(ObjType::Map), id))) => id,
            _ => doc.put_object(ROOT, "anchors", ObjType::Map)?,
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(anchor, &mut bytes).expect("writing to a Vec cannot fail");
        doc.put(&obj, device.to_string(), ScalarValue::Bytes(bytes))
    }

    /// The retention anchor of `device`, if retention removed any of its entries.
    pub fn anchor(doc: &AutoCommit, device: &DeviceId) -> Option<Result<SignedEntry, String>> {
        let obj = match doc.get(ROOT, "anchors") {
            Ok(Some((Value::Object(ObjType::Map), id))) => id,
            _ => return None,
        };
        doc.get(&obj, device.to_string()).ok()??;
        Some(read_entry(doc, &obj, &device.to_string()))
    }

    /// One device's entries as the document holds them: each key's `seq` and the entry (or why
    /// it cannot be read), in `seq` order.
    pub type Chain = Vec<(u64, Result<SignedEntry, String>)>;

    /// Every device's entries the document holds (keys that do not parse are reported under no
    /// device: `Err` with the key).
    pub fn synced_chains(doc: &AutoCommit) -> (BTreeMap<DeviceId, Chain>, Vec<String>) {
        let mut out: BTreeMap<DeviceId, Chain> = BTreeMap::new();
        let mut bad = Vec::new();
        let Some(obj) = entries_obj(doc) else {
            return (out, bad);
        };
        for k in doc.keys(&obj) {
            let parsed = k
                .split_once('/')
                .and_then(|(d, s)| Some((d.parse::<DeviceId>().ok()?, s.parse::<u64>().ok()?)));
            let Some((device, seq)) = parsed else {
                bad.push(k);
                continue;
            };
            let entry = read_entry(doc, &obj, &k);
            out.entry(device).or_default().push((seq, entry));
        }
        for chain in out.values_mut() {
            chain.sort_by_key(|(seq, _)| *seq);
        }
        (out, bad)
    }

    /// The entry of a synced chain, opened (its signature verified), if it is there.
    pub fn opened(chain: &Chain, seq: u64) -> Option<AuditEntry> {
        chain
            .iter()
            .find(|(s, _)| *s == seq)
            .and_then(|(_, e)| e.as_ref().ok())
            .and_then(|e| e.open().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(secrets: &DeviceSecrets, n: u64) -> Vec<SignedEntry> {
        let mut prev = [0; 32];
        (1..=n)
            .map(|seq| {
                let s = SignedEntry::sign(
                    secrets,
                    &AuditEntry {
                        seq,
                        at_ms: 1_000 * seq,
                        device: secrets.device_id(),
                        staff: Some("sato".into()),
                        doc: None,
                        action: AuditAction::Read,
                        fields: vec!["purpose".into()],
                        prev,
                    },
                );
                prev = entry_hash(&s);
                s
            })
            .collect()
    }

    fn rows(c: &[SignedEntry]) -> Vec<(u64, Result<SignedEntry, String>)> {
        c.iter()
            .enumerate()
            .map(|(i, s)| (i as u64 + 1, Ok(s.clone())))
            .collect()
    }

    #[test]
    fn a_changed_removed_or_truncated_entry_breaks_the_chain_where_it_happened() {
        let me = DeviceSecrets::from_seeds([1; 32], [2; 32]);
        let c = chain(&me, 5);
        let head = Some(ChainHead {
            seq: 5,
            hash: entry_hash(&c[4]),
        });
        let d = me.device_id();
        let ok = verify_chain(&d, (1, [0; 32]), rows(&c), head).expect("intact");
        assert_eq!((ok.entries, ok.first, ok.last), (5, Some(1), Some(5)));

        // An altered entry: its signature fails.
        let mut altered = rows(&c);
        if let Ok(s) = &mut altered[2].1 {
            let mut e: AuditEntry = ciborium::from_reader(s.entry.as_slice()).expect("cbor");
            e.action = AuditAction::Edit;
            s.entry.clear();
            ciborium::into_writer(&e, &mut s.entry).expect("cbor");
        }
        let b = verify_chain(&d, (1, [0; 32]), altered, head).expect_err("altered");
        assert_eq!(b.seq, 3);
        assert!(b.reason.contains("signature"), "{b}");

        // A removed entry: a gap.
        let mut removed = rows(&c);
        let _ = removed.remove(1);
        assert_eq!(
            verify_chain(&d, (1, [0; 32]), removed, head)
                .expect_err("removed")
                .seq,
            2
        );

        // An entry replaced by another of the device's, re-signed with its key at that place
        // (what a thief with the passphrase could do): the next entry's `prev` does not match.
        let mut replaced = rows(&c);
        let forged = SignedEntry::sign(
            &me,
            &AuditEntry {
                seq: 2,
                at_ms: 2_000,
                device: d,
                staff: Some("sato".into()),
                doc: None,
                action: AuditAction::SignIn,
                fields: vec![],
                prev: entry_hash(&c[0]),
            },
        );
        replaced[1].1 = Ok(forged);
        let b = verify_chain(&d, (1, [0; 32]), replaced, head).expect_err("replaced");
        assert_eq!(b.seq, 3, "{b}");

        // The newest two removed: seen against the head.
        let b = verify_chain(&d, (1, [0; 32]), rows(&c[..3]), head).expect_err("truncated");
        assert!(b.reason.contains("newest were removed"), "{b}");

        // The head removed while entries remain.
        let b = verify_chain(&d, (1, [0; 32]), rows(&c), None).expect_err("no head");
        assert!(b.reason.contains("newest entry is missing"), "{b}");

        // Another device's entry.
        let other = DeviceSecrets::from_seeds([3; 32], [4; 32]);
        let b = verify_chain(&d, (1, [0; 32]), rows(&chain(&other, 1)), head)
            .expect_err("another device");
        assert!(b.reason.contains("another device"), "{b}");
    }

    #[test]
    fn the_audit_document_merges_devices_and_copies_and_drops_what_retention_ends() {
        use automerge::AutoCommit;
        let (a, b) = (
            DeviceSecrets::from_seeds([1; 32], [2; 32]),
            DeviceSecrets::from_seeds([3; 32], [4; 32]),
        );
        let facility = crate::ids::FacilityId::from_random_bytes([5; 16]);
        let mut doc = AutoCommit::new();
        document::init(&mut doc, &facility).expect("init");
        let mut other = doc.fork();
        let ca = chain(&a, 3);
        let cb = chain(&b, 2);
        let numbered = |c: &[SignedEntry]| -> Vec<(u64, SignedEntry)> {
            c.iter()
                .cloned()
                .enumerate()
                .map(|(i, s)| (i as u64 + 1, s))
                .collect()
        };
        // Device a publishes its first two, then all three (the same entries again, and one new),
        // while device b publishes on a copy made before: the merge holds both chains whole.
        document::append(&mut doc, &a.device_id(), &numbered(&ca[..2])).expect("append");
        document::append(&mut doc, &a.device_id(), &numbered(&ca)).expect("append");
        document::append(&mut other, &b.device_id(), &numbered(&cb)).expect("append");
        doc.merge(&mut other).expect("merge");
        assert_eq!(document::last_seq(&doc, &a.device_id()), Some(3));
        assert_eq!(document::last_seq(&doc, &b.device_id()), Some(2));
        let (chains, bad) = document::synced_chains(&doc);
        assert!(bad.is_empty());
        for (dev, c) in [(a.device_id(), &ca), (b.device_id(), &cb)] {
            let held = &chains[&dev];
            let head = Some(ChainHead {
                seq: held.len() as u64,
                hash: entry_hash(c.last().expect("entries")),
            });
            let ok = verify_chain(&dev, (1, [0; 32]), held.iter().cloned(), head).expect("whole");
            assert_eq!(ok.entries, c.len() as u64);
        }
        // Retention removes a's first two: its chain verifies from entry 3, after entry 2.
        assert_eq!(
            document::remove_through(&mut doc, &a.device_id(), 2).expect("remove"),
            2
        );
        let (chains, _) = document::synced_chains(&doc);
        let held = &chains[&a.device_id()];
        assert_eq!(held.len(), 1);
        let ok = verify_chain(
            &a.device_id(),
            (3, entry_hash(&ca[1])),
            held.iter().cloned(),
            Some(ChainHead {
                seq: 3,
                hash: entry_hash(&ca[2]),
            }),
        )
        .expect("from the anchor");
        assert_eq!((ok.first, ok.last), (Some(3), Some(3)));
        // Every entry removed: the start is the head.
        let none: Vec<(u64, Result<SignedEntry, String>)> = Vec::new();
        verify_chain(
            &a.device_id(),
            (4, entry_hash(&ca[2])),
            none,
            Some(ChainHead {
                seq: 3,
                hash: entry_hash(&ca[2]),
            }),
        )
        .expect("nothing left after the anchor");
        // A key that is not the device's entry (junk another writer filed under it) is passed over.
        let mut junk = doc.fork();
        {
            use automerge::transaction::Transactable;
            let obj = match automerge::ReadDoc::get(&junk, automerge::ROOT, "entries") {
                Ok(Some((_, id))) => id,
                _ => panic!("entries"),
            };
            junk.put(
                &obj,
                format!("{}/{:020}", b.device_id(), 99_999_999u64),
                automerge::ScalarValue::Bytes(vec![1, 2, 3]),
            )
            .expect("put");
            junk.put(
                &obj,
                format!("{}/{:020}", b.device_id(), 88_888_888u64),
                automerge::ScalarValue::Bytes({
                    let mut v = Vec::new();
                    ciborium::into_writer(&ca[2], &mut v).expect("cbor");
                    v
                }),
            )
            .expect("put");
        }
        assert_eq!(document::last_seq(&junk, &b.device_id()), Some(2));
        assert_eq!(document::retention_days(&doc), None);
        document::set_retention_days(&mut doc, 3_650).expect("set");
        assert_eq!(document::retention_days(&doc), Some(3_650));
    }

    #[test]
    fn action_names_are_stable() {
        for a in AuditAction::ALL {
            assert_eq!(a.as_str().parse::<AuditAction>().expect("parse"), a);
        }
        assert_eq!(AuditAction::SignInFailed.as_str(), "sign-in-failed");
    }
}
