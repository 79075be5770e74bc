//! The error that crosses the IPC boundary: `{ kind, message }`.
//!
//! The UI branches on `kind` to show a sentence in the user's language that says what to do; the
//! `message` is the engine's English sentence, shown as detail. Never a bare `String`.

use musubi_facility::EngineError;
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
    /// Too many wrong passwords in a row: sign-in for that account is paused for a while.
    SignInLocked,
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
}

impl AppError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
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
        E::InvalidExpiry => ErrorKind::InvalidInput,
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
        let kind = match &e {
            S::BadCredentials => ErrorKind::BadCredentials,
            S::LockedOut { .. } => ErrorKind::SignInLocked,
            S::LoginTaken(_) | S::BadLogin | S::BadPassword => ErrorKind::InvalidInput,
            S::Engine(inner) => engine_kind(inner),
            S::Card(_)
            | S::AlreadyBound
            | S::CardInUse
            | S::UnknownCard
            | S::PossessionNotProven
            | S::StaffPinFormat
            | S::StaffPinNeeded
            | S::WrongStaffPin { .. }
            | S::StaffPinLocked => ErrorKind::Card,
            _ => ErrorKind::Internal,
        };
        Self::new(kind, e.to_string())
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
