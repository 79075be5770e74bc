//! Every decoder of hostile input, fuzzed for a short fixed time from its committed corpus
//! (`musubi_tests::fuzz`, issue 11). `MUSUBI_FUZZ_SECS=N` sets the time per target (default 3);
//! the seed is printed and `MUSUBI_FUZZ_SEED=N` replays it. `bench-fuzz` runs millions.

use std::time::Duration;

use musubi_tests::fuzz;

/// Seconds per target in CI.
const SECS_DEFAULT: u64 = 3;

#[test]
fn no_decoder_panics_on_mutated_input() {
    let seed: u64 = musubi_tests::env_or("MUSUBI_FUZZ_SEED", rand::random);
    let secs = musubi_tests::env_or("MUSUBI_FUZZ_SECS", || SECS_DEFAULT);
    // Straight to stderr, past the test harness's capture: an abort (which no `catch_unwind`
    // stops) would lose captured output, and the seed is what replays it.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("fuzz seed={seed} (replay with MUSUBI_FUZZ_SEED={seed}), {secs} s per target\n")
            .as_bytes(),
    );
    let targets: Vec<_> = fuzz::targets()
        .into_iter()
        .map(|target| {
            let corpus = fuzz::corpus(&target);
            assert!(
                corpus.len() > (target.seeds)().len(),
                "{}: the committed corpus adds inputs to the seeds",
                target.name
            );
            (target, corpus)
        })
        .collect();
    let hook = fuzz::silence_panics();
    let mut failures = Vec::new();
    for (target, corpus) in &targets {
        let found = fuzz::fuzz(target, corpus, seed, u64::MAX, Duration::from_secs(secs));
        eprintln!(
            "{:>9}: {} executions, {} panics",
            target.name,
            found.executions,
            found.panics.len()
        );
        for (i, input, message) in &found.panics {
            failures.push(format!(
                "{} panicked at execution {i} ({message}); input ({} bytes): {}",
                target.name,
                input.len(),
                hex::encode(&input[..input.len().min(256)])
            ));
        }
    }
    // The hook back before asserting, so a failure is printed.
    std::panic::set_hook(hook);
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}
