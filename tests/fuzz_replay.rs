//! The fuzz targets (`src/fuzz.rs`) on stable, without cargo-fuzz: each runs over every file of
//! its committed corpus (`fuzz/corpus/<target>/`), then over a fixed number of inputs mutated from
//! it by a seeded xorshift generator (bit flips, inserted, deleted and overwritten bytes, splices
//! of two corpus files), the same inputs on every run. `make fuzz` runs the same targets under
//! libFuzzer for longer.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

use ratelimit_wasm::fuzz;

/// Mutated inputs are cut to this length (the corpus files are shorter).
const MAX_INPUT: usize = 4096;

/// xorshift64*: small, seeded, the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus(target: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir)? {
        files.push(entry?.path());
    }
    files.sort();
    files.iter().map(fs::read).collect()
}

/// One corpus file changed in 1 to 8 places, or spliced with another.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    const INTERESTING: [u8; 10] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'0', b'9'];
    let mut input = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(input.len() + 1);
        match rng.below(5) {
            0 if at < input.len() => input[at] ^= 1 << rng.below(8),
            1 => input.insert(at, rng.next() as u8),
            2 if at < input.len() => {
                let end = (at + 1 + rng.below(8)).min(input.len());
                input.drain(at..end);
            }
            3 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                let piece = &other[from..(from + rng.below(64)).min(other.len())];
                input.splice(at..(at + rng.below(16)).min(input.len()), piece.iter().copied());
            }
            _ if at < input.len() => input[at] = INTERESTING[rng.below(INTERESTING.len())],
            _ => input.push(rng.next() as u8),
        }
    }
    input.truncate(MAX_INPUT);
    input
}

/// Runs `target` over its corpus and `mutations` mutants: what it ran, or the input it failed on.
fn replay(name: &str, target: fn(&[u8]), mutations: usize) -> Result<String, String> {
    let started = Instant::now();
    let corpus = corpus(name).map_err(|e| format!("fuzz/corpus/{name}: {e}"))?;
    if corpus.is_empty() {
        return Err(format!("fuzz/corpus/{name} is empty"));
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.bytes().fold(0, |h, b| h * 31 + u64::from(b)));
    let mutants = (0..mutations).map(|_| mutate(&mut rng, &corpus));
    let mut runs = 0;
    for input in corpus.iter().cloned().chain(mutants) {
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            let (text, hex) = (input.escape_ascii(), hex(&input));
            return Err(format!("fuzz target {name} failed on input b\"{text}\" (hex {hex})"));
        }
        runs += 1;
    }
    let elapsed = started.elapsed();
    Ok(format!(
        "fuzz replay {name}: {runs} inputs ({} corpus files, {mutations} mutants) in {elapsed:.2?}",
        corpus.len()
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn any_configuration_bytes_parse_or_are_refused_with_a_reason() {
    let ran = replay("config", fuzz::config, 20_000).unwrap_or_else(|e| panic!("{e}"));
    println!("{ran}");
}

#[test]
fn requests_in_any_order_at_any_clock_never_exceed_a_quota_or_panic() {
    let ran = replay("request", fuzz::request, 5_000).unwrap_or_else(|e| panic!("{e}"));
    println!("{ran}");
}

#[test]
fn arbitrary_bytes_in_every_slot_and_the_seed_never_break_the_table() {
    let ran = replay("table", fuzz::table, 3_000).unwrap_or_else(|e| panic!("{e}"));
    println!("{ran}");
}

#[test]
fn any_answer_of_the_rate_limit_service_maps_to_a_verdict() {
    let ran = replay("answer", fuzz::answer, 8_000).unwrap_or_else(|e| panic!("{e}"));
    println!("{ran}");
}
