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

/// Fuzzes every decoder of hostile input (`musubi_tests::fuzz`).
#[derive(clap::Parser)]
struct Args {
    /// Executions per target.
    #[arg(default_value_t = 10_000_000)]
    executions: u64,
    /// The mutations' seed (default: random; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Only this target.
    #[arg(long)]
    only: Option<String>,
    /// Write damaged variants of the seeds into the committed corpus instead.
    #[arg(long)]
    write_corpus: bool,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    if args.write_corpus {
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
    let budget = args.executions;
    let seed = args.seed.unwrap_or_else(rand::random);
    let only = args.only;
    println!("fuzzing: {budget} executions per target, seed {seed}");
    let targets: Vec<_> = fuzz::targets()
        .into_iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.name))
        .map(|t| {
            let corpus = fuzz::corpus(&t);
            (t, corpus)
        })
        .collect();
    let hook = fuzz::silence_panics();
    let started = Instant::now();
    let handles: Vec<_> = targets
        .into_iter()
        .map(|(t, corpus)| {
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let found = fuzz::fuzz(&t, &corpus, seed, budget, Duration::MAX);
                (t.name, found, t0.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
    std::panic::set_hook(hook);
    let mut panics = 0;
    for r in results {
        let (name, found, took) = r.expect("a fuzzing thread");
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
