//! Relatives' e-mail notifications: a sealed outbox in the local store and SMTP delivery (lettre).
//!
//! On check-in, reception queues one notification per registered relative ([`enqueue`]); `musubi
//! mail send` (once, for a while, or `--watch`) first queues any that a crash between the check-in
//! and its queueing left out ([`reconcile`]), then delivers what is due by SMTP ([`deliver`]).
//!
//! # At rest
//!
//! Table `mail_outbox`: the id, the state, attempt counts, times and an error class are public
//! metadata; the message itself (addresses, names, text) is age-sealed to this device's own
//! recipient (DESIGN invariant 2). SMTP error texts, which may echo an address, are not stored.
//!
//! # Delivery guarantee
//!
//! The outbox id and the `Message-ID` are derived from (stay event id, relative's address), so a
//! stay's notification to one relative is one row and one Message-ID on every attempt.
//! A row moves `queued → sending → unconfirmed → sent`:
//!
//! - `sending` is committed before the SMTP transaction starts (with the owner's pid and a lease).
//! - `unconfirmed` is committed after the whole message body was written and *before* the final
//!   `CRLF.CRLF` that asks the server to accept it (lettre's `message_iter` pulls the iterator one
//!   last time before writing it; that pull does the commit).
//! - `sent` is committed when the server answers 250. An explicit 4xx/5xx answer to the end of
//!   DATA requeues or fails the row; a lost answer (connection dropped, timeout) leaves it
//!   `unconfirmed`, since the server may have accepted the message.
//!
//! A process that dies in `sending` had not ended the DATA phase, so the server discarded the
//! transaction (RFC 5321 §4.1.1.4): the row goes back to `queued` and is sent again, with the same
//! Message-ID. A failure the server reports (4xx, a refused connection) also requeues it with
//! exponential backoff ([`BACKOFF_FIRST_MS`] doubling up to [`BACKOFF_MAX_MS`]); a 5xx answer is
//! permanent (`failed`).
//! A process that dies in `unconfirmed` died within one round trip of the server's acceptance: the
//! server may or may not hold the message, and SMTP offers no way to ask. Such a row is **not** sent
//! again on its own (never twice); `musubi mail status` lists it and `musubi mail resend ID` sends it
//! again with the same Message-ID (mail clients fold duplicates by Message-ID) after staff checked.
//! So: every notification is delivered at least once unless the sender dies inside that one round
//! trip, and never twice unless staff resend an unconfirmed one.

use std::path::PathBuf;
use std::time::Duration;

use lettre::Address;
use lettre::message::{Mailbox, Message, header::ContentType};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::ClientId;
use musubi_crdt::crypto;
use musubi_crdt::documents::shelter::Relative;
use musubi_crdt::ids::DocumentId;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError, Result, now_ms};

/// First retry delay after a transient failure, in milliseconds.
pub const BACKOFF_FIRST_MS: u64 = 1_000;
/// Longest retry delay, in milliseconds (5 minutes).
pub const BACKOFF_MAX_MS: u64 = 300_000;
/// How long a `sending` claim holds before another process may take the row over, in milliseconds.
pub const LEASE_MS: u64 = 120_000;
/// SMTP connect and command timeout.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest sealed message accepted when opening one, in bytes.
pub const MESSAGE_BYTES_MAX: usize = 256 * 1024;
/// Most messages one delivery pass sends.
pub const BATCH_COUNT_MAX: usize = 500;

/// The fault-injection variable of the tests (debug builds only): `abort-before-data-end` aborts
/// the process after writing the body and before ending DATA; `abort-after-smtp-accept` aborts after
/// the server's 250 and before recording `sent`.
pub const FAULT_ENV: &str = "MUSUBI_FAULT_INJECTION";

/// A notification to queue (plain data; sealed by [`enqueue`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Draft {
    /// The check-in event that began the stay (the stay id).
    pub stay_event: String,
    /// The shelter document.
    pub shelter: DocumentId,
    /// 避難所名.
    pub shelter_name: String,
    /// Its address.
    pub shelter_address: String,
    /// The evacuee's name.
    pub evacuee_name: String,
    /// Whom to tell.
    pub relative: Relative,
    /// Check-in time (RFC 3339).
    pub at: String,
}

