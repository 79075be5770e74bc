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
use musubi_crdt::ids::FacilityRole;
use musubi_sync_node::store::{self, InviteKind, Revocation, rfc3339};
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
enum Command {
    /// Create a new relay: the data directory, its database, its key and a deployment id.
    Init {
        #[command(flatten)]
        data: Data,
        /// A name for the deployment (for example the municipality).
        #[arg(long, value_name = "NAME", default_value = "musubi")]
        deployment: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve facilities; prints "listening on ADDR" for each listen address.
    Serve {
        #[command(flatten)]
        data: Data,
        /// A multiaddr to listen on (repeatable).
        #[arg(long = "listen", value_name = "MULTIADDR", value_parser = parse_multiaddr,
              default_values = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"])]
        listen: Vec<Multiaddr>,
    },
    /// Issue a single-use invite code for a new facility (--name, --role) or another device (--facility).
    #[command(group(clap::ArgGroup::new("what").required(true).args(["name", "facility"])))]
    Invite {
        #[command(flatten)]
        data: Data,
        /// Name of a new facility.
        #[arg(long, value_name = "NAME", requires = "role")]
        name: Option<String>,
        /// Role of the new facility.
        #[arg(long, value_name = "ROLE", value_parser = parse_role, requires = "name")]
        role: Option<FacilityRole>,
        /// An existing facility (id or exact name) that gets another device.
        #[arg(long, value_name = "FACILITY", conflicts_with_all = ["name", "role"])]
        facility: Option<String>,
        /// How long the code stays valid (e.g. 72h, 30m, 7days).
        #[arg(long, value_name = "DURATION", default_value = "72h")]
        expires: humantime::Duration,
        /// Print JSON instead of the bare code.
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            data,
            deployment,
            json,
        } => init(&data.data, &deployment, json),
        Command::Serve { data, listen } => {
            init_logging(&data.data, "info")?;
            serve(&data.data, listen)
        }
        Command::Invite {
            data,
            name,
            role,
            facility,
            expires,
            json,
        } => {
            init_logging(&data.data, "warn")?;
            invite(&data.data, name, role, facility, expires.into(), json)
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

fn init(data: &Path, deployment: &str, json: bool) -> Result<()> {
    let name = deployment.trim();
    if name.is_empty() {
        bail!("the deployment name must not be empty");
    }
    let store = Store::init(data, name, SystemTime::now())?;
    init_logging(data, "warn")?;
    let deployment_id = store.deployment()?;
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
            })
        );
    } else {
        println!("initialised relay data in {}", data.display());
        println!("deployment {deployment_id} ({name})");
        println!("relay {relay}");
    }
    Ok(())
}

fn serve(data: &Path, listen: Vec<Multiaddr>) -> Result<()> {
    let store = open(data)?;
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
        musubi_sync_node::serve_until(listen, store, Config::default(), shutdown)
            .await
            .context("the relay stopped")
    })
}

fn invite(
    data: &Path,
    name: Option<String>,
    role: Option<FacilityRole>,
    facility: Option<String>,
    expires: std::time::Duration,
    json: bool,
) -> Result<()> {
    let mut store = open(data)?;
    let kind = match (name, role, facility) {
        (Some(name), Some(role), None) => InviteKind::NewFacility {
            name: name.trim().to_owned(),
            role,
        },
        (None, None, Some(f)) => {
            let f = store.find_facility(&f)?;
            if f.revoked {
                bail!(
                    "facility {:?} has been revoked; it cannot enrol devices",
                    f.name
                );
            }
            InviteKind::Device { facility: f.id }
        }
        _ => bail!(
            "give either --name and --role (a new facility) or --facility (another device of one)"
        ),
    };
    let issued = store.issue_invite(kind, rand::random(), SystemTime::now(), expires)?;
    if issued.code.addrs.is_empty() {
        tracing::warn!(
            "the relay has not recorded any listen address yet (is `musubi-node serve` running on this data directory?); \
             the code carries no address, so the device must be told the relay's address another way"
        );
    }
    let (what, facility_id) = match &issued.kind {
        InviteKind::NewFacility { role, .. } => (format!("new {role} facility"), None),
        InviteKind::Device { facility } => ("device".to_owned(), Some(facility.to_string())),
    };
    tracing::info!(
        kind = %what,
        facility = %issued.facility_name,
        expires_at = %rfc3339(issued.expires_at_ms),
        "invite issued"
    );
    let code = issued.code.encode();
    let mut out = std::io::stdout().lock();
    if json {
        let role = match &issued.kind {
            InviteKind::NewFacility { role, .. } => Some(role.to_string()),
            InviteKind::Device { .. } => None,
        };
        writeln!(
            out,
            "{}",
            json!({
                "code": code,
                "kind": if facility_id.is_some() { "device" } else { "facility" },
                "facility_name": issued.facility_name,
                "facility": facility_id,
                "role": role,
                "expires_at": rfc3339(issued.expires_at_ms),
                "addrs": issued.code.addrs,
            })
        )?;
    } else {
        writeln!(out, "{code}")?;
    }
    out.flush()?;
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
                Decoded::Item(item) => {
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
            "no facilities yet; enrol one with `musubi-node invite --name NAME --role ROLE`"
        )?;
    } else {
        for f in &list {
            let state = if f.revoked { "  REVOKED" } else { "" };
            writeln!(out, "{}  {}  ({}){state}", f.id, f.name, f.role)?;
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
