//! The error that crosses the IPC boundary: `{ kind, message }`.
//!
//! The UI branches on `kind` to show a sentence in the user's language that says what to do; the
//! `message` is the engine's English sentence, shown as detail. Never a bare `String`.

use musubi_facility::EngineError;
use musubi_facility::card::CardError;
use musubi_facility::net::SyncError;
use musubi_facility::staff::StaffError;
use serde::Serialize;

/// What went wrong, as far as the user's next step is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, specta::Type)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No facility on this computer yet: run the first-run setup.
    NotInitialised,
    /// A facility already exists in the data directory.
    AlreadyInitialised,
    /// The passphrase does not unlock this facility's keys.
    WrongPassphrase,
    /// The app is locked: unlock with the passphrase first.
    Locked,
    /// No staff member is signed in.
    NotSignedIn,
    /// The login or password is wrong.
    BadCredentials,
    /// Too many wrong passwords in a row: sign-in for that account is paused for a while
    /// (`retry_after_s` says how long).
    SignInLocked,
    /// The session locked (the staff member was idle, or locked it): the same staff member signs
    /// in again to go on, or another one signs in afresh.
    SessionLocked,
    /// Only an administrator of this device may do this (the audit log, the idle-lock setting).
    AdminOnly,
    /// No card was placed on the reader in time.
    NoCard,
    /// The card is not bound to any staff account of this device.
    UnknownCard,
    /// The PIN is wrong (`tries_left` says how many tries are left).
    WrongPin,
    /// This device requires 二要素認証: only a staff card with its PIN signs in, not a password.
    CardRequired,
    /// Too many wrong PINs: this card cannot sign in until the PIN is unlocked (a staff PIN by a
    /// password sign-in; a My Number card's PIN at the municipal office), or only one try is left.
    PinLocked,
    /// This device has not joined a deployment (no invite accepted yet).
    NotEnrolled,
    /// The text is not an invite code (not `musubi2...`, cut short, or mistyped).
    BadInvite,
    /// The invite code's time ran out: ask whoever gave it for a new one.
    InviteExpired,
    /// The relay or the inviter refused the invite: unknown there (a device invite works once the
    /// inviting device has synced), already used, or asked for by another device.
    InviteRefused,
    /// This device has already joined a deployment.
    AlreadyEnrolled,
    /// A certificate, device chain or directory does not verify, or a device is not what the
    /// directory says: nothing was done.
    Trust,
    /// The safety number typed does not match the facility's new root key.
    SafetyNumberMismatch,
    /// The relay could not be reached; work continues offline.
    Unreachable,
    /// The relay refused this device (revoked or unknown): ask the operator.
    Refused,
    /// The document, facility, evacuee or item does not exist here.
    NotFound,
    /// This device has no key for the document yet: sync to fetch it.
    NoKey,
    /// This facility may read the document but not change it.
    ReadOnly,
    /// The input is not acceptable (empty, too long, badly formed): the message says which field.
    InvalidInput,
    /// An IC card or reader problem.
    Card,
    /// The local disk or database failed.
    Storage,
    /// Anything else: a bug or a broken invariant.
    Internal,
}

/// An error as the UI receives it.
#[derive(Clone, Debug, Serialize, specta::Type, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct AppError {
    /// What went wrong, for the UI to branch on.
    pub kind: ErrorKind,
    /// The engine's sentence (English), shown as detail.
    pub message: String,
    /// `sign_in_locked`: seconds until the next try is taken (the UI's sentence names it).
    pub retry_after_s: Option<u32>,
    /// `wrong_pin`: tries left before the PIN locks (the UI's sentence names it).
    pub tries_left: Option<u32>,
}

impl AppError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after_s: None,
            tries_left: None,
        }
    }

    /// A bad input: `message` names the field and what is wrong with it.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }
}

/// The result type of every command.
pub type AppResult<T> = Result<T, AppError>;

