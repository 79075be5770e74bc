//! `musubi-node`: the relay operator's command line (a thin wrapper over `musubi_sync_node`).
//!
//! Data-printing commands print to stdout (with `--json`, one JSON document); errors go to stderr as one
//! sentence with a non-zero exit status. Logs go to stderr only (`--log-format text|json`; journald
//! keeps and rotates them under systemd): `serve` at info, the other commands at warn, unless
//! `RUST_LOG` says otherwise. No log line holds a secret or a plaintext: the relay has no plaintext,
//! and keys, passphrases and tokens are never formatted.

use std::fs;
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use musubi_crdt::crypto;
use musubi_crdt::ids::FacilityRole;
use musubi_sync_node::admin::AdminConfig;
use musubi_sync_node::authority::{
    AUTHORITY_SCRYPT_LOG_N, Authority, AuthorityDir, AuthorityInvite,
};
use musubi_sync_node::backup;
use musubi_sync_node::limits::RateLimits;
use musubi_sync_node::store::{self, Revocation, rfc3339, unix_ms};
use musubi_sync_node::{CONNECTIONS_PER_ADDRESS_DEFAULT, Config, MIN_FREE_BYTES_DEFAULT, Store};
use musubi_transport::libp2p::Multiaddr;
use serde_json::json;
use tracing_subscriber::EnvFilter;

