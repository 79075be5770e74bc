//! Staff accounts of this device: who signs in to the app (password, or staff IC card + PIN), so that
//! every read and write can be attributed to a person (DESIGN "Identity and keys").
//!
//! Each account is one row of the `staff` table: a random id (public, meaningless) and the account
//! sealed to this device's age recipient (login, name, argon2id password hash, the bound card's
//! pseudonymous id, and for a contactless card the argon2id hash of its staff PIN). Nothing readable
//! lies on disk (DESIGN invariant 2). Lookups decrypt every row; a device has tens of staff, not thousands.
//!
//! Card binding happens once per account: a My Number card must prove possession (its own
//! user-authentication PIN and a signed challenge, checked by [`crate::card`]); a contactless card has
//! no PIN of its own, so the staff member sets a Musubi staff PIN, locked after
//! [`STAFF_PIN_TRIES_MAX`] wrong tries.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use musubi_crdt::crypto;
use rusqlite::params;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use musubi_crdt::audit::AuditAction;

use crate::card::{self, CardError, CardKind, CardRead, PinPrompt, ReadOptions};
use crate::engine::{Engine, EngineError, now_ms, random};
use crate::store::StoreError;

/// Shortest password accepted, in characters.
pub const PASSWORD_CHARS_MIN: usize = 8;
/// Longest password accepted, in bytes.
pub const PASSWORD_BYTES_MAX: usize = 1024;
/// Digits of a staff PIN for a contactless staff card (inclusive range).
pub const STAFF_PIN_DIGITS: std::ops::RangeInclusive<usize> = 4..=8;
/// Wrong staff PINs in a row after which a contactless staff card is locked (a password sign-in unlocks it).
pub const STAFF_PIN_TRIES_MAX: u8 = 5;
/// Wrong passwords in a row for one account before sign-in pauses (then each wrong one pauses it
/// longer: [`lockout_ms`]).
pub const SIGN_IN_FAILURES_FREE: u32 = 5;
/// The first pause, in milliseconds (it doubles with each wrong password after that).
pub const SIGN_IN_LOCKOUT_MS_FIRST: u64 = 30_000;
/// The longest pause, in milliseconds (15 minutes).
pub const SIGN_IN_LOCKOUT_MS_MAX: u64 = 15 * 60_000;

/// How long sign-in pauses after `failures` wrong passwords in a row, in milliseconds: none for the
/// first [`SIGN_IN_FAILURES_FREE`] - 1, then 30 s, 60 s, 120 s, ... up to 15 minutes (a back-off, so a
/// guesser gets a handful of tries an hour while a colleague who mistyped waits half a minute).
pub fn lockout_ms(failures: u32) -> u64 {
    if failures < SIGN_IN_FAILURES_FREE {
        return 0;
    }
    let doublings = (failures - SIGN_IN_FAILURES_FREE).min(16);
    (SIGN_IN_LOCKOUT_MS_FIRST << doublings).min(SIGN_IN_LOCKOUT_MS_MAX)
}

/// Longest login name, in bytes.
pub const LOGIN_BYTES_MAX: usize = 64;
/// Largest sealed account record opened, in bytes.
pub const RECORD_BYTES_MAX: usize = 64 * 1024;
/// Most staff accounts on one device.
pub const ACCOUNTS_MAX: usize = 10_000;

