//! `musubi-node`: the relay operator's command line (a thin wrapper over `musubi_sync_node`).
//!
//! Data-printing commands print to stdout (with `--json`, one JSON document); errors go to stderr as one
//! sentence with a non-zero exit status. `serve` logs to stderr and to `DATA/logs/node.log`; the other
//! commands log to the file and only warnings to stderr.

use std::fs;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use musubi_crdt::crypto;
use musubi_crdt::ids::FacilityRole;
use musubi_sync_node::authority::{
    AUTHORITY_SCRYPT_LOG_N, Authority, AuthorityDir, AuthorityInvite,
};
use musubi_sync_node::store::{self, Revocation, rfc3339, unix_ms};
use musubi_sync_node::{Config, Store};
use musubi_transport::libp2p::Multiaddr;
use serde_json::json;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The relay node of a Musubi deployment.
#[derive(Parser)]
#[command(name = "musubi-node", version, about, max_term_width = 100)]
struct Cli {
    /// Read the deployment authority's passphrase from this file (else from the
    /// MUSUBI_AUTHORITY_PASSPHRASE environment variable).
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
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

fn parse_role(s: &str) -> Result<FacilityRole, String> {
    s.parse()
        .map_err(|_| "expected one of: clinic, care-office, shelter, hq".to_owned())
}

/// Log target of the final error: written to the log file only (stderr gets it from `main`).
const EXIT_TARGET: &str = "musubi_node::exit";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(target: EXIT_TARGET, "{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (at `stderr_default` unless `RUST_LOG` says otherwise) and, when `data` exists,
/// to `DATA/logs/node.log` at info (whatever `RUST_LOG` says, so the operator's record is complete).
fn init_logging(data: &Path, stderr_default: &str) -> Result<()> {
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(env_filter(stderr_default))
        .with_filter(filter_fn(|m| m.target() != EXIT_TARGET));
    let file = if data.is_dir() {
        let dir = data.join(store::LOG_DIR);
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
        let path = dir.join(store::LOG_FILE);
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open the log file {}", path.display()))?;
        Some(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(Mutex::new(f))
                .with_filter(EnvFilter::new("info")),
        )
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init()
        .context("cannot set up logging")?;
    Ok(())
}

fn env_filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

fn open(data: &Path) -> Result<Store> {
    Store::open(data).map_err(anyhow::Error::from)
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
        } => {
            init_logging(&data.data, "info")?;
            let authority = authority.map(|a| unlock(&a, &pf)).transpose()?;
            serve(&data.data, authority, listen)
        }
        Command::Invite {
            data,
            authority,
            name,
            role,
            facility,
            expires,
            json,
        } => {
            init_logging(&data.data, "warn")?;
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
        } => {
            init_logging(&data.data, "warn")?;
            approve(&data.data, &authority, &pf, json)
        }
        Command::Facilities { data, json } => {
            init_logging(&data.data, "warn")?;
            facilities(&data.data, json)
        }
        Command::Import { data, file, json } => {
            init_logging(&data.data, "warn")?;
            import(&data.data, &file, json)
        }
        Command::Revoke { data, target, json } => {
            init_logging(&data.data, "warn")?;
            revoke(&data.data, &target, json)
        }
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
    init_logging(data, "warn")?;
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

fn serve(data: &Path, authority: Option<Authority>, listen: Vec<Multiaddr>) -> Result<()> {
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
        musubi_sync_node::serve_until(listen, store, authority, Config::default(), shutdown)
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
