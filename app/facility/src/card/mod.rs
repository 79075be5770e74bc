//! IC cards through PC/SC (pcsc-lite's `pcscd`): reader and card watching, the My Number card and
//! contactless cards, each turned into a pseudonymous id (DESIGN "Cards", invariant 7).
//!
//! - [`Watcher`]: one step at a time ([`Watcher::poll`]) it reports readers plugged in and out, cards
//!   inserted and removed, no reader, and the PC/SC service going away and coming back, as
//!   [`CardEvent`]s and a [`CardState`] the UI shows. It waits with `SCardGetStatusChange` and a
//!   timeout on the readers plus the `\\?PnP?\Notification` pseudo-reader, and re-establishes its
//!   context when the service stops, so it never hangs and recovers when `pcscd` restarts.
//! - [`read`] / [`wait_for_tap`]: wait for a card, then run one card session on a worker thread
//!   watched by a deadline (a card that stops answering becomes [`CardError::NotResponding`], never
//!   a hang): detect the kind, read the identity, and only when asked, verify a PIN (tries shown,
//!   last try refused without confirmation, never retried) to prove possession or read the four
//!   attributes. The worker hands back raw identifiers; the pseudonymous id is derived here with
//!   [`Engine::pseudonym`] and the raw bytes are dropped. Nothing is written to disk.
//! - [`apdu`], [`mynumber`], [`contactless`]: the APDU layer and the two card families.

pub mod apdu;
pub mod contactless;
pub mod mynumber;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pcsc::{
    Context, Disposition, PNP_NOTIFICATION, Protocols, ReaderState, Scope, ShareMode, State,
};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError};
use apdu::{Protocol, Transport};
use contactless::Uid;
use musubi_crdt::crypto::PseudonymSector;
pub use mynumber::{Attributes, Pin, PinKind, PinPrompt, Sex};
use mynumber::{AuthCertificate, MyNumberCard};

/// Pseudonym domain of My Number cards: the user-authentication certificate's SubjectPublicKeyInfo.
pub const DOMAIN_JPKI_AUTH: &str = "jpki-auth";
/// Pseudonym domain of contactless cards: the UID / IDm.
pub const DOMAIN_CONTACTLESS_UID: &str = "contactless-uid";

/// How long [`Watcher::poll`] sleeps between attempts while the PC/SC service is down.
pub const SERVICE_RETRY: Duration = Duration::from_millis(500);
/// How long one card exchange may take before the card counts as not responding (JPKI signing
/// takes about a second on real cards).
pub const EXCHANGE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(8);
/// Largest response buffer handed to `SCardTransmit`, in bytes (extended APDU size).
pub const TRANSMIT_BUFFER_BYTES: usize = pcsc::MAX_BUFFER_SIZE_EXTENDED;
/// Most readers tracked at once (pcsc-lite allows 16).
pub const READERS_MAX: usize = 16;