/// Errors of staff accounts; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StaffError {
    /// The login or password is wrong (which one is not told).
    #[error("wrong login or password")]
    BadCredentials,
    /// The login is taken.
    #[error("a staff account {0:?} already exists")]
    LoginTaken(String),
    /// The login is empty, too long or has spaces.
    #[error("a login is 1 to {LOGIN_BYTES_MAX} bytes without spaces")]
    BadLogin,
    /// The password is too short or too long.
    #[error(
        "a password has at least {PASSWORD_CHARS_MIN} characters (and at most {PASSWORD_BYTES_MAX} bytes)"
    )]
    BadPassword,
    /// The account already has a card.
    #[error("this account already has a staff card; unbind it first (`musubi staff unbind-card`)")]
    AlreadyBound,
    /// The card is bound to another account.
    #[error("this card is already bound to another staff account")]
    CardInUse,
    /// No account has this card.
    #[error("this card is not bound to any staff account of this device")]
    UnknownCard,
    /// A My Number card was read without proving possession.
    #[error(
        "the My Number card did not prove possession (its PIN and signature); read it with verification"
    )]
    PossessionNotProven,
    /// The staff PIN has the wrong form.
    #[error("a staff PIN is 4 to 8 digits")]
    StaffPinFormat,
    /// A staff PIN is needed and none was given.
    #[error("this card needs the staff PIN")]
    StaffPinNeeded,
    /// The staff PIN is wrong.
    #[error("wrong staff PIN: {tries_left} tries left before the card is locked for sign-in")]
    WrongStaffPin {
        /// Tries left.
        tries_left: u8,
    },
    /// Too many wrong staff PINs.
    #[error(
        "too many wrong staff PINs: this card is locked for sign-in; sign in with the password to unlock it"
    )]
    StaffPinLocked,
    /// Too many accounts.
    #[error("this device already has {ACCOUNTS_MAX} staff accounts")]
    TooMany,
    /// Too many wrong passwords in a row for this account: sign-in is paused.
    #[error("too many wrong passwords for this account: try again in {retry_after_s} s")]
    LockedOut {
        /// Seconds until the next try is taken.
        retry_after_s: u64,
    },
    /// This device requires 二要素認証 (two-factor authentication): a password alone does not sign
    /// in; a staff card with its PIN does.
    #[error(
        "this device requires two-factor sign-in: sign in with your staff card and its PIN (この端末は二要素認証が必要です。職員カードとPINでサインインしてください)"
    )]
    SecondFactorNeeded,
    /// Unbinding this card would leave no administrator able to sign in under 二要素認証.
    #[error(
        "this device requires two-factor sign-in and this is the last administrator's staff card: bind another administrator's card, or turn two-factor sign-in off, first (最後の管理者の職員カードは外せません)"
    )]
    LastAdminCard,
    /// The card could not be read.
    #[error(transparent)]
    Card(Box<CardError>),
    /// The engine failed.
    #[error(transparent)]
    Engine(Box<EngineError>),
    /// Hashing failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
}

impl From<rusqlite::Error> for StaffError {
    fn from(e: rusqlite::Error) -> Self {
        Self::from(EngineError::Store(StoreError::Sqlite(e)))
    }
}

impl From<StoreError> for StaffError {
    fn from(e: StoreError) -> Self {
        Self::from(EngineError::Store(e))
    }
}

impl From<EngineError> for StaffError {
    fn from(e: EngineError) -> Self {
        Self::Engine(Box::new(e))
    }
}

impl From<CardError> for StaffError {
    fn from(e: CardError) -> Self {
        Self::Card(Box::new(e))
    }
}

type Result<T> = std::result::Result<T, StaffError>;

/// What a staff member may do at this facility's device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
#[serde(rename_all = "snake_case")]
pub enum StaffRole {
    /// 管理者: also adds staff accounts and reads, verifies and exports the audit log.
    Admin,
    /// 職員: works with documents.
    #[default]
    Staff,
}

impl std::str::FromStr for StaffRole {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim() {
            "admin" => Ok(Self::Admin),
            "staff" => Ok(Self::Staff),
            other => Err(format!("a staff role is admin or staff, not {other:?}")),
        }
    }
}

/// A staff member as the app sees them (no secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "specta", derive(specta::Type))]
pub struct Staff {
    /// The account id.
    pub id: String,
    /// The login.
    pub login: String,
    /// The name shown in the audit log.
    pub name: String,
    /// What they may do (the first account of a device is its administrator).
    pub role: StaffRole,
    /// The kind of staff card bound, if any.
    pub card: Option<CardKind>,
}

#[derive(Clone, Serialize, Deserialize)]
struct BoundCard {
    kind: CardKind,
    pseudonymous_id: String,
    /// argon2id PHC string of the staff PIN (contactless cards only).
    pin_hash: Option<String>,
    bound_ms: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    login: String,
    name: String,
    password_hash: String,
    card: Option<BoundCard>,
    failed_pins: u8,
    created_ms: u64,
    /// Accounts made before roles were staff, except that the oldest is taken as administrator.
    #[serde(default)]
    role: Option<StaffRole>,
    /// Wrong passwords in a row.
    #[serde(default)]
    failed_passwords: u32,
    /// No password is checked before this time (ms since the Unix epoch).
    #[serde(default)]
    locked_until_ms: u64,
}

