//! The admin HTTP listener (`musubi-node serve --admin 127.0.0.1:PORT`), for the load balancer and
//! the monitoring of the data centre that runs the relay:
//!
//! - `GET /livez`: 200 while the process answers.
//! - `GET /readyz`: 200 `ready` when the relay can take pushes now: a write transaction starts
//!   within [`READY_DB_WAIT`] (no other process holds the database's write lock), the schema is
//!   the one this build writes, the data directory's filesystem has the configured free space, the
//!   last request did not fail to store, a libp2p listener is open and the request queue is below
//!   its limit; else 503 with one reason per line.
//! - `GET /status`: JSON (see [`Status`]).
//! - `GET /metrics`: the metrics ([`crate::metrics::Metrics`]) in the Prometheus text format
//!   (OpenMetrics 1.0 text).
//!
//! Off unless asked for. Bound to a loopback address it answers anyone on the host; bound
//! elsewhere it needs a bearer token (`--admin-token-file`), compared in constant time, on every
//! path but `/livez` (RFC 6750 `Authorization: Bearer`). It holds at most
//! [`ADMIN_CONNECTIONS_MAX`] connections, each for at most [`ADMIN_CONNECTION_SECS`], so clients
//! that connect and send nothing cannot take the relay's file descriptors. It reads only public figures: no
//! document content, no key, no id of a device, facility or document.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::metrics::{Live, Metrics};
use crate::store::{SCHEMA_VERSION, Store, StoreStats, rfc3339, unix_ms};

/// How long `/readyz` waits for the database's write lock.
pub const READY_DB_WAIT: Duration = Duration::from_millis(500);

/// Most connections the admin listener holds at once; more wait to be accepted (the relay's own
/// file descriptors stay for devices).
pub const ADMIN_CONNECTIONS_MAX: usize = 32;

/// Longest life of one admin connection: a client that sends nothing (or a request byte by byte)
/// is cut off then; a monitoring system reconnects for its next scrape.
pub const ADMIN_CONNECTION_SECS: u64 = 30;

/// How long `/readyz` reports a request that failed to store, unless a later one succeeded.
pub const STORE_FAILURE_HOLD: Duration = Duration::from_secs(10);

/// Where and how the admin listener runs.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// The address to bind (loopback unless a token is set).
    pub addr: SocketAddr,
    /// The bearer token, when bound to a non-loopback address.
    pub token: Option<String>,
}

/// Errors starting the admin listener.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A non-loopback address without a token.
    #[error(
        "the admin listener on {0} is not on a loopback address: give --admin-token-file FILE (a bearer token) or bind it to 127.0.0.1"
    )]
    TokenNeeded(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen for admin requests on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What the relay is, read once at start.
#[derive(Clone, Debug, Serialize)]
pub struct Identity {
    /// The deployment id.
    pub deployment: String,
    /// The deployment's name.
    pub deployment_name: String,
    /// The relay's peer id.
    pub relay: String,
    /// The store generation (hex).
    pub generation: String,
}

struct AdminState {
    metrics: Arc<Metrics>,
    live: Arc<Live>,
    /// The listener's own connection (a probe never waits behind the database thread's queue).
    store: Mutex<Store>,
    data: PathBuf,
    identity: Identity,
    token_hash: Option<blake3::Hash>,
}

/// `/status`'s JSON.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Deployment, relay peer id, store generation.
    #[serde(flatten)]
    pub identity: Identity,
    /// This build's version (`musubi-node --version`).
    pub version: &'static str,
    /// The wire protocol version spoken.
    pub protocol_version: u16,
    /// The schema version this build writes.
    pub schema_version: i64,
    /// Seconds since `serve` started.
    pub uptime_secs: u64,
    /// When `serve` started (RFC 3339).
    pub started_at: String,
    /// Devices connected now.
    pub connected_devices: i64,
    /// Requests waiting for or in the database thread, and the limit.
    pub queue: (usize, usize),
    /// The relay's listen addresses.
    pub listen_addrs: Vec<String>,
    /// When a push last committed (RFC 3339).
    pub last_commit: Option<String>,
    /// The store's figures (facilities, documents, bundles, database and WAL bytes, last backup).
    pub store: Option<StoreStats>,
    /// When the last backup finished (RFC 3339).
    pub last_backup: Option<String>,
}