/// An outbox row as listed (public metadata only).
#[derive(Clone, Debug, Serialize)]
pub struct OutboxRow {
    /// Row id (derived from stay and address).
    pub id: String,
    /// `queued`, `sending`, `unconfirmed`, `sent` or `failed`.
    pub state: String,
    /// SMTP attempts so far.
    pub attempts: u32,
    /// Next attempt (Unix ms) for queued rows.
    pub next_attempt_ms: u64,
    /// The class of the last error (never the server's text).
    pub error: Option<String>,
}

/// Where and how to deliver.
#[derive(Clone, Debug)]
pub struct SmtpConfig {
    /// Server host name or address.
    pub host: String,
    /// Port (25, 587, or a test server's).
    pub port: u16,
    /// The From address.
    pub from: String,
    /// Require STARTTLS (rustls, webpki roots); off for a loopback relay.
    pub starttls: bool,
}

/// What a delivery pass did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Messages the server accepted.
    pub sent: usize,
    /// Messages put back for a later attempt.
    pub deferred: usize,
    /// Messages refused for good.
    pub failed: usize,
    /// Rows left `unconfirmed` by a process that died (not resent on their own).
    pub unconfirmed: usize,
    /// Rows still waiting (queued) after the pass.
    pub waiting: usize,
    /// The earliest next attempt among waiting rows (Unix ms), if any.
    pub next_attempt_ms: Option<u64>,
}

fn store_err(e: rusqlite::Error) -> EngineError {
    EngineError::Store(e.into())
}

fn ensure_table(engine: &Engine) -> Result<()> {
    engine
        .store()
        .conn()
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS mail_outbox (
                id TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
                owner_pid INTEGER, lease_until_ms INTEGER, error TEXT, sealed BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS mail_outbox_state ON mail_outbox(state, next_attempt_ms);",
        )
        .map_err(store_err)
}

/// The outbox id of a stay's notification to one address: 32 hex digits of a BLAKE3 hash.
pub fn outbox_id(stay_event: &str, email: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"musubi/mail/v1\0");
    h.update(stay_event.as_bytes());
    h.update(b"\0");
    h.update(email.trim().to_ascii_lowercase().as_bytes());
    hex::encode(&h.finalize().as_bytes()[..16])
}

/// The Message-ID of an outbox row (the same on every attempt).
pub fn message_id(id: &str) -> String {
    format!("<{id}@shelter.musubi.invalid>")
}

/// Queues a notification (idempotent: the same stay and address is one row). Returns whether it
/// was new.
pub fn enqueue(engine: &Engine, draft: &Draft) -> Result<bool> {
    ensure_table(engine)?;
    let id = outbox_id(&draft.stay_event, &draft.relative.email);
    let mut plain = Vec::new();
    ciborium::into_writer(draft, &mut plain).expect("writing to a Vec cannot fail");
    let sealed = crypto::seal_to(&[engine.secrets().age_identity().to_public()], &plain)?;
    let now = now_ms() as i64;
    let n = engine
        .store()
        .conn()
        .execute(
            "INSERT OR IGNORE INTO mail_outbox (id, state, next_attempt_ms, created_ms, updated_ms, sealed)
             VALUES (?1, 'queued', ?2, ?2, ?2, ?3)",
            params![id, now, sealed],
        )
        .map_err(store_err)?;
    Ok(n == 1)
}

/// Queues the notifications of every open stay this device began whose rows are missing: a process
/// that died between committing a check-in and queueing its notifications loses nothing. Returns how
/// many rows it added (0 in the normal case). Idempotent.
pub fn reconcile(engine: &Engine) -> Result<usize> {
    use musubi_crdt::documents::shelter as schema;
    use musubi_crdt::ids::DocumentKind;
    ensure_table(engine)?;
    let me = engine.enrolment()?.facility;
    let device = engine.device_id().to_string();
    let mut added = 0;
    for row in engine.store().documents(Some(DocumentKind::Shelter))? {
        if !row
            .info
            .members
            .iter()
            .any(|m| m.facility == me && m.role.can_write())
        {
            continue;
        }
        let loaded = match engine.load(row.info.id) {
            Ok(l) if !l.heads.is_empty() => l,
            Ok(_) | Err(EngineError::NoKey(_)) => continue,
            Err(e) => return Err(e),
        };
        let roster = schema::read(&loaded.doc)?;
        for e in &roster.evacuees {
            if e.relatives.is_empty() || !e.presence().counts() {
                continue;
            }
            let Some(stay) = e.current_stay() else {
                continue;
            };
            if stay.device != device {
                continue;
            }
            for r in &e.relatives {
                let draft = Draft {
                    stay_event: stay.id.clone(),
                    shelter: row.info.id,
                    shelter_name: roster.shelter.name.clone(),
                    shelter_address: roster.shelter.address.clone(),
                    evacuee_name: e.name.clone(),
                    relative: r.clone(),
                    at: stay.at.clone(),
                };
                if enqueue(engine, &draft)? {
                    added += 1;
                }
            }
        }
    }
    Ok(added)
}