/// What went wrong with a card; each message says what to do. [`CardError::kind`] is the stable
/// name the UI branches on.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    /// The PC/SC service (`pcscd`) is not running or stopped.
    #[error(
        "the smart card service is not available ({0}); start pcscd (systemctl start pcscd.socket)"
    )]
    ServiceUnavailable(String),
    /// No card reader is connected.
    #[error("no card reader is connected; plug one in")]
    NoReader,
    /// No card came within the time allowed.
    #[error("no card was presented within {0:?}")]
    NoCard(Duration),
    /// The card left the reader during the session.
    #[error("the card was removed before reading finished; hold it to the reader again")]
    Removed,
    /// The card does not answer.
    #[error("the card in {reader} does not respond; take it out and place it again")]
    NotResponding {
        /// The reader.
        reader: String,
    },
    /// Another program holds the card exclusively.
    #[error("the card reader {0} is in use by another program")]
    ReaderBusy(String),
    /// Neither a My Number card nor a contactless card with a stable UID.
    #[error("this card is not supported: {0}")]
    Unsupported(String),
    /// The card answered a command with an error status word.
    #[error("{command}: the card answered {sw:04X} ({meaning})")]
    Status {
        /// The command.
        command: &'static str,
        /// SW1 SW2.
        sw: u16,
        /// What the status word means.
        meaning: &'static str,
    },
    /// The card's data did not have the expected form.
    #[error("the card's data is malformed: {0}")]
    Malformed(String),
    /// A file or response exceeds its limit.
    #[error("{what}: more than {max} bytes")]
    TooLarge {
        /// What was read.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The user-authentication certificate could not be used.
    #[error("{0}")]
    Certificate(String),
    /// The PIN is not exactly four digits (nothing was sent to the card).
    #[error("the PIN must be exactly 4 digits; nothing was sent to the card")]
    PinFormat,
    /// A PIN was needed and none was given (nothing was sent).
    #[error("the {} is needed ({tries_left} tries left); nothing was sent to the card", .which.label_en())]
    PinNotGiven {
        /// Which PIN.
        which: PinKind,
        /// Tries left.
        tries_left: u8,
    },
    /// The PIN was wrong; it is not retried automatically.
    #[error("wrong {}: {tries_left} tries left before the card locks it; ask the resident before trying again", .which.label_en())]
    WrongPin {
        /// Which PIN.
        which: PinKind,
        /// Tries left.
        tries_left: u8,
    },
    /// Only one try is left and the user did not confirm using it.
    #[error("only one try is left for the {}: another wrong PIN locks it; confirm with the resident (--confirm-last-try) or ask the municipal office to reset it", .which.label_en())]
    LastTry {
        /// Which PIN.
        which: PinKind,
    },
    /// The PIN is locked.
    #[error("the {} is locked; the resident must have it reset at the municipal office", .which.label_en())]
    PinBlocked {
        /// Which PIN.
        which: PinKind,
    },
    /// The card's signature over the challenge did not verify against its certificate.
    #[error("the card's signature does not match its certificate; the card may be counterfeit")]
    SignatureInvalid,
    /// Another PC/SC error.
    #[error("smart card error: {0}")]
    Pcsc(#[from] pcsc::Error),
    /// The engine could not derive the pseudonymous id.
    #[error(transparent)]
    Engine(Box<EngineError>),
}

impl From<EngineError> for CardError {
    fn from(e: EngineError) -> Self {
        Self::Engine(Box::new(e))
    }
}

impl CardError {
    pub(crate) fn status(command: &'static str, sw: u16) -> Self {
        Self::Status {
            command,
            sw,
            meaning: apdu::status_meaning(sw),
        }
    }

    /// A stable snake_case name of the error, for UIs and scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            CardError::ServiceUnavailable(_) => "service_unavailable",
            CardError::NoReader => "no_reader",
            CardError::NoCard(_) => "no_card",
            CardError::Removed => "removed",
            CardError::NotResponding { .. } => "not_responding",
            CardError::ReaderBusy(_) => "reader_busy",
            CardError::Unsupported(_) => "unsupported",
            CardError::Status { .. } => "status",
            CardError::Malformed(_) => "malformed",
            CardError::TooLarge { .. } => "too_large",
            CardError::Certificate(_) => "certificate",
            CardError::PinFormat => "pin_format",
            CardError::PinNotGiven { .. } => "pin_not_given",
            CardError::WrongPin { .. } => "wrong_pin",
            CardError::LastTry { .. } => "last_try",
            CardError::PinBlocked { .. } => "pin_blocked",
            CardError::SignatureInvalid => "signature_invalid",
            CardError::Pcsc(_) => "pcsc",
            CardError::Engine(e) if matches!(**e, EngineError::NoPseudonymKey { .. }) => {
                "no_sector_key"
            }
            CardError::Engine(_) => "engine",
        }
    }

    /// The message in Japanese, for the reception desk.
    pub fn message_ja(&self) -> String {
        match self {
            CardError::ServiceUnavailable(_) => {
                "カード読み取りサービス（pcscd）が動いていません。".into()
            }
            CardError::NoReader => "カードリーダーが接続されていません。".into(),
            CardError::NoCard(_) => "カードがかざされませんでした。".into(),
            CardError::Removed => {
                "読み取り中にカードが離れました。もう一度かざしてください。".into()
            }
            CardError::NotResponding { .. } => "カードが応答しません。置き直してください。".into(),
            CardError::ReaderBusy(_) => "カードリーダーを他のプログラムが使っています。".into(),
            CardError::Unsupported(_) => "このカードには対応していません。".into(),
            CardError::WrongPin { which, tries_left } => {
                format!(
                    "{}が違います。残り{}回で閉塞します。",
                    which.label_ja(),
                    tries_left
                )
            }
            CardError::LastTry { which } => {
                format!(
                    "{}は残り1回です。間違えると閉塞します。本人に確認してください。",
                    which.label_ja()
                )
            }
            CardError::PinBlocked { which } => {
                format!(
                    "{}が閉塞しています。市区町村の窓口で初期化が必要です。",
                    which.label_ja()
                )
            }
            CardError::PinFormat => "暗証番号は数字4桁です（カードには送っていません）。".into(),
            CardError::PinNotGiven { which, .. } => {
                format!("{}の入力が必要です。", which.label_ja())
            }
            CardError::SignatureInvalid => "カードの署名が証明書と一致しません。".into(),
            CardError::Engine(e) => match &**e {
                EngineError::NoPseudonymKey { sector, role } => format!(
                    "この施設（{}）には「{}」用のカードを読み取る鍵が発行されていません。",
                    role_ja(*role),
                    sector.label_ja()
                ),
                EngineError::NotEnrolled => {
                    "この端末はまだ参加していないため、カードを読み取れません。".into()
                }
                _ => format!("カードを読み取れませんでした（{}）。", self.kind()),
            },
            _ => format!("カードを読み取れませんでした（{}）。", self.kind()),
        }
    }
}

/// A facility role as staff name it.
fn role_ja(role: musubi_crdt::ids::FacilityRole) -> &'static str {
    use musubi_crdt::ids::FacilityRole as R;
    match role {
        R::Clinic => "診療所・病院",
        R::CareOffice => "居宅介護支援事業所",
        R::Shelter => "避難所",
        R::Hq => "災害対策本部",
    }
}

fn map_pcsc(e: pcsc::Error, reader: &str) -> CardError {
    use pcsc::Error as E;
    match e {
        E::NoService | E::ServiceStopped => CardError::ServiceUnavailable(e.to_string()),
        E::NoReadersAvailable => CardError::NoReader,
        E::RemovedCard | E::NoSmartcard | E::ResetCard | E::UnpoweredCard => CardError::Removed,
        E::UnresponsiveCard | E::CommError | E::Timeout | E::NotReady => CardError::NotResponding {
            reader: reader.to_owned(),
        },
        E::SharingViolation => CardError::ReaderBusy(reader.to_owned()),
        E::UnknownReader | E::ReaderUnavailable => CardError::Removed,
        other => CardError::Pcsc(other),
    }
}