impl Record {
    fn public(&self) -> Staff {
        Staff {
            id: self.id.clone(),
            login: self.login.clone(),
            name: self.name.clone(),
            role: self.role.unwrap_or_default(),
            card: self.card.as_ref().map(|c| c.kind),
        }
    }
}

fn ensure_table(e: &Engine) -> Result<()> {
    e.store().conn().execute_batch(
        "CREATE TABLE IF NOT EXISTS staff (id TEXT PRIMARY KEY, sealed BLOB NOT NULL, updated_ms INTEGER NOT NULL);",
    )?;
    Ok(())
}

fn records(e: &Engine) -> Result<Vec<Record>> {
    ensure_table(e)?;
    let mut stmt = e
        .store()
        .conn()
        .prepare("SELECT id, sealed FROM staff ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, sealed) = row?;
        let plain = Zeroizing::new(
            crypto::open_with(e.secrets().age_identity(), &sealed, RECORD_BYTES_MAX)
                .map_err(EngineError::from)?,
        );
        let rec: Record = ciborium::from_reader(&plain[..]).map_err(|err| {
            EngineError::Store(StoreError::Corrupt(format!("staff account {id}: {err}")))
        })?;
        out.push(rec);
    }
    // Accounts made before roles: the oldest is the device's administrator.
    if !out.iter().any(|r| r.role == Some(StaffRole::Admin))
        && let Some(first) = out.iter_mut().min_by_key(|r| r.created_ms)
    {
        first.role = Some(StaffRole::Admin);
    }
    Ok(out)
}

fn save(e: &Engine, rec: &Record) -> Result<()> {
    let mut plain = Zeroizing::new(Vec::new());
    ciborium::into_writer(rec, &mut *plain).expect("writing to a Vec cannot fail");
    let sealed = crypto::seal_to(&[e.secrets().age_identity().to_public()], &plain)
        .map_err(EngineError::from)?;
    e.store().conn().execute(
        "INSERT INTO staff (id, sealed, updated_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET sealed = excluded.sealed, updated_ms = excluded.updated_ms",
        params![rec.id, sealed, now_ms() as i64],
    )?;
    Ok(())
}

fn hash(secret: &[u8]) -> Result<String> {
    let salt =
        SaltString::encode_b64(&random::<16>()).map_err(|e| StaffError::Hash(e.to_string()))?;
    Ok(Argon2::default()
        .hash_password(secret, &salt)
        .map_err(|e| StaffError::Hash(e.to_string()))?
        .to_string())
}

fn matches(secret: &[u8], phc: &str) -> Result<bool> {
    let parsed = PasswordHash::new(phc).map_err(|e| StaffError::Hash(e.to_string()))?;
    Ok(Argon2::default().verify_password(secret, &parsed).is_ok())
}

fn check_password(password: &str) -> Result<()> {
    if password.chars().count() < PASSWORD_CHARS_MIN || password.len() > PASSWORD_BYTES_MAX {
        return Err(StaffError::BadPassword);
    }
    Ok(())
}

