//! `rediss://` (rustls) and ACL user/password against a real TLS-enabled redis-server.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[allow(clippy::unwrap_used)]
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_acl_user() {
    clear_of_hour_edge();
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED tls_with_acl_user: the openssl command is not installed");
        return;
    }
    let dir = TempDir::new("tls");
    let d = dir.path();
    // A self-signed certificate for 127.0.0.1: not trusted, so only --redis-tls-insecure accepts it.
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ],
    );
    let port = free_port();
    let _redis = Killed(
        Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--tls-auth-clients", "no"])
            .args([
                "--tls-cert-file",
                "cert.pem",
                "--tls-key-file",
                "key.pem",
                "--tls-ca-cert-file",
                "cert.pem",
            ])
            .args(["--user", "default", "off", "--user", "alice", "on", ">s3cret", "~*", "+@all"])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("redis TLS port", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    let url = format!("rediss://127.0.0.1:{port}/");

    // Untrusted certificate without --redis-tls-insecure: clear start-up failure.
    let (status, err) =
        run_to_exit(&["--redis-url", &url, "--redis-username", "alice", "--redis-password", "s3cret"]);
    assert!(!status.success());
    assert!(err.contains(&format!("cannot reach Redis at {url}")), "{err}");
    // Wrong password: also a start-up failure.
    let (status, err) = run_to_exit(&[
        "--redis-url",
        &url,
        "--redis-tls-insecure",
        "--redis-username",
        "alice",
        "--redis-password",
        "nope",
    ]);
    assert!(!status.success());
    assert!(err.contains("cannot reach Redis"), "{err}");

    let svc = Service::start(&[
        "--redis-url",
        &url,
        "--redis-tls-insecure",
        "--redis-username",
        "alice",
        "--redis-password",
        "s3cret",
    ]);
    let mut c = svc.client().await;
    for n in 0..3 {
        let r = call(&mut c, "tls", vec![desc_limit(&[("k", "v")], 2, HOUR)]).await.unwrap();
        assert_eq!(r.overall_code, if n < 2 { OK } else { OVER });
    }
    assert_eq!(svc.http_get("/healthz").0, 200);
    // The password never reaches the log.
    assert!(!svc.log_contains("s3cret"));
}