fn service_gone(e: pcsc::Error) -> bool {
    matches!(
        e,
        pcsc::Error::NoService
            | pcsc::Error::ServiceStopped
            | pcsc::Error::InvalidHandle
            | pcsc::Error::CommError
            | pcsc::Error::Shutdown
            | pcsc::Error::SystemCancelled
            | pcsc::Error::InternalError
    )
}

// ------------------------------------------------------------------------------------------------
// States and events

/// What the card reader side looks like now, for the UI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CardState {
    /// Not looked yet.
    Starting,
    /// The PC/SC service (`pcscd`) is not running.
    ServiceUnavailable,
    /// The service runs, no reader is connected.
    NoReader,
    /// Readers are connected, none holds a card.
    Ready {
        /// The readers.
        readers: Vec<String>,
    },
    /// A card is on a reader.
    CardPresent {
        /// The reader.
        reader: String,
    },
    /// A card is on a reader but does not answer.
    CardMute {
        /// The reader.
        reader: String,
    },
}

impl CardState {
    /// What the reception desk shows, in Japanese.
    pub fn message_ja(&self) -> &'static str {
        match self {
            CardState::Starting => "カードリーダーを確認しています",
            CardState::ServiceUnavailable => "カード読み取りサービス（pcscd）が動いていません",
            CardState::NoReader => "カードリーダーが接続されていません",
            CardState::Ready { .. } => "カードをリーダーにかざしてください",
            CardState::CardPresent { .. } => "カードを読み取れます",
            CardState::CardMute { .. } => "カードが応答しません。置き直してください",
        }
    }

    /// The same in English.
    pub fn message_en(&self) -> &'static str {
        match self {
            CardState::Starting => "Checking card readers",
            CardState::ServiceUnavailable => "The smart card service (pcscd) is not running",
            CardState::NoReader => "No card reader is connected",
            CardState::Ready { .. } => "Hold a card to the reader",
            CardState::CardPresent { .. } => "A card is on the reader",
            CardState::CardMute { .. } => "The card does not respond; place it again",
        }
    }
}

