//! Typed events the shell sends to the UI (tauri-specta generates their TypeScript).

use musubi_crdt::ids::{DocumentId, DocumentKind};
use serde::{Deserialize, Serialize};

/// The state of sync, in the terms the status bar shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Connected to the relay and in step with it (オンライン).
    Online,
    /// Trying to reach the relay (中継サーバーに接続中).
    Connecting,
    /// The relay is out of reach but facility devices on the LAN are connected (LAN内の端末と同期中).
    Lan,
    /// Neither the relay nor a LAN peer is reachable (オフライン): edits are kept and sent later.
    Offline,
    /// This device has not joined a deployment yet.
    NotJoined,
    /// The relay refused this device (revoked or unknown): `message` says what to do.
    Refused,
}

/// Sync state, unsent edits and the last successful sync. Sent as an event whenever it changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type, tauri_specta::Event)]
pub struct SyncStatus {
    /// What the status bar says.
    pub state: SyncState,
    /// Edits made here and not yet acknowledged by the relay (未送信), in outbox items.
    pub pending: u32,
    /// When this device was last in step with the relay, in milliseconds since the Unix epoch.
    pub last_sync_ms: Option<f64>,
    /// Facility devices on the LAN connected now.
    pub lan_peers: u32,
    /// The relay's or the network's last word when refused or failing (English), else null.
    pub message: Option<String>,
    /// The last time the relay was found to have gone back in time (restored from a backup, or
    /// rolled back) and this device offered what it holds again; null if never.
    pub relay_behind: Option<RelayBehindNotice>,
    /// Bundles this device keeps but does not apply (隔離): they failed to decode, were written as
    /// another device, or came from a device that may not write the document. Newest first, at most
    /// [`QUARANTINE_SHOWN_MAX`].
    pub quarantined: Vec<QuarantinedNotice>,
    /// How many bundles are quarantined in all.
    pub quarantined_total: u32,
    /// Edits the relay held back because this facility's storage quota there is full (保存容量の
    /// 上限): kept here and sent again at a later sync, once the relay operator raised it.
    pub held_back: u32,
}

/// Quarantined bundles listed in [`SyncStatus::quarantined`].
pub const QUARANTINE_SHOWN_MAX: usize = 20;

/// One quarantined bundle, as the status bar names it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct QuarantinedNotice {
    /// The bundle's id, its first 16 hex digits.
    pub bundle: String,
    /// The document it claims to belong to.
    pub document: String,
    /// The facility its envelope names: its certified name, or its id when the directory has none.
    pub facility: String,
    /// The device that signed it.
    pub device: String,
    /// Why it is not applied (English, from the engine).
    pub reason: String,
    /// When it was quarantined, in milliseconds since the Unix epoch.
    pub at_ms: f64,
}

/// The relay went back in time and this device sent its data again (DESIGN "Rollback").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type)]
pub struct RelayBehindNotice {
    /// When this device last noticed, in milliseconds since the Unix epoch.
    pub at_ms: f64,
    /// Whether the relay's store was another generation (restored from a backup) rather than
    /// rolled back.
    pub restored: bool,
    /// How many times this device noticed.
    pub times: u32,
}

/// A document's content changed here because bundles or keys arrived from another facility or
/// device; screens showing it reload. Also sent after the relay's document list arrives, with the
/// kind of each newly listed document.
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type, tauri_specta::Event,
)]
pub struct DocumentChanged {
    /// The document.
    pub id: DocumentId,
    /// Its kind: which screens care.
    pub kind: DocumentKind,
}

/// An IC card was tapped on the reader: its pseudonymous id in the sector of the people this
/// facility registers (never the card's own number). The reception screen checks the holder in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, specta::Type, tauri_specta::Event)]
pub struct CardTapped {
    /// The pseudonymous card id (HMAC of the card's id under the facility's key of that sector).
    pub card_id: String,
    /// The card type: マイナンバーカード or a contactless card (Suica and other FeliCa/MIFARE).
    pub card_kind: musubi_facility::card::CardKind,
    /// When the reader reported the tap, in milliseconds since the Unix epoch.
    pub at_ms: f64,
}

/// The card reader side as the reception screen shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum CardReaderState {
    /// Not looked yet, or waiting for the facility to be unlocked and enrolled.
    Starting,
    /// The PC/SC service (pcscd) is not running: checked again every few seconds.
    ServiceUnavailable,
    /// The service runs but no reader is connected: checked again every few seconds.
    NoReader,
    /// Readers are connected and empty: hold a card to one.
    Ready,
    /// A card is on a reader.
    CardPresent,
    /// A card is on a reader but does not answer: place it again.
    CardMute,
    /// This device has not joined a deployment, so card ids cannot be derived yet.
    NotEnrolled,
}

/// The card reader's status. Sent as the `CardStatus` event whenever it changes (never repeated
/// while nothing changes); the `card_status` command returns the latest.
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type, tauri_specta::Event,
)]
pub struct CardStatus {
    /// Whether a tap can be read now (the service runs and a reader is connected).
    pub available: bool,
    /// The state in detail.
    pub state: CardReaderState,
    /// The connected readers' names.
    pub readers: Vec<String>,
    /// What the reception desk shows (Japanese).
    pub message: String,
    /// The same in English.
    pub message_en: String,
    /// The last card that could not be read, as `{ kind, message }` (kind: the card module's
    /// stable error name, e.g. `not_responding`, `unsupported`); null after a good read.
    pub last_error: Option<CardReadError>,
}

/// Why a tapped card could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, specta::Type)]
pub struct CardReadError {
    /// The stable error name (`removed`, `not_responding`, `unsupported`, ...).
    pub kind: String,
    /// What to do, in Japanese.
    pub message: String,
}

impl CardStatus {
    /// The status before the reader was looked at.
    pub fn starting() -> Self {
        Self {
            available: false,
            state: CardReaderState::Starting,
            readers: Vec::new(),
            message: "カードリーダーを確認しています".into(),
            message_en: "Checking card readers".into(),
            last_error: None,
        }
    }
}
