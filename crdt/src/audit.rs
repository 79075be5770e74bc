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
}

impl AuditAction {
    /// Every action.
    pub const ALL: [Self; 15] = [
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
            Some(last) if last == head.seq && prev == head.hash => {}
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
    fn action_names_are_stable() {
        for a in AuditAction::ALL {
            assert_eq!(a.as_str().parse::<AuditAction>().expect("parse"), a);
        }
        assert_eq!(AuditAction::SignInFailed.as_str(), "sign-in-failed");
    }
}