/// One change seen by the [`Watcher`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CardEvent {
    /// The PC/SC service became reachable.
    ServiceAvailable,
    /// The PC/SC service is not reachable (not running, or stopped).
    ServiceUnavailable {
        /// The PC/SC error.
        detail: String,
    },
    /// A reader appeared.
    ReaderAdded {
        /// Its name.
        reader: String,
    },
    /// A reader went away.
    ReaderRemoved {
        /// Its name.
        reader: String,
    },
    /// A card was placed on a reader.
    CardInserted {
        /// The reader.
        reader: String,
        /// The card's ATR, hex (public: the card type, not the card).
        atr: String,
    },
    /// A card left a reader.
    CardRemoved {
        /// The reader.
        reader: String,
    },
    /// A card is on a reader but does not answer.
    CardMute {
        /// The reader.
        reader: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Slot {
    Empty,
    Present { atr: Vec<u8> },
    Mute,
}

#[derive(Clone, Debug)]
struct Tracked {
    slot: Slot,
    events: u32,
}

/// Watches readers and cards; see the module documentation.
pub struct Watcher {
    ctx: Option<Context>,
    service: Option<bool>,
    /// PnP pseudo-reader first, then the readers.
    states: Vec<ReaderState>,
    readers: BTreeMap<String, Tracked>,
}

impl Default for Watcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Watcher {
    /// A watcher that has not looked yet ([`CardState::Starting`]).
    pub fn new() -> Self {
        Self {
            ctx: None,
            service: None,
            states: vec![],
            readers: BTreeMap::new(),
        }
    }

    /// The state now.
    pub fn state(&self) -> CardState {
        match self.service {
            None => return CardState::Starting,
            Some(false) => return CardState::ServiceUnavailable,
            Some(true) => {}
        }
        if self.readers.is_empty() {
            return CardState::NoReader;
        }
        if let Some((r, _)) = self
            .readers
            .iter()
            .find(|(_, t)| matches!(t.slot, Slot::Present { .. }))
        {
            return CardState::CardPresent { reader: r.clone() };
        }
        if let Some((r, _)) = self.readers.iter().find(|(_, t)| t.slot == Slot::Mute) {
            return CardState::CardMute { reader: r.clone() };
        }
        CardState::Ready {
            readers: self.readers.keys().cloned().collect(),
        }
    }

    /// The readers known now, each with its card's ATR when one is present (`Some(empty)` when mute).
    pub fn readers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        self.readers
            .iter()
            .map(|(r, t)| {
                let atr = match &t.slot {
                    Slot::Empty => None,
                    Slot::Present { atr } => Some(atr.clone()),
                    Slot::Mute => Some(vec![]),
                };
                (r.clone(), atr)
            })
            .collect()
    }

    /// The readers holding a card that answered with an ATR.
    fn present(&self) -> impl Iterator<Item = (&String, &Vec<u8>)> {
        self.readers.iter().filter_map(|(r, t)| match &t.slot {
            Slot::Present { atr } => Some((r, atr)),
            _ => None,
        })
    }

    /// Waits at most `timeout` for something to change; returns what changed (often nothing).
    pub fn poll(&mut self, timeout: Duration) -> Vec<CardEvent> {
        let mut ev = Vec::new();
        let ctx = match &self.ctx {
            Some(c) => c.clone(),
            None => match Context::establish(Scope::User) {
                Ok(c) => {
                    self.ctx = Some(c.clone());
                    if self.service != Some(true) {
                        ev.push(CardEvent::ServiceAvailable);
                        self.service = Some(true);
                    }
                    self.states = vec![ReaderState::new(PNP_NOTIFICATION(), State::UNAWARE)];
                    self.readers.clear();
                    self.refresh(&c, &mut ev);
                    if self.ctx.is_none() {
                        return ev;
                    }
                    c
                }
                Err(e) => {
                    self.lost(e, &mut ev);
                    thread::sleep(timeout.min(SERVICE_RETRY));
                    return ev;
                }
            },
        };
        for rs in &mut self.states {
            rs.sync_current_state();
        }
        match ctx.get_status_change(timeout, &mut self.states) {
            Ok(()) => {}
            Err(pcsc::Error::Timeout) | Err(pcsc::Error::Cancelled) => return ev,
            Err(pcsc::Error::UnknownReader)
            | Err(pcsc::Error::ReaderUnavailable)
            | Err(pcsc::Error::NoReadersAvailable) => {
                self.refresh(&ctx, &mut ev);
                return ev;
            }
            Err(e) => {
                if !service_gone(e) {
                    tracing::warn!("card watch: {e}; re-establishing the PC/SC context");
                }
                self.lost(e, &mut ev);
                return ev;
            }
        }
        let mut relist = false;
        let mut seen = Vec::new();
        for rs in &self.states {
            let es = rs.event_state();
            if rs.name() == PNP_NOTIFICATION() {
                relist |= es.contains(State::CHANGED);
                continue;
            }
            if es.intersects(State::UNKNOWN | State::IGNORE) {
                relist = true;
                continue;
            }
            let slot = if es.contains(State::PRESENT) {
                if es.contains(State::MUTE) {
                    Slot::Mute
                } else {
                    Slot::Present {
                        atr: rs.atr().to_vec(),
                    }
                }
            } else {
                Slot::Empty
            };
            seen.push((
                rs.name().to_string_lossy().into_owned(),
                slot,
                rs.event_count(),
            ));
        }
        for (reader, slot, count) in seen {
            self.transition(reader, slot, count, &mut ev);
        }
        if relist {
            self.refresh(&ctx, &mut ev);
        }
        ev
    }

    /// Polls without waiting until every reader's state is known (for `card readers`).
    pub fn snapshot(&mut self) -> Vec<CardEvent> {
        let mut ev = Vec::new();
        for _ in 0..4 {
            ev.extend(self.poll(Duration::ZERO));
            let unaware = self
                .states
                .iter()
                .any(|s| s.current_state() == State::UNAWARE && s.event_state() == State::UNAWARE);
            if self.ctx.is_none() || !unaware {
                break;
            }
        }
        ev
    }

    fn transition(&mut self, reader: String, slot: Slot, count: u32, ev: &mut Vec<CardEvent>) {
        let Some(t) = self.readers.get_mut(&reader) else {
            return;
        };
        let old = std::mem::replace(&mut t.slot, slot.clone());
        let swapped = count != t.events && count.wrapping_sub(t.events) >= 2;
        t.events = count;
        match (&old, &slot) {
            (Slot::Present { atr: a }, Slot::Present { atr: b }) if a != b || swapped => {
                ev.push(CardEvent::CardRemoved {
                    reader: reader.clone(),
                });
                ev.push(CardEvent::CardInserted {
                    reader,
                    atr: hex::encode_upper(b),
                });
            }
            (Slot::Empty | Slot::Mute, Slot::Present { atr }) => ev.push(CardEvent::CardInserted {
                reader,
                atr: hex::encode_upper(atr),
            }),
            (Slot::Empty | Slot::Present { .. }, Slot::Mute) => {
                ev.push(CardEvent::CardMute { reader })
            }
            (Slot::Present { .. } | Slot::Mute, Slot::Empty) => {
                ev.push(CardEvent::CardRemoved { reader })
            }
            _ => {}
        }
    }

    fn refresh(&mut self, ctx: &Context, ev: &mut Vec<CardEvent>) {
        let names: Vec<String> = match ctx.list_readers_owned() {
            Ok(n) => n
                .into_iter()
                .map(|c| c.to_string_lossy().into_owned())
                .take(READERS_MAX)
                .collect(),
            Err(pcsc::Error::NoReadersAvailable) => vec![],
            Err(e) => {
                self.lost(e, ev);
                return;
            }
        };
        let gone: Vec<String> = self
            .readers
            .keys()
            .filter(|r| !names.contains(r))
            .cloned()
            .collect();
        for r in gone {
            if let Some(t) = self.readers.remove(&r)
                && t.slot != Slot::Empty
            {
                ev.push(CardEvent::CardRemoved { reader: r.clone() });
            }
            self.states.retain(|s| s.name().to_string_lossy() != r);
            ev.push(CardEvent::ReaderRemoved { reader: r });
        }
        for r in names {
            if self.readers.contains_key(&r) {
                continue;
            }
            let Ok(c) = CString::new(r.clone()) else {
                continue;
            };
            self.states.push(ReaderState::new(c, State::UNAWARE));
            self.readers.insert(
                r.clone(),
                Tracked {
                    slot: Slot::Empty,
                    events: 0,
                },
            );
            ev.push(CardEvent::ReaderAdded { reader: r });
        }
    }

    fn lost(&mut self, e: pcsc::Error, ev: &mut Vec<CardEvent>) {
        self.ctx = None;
        self.states.clear();
        if self.service == Some(false) {
            return;
        }
        for (r, t) in std::mem::take(&mut self.readers) {
            if t.slot != Slot::Empty {
                ev.push(CardEvent::CardRemoved { reader: r.clone() });
            }
            ev.push(CardEvent::ReaderRemoved { reader: r });
        }
        ev.push(CardEvent::ServiceUnavailable {
            detail: e.to_string(),
        });
        self.service = Some(false);
    }

    /// Runs until `stop` is set, calling `on_event` with each event and the state after it.
    pub fn run(&mut self, stop: &AtomicBool, mut on_event: impl FnMut(&CardEvent, &CardState)) {
        while !stop.load(Ordering::Relaxed) {
            for e in self.poll(Duration::from_millis(500)) {
                on_event(&e, &self.state());
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Reading a card

/// What kind of card answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "snake_case")]
pub enum CardKind {
    /// マイナンバーカード (個人番号カード), identified by its JPKI user-authentication certificate.
    MyNumber,
    /// A contactless card (FeliCa such as Suica, MIFARE), identified by its UID / IDm.
    Contactless,
}

/// A card's pseudonymous identity (nothing in it identifies the card outside this deployment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardIdentity {
    /// The kind.
    pub kind: CardKind,
    /// HMAC-SHA256 of the card identifier under the key of the sector it was read for (64 hex
    /// digits): the same card has unrelated ids in different sectors.
    pub pseudonymous_id: String,
    /// The reader it was read in.
    pub reader: String,
    /// The contactless technology the reader names (`felica`, `mifare`, ...), when it names one.
    pub technology: Option<String>,
    /// My Number card: the user-authentication certificate's end of validity (`YYYY-MM-DD`).
    pub expires: Option<String>,
    /// My Number card: whether that date has passed.
    pub expired: bool,
}

/// What a card session produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CardRead {
    /// The identity.
    #[serde(flatten)]
    pub identity: CardIdentity,
    /// My Number card: whether the card proved possession of the certified key (PIN + signature).
    pub possession_verified: bool,
    /// My Number card: 氏名, 住所, 生年月日, 性別, when asked for with consent and PIN.
    pub attributes: Option<Attributes>,
    /// How long it took.
    pub timings: ReadTimings,
}

/// Durations of a read, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ReadTimings {
    /// From the call until a card was on a reader.
    pub waited_ms: u64,
    /// From then until the pseudonymous id (and any PIN work) was done, PIN typing included.
    pub read_ms: u64,
}

/// What to do with the card.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Read only from this reader (default: any).
    pub reader: Option<String>,
    /// How long to wait for a card.
    pub timeout: Duration,
    /// My Number card: prove possession (user-authentication PIN, then a signed fresh challenge).
    pub verify: bool,
    /// My Number card: read the four attributes (the resident consented; 券面事項入力補助 PIN).
    pub attributes: bool,
    /// Send a PIN even when only one try is left (the resident confirmed).
    pub confirm_last_try: bool,
    /// How long one exchange may take before the card counts as not responding.
    pub exchange_timeout: Duration,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            reader: None,
            timeout: Duration::from_secs(30),
            verify: false,
            attributes: false,
            confirm_last_try: false,
            exchange_timeout: EXCHANGE_TIMEOUT_DEFAULT,
        }
    }
}