/// Every outbox row (metadata only), oldest first.
pub fn status(engine: &Engine) -> Result<Vec<OutboxRow>> {
    ensure_table(engine)?;
    let conn = engine.store().conn();
    let mut stmt = conn
        .prepare(
            "SELECT id, state, attempts, next_attempt_ms, error FROM mail_outbox ORDER BY created_ms, id",
        )
        .map_err(store_err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                state: r.get(1)?,
                attempts: r.get::<_, i64>(2)? as u32,
                next_attempt_ms: r.get::<_, i64>(3)?.max(0) as u64,
                error: r.get(4)?,
            })
        })
        .map_err(store_err)?;
    rows.collect::<std::result::Result<_, _>>()
        .map_err(store_err)
}

/// The plain notification of a row (for staff, never logged).
pub fn open_draft(engine: &Engine, id: &str) -> Result<Draft> {
    ensure_table(engine)?;
    let sealed: Vec<u8> = engine
        .store()
        .conn()
        .query_row("SELECT sealed FROM mail_outbox WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(store_err)?
        .ok_or_else(|| EngineError::UnknownDocument(format!("outbox message {id}")))?;
    let plain = crypto::open_with(engine.secrets().age_identity(), &sealed, MESSAGE_BYTES_MAX)?;
    ciborium::from_reader(plain.as_slice())
        .map_err(|e| EngineError::Store(crate::store::StoreError::Corrupt(e.to_string())))
}

/// Puts an `unconfirmed` (or `failed`) row back in the queue, after staff checked it did not arrive.
pub fn resend(engine: &Engine, id: &str) -> Result<bool> {
    ensure_table(engine)?;
    let n = engine
        .store()
        .conn()
        .execute(
            "UPDATE mail_outbox SET state = 'queued', next_attempt_ms = ?2, updated_ms = ?2
             WHERE id = ?1 AND state IN ('unconfirmed', 'failed')",
            params![id, now_ms() as i64],
        )
        .map_err(store_err)?;
    Ok(n == 1)
}

fn pid_alive(pid: i64) -> bool {
    if cfg!(target_os = "linux") {
        PathBuf::from(format!("/proc/{pid}")).exists()
    } else {
        true // elsewhere only the lease frees a claim
    }
}

/// Requeues `sending` rows whose process died (their DATA never ended, so nothing was delivered).
fn recover(engine: &Engine) -> Result<usize> {
    let conn = engine.store().conn();
    let now = now_ms() as i64;
    let mut stmt = conn
        .prepare("SELECT id, owner_pid, lease_until_ms FROM mail_outbox WHERE state = 'sending'")
        .map_err(store_err)?;
    let rows: Vec<(String, Option<i64>, Option<i64>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(store_err)?
        .collect::<std::result::Result<_, _>>()
        .map_err(store_err)?;
    let me = std::process::id() as i64;
    let mut n = 0;
    for (id, pid, lease) in rows {
        let dead = pid.is_none_or(|p| p != me && !pid_alive(p));
        if dead || lease.is_none_or(|l| l < now) {
            n += conn
                .execute(
                    "UPDATE mail_outbox SET state = 'queued', next_attempt_ms = ?2, updated_ms = ?2,
                     owner_pid = NULL, lease_until_ms = NULL WHERE id = ?1 AND state = 'sending'",
                    params![id, now],
                )
                .map_err(store_err)?;
        }
    }
    Ok(n)
}

fn set_state(engine: &Engine, id: &str, state: &str) -> Result<()> {
    engine
        .store()
        .conn()
        .execute(
            "UPDATE mail_outbox SET state = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, state, now_ms() as i64],
        )
        .map_err(store_err)?;
    Ok(())
}

fn defer(engine: &Engine, id: &str, attempts: u32, error: &str, permanent: bool) -> Result<()> {
    let shift = attempts.saturating_sub(1).min(20);
    let delay = (BACKOFF_FIRST_MS << shift).min(BACKOFF_MAX_MS);
    let now = now_ms();
    engine
        .store()
        .conn()
        .execute(
            "UPDATE mail_outbox SET state = ?2, next_attempt_ms = ?3, updated_ms = ?4, error = ?5,
             owner_pid = NULL, lease_until_ms = NULL WHERE id = ?1",
            params![
                id,
                if permanent { "failed" } else { "queued" },
                (now + delay) as i64,
                now as i64,
                error
            ],
        )
        .map_err(store_err)?;
    Ok(())
}

fn fault(point: &str) {
    if cfg!(debug_assertions) && std::env::var(FAULT_ENV).is_ok_and(|v| v == point) {
        eprintln!("fault injection: aborting at {point}");
        std::process::abort();
    }
}

/// The error class stored for a failed attempt: the SMTP code or the kind of failure, never the
/// server's text (it may echo an address).
fn error_class(e: &lettre::transport::smtp::Error) -> String {
    match e.status() {
        Some(code) => format!("smtp {code}"),
        None if e.is_timeout() => "timeout".into(),
        None if e.is_transient() => "transient".into(),
        None if e.is_permanent() => "permanent".into(),
        None => "network".into(),
    }
}

fn build_message(from: &Mailbox, id: &str, draft: &Draft) -> std::result::Result<Message, String> {
    let to_addr: Address = draft
        .relative
        .email
        .parse()
        .map_err(|e| format!("bad recipient address: {e}"))?;
    let to = Mailbox::new(Some(draft.relative.name.clone()), to_addr);
    let body = format!(
        "{name} 様\n\n{evacuee} さんが {at} に避難所「{shelter}」{addr}に入所されました。\n\n\
         このメールは避難所の受付システム (Musubi) から、ご本人が登録した連絡先へ自動で送信しています。\n\
         お問い合わせは避難所または災害対策本部へお願いします。\n",
        name = draft.relative.name,
        evacuee = draft.evacuee_name,
        at = draft.at,
        shelter = draft.shelter_name,
        addr = if draft.shelter_address.is_empty() {
            String::new()
        } else {
            format!("（{}）", draft.shelter_address)
        },
    );
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(format!(
            "【避難所入所のお知らせ】{} さん",
            draft.evacuee_name
        ))
        .message_id(Some(message_id(id)))
        .header(ContentType::TEXT_PLAIN)
        .body(body)
        .map_err(|e| format!("cannot build the message: {e}"))
}

/// Claims a due queued row for this process; returns its attempt number, or `None` when another
/// process took it.
fn claim(engine: &Engine, id: &str) -> Result<Option<u32>> {
    let now = now_ms() as i64;
    let conn = engine.store().conn();
    let n = conn
        .execute(
            "UPDATE mail_outbox SET state = 'sending', attempts = attempts + 1, owner_pid = ?2,
             lease_until_ms = ?3, updated_ms = ?4 WHERE id = ?1 AND state = 'queued'",
            params![id, std::process::id() as i64, now + LEASE_MS as i64, now],
        )
        .map_err(store_err)?;
    if n == 0 {
        return Ok(None);
    }
    let attempts: i64 = conn
        .query_row(
            "SELECT attempts FROM mail_outbox WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .map_err(store_err)?;
    Ok(Some(attempts as u32))
}

/// One delivery pass: requeues rows of dead processes, then sends every due queued row over one
/// SMTP connection (reconnecting after a failure), following the state machine of the module docs.
pub async fn deliver(engine: &Engine, cfg: &SmtpConfig) -> Result<Report> {
    ensure_table(engine)?;
    recover(engine)?;
    let from: Mailbox = cfg.from.parse().map_err(|e| EngineError::Io {
        path: "--from".into(),
        source: std::io::Error::other(format!("bad From address {:?}: {e}", cfg.from)),
    })?;
    let now = now_ms() as i64;
    let due: Vec<String> = {
        let conn = engine.store().conn();
        let mut stmt = conn
            .prepare(
                "SELECT id FROM mail_outbox WHERE state = 'queued' AND next_attempt_ms <= ?1
                 ORDER BY next_attempt_ms, id LIMIT ?2",
            )
            .map_err(store_err)?;
        stmt.query_map(params![now, BATCH_COUNT_MAX as i64], |r| r.get(0))
            .map_err(store_err)?
            .collect::<std::result::Result<_, _>>()
            .map_err(store_err)?
    };
    let mut report = Report::default();
    let mut conn: Option<AsyncSmtpConnection> = None;
    let mut unreachable: Option<String> = None;
    for id in due {
        let Some(attempts) = claim(engine, &id)? else {
            continue;
        };
        if let Some(class) = &unreachable {
            // The server did not answer this pass: every due message waits for its backoff.
            defer(engine, &id, attempts, class, false)?;
            report.deferred += 1;
            continue;
        }
        let draft = open_draft(engine, &id)?;
        let message = match build_message(&from, &id, &draft) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%id, "notification cannot be built: {e}");
                defer(engine, &id, attempts, "bad address", true)?;
                report.failed += 1;
                continue;
            }
        };
        if conn.as_ref().is_none_or(|c| c.has_broken()) {
            match connect(cfg).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::info!("SMTP server {}:{} unreachable: {e}", cfg.host, cfg.port);
                    let class = error_class(&e);
                    defer(engine, &id, attempts, &class, false)?;
                    report.deferred += 1;
                    unreachable = Some(class);
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        let past_point_of_no_return = std::cell::Cell::new(false);
        match transaction(engine, c, &id, &message, &past_point_of_no_return).await {
            Ok(()) => {
                fault("abort-after-smtp-accept");
                set_state(engine, &id, "sent")?;
                report.sent += 1;
            }
            Err(e) if past_point_of_no_return.get() && e.status().is_none() => {
                // The end of DATA may have reached the server and its answer was lost: ambiguous,
                // so the row stays `unconfirmed` (never sent twice on its own).
                tracing::warn!(%id, "no answer to the end of DATA ({}); left unconfirmed", error_class(&e));
                engine
                    .store()
                    .conn()
                    .execute(
                        "UPDATE mail_outbox SET error = ?2, owner_pid = NULL, lease_until_ms = NULL WHERE id = ?1",
                        params![id, error_class(&e)],
                    )
                    .map_err(store_err)?;
                conn = None;
            }
            Err(e) => {
                let permanent = e.is_permanent();
                tracing::info!(%id, "SMTP attempt {attempts} failed ({})", error_class(&e));
                defer(engine, &id, attempts, &error_class(&e), permanent)?;
                if permanent {
                    report.failed += 1;
                } else {
                    report.deferred += 1;
                }
                conn = None;
            }
        }
    }
    if let Some(mut c) = conn {
        let _ = c.quit().await;
    }
    let db = engine.store().conn();
    report.unconfirmed = db
        .query_row(
            "SELECT COUNT(*) FROM mail_outbox WHERE state = 'unconfirmed'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(store_err)? as usize;
    let (waiting, next): (i64, Option<i64>) = db
        .query_row(
            "SELECT COUNT(*), MIN(next_attempt_ms) FROM mail_outbox WHERE state IN ('queued', 'sending')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(store_err)?;
    report.waiting = waiting as usize;
    report.next_attempt_ms = next.map(|n| n.max(0) as u64);
    Ok(report)
}

async fn connect(
    cfg: &SmtpConfig,
) -> std::result::Result<AsyncSmtpConnection, lettre::transport::smtp::Error> {
    let mut conn = AsyncSmtpConnection::connect_tokio1(
        (cfg.host.as_str(), cfg.port),
        Some(SMTP_TIMEOUT),
        &ClientId::default(),
        None,
        None,
    )
    .await?;
    if cfg.starttls {
        let params = TlsParameters::new(cfg.host.clone())?;
        conn.starttls(params, &ClientId::default()).await?;
    }
    Ok(conn)
}

/// MAIL, RCPT, DATA and the body; commits `unconfirmed` just before the end of DATA.
async fn transaction(
    engine: &Engine,
    conn: &mut AsyncSmtpConnection,
    id: &str,
    message: &Message,
    past_point_of_no_return: &std::cell::Cell<bool>,
) -> std::result::Result<(), lettre::transport::smtp::Error> {
    use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
    let envelope = message.envelope();
    let mut params = Vec::new();
    let body = message.formatted();
    if !body.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    conn.command(Mail::new(envelope.from().cloned(), params))
        .await?;
    for to in envelope.to() {
        conn.command(Rcpt::new(to.clone(), vec![])).await?;
    }
    conn.command(Data).await?;
    let parts = std::iter::once(body).chain(std::iter::from_fn(|| {
        if !past_point_of_no_return.get() {
            fault("abort-before-data-end");
            // The point of no return: record it before the server can accept the message. If the
            // record cannot be written, unwinding drops the connection before the end of DATA, so
            // the server discards the message and the row stays `sending` (sent again later).
            set_state(engine, id, "unconfirmed")
                .expect("recording an SMTP attempt must succeed before its end of DATA is sent");
            past_point_of_no_return.set(true);
        }
        None
    }));
    conn.message_iter(parts).await?;
    Ok(())
}
