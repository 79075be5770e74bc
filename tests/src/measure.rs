//! Small measuring helpers for the workload drivers: peak memory from `/proc`, percentiles, units.

use std::fs;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::Output;

/// `VmHWM` (peak resident set size) of a process, in KiB, from `/proc/PID/status`.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    status_field(&format!("/proc/{pid}/status"), "VmHWM:")
}

/// `VmHWM` of this process, in KiB.
pub fn self_vm_hwm_kib() -> Option<u64> {
    status_field("/proc/self/status", "VmHWM:")
}

fn status_field(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Runs `cmd` to completion, sampling its `VmHWM` every 2 ms; returns its output and the last peak seen
/// (KiB; a peak reached in its last 2 ms may be missed).
pub fn run_with_peak(mut cmd: Command) -> (Output, u64) {
    let line = crate::cmdline(&cmd);
    let start = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir for output");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("create"))
        .stderr(fs::File::create(&err_path).expect("create"));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    let pid = child.id();
    let mut peak = 0;
    let status = loop {
        if let Some(h) = vm_hwm_kib(pid) {
            peak = peak.max(h);
        }
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    (
        Output {
            cmdline: line,
            status,
            stdout,
            stderr,
            elapsed: start.elapsed(),
        },
        peak,
    )
}

/// The `p`-th percentile (0..=100) of `samples` (sorted here), nearest-rank.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    samples.sort();
    let rank = ((p / 100.0) * samples.len() as f64).ceil().max(1.0) as usize;
    samples[rank.min(samples.len()) - 1]
}

/// Bytes in a human unit (KiB, MiB).
pub fn human_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", b / 1024.0 / 1024.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// A duration in milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}