/// Waits for a card and returns its pseudonymous identity in `sector`; no PIN is asked or sent.
///
/// This is what `musubi shelter checkin --card` calls (reception's sector).
pub fn wait_for_tap(
    engine: &Engine,
    sector: PseudonymSector,
    timeout: Duration,
) -> Result<CardIdentity, CardError> {
    let opts = ReadOptions {
        timeout,
        ..ReadOptions::default()
    };
    Ok(read(engine, sector, &opts, Box::new(NoPin))?.identity)
}

/// A prompt that never gives a PIN.
pub struct NoPin;

impl PinPrompt for NoPin {
    fn pin(&mut self, _: PinKind, _: u8) -> Option<Pin> {
        None
    }
}

/// Waits for a card (one already on a reader counts) and reads it as `opts` asks; its id is the
/// pseudonym in `sector` (evacuees' cards at reception, patients' at a clinic, staff cards).
///
/// `prompt` is called only when a PIN is needed, with the tries left, and at most once per PIN.
///
/// Errors: [`CardError`]; before waiting, an engine error when this facility holds no key of
/// `sector` (not enrolled, or its role was not issued that sector's key).
pub fn read(
    engine: &Engine,
    sector: PseudonymSector,
    opts: &ReadOptions,
    prompt: Box<dyn PinPrompt + Send>,
) -> Result<CardRead, CardError> {
    // Fail before waiting when this sector's key is not here; the key is unsealed once per read.
    let key = engine.pseudonym_key(sector)?;
    let id_of = |domain: &str, input: &[u8]| crate::engine::pseudonym_hex(&key, domain, input);
    let start = Instant::now();
    let prompt = Arc::new(Mutex::new(prompt));
    let (reader, waited, raw) = loop {
        let left = opts.timeout.saturating_sub(start.elapsed());
        let (ctx, reader, atr) = wait_for_card(opts.reader.as_deref(), left)?;
        let waited = start.elapsed();
        match run_session(ctx, reader.clone(), atr, opts, prompt.clone()) {
            Ok(raw) => break (reader, waited, raw),
            // The reader still showed a card that had already left (it polls a few times a second):
            // nothing was exchanged and no PIN asked, so keep waiting for the next card.
            Err((CardError::Removed, Untouched(true))) if start.elapsed() < opts.timeout => {
                tracing::debug!(%reader, "the card had left before the session began; waiting again");
                thread::sleep(Duration::from_millis(100));
            }
            Err((e, _)) => return Err(e),
        }
    };
    let identity = match raw.card {
        RawIdentity::MyNumber(cert) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            CardIdentity {
                kind: CardKind::MyNumber,
                pseudonymous_id: id_of(DOMAIN_JPKI_AUTH, &cert.spki_der),
                reader,
                technology: raw.technology,
                expires: Some(date_of(cert.not_after_unix)),
                expired: cert.not_after_unix < now,
            }
        }
        RawIdentity::Contactless(uid) => CardIdentity {
            kind: CardKind::Contactless,
            pseudonymous_id: id_of(DOMAIN_CONTACTLESS_UID, &uid),
            reader,
            technology: raw.technology,
            expires: None,
            expired: false,
        },
    };
    crate::audit::record(
        engine,
        musubi_crdt::audit::AuditAction::CardRead,
        None,
        &[sector.as_str()],
    )?;
    Ok(CardRead {
        identity,
        possession_verified: raw.verified,
        attributes: raw.attributes,
        timings: ReadTimings {
            waited_ms: waited.as_millis() as u64,
            read_ms: (start.elapsed() - waited).as_millis() as u64,
        },
    })
}