/// Creates a staff account with a password, and records it in the audit log (`staff-add`, the new
/// login and role as its fields). The device's first account is its administrator whatever `role`
/// says; the shells let only a signed-in administrator add later ones.
pub fn create(
    e: &Engine,
    login: &str,
    name: &str,
    password: &str,
    role: StaffRole,
) -> Result<Staff> {
    if login.is_empty() || login.len() > LOGIN_BYTES_MAX || login.chars().any(char::is_whitespace) {
        return Err(StaffError::BadLogin);
    }
    check_password(password)?;
    let all = records(e)?;
    if all.len() >= ACCOUNTS_MAX {
        return Err(StaffError::TooMany);
    }
    if all.iter().any(|r| r.login == login) {
        return Err(StaffError::LoginTaken(login.to_owned()));
    }
    let role = if all.is_empty() {
        StaffRole::Admin
    } else {
        role
    };
    let rec = Record {
        id: hex::encode(random::<16>()),
        login: login.to_owned(),
        name: name.to_owned(),
        password_hash: hash(password.as_bytes())?,
        card: None,
        failed_pins: 0,
        created_ms: now_ms(),
        role: Some(role),
        failed_passwords: 0,
        locked_until_ms: 0,
    };
    save(e, &rec)?;
    let role_field = match role {
        StaffRole::Admin => "role=admin",
        StaffRole::Staff => "role=staff",
    };
    // The first account has no one signed in to add it: it is its own author.
    crate::audit::record_as(
        e,
        e.staff().or(Some(login)),
        AuditAction::StaffAdd,
        None,
        &[&format!("login={login}"), role_field],
    )?;
    Ok(rec.public())
}

/// The accounts of this device.
pub fn list(e: &Engine) -> Result<Vec<Staff>> {
    Ok(records(e)?.iter().map(Record::public).collect())
}

fn by_password(e: &Engine, login: &str, password: &str) -> Result<Record> {
    let now = now_ms();
    let Some(mut r) = records(e)?.into_iter().find(|r| r.login == login) else {
        // Spend the same time as a wrong password, so a login's existence does not show.
        let _ = hash(password.as_bytes());
        return Err(StaffError::BadCredentials);
    };
    if now < r.locked_until_ms {
        return Err(StaffError::LockedOut {
            retry_after_s: (r.locked_until_ms - now).div_ceil(1000),
        });
    }
    if matches(password.as_bytes(), &r.password_hash)? {
        if r.failed_passwords > 0 || r.locked_until_ms > 0 {
            r.failed_passwords = 0;
            r.locked_until_ms = 0;
            save(e, &r)?;
        }
        return Ok(r);
    }
    r.failed_passwords = r.failed_passwords.saturating_add(1);
    let pause = lockout_ms(r.failed_passwords);
    if pause > 0 {
        r.locked_until_ms = now + pause;
    }
    save(e, &r)?;
    Err(StaffError::BadCredentials)
}

/// Checks a login and password without signing in (also unlocks a staff card locked by wrong
/// staff PINs): what binding a card and [`sign_in_password`] check first. A wrong login or password
/// is recorded in the audit log (`sign-in-failed`, naming the login tried) and counts towards the
/// account's lockout.
///
/// Errors: [`StaffError::BadCredentials`], [`StaffError::LockedOut`]; store errors.
pub fn verify_password(e: &Engine, login: &str, password: &str) -> Result<Staff> {
    let mut rec = match by_password(e, login, password) {
        Ok(rec) => rec,
        Err(err) => {
            let why = if matches!(err, StaffError::LockedOut { .. }) {
                "locked"
            } else {
                "password"
            };
            crate::audit::record_as(e, Some(login), AuditAction::SignInFailed, None, &[why])?;
            return Err(err);
        }
    };
    if rec.failed_pins > 0 {
        rec.failed_pins = 0;
        save(e, &rec)?;
    }
    Ok(rec.public())
}

/// Signs in with login and password ([`verify_password`]); a success is not recorded (a session's
/// shell records `sign-in`, see [`sign_in_session`]). On a device that requires 二要素認証 a right
/// password still unlocks a card locked by wrong PINs, but signs no one in (recorded as
/// `sign-in-failed`, `second-factor-needed`).
///
/// Errors: as [`verify_password`]; [`StaffError::SecondFactorNeeded`].
pub fn sign_in_password(e: &Engine, login: &str, password: &str) -> Result<Staff> {
    let who = verify_password(e, login, password)?;
    if two_factor_required(e)? {
        crate::audit::record_as(
            e,
            Some(login),
            AuditAction::SignInFailed,
            None,
            &["password", "second-factor-needed"],
        )?;
        return Err(StaffError::SecondFactorNeeded);
    }
    Ok(who)
}

