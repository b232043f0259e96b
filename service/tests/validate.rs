//! `--validate`: a limits file is checked without Redis, as Limitador's own check does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn validate(config: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ratelimit-service"))
        .args(["--validate", "--config", config, "--redis-url", "redis://127.0.0.1:1"])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn a_good_limits_file_validates_without_redis_and_names_its_domains() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/limits.yaml");
    let (ok, text) = validate(example);
    assert!(ok, "{text}");
    assert_eq!(text.trim(), "ok: 1 file(s), domain(s) edge");
}

#[test]
fn a_bad_limits_file_fails_with_its_error() {
    let dir = std::env::temp_dir().join(format!("validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "domain: x\ndescriptors:\n  - key: a\n    rate_limit: {unit: parsec, requests_per_unit: 1}\n",
    )
    .unwrap();
    let (ok, text) = validate(bad.to_str().unwrap());
    assert!(!ok);
    assert!(text.contains("unknown unit `parsec`"), "{text}");
}