/// `YYYY-MM-DD` of a Unix time.
fn date_of(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

/// Waits until a reader holds a card that answered with an ATR; returns the context, reader and ATR.
fn wait_for_card(
    reader: Option<&str>,
    timeout: Duration,
) -> Result<(Context, String, Vec<u8>), CardError> {
    let deadline = Instant::now() + timeout;
    let mut w = Watcher::new();
    let mut last_service_error = String::new();
    loop {
        for e in w.poll(Duration::ZERO) {
            if let CardEvent::ServiceUnavailable { detail } = e {
                last_service_error = detail;
            }
        }
        if let Some((r, atr)) = w
            .present()
            .find(|(r, _)| reader.is_none_or(|want| want == r.as_str()))
        {
            let ctx = w
                .ctx
                .clone()
                .expect("a present card was seen through a live context");
            return Ok((ctx, r.clone(), atr.clone()));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(match w.state() {
                CardState::ServiceUnavailable | CardState::Starting => {
                    CardError::ServiceUnavailable(last_service_error)
                }
                CardState::NoReader => CardError::NoReader,
                CardState::CardMute { reader } => CardError::NotResponding { reader },
                _ => CardError::NoCard(timeout),
            });
        }
        w.poll((deadline - now).min(Duration::from_millis(250)));
    }
}

enum RawIdentity {
    MyNumber(AuthCertificate),
    Contactless(Vec<u8>),
}

struct RawCard {
    card: RawIdentity,
    technology: Option<String>,
    verified: bool,
    attributes: Option<Attributes>,
}

/// When the worker last heard from the card, and whether it is waiting for a person (PIN entry).
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    prompting: AtomicBool,
    /// Exchanges the card answered, and PIN prompts made, in this session.
    answered: AtomicU64,
    asked: AtomicBool,
}

/// Whether a failed session had exchanged nothing with the card and asked no PIN.
struct Untouched(bool);

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
        Duration::from_millis(
            (self.base.elapsed().as_millis() as u64)
                .saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }
}

/// Runs the card session on a worker thread; a card silent for longer than the exchange timeout
/// (PIN typing excluded) ends it with [`CardError::NotResponding`]. The worker, blocked in pcsc-lite,
/// is left behind then; it ends when the card is removed.
fn run_session(
    ctx: Context,
    reader: String,
    atr: Vec<u8>,
    opts: &ReadOptions,
    prompt: SharedPrompt,
) -> Result<RawCard, (CardError, Untouched)> {
    let activity = Arc::new(Activity {
        base: Instant::now(),
        last_ms: AtomicU64::new(0),
        prompting: AtomicBool::new(false),
        answered: AtomicU64::new(0),
        asked: AtomicBool::new(false),
    });
    let untouched = |a: &Activity| {
        Untouched(a.answered.load(Ordering::Relaxed) == 0 && !a.asked.load(Ordering::Relaxed))
    };
    let (tx, rx) = mpsc::channel();
    let worker = {
        let activity = activity.clone();
        let reader = reader.clone();
        let opts = opts.clone();
        thread::Builder::new()
            .name("card-session".into())
            .spawn(move || {
                let r = session(&ctx, &reader, &atr, &opts, prompt, &activity);
                let _ = tx.send(r);
            })
            .map_err(|e| {
                let e = CardError::Malformed(format!("cannot start the card session thread: {e}"));
                (e, Untouched(false))
            })?
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => {
                let _ = worker.join();
                return r.map_err(|e| (e, untouched(&activity)));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !activity.prompting.load(Ordering::Relaxed)
                    && activity.idle() > opts.exchange_timeout
                {
                    tracing::warn!(%reader, "the card stopped answering; giving up on this session");
                    return Err((CardError::NotResponding { reader }, Untouched(false)));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let e = CardError::Malformed("the card session ended without a result".into());
                return Err((e, Untouched(false)));
            }
        }
    }
}