/// Whether this device requires 二要素認証 for every sign-in (医療情報システムの安全管理に関する
/// ガイドライン 第6.0版: 二要素認証): then only a staff card with its PIN signs in (a My Number
/// card's PIN is checked by the card, a contactless card's staff PIN by this device), never a
/// password alone. A password still unbinds a card and unlocks one locked by wrong PINs.
///
/// Errors: store errors.
pub fn two_factor_required(e: &Engine) -> Result<bool> {
    Ok(e.store()
        .meta_cbor::<bool>("staff_two_factor")?
        .unwrap_or(false))
}

/// Sets whether this device requires 二要素認証 ([`two_factor_required`]). Only an administrator
/// signed in at `e`; recorded as `staff-change` (`two-factor:on` or `two-factor:off`). Turning it
/// on needs at least one administrator with a staff card, so that someone can still sign in.
///
/// Errors: [`StaffError::BadCredentials`] when no administrator is signed in; [`StaffError::UnknownCard`]
/// when turning it on and no administrator has a card; store errors.
pub fn set_two_factor_required(e: &Engine, required: bool) -> Result<()> {
    let admin = match e.staff() {
        Some(login) => find(e, login)?.filter(|s| s.role == StaffRole::Admin),
        None => None,
    };
    if admin.is_none() {
        return Err(StaffError::BadCredentials);
    }
    if required
        && !list(e)?
            .iter()
            .any(|s| s.role == StaffRole::Admin && s.card.is_some())
    {
        return Err(StaffError::UnknownCard);
    }
    e.store().set_meta_cbor("staff_two_factor", &required)?;
    crate::audit::record(
        e,
        AuditAction::StaffChange,
        None,
        &[if required {
            "two-factor:on"
        } else {
            "two-factor:off"
        }],
    )?;
    Ok(())
}

/// Starts a session (the desktop app): [`sign_in_password`], then `e` attributes everything to the
/// staff member and the audit log records `sign-in`.
pub fn sign_in_session(e: &mut Engine, login: &str, password: &str) -> Result<Staff> {
    let who = sign_in_password(e, login, password)?;
    e.set_staff(Some(who.login.clone()));
    crate::audit::record(e, AuditAction::SignIn, None, &["password"])?;
    Ok(who)
}

/// Ends a session: records `sign-out` for whoever is signed in at `e`, who no longer is.
///
/// Signing out always succeeds: when the entry cannot be written, the failure is logged and the
/// staff member is signed out anyway.
pub fn sign_out_session(e: &mut Engine) -> Result<()> {
    if e.staff().is_some()
        && let Err(err) = crate::audit::record(e, AuditAction::SignOut, None, &[])
    {
        tracing::error!("could not record a sign-out in the audit log: {err}");
    }
    e.set_staff(None);
    Ok(())
}

/// The account of `login`, if any (no secrets).
pub fn find(e: &Engine, login: &str) -> Result<Option<Staff>> {
    Ok(records(e)?
        .iter()
        .find(|r| r.login == login)
        .map(Record::public))
}

fn check_staff_pin(pin: &str) -> Result<()> {
    if !STAFF_PIN_DIGITS.contains(&pin.len()) || !pin.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StaffError::StaffPinFormat);
    }
    Ok(())
}

/// Binds the card `read` to the account (once). The account's password authorises it. A My Number
/// card must have proved possession; a contactless card needs `staff_pin` (4 to 8 digits), which
/// sign-in will ask for.
pub fn bind_card(
    e: &Engine,
    login: &str,
    password: &str,
    read: &CardRead,
    staff_pin: Option<&str>,
) -> Result<Staff> {
    let mut rec = by_password(e, login, password)?;
    if rec.card.is_some() {
        return Err(StaffError::AlreadyBound);
    }
    let id = &read.identity.pseudonymous_id;
    if records(e)?
        .iter()
        .any(|r| r.card.as_ref().is_some_and(|c| &c.pseudonymous_id == id))
    {
        return Err(StaffError::CardInUse);
    }
    let pin_hash = match read.identity.kind {
        CardKind::MyNumber => {
            if !read.possession_verified {
                return Err(StaffError::PossessionNotProven);
            }
            None
        }
        CardKind::Contactless => {
            let pin = staff_pin.ok_or(StaffError::StaffPinNeeded)?;
            check_staff_pin(pin)?;
            Some(hash(pin.as_bytes())?)
        }
    };
    rec.card = Some(BoundCard {
        kind: read.identity.kind,
        pseudonymous_id: id.clone(),
        pin_hash,
        bound_ms: now_ms(),
    });
    rec.failed_pins = 0;
    save(e, &rec)?;
    crate::audit::record_as(
        e,
        e.staff().or(Some(login)),
        AuditAction::StaffChange,
        None,
        &[&format!("login={login}"), "card-bound"],
    )?;
    Ok(rec.public())
}

