//! `musubi device …`: this facility's devices (invite another, revoke a lost one), and the
//! facilities list with safety numbers.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use musubi_crdt::directory::{Trust, authority_fingerprint};
use musubi_facility::engine::Engine;

use crate::{Data, Json, open_staff, print_json};

#[derive(Subcommand)]
pub(crate) enum DeviceCommand {
    /// Make an invite code for one more device of this facility (hand it over in person). It works
    /// once this device has synced; this device approves the join at its next sync after that.
    Invite {
        #[command(flatten)]
        data: Data,
        /// How long the code stays valid (e.g. 72h, 30m, 7days).
        #[arg(long, value_name = "DURATION", default_value = "72h")]
        expires: humantime::Duration,
        #[command(flatten)]
        json: Json,
    },
    /// Revoke a device of this facility (a lost laptop): it gets no key from then on, and the
    /// documents' keys are rotated at the next sync.
    Revoke {
        #[command(flatten)]
        data: Data,
        /// The device id (12D3KooW...), as `musubi facilities` lists it.
        device: String,
    },
}

pub(crate) fn run(pf: &Option<std::path::PathBuf>, cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::Invite {
            data,
            expires,
            json,
        } => {
            let mut e = open_staff(pf, &data.data)?;
            let code = e.device_invite(Duration::from(expires))?;
            let text = code.encode();
            if json.json {
                print_json(&serde_json::json!({
                    "code": text,
                    "kind": "device",
                    "facility": code.facility().to_string(),
                    "expires_at_ms": code.expires_at_ms,
                    "authority_fingerprint": authority_fingerprint(&code.authority),
                }))?;
            } else {
                println!("{text}");
                eprintln!(
                    "the code works once this device has synced (`musubi sync`); this device approves the new one at its next sync after it joined"
                );
            }
        }
        DeviceCommand::Revoke { data, device } => {
            let mut e = open_staff(pf, &data.data)?;
            e.revoke_device(&device)?;
            e.maintain()?;
            println!("revoked {device}; the relay learns it at the next sync");
        }
    }
    Ok(())
}

/// `musubi facilities`: every facility of the verified directory with its safety number, its trust
/// and its devices; what the relay listed but did not verify.
pub(crate) fn print_facilities(e: &Engine, json: bool) -> Result<()> {
    let dir = e.directory()?;
    let me = e.enrolment()?;
    let trust = |t: &Trust| match t {
        Trust::Verified => "verified".to_owned(),
        Trust::RootChanged { .. } => "root-changed".to_owned(),
        Trust::ChainForked { .. } => "chain-refused".to_owned(),
    };
    if json {
        let v: Vec<_> = dir
            .facilities
            .iter()
            .map(|f| {
                serde_json::json!({
                    "id": f.id.to_string(), "name": f.name, "role": f.role.to_string(), "revoked": f.revoked,
                    "safety_number": f.safety_number,
                    "trust": trust(&f.trust),
                    "pinned_safety_number": match &f.trust { Trust::RootChanged { pinned } => Some(pinned.clone()), _ => None },
                    "refused": f.refused,
                    "devices": f.devices.iter().map(|d| serde_json::json!({"device": d.device.to_string(), "revoked": d.revoked})).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "authority_fingerprint": authority_fingerprint(&me.authority),
            "facilities": v,
            "ignored": dir.ignored.iter().map(|i| serde_json::json!({"facility": i.facility.to_string(), "name": i.name, "reason": i.reason})).collect::<Vec<_>>(),
        }))?;
        return Ok(());
    }
    println!(
        "deployment authority fingerprint {}",
        authority_fingerprint(&me.authority)
    );
    for f in &dir.facilities {
        let current = f.current_devices().count();
        println!(
            "{}  {}  {}  {} device(s){}",
            f.id,
            f.name,
            f.role,
            current,
            if f.revoked { "  REVOKED" } else { "" }
        );
        println!("    safety number {}", f.safety_number);
        match &f.trust {
            Trust::Verified => {}
            Trust::RootChanged { pinned } => println!(
                "    WARNING: its root key changed (was {pinned}); it gets no key until you compare the new safety number with it by phone and run `musubi facilities --data DIR confirm {} \"{}\"`",
                f.id, f.safety_number
            ),
            Trust::ChainForked { reason } => println!("    WARNING: {reason}"),
        }
        for r in &f.refused {
            println!("    refused: {r}");
        }
        for d in &f.devices {
            println!(
                "    {}{}",
                d.device,
                if d.revoked { "  REVOKED" } else { "" }
            );
        }
    }
    for i in &dir.ignored {
        println!("IGNORED {}  {}: {}", i.facility, i.name, i.reason);
    }
    Ok(())
}
