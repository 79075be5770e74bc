//! Walking directories and searching every byte of every file in them (the confidentiality checks).

use std::fs;
use std::path::{Path, PathBuf};

/// Every regular file under `dir`, recursively (symlinks are not followed). Missing dir: empty.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// Copies the regular files directly in `from` into `to` (created if missing), as an operator's
/// file copy of a data directory taken while nothing runs.
///
/// Panics on an IO error (a test fixture).
pub fn copy_flat(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// One needle found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The file.
    pub path: PathBuf,
    /// The needle, as text (lossy for binary needles).
    pub needle: String,
    /// Byte offset of the first occurrence.
    pub offset: usize,
}

/// Every (file, needle) pair such that the needle's bytes occur in the file, over all files under `dirs`.
pub fn grep_tree(dirs: &[&Path], needles: &[Vec<u8>]) -> Vec<Found> {
    let mut found = Vec::new();
    for dir in dirs {
        for path in walk(dir) {
            let Ok(bytes) = fs::read(&path) else { continue };
            for n in needles {
                if n.is_empty() {
                    continue;
                }
                if let Some(offset) = bytes.windows(n.len()).position(|w| w == n.as_slice()) {
                    found.push(Found {
                        path: path.clone(),
                        needle: String::from_utf8_lossy(n).into_owned(),
                        offset,
                    });
                }
            }
        }
    }
    found
}

/// Total size in bytes of the files under `dir`.
pub fn tree_bytes(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// A listing of `dir` with sizes, for failure messages.
pub fn listing(dir: &Path) -> String {
    let mut files = walk(dir);
    files.sort();
    files
        .iter()
        .map(|p| {
            format!(
                "  {} ({} bytes)",
                p.display(),
                fs::metadata(p).map(|m| m.len()).unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
