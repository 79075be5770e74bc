//! Fuzzes every decoder of hostile input for millions of executions each and prints the rates
//! (`musubi_tests::fuzz`). Release build:
//!
//! ```text
//! cargo run --release -p musubi-tests --bin bench-fuzz -- [EXECUTIONS_PER_TARGET] [--seed N] [--only NAME]
//! cargo run --release -p musubi-tests --bin bench-fuzz -- --write-corpus
//! ```
//!
//! The default is 10,000,000 executions per target. Each target runs on its own thread (the
//! machine's cores share the targets). Exits non-zero when any input panicked, printing it in hex.

use std::time::{Duration, Instant};

use musubi_tests::fuzz;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--write-corpus") {
        for t in fuzz::targets() {
            let n = fuzz::write_corpus(&t);
            println!(
                "{}: {n} file(s) in {}",
                t.name,
                fuzz::corpus_dir(t.name).display()
            );
        }
        return;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let budget: u64 = args
        .iter()
        .find(|a| {
            !a.starts_with("--") && a.parse::<u64>().is_ok() && Some(*a) != value("--seed").as_ref()
        })
        .map(|a| a.parse().expect("a number"))
        .unwrap_or(10_000_000);
    let seed: u64 = value("--seed").map_or_else(rand::random, |s| s.parse().expect("--seed N"));
    let only = value("--only");
    println!("fuzzing: {budget} executions per target, seed {seed}");
    fuzz::silence_panics();
    let started = Instant::now();
    let handles: Vec<_> = fuzz::targets()
        .into_iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.name))
        .map(|t| {
            std::thread::spawn(move || {
                let corpus = fuzz::corpus(&t);
                let t0 = Instant::now();
                let found = fuzz::fuzz(&t, &corpus, seed, budget, Duration::MAX);
                (t.name, found, t0.elapsed())
            })
        })
        .collect();
    let mut panics = 0;
    for h in handles {
        let (name, found, took) = h.join().expect("a fuzzing thread");
        println!(
            "{name:>9}: {:>11} executions in {:>7.1} s ({:>9.0}/s), {} panics",
            found.executions,
            took.as_secs_f64(),
            found.executions as f64 / took.as_secs_f64(),
            found.panics.len()
        );
        for (i, input, message) in &found.panics {
            panics += 1;
            println!(
                "  execution {i}: {message}\n  input: {}",
                hex::encode(input)
            );
        }
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    if panics > 0 {
        std::process::exit(1);
    }
}