/// Binds the listener and returns the task that serves it until `shutdown`.
///
/// Errors: [`AdminError`].
pub async fn start(
    config: AdminConfig,
    store: Store,
    metrics: Arc<Metrics>,
    live: Arc<Live>,
    identity: Identity,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdminError> {
    if !config.addr.ip().is_loopback() && config.token.is_none() {
        return Err(AdminError::TokenNeeded(config.addr));
    }
    let state = Arc::new(AdminState {
        metrics,
        live,
        data: store.dir().to_owned(),
        store: Mutex::new(store),
        identity,
        token_hash: config.token.as_deref().map(|t| blake3::hash(t.as_bytes())),
    });
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| AdminError::Bind {
            addr: config.addr,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| AdminError::Bind {
        addr: config.addr,
        source,
    })?;
    let listener = Capped {
        inner: listener,
        permits: Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX)),
    };
    tracing::info!(addr = %local, "admin listener started");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "the admin listener stopped");
        }
    });
    Ok((local, task))
}

/// The admin listener's TCP listener: at most [`ADMIN_CONNECTIONS_MAX`] connections, each for at
/// most [`ADMIN_CONNECTION_SECS`].
struct Capped {
    inner: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for Capped {
    type Io = CappedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            CappedIo {
                stream,
                deadline: Box::pin(tokio::time::sleep(Duration::from_secs(
                    ADMIN_CONNECTION_SECS,
                ))),
                _permit: permit,
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// One admin connection: reads fail once its time is up; its place is given back when dropped.
struct CappedIo {
    stream: tokio::net::TcpStream,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tokio::io::AsyncRead for CappedIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future as _;
        if self.deadline.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CappedIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Whether the request carries the token (always, when none is set).
fn authorised(state: &AdminState, headers: &HeaderMap) -> bool {
    let Some(want) = state.token_hash else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // blake3::Hash compares in constant time.
    blake3::hash(given.trim().as_bytes()) == want
}

fn unauthorised() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a bearer token is needed\n",
    )
        .into_response()
}

/// The reasons the relay is not ready (empty: ready).
fn not_ready(state: &AdminState) -> Vec<String> {
    let mut reasons = Vec::new();
    let live = &state.live;
    if live.listeners.load(Ordering::Relaxed) == 0 {
        reasons.push("no libp2p listener is open".to_owned());
    }
    let queued = usize::try_from(state.metrics.queue_depth.get()).unwrap_or(0);
    if queued >= live.queue_max {
        reasons.push(format!(
            "the request queue is full ({queued} of {})",
            live.queue_max
        ));
    }
    match state.store.lock() {
        Ok(mut store) => {
            let started = Instant::now();
            match store.can_write_within(READY_DB_WAIT) {
                Ok(true) => {
                    let took = started.elapsed();
                    if took > READY_DB_WAIT {
                        reasons.push(format!(
                            "the database is slow: a write transaction took {} ms to start",
                            took.as_millis()
                        ));
                    }
                }
                Ok(false) => reasons.push(format!(
                    "the database is locked by another process (no write within {} ms)",
                    READY_DB_WAIT.as_millis()
                )),
                Err(e) => reasons.push(format!("the database fails: {e}")),
            }
            match store.schema_version() {
                Ok(SCHEMA_VERSION) => {}
                Ok(v) => reasons.push(format!(
                    "the database schema is version {v}, this build writes {SCHEMA_VERSION}"
                )),
                Err(e) => reasons.push(format!("the database fails: {e}")),
            }
        }
        Err(_) => reasons.push("the admin listener's database connection is poisoned".into()),
    }
    // A failure counts for STORE_FAILURE_HOLD (no request may come while the load balancer keeps
    // the relay out), or until a later request stored.
    let failed_at = live.store_failed_at_ms.load(Ordering::Relaxed);
    if failed_at > 0
        && unix_ms(SystemTime::now()) - failed_at < STORE_FAILURE_HOLD.as_millis() as i64
    {
        reasons.push(
            "the last request could not be stored (a full disk or a database error; see the log)"
                .to_owned(),
        );
    }
    let min_free = live.min_free_bytes.load(Ordering::Relaxed);
    match free_bytes(&state.data) {
        Ok(free) if free < min_free => reasons.push(format!(
            "the disk is almost full: {free} bytes free in {}, at least {min_free} needed",
            state.data.display()
        )),
        Ok(_) => {}
        Err(e) => reasons.push(format!(
            "cannot read the free space of {}: {e}",
            state.data.display()
        )),
    }
    reasons
}

/// Bytes an unprivileged process may still write on the filesystem holding `path` (statvfs(3)
/// `f_bavail × f_frsize`).
///
/// Errors: the OS error of statvfs.
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

async fn readyz(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if !authorised(&state, &headers) {
        return unauthorised();
    }
    let s = state.clone();
    let reasons = tokio::task::spawn_blocking(move || not_ready(&s))
        .await
        .unwrap_or_else(|_| vec!["the readiness check failed".to_owned()]);
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        tracing::warn!(reasons = %reasons.join("; "), "not ready");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", reasons.join("\n")),
        )
            .into_response()
    }
}

