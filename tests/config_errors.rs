//! One fixture per configuration error: `tests/config_errors/<case>.json` holds the filter JSON,
//! `<case>.error` the exact message Envoy's log shows after `ratelimit-wasm: invalid configuration: `.
//! Run with `BLESS=1` to write the `.error` files from the current messages (then review them).

use std::fs;
use std::path::Path;

use ratelimit_wasm::config::Config;

#[test]
fn every_config_error_fixture_gives_its_exact_message() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config_errors");
    let bless = std::env::var_os("BLESS").is_some();
    let mut cases: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "fixtures missing from {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let json = fs::read(case).unwrap();
        let message = match Config::parse(&json) {
            Ok(_) => "<accepted>".to_owned(),
            Err(e) => e.to_string(),
        };
        let expected_path = case.with_extension("error");
        if bless {
            fs::write(&expected_path, format!("{message}\n")).unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} has no .error file", case.display()));
        if message != expected.trim_end_matches('\n') {
            failures.push(format!(
                "{}:\n  expected: {}\n  actual:   {message}",
                case.display(),
                expected.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
