//! Test harness: real `redis-server` processes on free loopback ports, the built service binary,
//! a tonic client. Every process is killed on drop, so also when a test fails.
#![allow(dead_code)]
// Helpers used only by tests: failing loudly is what they are for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use tonic::transport::Channel;

pub const OK: i32 = 1;
pub const OVER: i32 = 2;
pub const SECOND: i32 = 1;
pub const MINUTE: i32 = 2;
pub const HOUR: i32 = 3;
pub const DAY: i32 = 4;

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("rls-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sleeps, if needed, until at least `needed` is left of the current window of `window` (windows are
/// aligned to the Unix epoch, as the service's fixed windows are). A test that counts requests in
/// one window must not straddle two: it would see the count reset and fail by the time of day.
pub fn clear_of_window_edge(window: Duration, needed: Duration) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let left = window.as_millis() - now.as_millis() % window.as_millis();
    if left < needed.as_millis() {
        std::thread::sleep(Duration::from_millis(left as u64 + 50));
    }
}

/// Sleeps past the hour's edge if it is under a minute away; see [`clear_of_window_edge`].
pub fn clear_of_hour_edge() {
    clear_of_window_edge(Duration::from_secs(3600), Duration::from_secs(60));
}

/// Waits (bounded) until `f` holds.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn redis_ping(port: u16) -> bool {
    let Ok(c) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else {
        return false;
    };
    let Ok(mut conn) = c.get_connection_with_timeout(Duration::from_millis(500)) else {
        return false;
    };
    redis::cmd("PING").query::<String>(&mut conn).is_ok()
}

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            let port = free_port();
            let mut s = RedisServer {
                port,
                child: None,
                dir: TempDir::new("redis"),
                extra: extra.iter().map(|s| s.to_string()).collect(),
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start redis-server");
    }

    /// (Re)starts on the same port. False if it did not come up (port taken meanwhile).
    pub fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (make setup)");
        self.child = Some(child);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if redis_ping(self.port) {
                return true;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return false;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the running redis-server.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("redis-server is running").id();
        let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
        assert!(ok.success(), "kill -{sig} {pid}");
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).unwrap().get_connection().unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three masters, no replicas, slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for n in &nodes {
            wait_until("cluster_state:ok", Duration::from_secs(30), || {
                let mut c = n.conn();
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).unwrap();
                info.contains("cluster_state:ok")
            });
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",")
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ratelimit-service")
}

pub struct Service {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts the binary on free ports; waits for its "listening" line.
    pub fn start(args: &[&str]) -> Service {
        let mut child = Command::new(bin())
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--config-poll-ms", "100"])
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("RATELIMIT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[service] {line}");
                    let addrs = line.split(" listening grpc=").nth(1).map(|rest| {
                        let mut it = rest.split_whitespace();
                        let g: SocketAddr = it.next().unwrap().parse().unwrap();
                        let h: SocketAddr = it.next().unwrap().trim_start_matches("http=").parse().unwrap();
                        (g, h)
                    });
                    // Logged before `start` returns, so a test can look for the listening line.
                    log.lock().unwrap().push(line);
                    if let Some(a) = addrs {
                        let _ = tx.send(a);
                    }
                }
            });
        }
        let (grpc, http) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                kill(&mut child);
                panic!("service did not start: {:?}", log.lock().unwrap());
            }
        };
        Service { child: Some(child), grpc, http, log }
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.grpc)).await.unwrap()
    }

    /// SIGTERM; returns the exit status (waits at most 20 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let t0 = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                kill(&mut c);
                panic!("service did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }

    pub fn log_contains(&self, s: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(s))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Runs the binary to completion (start-up error tests).
pub fn run_to_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(bin())
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("RATELIMIT_CONFIG")
        .output()
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

pub fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
        ..Default::default()
    }
}

pub fn desc_limit(entries: &[(&str, &str)], rpu: u32, unit: i32) -> RateLimitDescriptor {
    let mut d = desc(entries);
    d.limit = Some(RateLimitOverride { requests_per_unit: rpu, unit });
    d
}

pub fn with_hits(mut d: RateLimitDescriptor, hits: u64) -> RateLimitDescriptor {
    d.hits_addend = Some(UInt64Value { value: hits });
    d
}

pub async fn call(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
) -> Result<RateLimitResponse, tonic::Status> {
    c.should_rate_limit(RateLimitRequest { domain: domain.to_string(), descriptors, hits_addend: 0 })
        .await
        .map(|r| r.into_inner())
}

/// Fires `n` concurrent single-descriptor calls; returns how many were OK.
pub async fn concurrent_ok(
    client: &RateLimitServiceClient<Channel>,
    domain: &str,
    d: RateLimitDescriptor,
    n: usize,
) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let mut c = client.clone();
        let d = d.clone();
        let domain = domain.to_string();
        set.spawn(async move { call(&mut c, &domain, vec![d]).await.unwrap().overall_code });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        if r.unwrap() == OK {
            ok += 1;
        }
    }
    ok
}

pub fn write_file(path: &Path, text: &str) {
    // Write then rename, so the reloader never sees a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The service's algorithms, for tests that run once per algorithm.
pub const ALGORITHMS: [&str; 3] = ["fixed_window", "sliding_window", "token_bucket"];

/// One service per algorithm (the default algorithm applies to `limit` overrides).
pub fn services(redis: &RedisServer, extra: &[&str]) -> Vec<(&'static str, Service)> {
    let url = redis.url();
    ALGORITHMS
        .iter()
        .map(|a| {
            let mut args = vec!["--redis-url", &url, "--default-algorithm", a, "--redis-timeout-ms", "10000"];
            args.extend_from_slice(extra);
            (*a, Service::start(&args))
        })
        .collect()
}

/// A `ShouldRateLimit` call with request metadata `headers` (name, value).
pub async fn call_with(
    c: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    headers: &[(&'static str, &str)],
) -> Result<RateLimitResponse, tonic::Status> {
    let mut r = tonic::Request::new(RateLimitRequest { domain: domain.into(), descriptors, hits_addend: 0 });
    for (k, v) in headers {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    c.should_rate_limit(r).await.map(|r| r.into_inner())
}

/// The value of the `/metrics` line that starts with `line_prefix`.
pub fn metric(svc: &Service, line_prefix: &str) -> u64 {
    let (_, body) = svc.http_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(line_prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {line_prefix} in {body}"))
}

/// Keys in the Redis server.
pub fn dbsize(redis: &RedisServer) -> i64 {
    redis::cmd("DBSIZE").query(&mut redis.conn()).unwrap()
}