/// `/status` from the live figures, the queue depth and the store's figures `stats`.
pub fn status_of(
    live: &Live,
    identity: &Identity,
    connected: i64,
    queued: i64,
    stats: Option<StoreStats>,
) -> Status {
    let ms = live.last_commit_ms.load(Ordering::Relaxed);
    Status {
        identity: identity.clone(),
        version: env!("CARGO_PKG_VERSION"),
        protocol_version: musubi_crdt::protocol::WIRE_VERSION,
        schema_version: SCHEMA_VERSION,
        uptime_secs: live.started.elapsed().as_secs(),
        started_at: rfc3339(crate::store::unix_ms(live.started_at)),
        connected_devices: connected,
        queue: (usize::try_from(queued).unwrap_or(0), live.queue_max),
        listen_addrs: live.addrs.lock().map(|a| a.clone()).unwrap_or_default(),
        last_commit: (ms > 0).then(|| rfc3339(ms)),
        last_backup: stats
            .as_ref()
            .and_then(|s| s.last_backup_at_ms)
            .map(rfc3339),
        store: stats,
    }
}

/// Reads the store's figures on the listener's own connection and sets the gauges from them (a
/// few indexed counts; no table scan).
async fn refresh_stats(state: &Arc<AdminState>) -> Option<StoreStats> {
    let s = state.clone();
    let stats = tokio::task::spawn_blocking(move || {
        s.store
            .lock()
            .map_err(|_| "poisoned".to_owned())
            .and_then(|st| st.stats().map_err(|e| e.to_string()))
    })
    .await;
    match stats {
        Ok(Ok(stats)) => {
            state.metrics.set_store(&stats);
            Some(stats)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the store's figures");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the store's figures");
            None
        }
    }
}

async fn status(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if !authorised(&state, &headers) {
        return unauthorised();
    }
    let stats = refresh_stats(&state).await;
    let s = status_of(
        &state.live,
        &state.identity,
        state.metrics.connected_devices.get(),
        state.metrics.queue_depth.get(),
        stats,
    );
    axum::Json(s).into_response()
}

async fn metrics_text(State(state): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if !authorised(&state, &headers) {
        return unauthorised();
    }
    refresh_stats(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