/// The relay node of a Musubi deployment.
#[derive(Parser)]
#[command(name = "musubi-node", version, about, max_term_width = 100)]
struct Cli {
    /// Read the deployment authority's passphrase from this file (else from the
    /// MUSUBI_AUTHORITY_PASSPHRASE environment variable).
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    /// How log lines on stderr look: `text` for people, `json` (one object a line) for journald
    /// and log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MUSUBI_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the backup passphrase comes from (it seals the relay key inside each backup).
#[derive(Args)]
struct BackupPassphrase {
    /// Read the passphrase that seals (or opens) the relay key in the backup from this file (else
    /// from the MUSUBI_BACKUP_PASSPHRASE environment variable).
    #[arg(long, value_name = "FILE")]
    key_passphrase_file: Option<PathBuf>,
}

#[derive(Args)]
struct Data {
    /// The relay's data directory (database, key, logs).
    #[arg(long, value_name = "DIR", env = "MUSUBI_NODE_DATA")]
    data: PathBuf,
}

#[derive(Subcommand)]
enum AuthorityCommand {
    /// Create the deployment authority (the municipality's key, passphrase-sealed) in ADIR, meant
    /// for a USB stick kept off the relay host; prints its fingerprint for facilities to compare.
    Init {
        /// The authority's directory.
        #[arg(long, value_name = "ADIR")]
        authority: PathBuf,
        /// A name for the deployment (for example the municipality).
        #[arg(long, value_name = "NAME", default_value = "musubi")]
        deployment: String,
        /// scrypt work factor (log2 N) of the passphrase, 16 to 22; higher is slower to unlock and to
        /// attack (below 16 only for tests, with MUSUBI_WEAK_KDF_FOR_TESTS=1).
        #[arg(long, default_value_t = AUTHORITY_SCRYPT_LOG_N, value_parser = clap::value_parser!(u8).range(10..=22))]
        scrypt_log_n: u8,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// The deployment authority (certifies facilities; never stored on the relay).
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Create a new relay for the authority's deployment: the data directory, its database and its
    /// key. Only the authority's public key is copied.
    Init {
        #[command(flatten)]
        data: Data,
        /// The deployment authority's directory (only `authority.pub` is read).
        #[arg(long, value_name = "ADIR")]
        authority: PathBuf,
        /// A name for the deployment on this relay (default: the authority's).
        #[arg(long, value_name = "NAME")]
        deployment: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve facilities; prints "listening on ADDR" for each listen address. With --authority (the
    /// embedded default), new facilities are approved as they join.
    Serve {
        #[command(flatten)]
        data: Data,
        /// The deployment authority's directory: approve new facilities as they join.
        #[arg(long, value_name = "ADIR")]
        authority: Option<PathBuf>,
        /// A multiaddr to listen on (repeatable).
        #[arg(long = "listen", value_name = "MULTIADDR", value_parser = parse_multiaddr,
              default_values = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"])]
        listen: Vec<Multiaddr>,
        /// An address to announce beside the listen addresses, first (repeatable): a DNS name
        /// that survives a move (/dns4/relay.example.lg.jp/tcp/4001), an address behind NAT.
        /// Invites carry it; devices resolve it at every connect and learn changes from the
        /// directory answers.
        #[arg(long = "advertise", value_name = "MULTIADDR", value_parser = parse_multiaddr)]
        advertise: Vec<Multiaddr>,
        /// Serve /livez, /readyz, /status and /metrics over HTTP on this address (off unless
        /// given; e.g. 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR:PORT")]
        admin: Option<SocketAddr>,
        /// A file holding the bearer token the admin listener asks for (needed when --admin is
        /// not a loopback address).
        #[arg(long, value_name = "FILE")]
        admin_token_file: Option<PathBuf>,
        /// Most bundle bytes one facility may store at this relay (e.g. 10GiB, 500MB); unlimited
        /// unless given.
        #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
        quota_bytes_per_facility: Option<u64>,
        /// Requests a second one device may send on average (bursts of ten times as many);
        /// 0 turns the per-device limits off.
        #[arg(long, value_name = "N", default_value_t = RateLimits::default().requests_per_sec)]
        device_requests_per_sec: f64,
        /// Request bytes a second one device may send on average (bursts of eight times as many,
        /// and never below one largest frame).
        #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "8MiB")]
        device_bytes_per_sec: u64,
        /// Most inbound connections (handshakes included) from one IP address; 0: no cap.
        #[arg(long, value_name = "N", default_value_t = CONNECTIONS_PER_ADDRESS_DEFAULT)]
        connections_per_address: usize,
        /// Most inbound connections in all (handshakes included).
        #[arg(long, value_name = "N", default_value_t = musubi_crdt::limits::RELAY_CONNECTIONS_INCOMING_MAX as usize)]
        connections_max: usize,
        /// Free space the data directory's filesystem must keep for /readyz to say ready.
        #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value_t = MIN_FREE_BYTES_DEFAULT)]
        min_free_bytes: u64,
    },
    /// Take a consistent backup while `serve` runs: the database (SQLite VACUUM INTO), the relay
    /// key sealed with the backup passphrase, and a manifest with checksums, in one file.
    Backup {
        #[command(flatten)]
        data: Data,
        /// The backup file to write (must not exist).
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "out_dir",
            required_unless_present = "out_dir"
        )]
        out: Option<PathBuf>,
        /// Write `musubi-node-<time>.musubi-backup` into this directory and keep only the newest
        /// --keep there (for the nightly timer).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// How many backups --out-dir keeps.
        #[arg(long, value_name = "N", default_value_t = 7, requires = "out_dir")]
        keep: usize,
        #[command(flatten)]
        passphrase: BackupPassphrase,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a new, empty data directory; the store gets a new generation, so
    /// every device pulls everything again and offers what it holds.
    Restore {
        #[command(flatten)]
        data: Data,
        /// The backup file.
        file: PathBuf,
        #[command(flatten)]
        passphrase: BackupPassphrase,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Upgrade the database schema to this build's (a snapshot of the old database is taken
    /// first), or with --check only say whether an upgrade is due.
    Migrate {
        #[command(flatten)]
        data: Data,
        /// Only check; exit status 0 when the schema is current, 2 when an upgrade is due.
        #[arg(long)]
        check: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The relay's figures: deployment, relay, generation, schema, facilities, devices,
    /// documents, bundles, database and WAL bytes, last backup.
    Status {
        #[command(flatten)]
        data: Data,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every document the relay holds: kind, epoch, members, bundles, bytes, head (no content:
    /// the relay has none).
    Documents {
        #[command(flatten)]
        data: Data,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stored bundle bytes per facility (against the quota `serve` is given).
    Usage {
        #[command(flatten)]
        data: Data,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Issue a single-use invite code for a new facility; the authority keeps its secret.
    Invite {
        #[command(flatten)]
        data: Data,
        /// The deployment authority's directory.
        #[arg(long, value_name = "ADIR")]
        authority: Option<PathBuf>,
        /// Name of the new facility.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Role of the new facility.
        #[arg(long, value_name = "ROLE", value_parser = parse_role)]
        role: Option<FacilityRole>,
        /// (Gone: another device of a facility is invited at the facility, `musubi device invite`.)
        #[arg(long, value_name = "FACILITY", hide = true)]
        facility: Option<String>,
        /// How long the code stays valid (e.g. 72h, 30m, 7days).
        #[arg(long, value_name = "DURATION", default_value = "72h")]
        expires: humantime::Duration,
        /// Print JSON instead of the bare code.
        #[arg(long)]
        json: bool,
    },
    /// Certify the facilities that joined with the authority's invites.
    Approve {
        #[command(flatten)]
        data: Data,
        /// The deployment authority's directory.
        #[arg(long, value_name = "ADIR")]
        authority: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take an offline-transfer file (from `musubi bundle export`): every item that verifies is stored.
    Import {
        #[command(flatten)]
        data: Data,
        /// The file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List facilities and their devices.
    Facilities {
        #[command(flatten)]
        data: Data,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device (by device id) or a whole facility (by id or exact name); takes effect at once.
    Revoke {
        #[command(flatten)]
        data: Data,
        /// A device id (12D3KooW...), a facility id, or a facility's exact name.
        #[arg(value_name = "FACILITY|DEVICE")]
        target: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.parse()
        .map_err(|e| format!("{e} (expected e.g. /ip4/0.0.0.0/tcp/4001)"))
}

/// A byte count: a number with an optional unit (B, kB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count (e.g. 500MB, 10GiB)"))?;
    let m: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown unit {u:?} in {s:?} (B, kB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    Ok((n * m) as u64)
}

fn parse_role(s: &str) -> Result<FacilityRole, String> {
    s.parse()
        .map_err(|_| "expected one of: clinic, care-office, shelter, hq".to_owned())
}

/// Exit status of `migrate --check` when an upgrade is due.
const EXIT_MIGRATION_DUE: u8 = 2;

/// `migrate --check` found an upgrade due (exit status [`EXIT_MIGRATION_DUE`], not an error).
#[derive(Debug, thiserror::Error)]
#[error("a schema upgrade is due")]
struct MigrationDue;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<MigrationDue>() => ExitCode::from(EXIT_MIGRATION_DUE),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `default` unless `RUST_LOG` says otherwise, as text or one JSON object a line.
fn init_logging(format: LogFormat, default: &str) -> Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(env_filter(default));
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .flatten_event(true)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

fn env_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

fn open(data: &Path) -> Result<Store> {
    Store::open(data).map_err(anyhow::Error::from)
}

/// Opens the store without upgrading its schema (reading and backing up commands).
fn open_current(data: &Path) -> Result<Store> {
    Store::open_current(data).map_err(anyhow::Error::from)
}

/// The authority's passphrase: from `--passphrase-file`, else `MUSUBI_AUTHORITY_PASSPHRASE`.
fn authority_passphrase(file: &Option<PathBuf>) -> Result<String> {
    if let Some(f) = file {
        let text = fs::read_to_string(f)
            .with_context(|| format!("cannot read the passphrase file {}", f.display()))?;
        return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
    }
    std::env::var("MUSUBI_AUTHORITY_PASSPHRASE").map_err(|_| {
        anyhow::anyhow!(
            "the deployment authority's passphrase is needed: give --passphrase-file FILE or set MUSUBI_AUTHORITY_PASSPHRASE"
        )
    })
}

fn unlock(adir: &Path, passphrase_file: &Option<PathBuf>) -> Result<Authority> {
    let dir = AuthorityDir::open(adir)?;
    let pass = authority_passphrase(passphrase_file)?;
    Ok(dir.unlock(&pass)?)
}

fn run(cli: Cli) -> Result<()> {
    let pf = cli.passphrase_file;
    let default_level = if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    };
    init_logging(cli.log_format, default_level)?;
    match cli.command {
        Command::Authority(AuthorityCommand::Init {
            authority,
            deployment,
            scrypt_log_n,
            json,
        }) => authority_init(&authority, &deployment, scrypt_log_n, &pf, json),
        Command::Init {
            data,
            authority,
            deployment,
            json,
        } => init(&data.data, &authority, deployment.as_deref(), json),
        Command::Serve {
            data,
            authority,
            listen,
            admin,
            admin_token_file,
            quota_bytes_per_facility,
            device_requests_per_sec,
            device_bytes_per_sec,
            min_free_bytes,
            connections_per_address,
            connections_max,
            advertise,
        } => {
            let authority = authority.map(|a| unlock(&a, &pf)).transpose()?;
            let token = admin_token_file
                .map(|f| -> Result<String> {
                    let t = fs::read_to_string(&f).with_context(|| {
                        format!("cannot read the admin token file {}", f.display())
                    })?;
                    let t = t.trim().to_owned();
                    if t.len() < 16 {
                        bail!(
                            "the admin token in {} is shorter than 16 characters",
                            f.display()
                        );
                    }
                    Ok(t)
                })
                .transpose()?;
            if device_bytes_per_sec == 0 && device_requests_per_sec > 0.0 {
                bail!(
                    "--device-bytes-per-sec must be more than 0 (--device-requests-per-sec 0 turns the per-device limits off)"
                );
            }
            let rate_limits = (device_requests_per_sec > 0.0).then(|| {
                let bytes = device_bytes_per_sec as f64;
                RateLimits {
                    requests_per_sec: device_requests_per_sec,
                    requests_burst: device_requests_per_sec * 10.0,
                    bytes_per_sec: bytes,
                    bytes_burst: bytes * 8.0,
                }
            });
            let config = Config {
                rate_limits,
                facility_quota_bytes: quota_bytes_per_facility,
                admin: admin.map(|addr| AdminConfig { addr, token }),
                min_free_bytes,
                connections: musubi_transport::AddressLimits {
                    per_address: (connections_per_address > 0).then_some(connections_per_address),
                    total: Some(connections_max),
                },
                advertise,
                ..Config::default()
            };
            serve(&data.data, authority, listen, config)
        }
        Command::Backup {
            data,
            out,
            out_dir,
            keep,
            passphrase,
            json,
        } => backup_cmd(&data.data, out, out_dir, keep, &passphrase, json),
        Command::Restore {
            data,
            file,
            passphrase,
            json,
        } => restore_cmd(&data.data, &file, &passphrase, json),
        Command::Migrate { data, check, json } => migrate(&data.data, check, json),
        Command::Status { data, json } => status(&data.data, json),
        Command::Documents { data, json } => documents(&data.data, json),
        Command::Usage { data, json } => usage(&data.data, json),
        Command::Invite {
            data,
            authority,
            name,
            role,
            facility,
            expires,
            json,
        } => {
            if facility.is_some() {
                bail!(
                    "`musubi-node invite --facility` is gone: another device of a facility is invited at one of that facility's devices, with `musubi device invite --data DIR` (the relay cannot add devices to a facility)"
                );
            }
            let (Some(name), Some(role)) = (name, role) else {
                bail!("give --name and --role of the new facility");
            };
            let Some(authority) = authority else {
                bail!(
                    "a new facility is certified by the deployment authority: give --authority ADIR (its directory, for example on the authority's USB stick)"
                );
            };
            invite(&data.data, &authority, &name, role, expires.into(), json)
        }
        Command::Approve {
            data,
            authority,
            json,
        } => approve(&data.data, &authority, &pf, json),
        Command::Facilities { data, json } => facilities(&data.data, json),
        Command::Import { data, file, json } => import(&data.data, &file, json),
        Command::Revoke { data, target, json } => revoke(&data.data, &target, json),
    }
}

fn authority_init(
    adir: &Path,
    deployment: &str,
    log_n: u8,
    passphrase_file: &Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let name = deployment.trim();
    if name.is_empty() {
        bail!("the deployment name must not be empty");
    }
    let pass = authority_passphrase(passphrase_file)?;
    // The authority's key certifies every facility: the same work factor rule as a device's key
    // (its passphrase's length is `AuthorityDir::init`'s), the test harness's cheap one only when
    // it says so.
    crypto::check_work_factor(
        log_n,
        std::env::var(crypto::WEAK_KDF_FOR_TESTS_ENV).as_deref() == Ok("1"),
    )?;
    let dir = AuthorityDir::init(adir, name, &pass, log_n)?;
    let public = dir.public();
    if json {
        println!(
            "{}",
            json!({
                "authority": adir.display().to_string(),
                "deployment": public.deployment.to_string(),
                "deployment_name": public.deployment_name,
                "key": public.key.to_string(),
                "fingerprint": public.fingerprint(),
            })
        );
    } else {
        println!("created the deployment authority in {}", adir.display());
        println!(
            "deployment {} ({})",
            public.deployment, public.deployment_name
        );
        println!("authority fingerprint: {}", public.fingerprint());
        println!(
            "keep this directory off the relay host (for example on a USB stick); publish the fingerprint so facilities can compare it when they join"
        );
    }
    Ok(())
}

fn init(data: &Path, adir: &Path, deployment: Option<&str>, json: bool) -> Result<()> {
    let authority = AuthorityDir::open(adir)?;
    if let Some(n) = deployment
        && n.trim().is_empty()
    {
        bail!("the deployment name must not be empty");
    }
    let store = Store::init(
        data,
        authority.public(),
        deployment.map(str::trim),
        SystemTime::now(),
    )?;
    let deployment_id = store.deployment()?;
    let name = store.deployment_name()?;
    let relay = store.relay_device()?;
    tracing::info!(%deployment_id, %relay, "relay initialised");
    if json {
        println!(
            "{}",
            json!({
                "data": data.display().to_string(),
                "deployment": deployment_id.to_string(),
                "deployment_name": name,
                "relay": relay.to_string(),
                "authority_fingerprint": authority.public().fingerprint(),
            })
        );
    } else {
        println!("initialised relay data in {}", data.display());
        println!("deployment {deployment_id} ({name})");
        println!("relay {relay}");
        println!(
            "authority fingerprint: {} (the relay keeps only this public key)",
            authority.public().fingerprint()
        );
    }
    Ok(())
}

fn serve(
    data: &Path,
    authority: Option<Authority>,
    listen: Vec<Multiaddr>,
    config: Config,
) -> Result<()> {
    let store = open(data)?;
    if let Some(a) = &authority {
        tracing::info!(fingerprint = %a.public().fingerprint(), "approving new facilities as they join with the authority's invites");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch SIGTERM");
                        let _ = tokio::signal::ctrl_c().await;
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        };
        musubi_sync_node::serve_until(listen, store, authority, config, shutdown)
            .await
            .context("the relay stopped")
    })
}

fn invite(
    data: &Path,
    adir: &Path,
    name: &str,
    role: FacilityRole,
    expires: std::time::Duration,
    json: bool,
) -> Result<()> {
    let authority = AuthorityDir::open(adir)?;
    let mut store = open(data)?;
    if store.deployment()? != authority.public().deployment
        || store.authority()? != authority.public().key
    {
        bail!(
            "{} is the authority of deployment {}, not of this relay's {}",
            adir.display(),
            authority.public().deployment,
            store.deployment()?
        );
    }
    let secret: [u8; 32] = rand::random();
    let code =
        store.issue_facility_invite(secret, name.trim(), role, SystemTime::now(), expires)?;
    authority.record_invite(&AuthorityInvite {
        secret,
        name: name.trim().to_owned(),
        role,
        expires_at_ms: code.expires_at_ms,
    })?;
    if code.addrs.is_empty() {
        tracing::warn!(
            "the relay has not recorded any listen address yet (is `musubi-node serve` running on this data directory?); \
             the code carries no address, so the device must be told the relay's address another way"
        );
    }
    let expires_at = rfc3339(i64::try_from(code.expires_at_ms).unwrap_or(0));
    tracing::info!(kind = %format!("new {role} facility"), facility = %name, expires_at = %expires_at, "invite issued");
    let text = code.encode();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            json!({
                "code": text,
                "kind": "facility",
                "facility_name": name,
                "role": role.to_string(),
                "expires_at": expires_at,
                "addrs": code.addrs,
                "authority_fingerprint": authority.public().fingerprint(),
            })
        )?;
    } else {
        writeln!(out, "{text}")?;
        eprintln!(
            "authority fingerprint: {} (the joining device shows it; compare)",
            authority.public().fingerprint()
        );
    }
    out.flush()?;
    Ok(())
}

fn approve(data: &Path, adir: &Path, passphrase_file: &Option<PathBuf>, json: bool) -> Result<()> {
    let authority = unlock(adir, passphrase_file)?;
    let mut store = open(data)?;
    let now = SystemTime::now();
    let mut approved = Vec::new();
    let mut refused = Vec::new();
    for pending in store.pending_facility_joins()? {
        let r = &pending.request;
        let Some(kept) = authority.invite(r.invite)? else {
            continue; // another authority's invite, or approved already
        };
        match authority.approve(r, &kept, u64::try_from(unix_ms(now)).unwrap_or(0)) {
            Ok(a) => {
                store.store_approval(r, &a, now)?;
                authority.mark_used(r.invite)?;
                tracing::info!(facility = %a.cert.facility, name = %a.cert.name, device = %r.device.device, "facility approved");
                approved.push(json!({
                    "facility": a.cert.facility.to_string(),
                    "name": a.cert.name,
                    "role": a.cert.role.to_string(),
                    "device": r.device.device.to_string(),
                    "safety_number": a.cert.safety_number(),
                }));
            }
            Err(e) => {
                tracing::warn!(device = %r.device.device, "join request refused: {e}");
                refused.push(json!({
                    "device": r.device.device.to_string(),
                    "name": pending.name,
                    "reason": e.to_string(),
                }));
            }
        }
    }
    if json {
        println!("{}", json!({"approved": approved, "refused": refused}));
    } else {
        if approved.is_empty() && refused.is_empty() {
            println!("no join request waits for this authority");
        }
        for a in &approved {
            println!(
                "approved {} ({}), safety number {}",
                a["name"].as_str().unwrap_or_default(),
                a["role"].as_str().unwrap_or_default(),
                a["safety_number"].as_str().unwrap_or_default()
            );
        }
        for r in &refused {
            println!(
                "refused a request for {}: {}",
                r["name"].as_str().unwrap_or_default(),
                r["reason"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Items applied per transaction during an import.
const IMPORT_CHUNK_ITEMS: usize = 256;

fn import(data: &Path, file: &Path, json: bool) -> Result<()> {
    use musubi_crdt::protocol::PushResult;
    use musubi_crdt::transfer::{Decoded, TransferDecoder};
    use std::io::Read as _;

    let store = open(data)?;
    let deployment = store.deployment()?;
    let mut relay = musubi_sync_node::relay::Relay::new(store)?;
    let mut f = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut dec = TransferDecoder::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut chunk = Vec::new();
    let (mut accepted, mut duplicate, mut refused) = (0u64, 0u64, Vec::new());
    let mut apply =
        |relay: &mut musubi_sync_node::relay::Relay, chunk: &mut Vec<_>| -> Result<()> {
            let (results, _notes) = relay.import(std::mem::take(chunk), SystemTime::now())?;
            for r in results {
                match r {
                    PushResult::Accepted { .. } => accepted += 1,
                    PushResult::Duplicate { .. } => duplicate += 1,
                    PushResult::Rejected { message, .. } => refused.push(message),
                }
            }
            Ok(())
        };
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", file.display()))?;
        if n > 0 {
            dec.feed(&buf[..n]);
        }
        while let Some(d) = dec.next_record()? {
            match d {
                Decoded::Header(h) if h.deployment != deployment => {
                    bail!(
                        "{} was written for deployment {}, not this relay's {deployment}",
                        file.display(),
                        h.deployment
                    )
                }
                Decoded::Item(item, _) => {
                    chunk.push(*item);
                    if chunk.len() >= IMPORT_CHUNK_ITEMS {
                        apply(&mut relay, &mut chunk)?;
                    }
                }
                Decoded::Header(_) | Decoded::End { .. } => {}
            }
        }
        if n == 0 {
            break;
        }
    }
    apply(&mut relay, &mut chunk)?;
    let complete = dec.finish();
    if json {
        println!(
            "{}",
            json!({"accepted": accepted, "duplicate": duplicate, "refused": refused, "complete": complete.is_ok()})
        );
    } else {
        println!(
            "imported {accepted} new item(s); {duplicate} already here; {} refused",
            refused.len()
        );
        for r in &refused {
            eprintln!("refused: {r}");
        }
    }
    complete.with_context(|| format!("{} is incomplete", file.display()))?;
    Ok(())
}

fn facilities(data: &Path, json: bool) -> Result<()> {
    let store = open(data)?;
    let list = store.facilities()?;
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|f| {
                json!({
                    "id": f.id.to_string(),
                    "name": f.name,
                    "role": f.role.to_string(),
                    "revoked": f.revoked,
                    "safety_number": f.safety_number,
                    "devices": f.devices.iter().map(|d| json!({
                        "device": d.device.to_string(),
                        "revoked": d.revoked,
                        "enrolled_at": rfc3339(d.enrolled_at_ms),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(v))?;
    } else if list.is_empty() {
        writeln!(
            out,
            "no facilities yet; enrol one with `musubi-node invite --authority ADIR --name NAME --role ROLE`"
        )?;
    } else {
        for f in &list {
            let state = if f.revoked { "  REVOKED" } else { "" };
            writeln!(out, "{}  {}  ({}){state}", f.id, f.name, f.role)?;
            writeln!(out, "    safety number {}", f.safety_number)?;
            if f.devices.is_empty() {
                writeln!(out, "    (no devices)")?;
            }
            for d in &f.devices {
                let state = if d.revoked { "  REVOKED" } else { "" };
                writeln!(
                    out,
                    "    {}  enrolled {}{state}",
                    d.device,
                    rfc3339(d.enrolled_at_ms)
                )?;
            }
        }
    }
    Ok(())
}

fn revoke(data: &Path, target: &str, json: bool) -> Result<()> {
    let mut store = open(data)?;
    let r = store.revoke(target, SystemTime::now())?;
    let (value, text) = match &r {
        Revocation::Device {
            device,
            facility_name,
            already,
        } => (
            json!({"device": device.to_string(), "facility_name": facility_name, "already_revoked": already}),
            if *already {
                format!("device {device} of {facility_name} was already revoked")
            } else {
                format!("revoked device {device} of {facility_name}")
            },
        ),
        Revocation::Facility {
            id,
            name,
            devices,
            already,
        } => (
            json!({"facility": id.to_string(), "facility_name": name, "devices": devices, "already_revoked": already}),
            if *already {
                format!("facility {name} ({id}) was already revoked")
            } else {
                format!("revoked facility {name} ({id}) and its {devices} device(s)")
            },
        ),
    };
    tracing::info!("{text}");
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
    Ok(())
}

/// The backup passphrase: from `--key-passphrase-file`, else `MUSUBI_BACKUP_PASSPHRASE`.
fn backup_passphrase(p: &BackupPassphrase) -> Result<String> {
    if let Some(f) = &p.key_passphrase_file {
        let text = fs::read_to_string(f)
            .with_context(|| format!("cannot read the backup passphrase file {}", f.display()))?;
        return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
    }
    std::env::var("MUSUBI_BACKUP_PASSPHRASE").map_err(|_| {
        anyhow::anyhow!(
            "the backup passphrase (it seals the relay key in the backup) is needed: give --key-passphrase-file FILE or set MUSUBI_BACKUP_PASSPHRASE"
        )
    })
}

/// The scrypt work factor of the sealed key in a backup: the default, or the test harness's cheap
/// one when it says so.
fn backup_log_n() -> u8 {
    if std::env::var(crypto::WEAK_KDF_FOR_TESTS_ENV).as_deref() == Ok("1") {
        crypto::PASSPHRASE_LOG_N_MIN
    } else {
        crypto::PASSPHRASE_LOG_N_DEFAULT
    }
}

fn backup_cmd(
    data: &Path,
    out: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    keep: usize,
    passphrase: &BackupPassphrase,
    json: bool,
) -> Result<()> {
    let pass = backup_passphrase(passphrase)?;
    let store = open_current(data)?;
    let now = SystemTime::now();
    let report = match (out, out_dir) {
        (Some(out), None) => backup::backup(&store, &out, &pass, backup_log_n(), now)?,
        (None, Some(dir)) => {
            backup::backup_into_dir(&store, &dir, keep, &pass, backup_log_n(), now)?
        }
        _ => bail!("give --out FILE or --out-dir DIR"),
    };
    tracing::info!(path = %report.path.display(), bytes = report.bytes, took_ms = report.took.as_millis() as u64, "backup taken");
    if json {
        println!(
            "{}",
            json!({
                "path": report.path.display().to_string(),
                "bytes": report.bytes,
                "took_ms": report.took.as_millis() as u64,
                "manifest": report.manifest,
                "removed": report.removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "backup written to {} ({} bytes, database {} bytes, in {:.1} s)",
            report.path.display(),
            report.bytes,
            report.manifest.database.bytes,
            report.took.as_secs_f64()
        );
        println!(
            "database checksum (BLAKE3) {}",
            report.manifest.database.blake3
        );
        for r in &report.removed {
            println!("removed the older backup {}", r.display());
        }
    }
    Ok(())
}

fn restore_cmd(data: &Path, file: &Path, passphrase: &BackupPassphrase, json: bool) -> Result<()> {
    let pass = backup_passphrase(passphrase)?;
    let report = backup::restore(file, data, &pass, SystemTime::now())?;
    tracing::info!(data = %data.display(), generation = %report.generation, "restored from a backup");
    if json {
        println!(
            "{}",
            json!({
                "data": data.display().to_string(),
                "generation": report.generation,
                "took_ms": report.took.as_millis() as u64,
                "manifest": report.manifest,
            })
        );
    } else {
        println!(
            "restored the backup of {} taken {} into {} (in {:.1} s)",
            report.manifest.deployment_name,
            report.manifest.created_at,
            data.display(),
            report.took.as_secs_f64()
        );
        println!(
            "new store generation {}: every device pulls everything again and offers what it holds when it next connects",
            report.generation
        );
        println!(
            "start it with `musubi-node serve --data {}`",
            data.display()
        );
    }
    Ok(())
}

fn migrate(data: &Path, check: bool, json: bool) -> Result<()> {
    let found = store::schema_version_of(data)?;
    let due = found < store::SCHEMA_VERSION;
    if found > store::SCHEMA_VERSION {
        bail!(
            "the database has schema version {found}, newer than this musubi-node understands ({}); upgrade musubi-node",
            store::SCHEMA_VERSION
        );
    }
    if check {
        if json {
            println!(
                "{}",
                json!({"schema_version": found, "current": store::SCHEMA_VERSION, "upgrade_due": due})
            );
        } else if due {
            println!(
                "schema version {found}; this musubi-node upgrades it to {} (a snapshot of the old database is taken first)",
                store::SCHEMA_VERSION
            );
        } else {
            println!("schema version {found} is current");
        }
        return if due {
            Err(MigrationDue.into())
        } else {
            Ok(())
        };
    }
    drop(open(data)?);
    let snapshot = fs::read_dir(data)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{}{found}-", store::PRE_MIGRATION_PREFIX)))
        })
        .max();
    if json {
        println!(
            "{}",
            json!({"from": found, "to": store::SCHEMA_VERSION, "snapshot": snapshot.as_ref().filter(|_| due).map(|p| p.display().to_string())})
        );
    } else if due {
        println!(
            "upgraded the schema from version {found} to {}",
            store::SCHEMA_VERSION
        );
        if let Some(s) = snapshot {
            println!("the old database is kept in {}", s.display());
        }
    } else {
        println!("schema version {found} is current; nothing to do");
    }
    Ok(())
}

fn status(data: &Path, json: bool) -> Result<()> {
    let store = open_current(data)?;
    let stats = store.stats()?;
    let value = json!({
        "data": data.display().to_string(),
        "deployment": store.deployment()?.to_string(),
        "deployment_name": store.deployment_name()?,
        "relay": store.relay_device()?.to_string(),
        "generation": hex::encode(store.generation()?),
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": musubi_crdt::protocol::WIRE_VERSION,
        "schema_version": stats.schema_version,
        "directory_version": store.directory_version()?,
        "listen_addrs": store.listen_addrs()?,
        "store": stats,
        "last_backup": stats.last_backup_at_ms.map(rfc3339),
        "restored_at": stats.restored_at_ms.map(rfc3339),
    });
    if json {
        println!("{value}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "deployment   {} ({})",
        value["deployment"].as_str().unwrap_or_default(),
        value["deployment_name"].as_str().unwrap_or_default()
    )?;
    writeln!(
        out,
        "relay        {}",
        value["relay"].as_str().unwrap_or_default()
    )?;
    writeln!(
        out,
        "generation   {}",
        value["generation"].as_str().unwrap_or_default()
    )?;
    writeln!(
        out,
        "version      {} (protocol {}, schema {})",
        env!("CARGO_PKG_VERSION"),
        musubi_crdt::protocol::WIRE_VERSION,
        stats.schema_version
    )?;
    writeln!(
        out,
        "facilities   {} ({} devices)",
        stats.facilities, stats.devices
    )?;
    writeln!(out, "documents    {}", stats.documents)?;
    writeln!(
        out,
        "bundles      {} ({} bytes)",
        stats.bundles, stats.bundle_bytes
    )?;
    writeln!(
        out,
        "database     {} bytes (+ {} bytes WAL)",
        stats.db_bytes, stats.wal_bytes
    )?;
    writeln!(
        out,
        "last bundle  {}",
        stats.last_bundle_at_ms.map_or("none".into(), rfc3339)
    )?;
    writeln!(
        out,
        "last backup  {}",
        stats.last_backup_at_ms.map_or("never".into(), rfc3339)
    )?;
    if let Some(r) = stats.restored_at_ms {
        writeln!(out, "restored     {}", rfc3339(r))?;
    }
    for a in store.listen_addrs()? {
        writeln!(out, "listening    {a}")?;
    }
    Ok(())
}

fn documents(data: &Path, json: bool) -> Result<()> {
    let store = open_current(data)?;
    let docs = store.documents_usage()?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_value(&docs)?)?;
        return Ok(());
    }
    if docs.is_empty() {
        writeln!(out, "no documents yet")?;
    }
    for d in &docs {
        writeln!(
            out,
            "{}  {:<10} epoch {}  {} member(s)  {} bundle(s)  {} bytes  head {}  last {}",
            d.id,
            d.kind,
            d.epoch,
            d.members,
            d.bundles,
            d.bytes,
            d.head,
            d.last_bundle_at_ms.map_or("-".into(), rfc3339)
        )?;
    }
    Ok(())
}

fn usage(data: &Path, json: bool) -> Result<()> {
    let store = open_current(data)?;
    let names: std::collections::HashMap<String, String> = store
        .facilities()?
        .into_iter()
        .map(|f| (f.id.to_string(), f.name))
        .collect();
    let usage = store.facility_usage()?;
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = usage
            .iter()
            .map(|u| json!({"facility": u.facility, "name": names.get(&u.facility), "bytes": u.bytes, "bundles": u.bundles}))
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(v))?;
        return Ok(());
    }
    if usage.is_empty() {
        writeln!(out, "no bundles stored yet")?;
    }
    for u in &usage {
        writeln!(
            out,
            "{}  {}  {} bytes in {} bundle(s)",
            u.facility,
            names.get(&u.facility).map_or("(unknown)", String::as_str),
            u.bytes,
            u.bundles
        )?;
    }
    Ok(())
}
