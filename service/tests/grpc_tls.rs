//! TLS and mutual TLS on the gRPC port, with certificates generated for the test (rcgen).
// Test helpers: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA and, signed by it, a server certificate for localhost/127.0.0.1 and a client certificate.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    (p.signed_by(&key, issuer).unwrap().pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let ca = ca("test CA");
    Pki {
        ca: ca.pem(),
        server: leaf(&ca, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth),
        client: leaf(&ca, &["envoy-client"], ExtendedKeyUsagePurpose::ClientAuth),
    }
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

async fn tls_client(
    svc: &Service,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<RateLimitServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ch =
        Endpoint::from_shared(format!("https://{}", svc.grpc)).unwrap().tls_config(tls)?.connect().await?;
    Ok(RateLimitServiceClient::new(ch))
}

/// One call; `Err` whether the connection or the call failed.
async fn one_call(
    c: Result<RateLimitServiceClient<Channel>, tonic::transport::Error>,
) -> Result<i32, String> {
    let mut c = c.map_err(|e| format!("connect: {e:?}"))?;
    call(&mut c, "tls", vec![desc_limit(&[("k", "v")], 100, HOUR)])
        .await
        .map(|r| r.overall_code)
        .map_err(|e| format!("call: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_port_serves_tls_and_requires_client_certificates_with_a_client_ca() {
    clear_of_hour_edge();
    let redis = RedisServer::start();
    let dir = TempDir::new("pki");
    let pki = pki();
    let (cert, key) = (write(&dir, "server.pem", &pki.server.0), write(&dir, "server.key", &pki.server.1));
    let client_ca = write(&dir, "ca.pem", &pki.ca);

    // TLS only: a client that trusts the CA is served; plaintext is not.
    let svc =
        Service::start(&["--redis-url", &redis.url(), "--grpc-tls-cert", &cert, "--grpc-tls-key", &key]);
    assert!(svc.log_contains("grpc_tls=on"));
    assert_eq!(one_call(tls_client(&svc, &pki.ca, None).await).await, Ok(OK));
    let plain = Endpoint::from_shared(format!("http://{}", svc.grpc)).unwrap().connect().await;
    let plain = plain.map(RateLimitServiceClient::new);
    assert!(one_call(plain).await.is_err(), "plaintext must not be served on a TLS port");
    drop(svc);

    // Mutual TLS: only clients with a certificate from the client CA.
    let svc = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--grpc-tls-cert",
        &cert,
        "--grpc-tls-key",
        &key,
        "--grpc-tls-client-ca",
        &client_ca,
    ]);
    assert!(svc.log_contains("grpc_tls=mutual"));
    assert_eq!(one_call(tls_client(&svc, &pki.ca, Some(&pki.client)).await).await, Ok(OK));
    let none = one_call(tls_client(&svc, &pki.ca, None).await).await;
    assert!(none.is_err(), "no client certificate: {none:?}");
    let rogue = leaf(&ca("rogue CA"), &["envoy-client"], ExtendedKeyUsagePurpose::ClientAuth);
    let rogue = one_call(tls_client(&svc, &pki.ca, Some(&rogue)).await).await;
    assert!(rogue.is_err(), "a certificate from another CA: {rogue:?}");
    // Only the two authenticated calls counted.
    let n: u64 = redis::cmd("HGET").arg("rl:{tls|k=v}:fw:h").arg("c").query(&mut redis.conn()).unwrap();
    assert_eq!(n, 2);
}

#[test]
fn an_unreadable_certificate_is_a_clear_startup_error() {
    let redis = RedisServer::start();
    let (status, err) = run_to_exit(&[
        "--redis-url",
        &redis.url(),
        "--grpc-tls-cert",
        "/nonexistent/server.pem",
        "--grpc-tls-key",
        "/nonexistent/server.key",
    ]);
    assert!(!status.success());
    assert!(err.contains("cannot read --grpc-tls-cert /nonexistent/server.pem"), "{err}");
}
