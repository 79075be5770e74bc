//! `musubi-vcard`: a virtual smart card for one slot of vsmartcard's vpcd reader driver in pcscd.
//!
//! Usage: `musubi-vcard --port 35963 --log apdus.jsonl [--host 127.0.0.1] [--ca-out ca.pem]`.
//! Prints `ready` once its test CA is made, then reads one command per line on standard input and
//! answers each with one line, `ok ...` or `err ...`:
//!
//! ```text
//! insert alice mynumber pin=1234        a My Number card (JPKI + 券面事項入力補助AP) on the reader
//! insert suica felica                   a FeliCa card (the reader answers GET DATA with its IDm)
//! remove                                take the card off
//! insert alice                          put alice back (its PIN counters kept)
//! set alice mute=1 | remove_after=3 | wrong_sw=B0:6F00 | proto=t0 | strict_le=1 | kenhojo_tries=1
//! status alice                          tries left and the identifiers that must never show in the clear
//! ```
//!
//! Every command APDU and response is appended to the log as one JSON line
//! (`{"card","c","r","at","now","t_ms"}`), and so are insertions, removals and power events.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use musubi_tests::vcard::emulator::Emulator;

fn main() -> ExitCode {
    let mut port: u16 = 35963;
    let mut host = "127.0.0.1".to_owned();
    let mut log: Option<PathBuf> = None;
    let mut ca_out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match a.as_str() {
            "--port" => port = value("--port").parse().expect("--port takes a number"),
            "--host" => host = value("--host"),
            "--log" => log = Some(value("--log").into()),
            "--ca-out" => ca_out = Some(value("--ca-out").into()),
            "-h" | "--help" => {
                println!(
                    "musubi-vcard --port PORT --log FILE [--host HOST] [--ca-out FILE]; see the source's header for commands"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other}");
                return ExitCode::FAILURE;
            }
        }
    }
    let Some(log) = log else {
        eprintln!("--log FILE is required");
        return ExitCode::FAILURE;
    };
    let addr: SocketAddr = match (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => {
            eprintln!("cannot resolve {host}:{port}");
            return ExitCode::FAILURE;
        }
    };
    let em = match Emulator::start(addr, &log) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(p) = ca_out
        && let Err(e) = std::fs::write(&p, em.ca_pem())
    {
        eprintln!("cannot write {}: {e}", p.display());
        return ExitCode::FAILURE;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line == "quit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{}", em.command(line));
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}