/// The kind of an engine error.
fn engine_kind(e: &EngineError) -> ErrorKind {
    use EngineError as E;
    match e {
        E::NotInitialised(_) => ErrorKind::NotInitialised,
        E::AlreadyInitialised(_) => ErrorKind::AlreadyInitialised,
        E::WrongPassphrase => ErrorKind::WrongPassphrase,
        E::NotEnrolled => ErrorKind::NotEnrolled,
        E::AlreadyEnrolled(_) => ErrorKind::AlreadyEnrolled,
        E::Trust(_) => ErrorKind::Trust,
        E::SafetyNumber { .. } => ErrorKind::SafetyNumberMismatch,
        E::InvalidExpiry | E::Invalid(_) => ErrorKind::InvalidInput,
        E::UnknownFacility(_) | E::UnknownDocument(_) | E::UnknownDevice(_) => ErrorKind::NotFound,
        E::NoKey(_) => ErrorKind::NoKey,
        E::NoPseudonymKey { .. } => ErrorKind::Card,
        E::ReadOnly(_) | E::NotOwner => ErrorKind::ReadOnly,
        E::Store(_) | E::Io { .. } => ErrorKind::Storage,
        E::Document(_) | E::Fhir(_) => ErrorKind::InvalidInput,
        _ => ErrorKind::Internal,
    }
}

impl From<EngineError> for AppError {
    fn from(e: EngineError) -> Self {
        Self::new(engine_kind(&e), e.to_string())
    }
}

impl From<StaffError> for AppError {
    fn from(e: StaffError) -> Self {
        use StaffError as S;
        let mut retry_after_s = None;
        let mut tries_left = None;
        let kind = match &e {
            S::BadCredentials => ErrorKind::BadCredentials,
            S::LockedOut { retry_after_s: s } => {
                retry_after_s = Some(u32::try_from(*s).unwrap_or(u32::MAX));
                ErrorKind::SignInLocked
            }
            S::LoginTaken(_) | S::BadLogin | S::BadPassword | S::TooMany => ErrorKind::InvalidInput,
            S::SecondFactorNeeded => ErrorKind::CardRequired,
            S::Engine(inner) => engine_kind(inner),
            S::UnknownCard => ErrorKind::UnknownCard,
            S::WrongStaffPin { tries_left: n } => {
                tries_left = Some(u32::from(*n));
                ErrorKind::WrongPin
            }
            S::StaffPinLocked => ErrorKind::PinLocked,
            S::StaffPinFormat | S::StaffPinNeeded => ErrorKind::InvalidInput,
            S::Card(card) => {
                let (kind, n) = card_kind(card);
                tries_left = n;
                kind
            }
            S::AlreadyBound | S::CardInUse | S::PossessionNotProven | S::LastAdminCard => {
                ErrorKind::Card
            }
            _ => ErrorKind::Internal,
        };
        Self {
            kind,
            message: e.to_string(),
            retry_after_s,
            tries_left,
        }
    }
}

/// The kind of a card error at sign-in, with the tries left of a wrong PIN.
fn card_kind(e: &CardError) -> (ErrorKind, Option<u32>) {
    match e {
        CardError::NoCard(_) => (ErrorKind::NoCard, None),
        CardError::WrongPin { tries_left, .. } => {
            (ErrorKind::WrongPin, Some(u32::from(*tries_left)))
        }
        CardError::PinBlocked { .. } | CardError::LastTry { .. } => (ErrorKind::PinLocked, None),
        CardError::PinFormat | CardError::PinNotGiven { .. } => (ErrorKind::InvalidInput, None),
        CardError::Engine(inner) => (engine_kind(inner), None),
        _ => (ErrorKind::Card, None),
    }
}

impl From<SyncError> for AppError {
    fn from(e: SyncError) -> Self {
        let kind = match &e {
            SyncError::Unreachable { .. } => ErrorKind::Unreachable,
            SyncError::Refused { .. } => ErrorKind::Refused,
            SyncError::Invite(_) => ErrorKind::BadInvite,
            SyncError::InviteRefused(_) => ErrorKind::InviteRefused,
            SyncError::Engine(inner) => engine_kind(inner),
            SyncError::Store(_) => ErrorKind::Storage,
            _ => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
    }
}

impl From<musubi_facility::store::StoreError> for AppError {
    fn from(e: musubi_facility::store::StoreError) -> Self {
        Self::new(ErrorKind::Storage, e.to_string())
    }
}