/// Removes the account's card (the password authorises it).
pub fn unbind_card(e: &Engine, login: &str, password: &str) -> Result<Staff> {
    let mut rec = by_password(e, login, password)?;
    if two_factor_required(e)?
        && rec.card.is_some()
        && list(e)?
            .iter()
            .any(|s| s.login == login && s.role == StaffRole::Admin)
        && !list(e)?
            .iter()
            .any(|s| s.login != login && s.role == StaffRole::Admin && s.card.is_some())
    {
        return Err(StaffError::LastAdminCard);
    }
    rec.card = None;
    rec.failed_pins = 0;
    save(e, &rec)?;
    crate::audit::record_as(
        e,
        e.staff().or(Some(login)),
        AuditAction::StaffChange,
        None,
        &[&format!("login={login}"), "card-unbound"],
    )?;
    Ok(rec.public())
}

/// Signs in with a card already read: a My Number card must have proved possession (its own PIN,
/// checked by the card); a contactless card needs its staff PIN.
///
/// A refusal (unknown card, no possession proof, wrong or locked staff PIN) is recorded in the
/// audit log (`sign-in-failed`, naming the account when the card is bound to one).
pub fn sign_in_card(e: &Engine, read: &CardRead, staff_pin: Option<&str>) -> Result<Staff> {
    let out = card_sign_in(e, read, staff_pin);
    if let Err(err) = &out
        && !matches!(err, StaffError::Engine(_) | StaffError::Card(_))
    {
        let login = records(e)?
            .into_iter()
            .find(|r| {
                r.card
                    .as_ref()
                    .is_some_and(|c| c.pseudonymous_id == read.identity.pseudonymous_id)
            })
            .map(|r| r.login);
        crate::audit::record_as(
            e,
            login.as_deref(),
            AuditAction::SignInFailed,
            None,
            &["card"],
        )?;
    }
    out
}

fn card_sign_in(e: &Engine, read: &CardRead, staff_pin: Option<&str>) -> Result<Staff> {
    let id = &read.identity.pseudonymous_id;
    let mut rec = records(e)?
        .into_iter()
        .find(|r| {
            r.card
                .as_ref()
                .is_some_and(|c| &c.pseudonymous_id == id && c.kind == read.identity.kind)
        })
        .ok_or(StaffError::UnknownCard)?;
    let bound = rec.card.clone().expect("found by its card");
    match bound.kind {
        CardKind::MyNumber => {
            if !read.possession_verified {
                return Err(StaffError::PossessionNotProven);
            }
        }
        CardKind::Contactless => {
            if rec.failed_pins >= STAFF_PIN_TRIES_MAX {
                return Err(StaffError::StaffPinLocked);
            }
            let pin = staff_pin.ok_or(StaffError::StaffPinNeeded)?;
            check_staff_pin(pin)?;
            let phc = bound
                .pin_hash
                .as_deref()
                .ok_or(StaffError::StaffPinNeeded)?;
            if !matches(pin.as_bytes(), phc)? {
                rec.failed_pins += 1;
                save(e, &rec)?;
                let left = STAFF_PIN_TRIES_MAX - rec.failed_pins;
                return Err(if left == 0 {
                    StaffError::StaffPinLocked
                } else {
                    StaffError::WrongStaffPin { tries_left: left }
                });
            }
            if rec.failed_pins > 0 {
                rec.failed_pins = 0;
                save(e, &rec)?;
            }
        }
    }
    Ok(rec.public())
}