/// The PIN prompt, shared by the attempts of one read (a stale card state can make a first attempt
/// end before anything was exchanged).
type SharedPrompt = Arc<Mutex<Box<dyn PinPrompt + Send>>>;

struct PcscTransport<'a> {
    card: &'a pcsc::Card,
    reader: &'a str,
    protocol: Protocol,
    activity: &'a Activity,
    buf: Vec<u8>,
}

/// How long connecting to a card just seen keeps trying while the reader settles.
pub const CONNECT_SETTLE: Duration = Duration::from_millis(1500);

/// How long a failed exchange waits for the reader to tell whether the card is still there.
pub const REMOVAL_CHECK: Duration = Duration::from_millis(1500);

impl PcscTransport<'_> {
    /// A failed exchange: the card left (the reader notices within its polling interval), or it failed.
    fn classify(&self, e: pcsc::Error) -> CardError {
        use pcsc::Error as E;
        if !matches!(
            e,
            E::NotTransacted | E::CommError | E::UnknownError | E::UnresponsiveCard | E::ResetCard
        ) {
            return map_pcsc(e, self.reader);
        }
        let deadline = Instant::now() + REMOVAL_CHECK;
        while Instant::now() < deadline {
            self.activity.touch();
            match self.card.status2_owned() {
                Err(
                    E::RemovedCard
                    | E::NoSmartcard
                    | E::ResetCard
                    | E::ReaderUnavailable
                    | E::UnknownReader,
                ) => {
                    return CardError::Removed;
                }
                Ok(st) if !st.status().contains(pcsc::Status::PRESENT) => {
                    return CardError::Removed;
                }
                Err(E::NoService | E::ServiceStopped) => {
                    return CardError::ServiceUnavailable(e.to_string());
                }
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
        map_pcsc(e, self.reader)
    }
}

impl Transport for PcscTransport<'_> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, CardError> {
        self.activity.touch();
        let r = self
            .card
            .transmit(command, &mut self.buf)
            .map(<[u8]>::to_vec);
        self.activity.touch();
        match r {
            Ok(v) if v.len() >= 2 => {
                self.activity.answered.fetch_add(1, Ordering::Relaxed);
                Ok(v)
            }
            // No status word: the reader lost the card mid-command (vpcd reports it so).
            Ok(_) => Err(self.classify(pcsc::Error::CommError)),
            Err(e) => Err(self.classify(e)),
        }
    }
    fn protocol(&self) -> Protocol {
        self.protocol
    }
}

/// A prompt wrapper that tells the watchdog a person is typing.
struct Watched<'a> {
    inner: SharedPrompt,
    activity: &'a Activity,
}

impl PinPrompt for Watched<'_> {
    fn pin(&mut self, which: PinKind, tries_left: u8) -> Option<Pin> {
        self.activity.prompting.store(true, Ordering::Relaxed);
        self.activity.asked.store(true, Ordering::Relaxed);
        let p = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pin(which, tries_left);
        self.activity.touch();
        self.activity.prompting.store(false, Ordering::Relaxed);
        p
    }
}

