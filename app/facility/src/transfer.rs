//! Offline transfer: bundles to and from a file (`musubi bundle export|import`), for a USB stick
//! carried between facilities when no network exists. The file holds only signed operations, sealed
//! grants and encrypted bundles (see `musubi_crdt::transfer` for the format).
//!
//! Export writes to a temporary file beside the target and renames it when complete, so a crash
//! never leaves a half-written file under the target name. Import verifies every item and applies
//! what verifies, in chunks of at most [`IMPORT_CHUNK_ITEMS`] items and [`IMPORT_CHUNK_BYTES_MAX`]
//! bytes, so memory stays bounded by the chunk, not the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use musubi_crdt::ids::{BundleId, DocumentId};
use musubi_crdt::protocol::PushItem;
use musubi_crdt::transfer::{
    Decoded, TransferDecoder, TransferEncoder, TransferError, TransferHeader,
};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineError, ImportReport, now_ms};
use crate::store::Origin;

/// Items applied per store pass during import.
pub const IMPORT_CHUNK_ITEMS: usize = 256;

/// Bytes of records held before a store pass applies them during import (16 MiB): with the record
/// being decoded, what an import holds in memory, whatever the file (256 records of the maximal
/// size held at once were 2.4 GB).
pub const IMPORT_CHUNK_BYTES_MAX: usize = 16 * 1024 * 1024;

/// What a facility already holds, per document: written by `musubi bundle have`, read by export
/// so the file carries only what the other facility lacks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HaveList {
    /// Bundle ids held, per document.
    pub docs: BTreeMap<DocumentId, Vec<BundleId>>,
}

/// Errors of export and import.
#[derive(Debug, thiserror::Error)]
pub enum TransferFileError {
    /// Engine failure.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The file's format.
    #[error(transparent)]
    Format(#[from] TransferError),
    /// The file is for another deployment.
    #[error("this file was written for another deployment ({0}); it cannot be imported here")]
    OtherDeployment(String),
    /// File IO.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// What an export wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExportReport {
    /// Items written.
    pub items: u64,
    /// Bundles among them.
    pub bundles: u64,
    /// File size in bytes.
    pub bytes: u64,
}

/// The have-list of this device (every bundle id of every document).
pub fn have_list(engine: &Engine) -> Result<HaveList, EngineError> {
    let mut docs = BTreeMap::new();
    for row in engine.store().documents(None)? {
        docs.insert(row.info.id, engine.store().bundle_ids(row.info.id)?);
    }
    Ok(HaveList { docs })
}

/// Writes the items of `docs` (all documents when empty) to `out`, leaving out bundles in `have`.
pub fn export(
    engine: &Engine,
    docs: &[DocumentId],
    have: Option<&HaveList>,
    out: &Path,
) -> Result<ExportReport, TransferFileError> {
    let io = |source| TransferFileError::Io {
        path: out.display().to_string(),
        source,
    };
    let enrolment = engine.enrolment()?;
    let docs: Vec<DocumentId> = if docs.is_empty() {
        engine
            .store()
            .documents(None)?
            .into_iter()
            .map(|r| r.info.id)
            .collect()
    } else {
        for d in docs {
            engine.document_info(&d.to_string())?;
        }
        docs.to_vec()
    };
    let tmp = out.with_extension("partial");
    let mut w = BufWriter::new(File::create(&tmp).map_err(io)?);
    let header = TransferHeader {
        deployment: enrolment.deployment,
        device: engine.device_id(),
        created_at_ms: now_ms(),
        directory: engine.signed_directory()?,
    };
    let (mut enc, start) = TransferEncoder::start(&header);
    w.write_all(&start).map_err(io)?;
    let mut report = ExportReport::default();
    for doc in docs {
        let skip: BTreeSet<BundleId> = have
            .and_then(|h| h.docs.get(&doc))
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default();
        for item in engine.export_items(doc)? {
            if let PushItem::Bundle { envelope } = &item {
                if skip.contains(&envelope.id()) {
                    continue;
                }
                report.bundles += 1;
            }
            w.write_all(&enc.item(&item)?).map_err(io)?;
            report.items += 1;
        }
    }
    w.write_all(&enc.finish()).map_err(io)?;
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, out).map_err(io)?;
    report.bytes = std::fs::metadata(out).map_err(io)?.len();
    Ok(report)
}

/// Reads a transfer file and applies every item that verifies; items are queued for the relay.
///
/// A truncated file still applies what it holds and then reports [`TransferError::Truncated`].
pub fn import(engine: &mut Engine, file: &Path) -> Result<ImportReport, TransferFileError> {
    let io = |source| TransferFileError::Io {
        path: file.display().to_string(),
        source,
    };
    let deployment = engine.enrolment()?.deployment;
    let mut f = File::open(file).map_err(io)?;
    let mut dec = TransferDecoder::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut chunk = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut total = ImportReport::default();
    let mut apply =
        |engine: &mut Engine, chunk: &mut Vec<PushItem>| -> Result<(), TransferFileError> {
            let r = engine.import_items(std::mem::take(chunk), Origin::File, true)?;
            total.new += r.new;
            total.known += r.known;
            total.skipped += r.skipped;
            total.provisional += r.provisional;
            total.stale += r.stale;
            total.refused.extend(r.refused);
            Ok(())
        };
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n > 0 {
            dec.feed(&buf[..n]);
        }
        while let Some(d) = dec.next_record()? {
            match d {
                Decoded::Header(h) if h.deployment != deployment => {
                    return Err(TransferFileError::OtherDeployment(h.deployment.to_string()));
                }
                Decoded::Header(h) => {
                    // Revocations travel with the file: a newer directory that verifies is taken
                    // before any item is checked.
                    if let Some(d) = &h.directory
                        && engine.update_directory(d)?
                    {
                        tracing::info!("took a newer directory from the file");
                    }
                }
                Decoded::End { .. } => {}
                Decoded::Item(item, bytes) => {
                    chunk.push(*item);
                    chunk_bytes += bytes;
                    if chunk.len() >= IMPORT_CHUNK_ITEMS || chunk_bytes >= IMPORT_CHUNK_BYTES_MAX {
                        apply(engine, &mut chunk)?;
                        chunk_bytes = 0;
                    }
                }
            }
        }
        if n == 0 {
            break;
        }
    }
    apply(engine, &mut chunk)?;
    // Keys the file brought go to devices that lack them; bundles waiting for a key are sealed.
    engine.maintain_offline()?;
    dec.finish()?;
    Ok(total)
}