/// Waits for a staff card and signs in with it: a My Number card is read with possession proof
/// (`prompt` gives its user-authentication PIN); for a contactless card `staff_pin` is asked after the tap.
pub fn sign_in_with_card(
    e: &Engine,
    opts: &ReadOptions,
    prompt: Box<dyn PinPrompt + Send>,
    staff_pin: impl FnOnce() -> Option<Zeroizing<String>>,
) -> Result<Staff> {
    let opts = ReadOptions {
        verify: true,
        attributes: false,
        ..opts.clone()
    };
    let read = card::read(
        e,
        musubi_crdt::crypto::PseudonymSector::Staff,
        &opts,
        prompt,
    )?;
    match read.identity.kind {
        CardKind::MyNumber => sign_in_card(e, &read, None),
        CardKind::Contactless => {
            // Check the card is known before asking for a PIN.
            let known = records(e)?.iter().any(|r| {
                r.card
                    .as_ref()
                    .is_some_and(|c| c.pseudonymous_id == read.identity.pseudonymous_id)
            });
            if !known {
                return Err(StaffError::UnknownCard);
            }
            let pin = staff_pin();
            sign_in_card(e, &read, pin.as_deref().map(String::as_str))
        }
    }
}

#[cfg(test)]
mod tests {

    /// A login typed to attack the log (100 KiB, control characters that would forge lines of
    /// `audit list`): refused, recorded cut and cleaned, and the log still verifies.
    #[test]
    fn a_hostile_login_is_recorded_cut_and_clean_and_the_log_verifies() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e =
            Engine::init(&tmp.path().join("d"), "受付", "correct horse battery", 10).expect("init");
        let login = format!(
            "sato\n2024-01-01 sign-in admin\u{1b}[2J{}",
            "x".repeat(100 * 1024)
        );
        assert!(matches!(
            sign_in_password(&e, &login, "whatever"),
            Err(StaffError::BadCredentials)
        ));
        let all = crate::audit::list(&e, &crate::audit::Filter::default()).expect("list");
        let staff = all[0].staff.as_deref().expect("the login tried");
        assert!(staff.chars().count() <= crate::audit::TEXT_CHARS_MAX);
        assert!(!staff.chars().any(char::is_control), "{staff:?}");
        assert!(crate::audit::verify(&e).expect("verify").is_ok());
    }

    #[test]
    fn sign_in_pauses_after_repeated_wrong_passwords_and_longer_each_time() {
        assert_eq!(lockout_ms(SIGN_IN_FAILURES_FREE - 1), 0);
        assert_eq!(lockout_ms(SIGN_IN_FAILURES_FREE), 30_000);
        assert_eq!(lockout_ms(SIGN_IN_FAILURES_FREE + 1), 60_000);
        assert_eq!(lockout_ms(SIGN_IN_FAILURES_FREE + 3), 240_000);
        assert_eq!(lockout_ms(u32::MAX), SIGN_IN_LOCKOUT_MS_MAX);

        let tmp = tempfile::tempdir().expect("tempdir");
        let e =
            Engine::init(&tmp.path().join("d"), "受付", "correct horse battery", 10).expect("init");
        create(&e, "sato", "佐藤", "correct horse", StaffRole::Staff).expect("create");
        for _ in 0..SIGN_IN_FAILURES_FREE {
            assert!(matches!(
                sign_in_password(&e, "sato", "wrong horse"),
                Err(StaffError::BadCredentials)
            ));
        }
        match sign_in_password(&e, "sato", "correct horse") {
            Err(StaffError::LockedOut { retry_after_s }) => {
                assert!((1..=30).contains(&retry_after_s), "{retry_after_s}")
            }
            other => panic!("the right password waits out the pause: {other:?}"),
        }
        let failed = crate::audit::list(
            &e,
            &crate::audit::Filter {
                action: Some(AuditAction::SignInFailed),
                ..Default::default()
            },
        )
        .expect("audit");
        assert_eq!(failed.len(), SIGN_IN_FAILURES_FREE as usize + 1);
        assert_eq!(failed.last().expect("entry").fields, ["locked"]);
    }

    use super::*;
    use crate::card::{CardIdentity, ReadTimings};

    fn engine() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = Engine::init(dir.path(), "test", "passphrase", 10).expect("init");
        (dir, e)
    }

    fn read(kind: CardKind, id: &str, verified: bool) -> CardRead {
        CardRead {
            identity: CardIdentity {
                kind,
                pseudonymous_id: id.into(),
                reader: "R".into(),
                technology: None,
                expires: None,
                expired: false,
            },
            possession_verified: verified,
            attributes: None,
            timings: ReadTimings::default(),
        }
    }

    #[test]
    fn accounts_are_sealed_and_sign_in_works() {
        let (dir, e) = engine();
        let s = create(&e, "sato", "佐藤 一郎", "correct horse", StaffRole::Staff).expect("create");
        assert!(matches!(
            create(&e, "sato", "x", "correct horse", StaffRole::Staff),
            Err(StaffError::LoginTaken(_))
        ));
        assert!(matches!(
            create(&e, "x", "x", "short", StaffRole::Staff),
            Err(StaffError::BadPassword)
        ));
        assert_eq!(
            sign_in_password(&e, "sato", "correct horse").expect("sign in"),
            s
        );
        assert!(matches!(
            sign_in_password(&e, "sato", "wrong horse"),
            Err(StaffError::BadCredentials)
        ));
        assert!(matches!(
            sign_in_password(&e, "nobody", "correct horse"),
            Err(StaffError::BadCredentials)
        ));
        drop(e);
        for f in std::fs::read_dir(dir.path()).expect("dir") {
            let bytes = std::fs::read(f.expect("entry").path()).expect("read");
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("sato") && !text.contains("佐藤") && !text.contains("argon2"),
                "plaintext on disk"
            );
        }
    }

    #[test]
    fn cards_bind_once_and_sign_in_with_pins() {
        let (_dir, e) = engine();
        create(&e, "sato", "佐藤", "correct horse", StaffRole::Staff).expect("create");
        create(&e, "suzuki", "鈴木", "correct horse", StaffRole::Staff).expect("create");
        let mn = read(CardKind::MyNumber, "aa", false);
        assert!(matches!(
            bind_card(&e, "sato", "correct horse", &mn, None),
            Err(StaffError::PossessionNotProven)
        ));
        let mn = read(CardKind::MyNumber, "aa", true);
        bind_card(&e, "sato", "correct horse", &mn, None).expect("bind");
        assert!(matches!(
            bind_card(&e, "sato", "correct horse", &mn, None),
            Err(StaffError::AlreadyBound)
        ));
        assert!(matches!(
            bind_card(&e, "suzuki", "correct horse", &mn, None),
            Err(StaffError::CardInUse)
        ));
        assert_eq!(sign_in_card(&e, &mn, None).expect("sign in").login, "sato");
        assert!(matches!(
            sign_in_card(&e, &read(CardKind::MyNumber, "aa", false), None),
            Err(StaffError::PossessionNotProven)
        ));

        let suica = read(CardKind::Contactless, "bb", false);
        assert!(matches!(
            bind_card(&e, "suzuki", "correct horse", &suica, None),
            Err(StaffError::StaffPinNeeded)
        ));
        bind_card(&e, "suzuki", "correct horse", &suica, Some("2468")).expect("bind");
        assert_eq!(
            sign_in_card(&e, &suica, Some("2468"))
                .expect("sign in")
                .login,
            "suzuki"
        );
        for left in (1..STAFF_PIN_TRIES_MAX).rev() {
            let err = sign_in_card(&e, &suica, Some("0000")).expect_err("wrong");
            assert!(
                matches!(err, StaffError::WrongStaffPin { tries_left } if tries_left == left),
                "{err:?}"
            );
        }
        assert!(matches!(
            sign_in_card(&e, &suica, Some("0000")),
            Err(StaffError::StaffPinLocked)
        ));
        assert!(matches!(
            sign_in_card(&e, &suica, Some("2468")),
            Err(StaffError::StaffPinLocked)
        ));
        sign_in_password(&e, "suzuki", "correct horse").expect("unlock");
        assert_eq!(
            sign_in_card(&e, &suica, Some("2468"))
                .expect("sign in")
                .login,
            "suzuki"
        );
        assert!(matches!(
            sign_in_card(&e, &read(CardKind::Contactless, "cc", false), Some("2468")),
            Err(StaffError::UnknownCard)
        ));
    }
}