fn session(
    ctx: &Context,
    reader: &str,
    atr: &[u8],
    opts: &ReadOptions,
    prompt: SharedPrompt,
    activity: &Activity,
) -> Result<RawCard, CardError> {
    let name = CString::new(reader).map_err(|_| CardError::Removed)?;
    activity.touch();
    // Just after an insertion the client library may not know the card yet: try again briefly.
    let deadline = Instant::now() + CONNECT_SETTLE;
    let mut card = loop {
        use pcsc::Error as E;
        match ctx.connect(&name, ShareMode::Shared, Protocols::ANY) {
            Ok(c) => break c,
            Err(
                E::UnknownReader
                | E::NoSmartcard
                | E::RemovedCard
                | E::ResetCard
                | E::NotReady
                | E::ReaderUnavailable,
            ) if Instant::now() < deadline => {
                activity.touch();
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(map_pcsc(e, reader)),
        }
    };
    let protocol = match card.status2_owned().map(|s| s.protocol2()) {
        Ok(Some(pcsc::Protocol::T0)) => Protocol::T0,
        _ => Protocol::T1,
    };
    let result = {
        let tx = card.transaction().map_err(|e| map_pcsc(e, reader))?;
        let mut t = PcscTransport {
            card: &tx,
            reader,
            protocol,
            activity,
            buf: vec![0; TRANSMIT_BUFFER_BYTES],
        };
        let mut prompt = Watched {
            inner: prompt,
            activity,
        };
        let r = identify(&mut t, atr, opts, &mut prompt);
        let _ = tx.end(Disposition::LeaveCard);
        r
    };
    // Reset the card so no verified PIN outlives this session.
    let _ = card.disconnect(Disposition::ResetCard);
    result
}

/// Detects the kind and reads the identity, then does only the PIN work `opts` asks for.
fn identify(
    t: &mut dyn Transport,
    atr: &[u8],
    opts: &ReadOptions,
    prompt: &mut dyn PinPrompt,
) -> Result<RawCard, CardError> {
    let technology = contactless::technology_from_atr(atr);
    // Storage cards (FeliCa, MIFARE Classic) named by the reader's ATR have no applications to select.
    let storage_card = matches!(technology, Some("felica" | "mifare" | "iso15693"));
    if !storage_card && let Some(mut m) = MyNumberCard::detect(t)? {
        let cert = m.auth_certificate()?;
        let mut verified = false;
        let mut attributes = None;
        if opts.verify {
            m.verify_pin(PinKind::UserAuthentication, prompt, opts.confirm_last_try)?;
            let challenge: [u8; 32] = crate::engine::random();
            m.prove_possession(&cert, &challenge)?;
            verified = true;
        }
        if opts.attributes {
            m.verify_pin(PinKind::Kenhojo, prompt, opts.confirm_last_try)?;
            attributes = Some(m.basic_four()?);
        }
        return Ok(RawCard {
            card: RawIdentity::MyNumber(cert),
            technology: technology.map(str::to_owned),
            verified,
            attributes,
        });
    }
    match contactless::read_uid(t)? {
        Uid::Stable(uid) => Ok(RawCard {
            card: RawIdentity::Contactless(uid),
            technology: technology.map(str::to_owned),
            verified: false,
            attributes: None,
        }),
        Uid::Random => Err(CardError::Unsupported(
            "the card shows a different random UID at every tap".into(),
        )),
        Uid::None => Err(CardError::Unsupported(
            "neither a My Number card nor a contactless card with a UID".into(),
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed RSA-2048 certificate standing in for a JPKI user-authentication certificate.
    pub(crate) fn test_certificate() -> Vec<u8> {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa key");
        let pkcs8 = key.to_pkcs8_der().expect("pkcs8");
        let kp = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &pkcs8.as_bytes().into(),
            &rcgen::PKCS_RSA_SHA256,
        )
        .expect("rcgen key");
        let params = rcgen::CertificateParams::new(vec![]).expect("params");
        params.self_signed(&kp).expect("self-signed").der().to_vec()
    }

    #[test]
    fn a_felica_card_is_read_by_its_uid_without_selecting_anything() {
        struct Felica(Vec<Vec<u8>>);
        impl Transport for Felica {
            fn transmit(&mut self, c: &[u8]) -> Result<Vec<u8>, CardError> {
                self.0.push(c.to_vec());
                Ok(if c[..2] == [0xFF, 0xCA] {
                    vec![1, 2, 3, 4, 5, 6, 7, 8, 0x90, 0x00]
                } else {
                    vec![0x6A, 0x81]
                })
            }
            fn protocol(&self) -> Protocol {
                Protocol::T1
            }
        }
        let atr = [
            0x3B, 0x8F, 0x80, 0x01, 0x80, 0x4F, 0x0C, 0xA0, 0x00, 0x00, 0x03, 0x06, 0x11, 0x00,
            0x3B, 0, 0, 0, 0, 0x42,
        ];
        let mut f = Felica(vec![]);
        let opts = ReadOptions {
            attributes: true,
            verify: true,
            ..ReadOptions::default()
        };
        let r = identify(&mut f, &atr, &opts, &mut NoPin).expect("identify");
        assert!(matches!(r.card, RawIdentity::Contactless(ref u) if u.len() == 8));
        assert_eq!(
            f.0,
            vec![vec![0xFF, 0xCA, 0x00, 0x00, 0x00]],
            "no PIN and no SELECT went to a FeliCa card"
        );
    }

    #[test]
    fn a_my_number_card_without_pin_work_gets_no_verify() {
        let mut card = mynumber::tests::MockCard::new(test_certificate(), 3);
        let r = identify(
            &mut card,
            &[0x3B, 0x00],
            &ReadOptions::default(),
            &mut NoPin,
        )
        .expect("identify");
        assert!(matches!(r.card, RawIdentity::MyNumber(_)));
        assert!(
            card.log.iter().all(|c| c[1] != 0x20),
            "no VERIFY at all: {:02X?}",
            card.log
        );
        assert!(!mynumber::tests::selects_individual_number(&card.log));
    }

    #[test]
    fn dates() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(2_000_000_000), "2033-05-18");
    }

    #[test]
    fn watcher_reports_swaps_and_removals() {
        let mut w = Watcher::new();
        w.service = Some(true);
        w.readers.insert(
            "R".into(),
            Tracked {
                slot: Slot::Empty,
                events: 0,
            },
        );
        let mut ev = vec![];
        w.transition("R".into(), Slot::Present { atr: vec![1] }, 1, &mut ev);
        assert_eq!(w.state(), CardState::CardPresent { reader: "R".into() });
        w.transition("R".into(), Slot::Present { atr: vec![1] }, 3, &mut ev);
        w.transition("R".into(), Slot::Empty, 4, &mut ev);
        assert_eq!(
            ev,
            vec![
                CardEvent::CardInserted {
                    reader: "R".into(),
                    atr: "01".into()
                },
                CardEvent::CardRemoved { reader: "R".into() },
                CardEvent::CardInserted {
                    reader: "R".into(),
                    atr: "01".into()
                },
                CardEvent::CardRemoved { reader: "R".into() },
            ]
        );
        assert_eq!(
            w.state(),
            CardState::Ready {
                readers: vec!["R".into()]
            }
        );
    }
}
