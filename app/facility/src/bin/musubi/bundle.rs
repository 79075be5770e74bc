//! `musubi bundle ...`: the local bundles, and offline transfer by file (USB stick).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use musubi_crdt::ids::DocumentId;
use musubi_facility::transfer::{self, HaveList};

use crate::{Data, Json, open_staff, print_json};

#[derive(Subcommand)]
pub(crate) enum BundleCommand {
    /// Every bundle with its relay sequence number (null: not yet acknowledged).
    List {
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        json: Json,
    },
    /// Write what this device holds into a file, for a facility that cannot reach the relay.
    Export {
        #[command(flatten)]
        data: Data,
        /// Only these documents (default: all).
        #[arg(long, num_args = 1..)]
        docs: Vec<String>,
        /// Leave out the bundles listed in this file (made by `musubi bundle have` at the receiving facility).
        #[arg(long)]
        have: Option<PathBuf>,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        json: Json,
    },
    /// Take a file written by `musubi bundle export`: everything that verifies is stored and queued for the relay.
    Import {
        #[command(flatten)]
        data: Data,
        /// The file.
        file: PathBuf,
        #[command(flatten)]
        json: Json,
    },
    /// Write the list of bundles this device holds (so an exporting facility sends only what is missing).
    Have {
        #[command(flatten)]
        data: Data,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) fn run(pf: &Option<PathBuf>, cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::List { data, json } => {
            let e = open_staff(pf, &data.data)?;
            let rows = e.store().all_bundles()?;
            if json.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "id": b.id.to_string(), "doc": b.doc.to_string(), "seq": b.seq.map(|s| s.0),
                            "epoch": b.envelope.epoch.0, "author": b.envelope.author.to_string(),
                            "bytes": b.envelope.ciphertext.len(),
                        })
                    })
                    .collect();
                print_json(&v)?;
            } else {
                for b in rows {
                    let seq = b.seq.map_or("pending".into(), |s| s.to_string());
                    println!("{}  {}  {}", b.id, b.doc, seq);
                }
            }
        }
        BundleCommand::Export {
            data,
            docs,
            have,
            out,
            json,
        } => {
            let e = open_staff(pf, &data.data)?;
            let docs = docs
                .iter()
                .map(|d| {
                    d.parse::<DocumentId>()
                        .with_context(|| format!("{d:?} is not a document id"))
                })
                .collect::<Result<Vec<_>>>()?;
            let have: Option<HaveList> = match have {
                Some(p) => {
                    let bytes =
                        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                    Some(
                        ciborium::from_reader(bytes.as_slice())
                            .with_context(|| format!("{} is not a have-list", p.display()))?,
                    )
                }
                None => None,
            };
            let r = transfer::export(&e, &docs, have.as_ref(), &out)?;
            if json.json {
                print_json(&r)?;
            } else {
                println!(
                    "wrote {} item(s) ({} bundle(s), {} bytes) to {}",
                    r.items,
                    r.bundles,
                    r.bytes,
                    out.display()
                );
            }
        }
        BundleCommand::Import { data, file, json } => {
            let mut e = open_staff(pf, &data.data)?;
            let r = transfer::import(&mut e, &file)?;
            if json.json {
                print_json(&r)?;
            } else {
                println!(
                    "imported {} new item(s); {} already here; {} of documents this facility is not a member of left out",
                    r.new, r.known, r.skipped
                );
            }
            for reason in &r.refused {
                eprintln!("refused: {reason}");
            }
        }
        BundleCommand::Have { data, out } => {
            let e = open_staff(pf, &data.data)?;
            let list = transfer::have_list(&e)?;
            let mut bytes = Vec::new();
            ciborium::into_writer(&list, &mut bytes).context("encoding the have-list")?;
            std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
        }
    }
    Ok(())
}
