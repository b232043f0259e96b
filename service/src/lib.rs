//! ratelimit-service: a Redis-backed global rate-limit service speaking Envoy's Rate Limit Service
//! API v3 (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`).

pub mod bounds;
pub mod charge;
pub mod config;
pub mod grpc;
pub mod http;
pub mod idempotency;
pub mod keys;
pub mod lease;
pub mod log;
pub mod metrics;
pub mod reload;
pub mod scripts;
pub mod service;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bounds::Bounds;
use crate::config::{Algorithm, Config};
use crate::grpc::{KeysServer, LeaseServer, RlsServer};
use crate::idempotency::Keys;
use crate::metrics::Metrics;
use crate::service::Limiter;
use crate::store::{RedisOptions, Store};

/// Command line; every flag also reads an environment variable.
#[derive(Parser, Debug, Clone)]
#[command(name = "ratelimit-service", version, about)]
pub struct Args {
    /// gRPC listen address (Rate Limit Service v3 + grpc.health.v1).
    #[arg(long, env = "RATELIMIT_GRPC_ADDR", default_value = "127.0.0.1:8081")]
    pub grpc_addr: SocketAddr,
    /// HTTP listen address for /healthz and /metrics.
    #[arg(long, env = "RATELIMIT_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Redis URL (redis://, rediss:// for TLS). With --redis-cluster: comma-separated node URLs.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Talk to a Redis Cluster (the URLs are seed nodes).
    #[arg(long, env = "REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// Redis ACL user name.
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// Redis password (overrides one in the URL).
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// With rediss://: do not verify the server certificate.
    #[arg(long, env = "REDIS_TLS_INSECURE")]
    pub redis_tls_insecure: bool,
    /// Timeout of one Redis call, in milliseconds.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,
    /// At start, keep trying to reach Redis for this many seconds before giving up (0: fail at once).
    #[arg(long, env = "REDIS_STARTUP_WAIT_SECS", default_value_t = 0)]
    pub redis_startup_wait_secs: u64,
    /// Limits file or directory (its *.yaml/*.yml files), envoyproxy/ratelimit format. Repeatable;
    /// in the environment, comma-separated.
    #[arg(long = "config", env = "RATELIMIT_CONFIG", value_delimiter = ',')]
    pub config: Vec<PathBuf>,
    /// Check the --config files and exit (0 when they load, 1 with the error): no Redis needed.
    #[arg(long)]
    pub validate: bool,
    /// How often to check the configuration files for changes, in milliseconds.
    #[arg(long, env = "RATELIMIT_CONFIG_POLL_MS", default_value_t = 1000)]
    pub config_poll_ms: u64,
    /// Algorithm of limits that do not name one: fixed_window, sliding_window or token_bucket.
    #[arg(long, env = "RATELIMIT_DEFAULT_ALGORITHM", default_value = "fixed_window")]
    pub default_algorithm: Algorithm,
    /// First part of every Redis key.
    #[arg(long, env = "RATELIMIT_KEY_PREFIX", default_value = "rl")]
    pub key_prefix: String,
    /// Shadow mode for every limit: count and report as usual, but always answer OK
    /// (envoyproxy/ratelimit's SHADOW_MODE).
    #[arg(long, env = "SHADOW_MODE")]
    pub shadow_mode: bool,
    /// Largest request message (ShouldRateLimit, Leases/Return, Keys/Claim and Keys/Complete), in
    /// bytes; a larger one is refused undecoded.
    #[arg(long, env = "RATELIMIT_MAX_REQUEST_BYTES", default_value_t = 262_144)]
    pub max_request_bytes: usize,
    /// Most descriptors one ShouldRateLimit request may carry.
    #[arg(long, env = "RATELIMIT_MAX_DESCRIPTORS", default_value_t = Bounds::default().descriptors)]
    pub max_descriptors: usize,
    /// Most entries one descriptor may carry.
    #[arg(long, env = "RATELIMIT_MAX_ENTRIES", default_value_t = Bounds::default().entries)]
    pub max_entries: usize,
    /// Longest domain, entry key or entry value, in bytes.
    #[arg(long, env = "RATELIMIT_MAX_VALUE_BYTES", default_value_t = Bounds::default().value_bytes)]
    pub max_value_bytes: usize,
    /// Most hits one descriptor may add.
    #[arg(long, env = "RATELIMIT_MAX_HITS_PER_DESCRIPTOR", default_value_t = Bounds::default().hits_per_descriptor)]
    pub max_hits_per_descriptor: u64,
    /// Most hits one request may add over all its descriptors.
    #[arg(long, env = "RATELIMIT_MAX_HITS_PER_CALL", default_value_t = Bounds::default().hits_per_call)]
    pub max_hits_per_call: u64,
    /// gRPC TLS: the server's certificate chain (PEM). With --grpc-tls-key, the gRPC port
    /// speaks only TLS.
    #[arg(long, env = "RATELIMIT_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// gRPC TLS: the server's private key (PEM).
    #[arg(long, env = "RATELIMIT_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// gRPC mutual TLS: CA certificates (PEM) that client certificates must chain to; every
    /// client must then present one.
    #[arg(long, env = "RATELIMIT_GRPC_TLS_CLIENT_CA", requires = "grpc_tls_cert")]
    pub grpc_tls_client_ca: Option<PathBuf>,
    /// HTTP port: a connection that has not sent a whole request head within this many
    /// milliseconds is closed.
    #[arg(long, env = "RATELIMIT_HTTP_HEADER_TIMEOUT_MS", default_value_t = 5000)]
    pub http_header_timeout_ms: u64,
    /// HTTP port: connections served at once; further ones wait until one closes.
    #[arg(long, env = "RATELIMIT_HTTP_MAX_CONNECTIONS", default_value_t = 64)]
    pub http_max_connections: usize,
}

/// A TLS handshake on the gRPC port must finish within this, so half-open handshakes cannot pile up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read_pem(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))
}

impl Args {
    /// The gRPC port's TLS settings, if TLS is on; `Err` names the flag whose file is unreadable.
    pub fn grpc_tls(&self) -> Result<Option<tonic::transport::ServerTlsConfig>, String> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let (Some(cert), Some(key)) = (&self.grpc_tls_cert, &self.grpc_tls_key) else {
            return Ok(None);
        };
        let identity =
            Identity::from_pem(read_pem("--grpc-tls-cert", cert)?, read_pem("--grpc-tls-key", key)?);
        let mut tls = ServerTlsConfig::new().identity(identity).timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.grpc_tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read_pem("--grpc-tls-client-ca", ca)?));
        }
        Ok(Some(tls))
    }

    /// For the start-up line.
    fn grpc_tls_mode(&self) -> &'static str {
        match (&self.grpc_tls_cert, &self.grpc_tls_client_ca) {
            (None, _) => "",
            (Some(_), None) => " grpc_tls=on",
            (Some(_), Some(_)) => " grpc_tls=mutual",
        }
    }

    pub fn bounds(&self) -> Bounds {
        Bounds {
            descriptors: self.max_descriptors,
            entries: self.max_entries,
            value_bytes: self.max_value_bytes,
            hits_per_descriptor: self.max_hits_per_descriptor,
            hits_per_call: self.max_hits_per_call,
        }
    }

    pub fn redis_options(&self) -> RedisOptions {
        RedisOptions {
            urls: self.redis_url.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            cluster: self.redis_cluster,
            username: self.redis_username.clone(),
            password: self.redis_password.clone(),
            tls_insecure: self.redis_tls_insecure,
            timeout: Duration::from_millis(self.redis_timeout_ms.max(1)),
        }
    }
}

/// Runs until `shutdown` turns true (or SIGTERM/SIGINT when called from `main`).
/// Errors are one-line messages for start-up problems.
pub async fn run(args: Args, mut shutdown: watch::Receiver<bool>) -> Result<(), String> {
    // rustls (used by the redis crate for rediss://) needs a process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let metrics = Arc::new(Metrics::default());
    let grpc_tls = args.grpc_tls()?;

    let (cfg, sig) = if args.config.is_empty() {
        (Config::default(), Vec::new())
    } else {
        Config::load(&args.config).map_err(|e| format!("bad configuration: {e}"))?
    };
    let domains = cfg.domain_names();
    for w in &cfg.warnings {
        warn!("configuration: {w}");
    }
    let config = Arc::new(RwLock::new(Arc::new(cfg)));

    let opts = args.redis_options();
    let deadline = Instant::now() + Duration::from_secs(args.redis_startup_wait_secs);
    let store = loop {
        match Store::connect(&opts, metrics.clone()).await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot reach Redis at {}: {e}", opts.display_urls()))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    metrics.set_redis_up(true);

    let grpc_listener = TcpListener::bind(args.grpc_addr)
        .await
        .map_err(|e| format!("cannot listen on --grpc-addr {}: {e}", args.grpc_addr))?;
    let http_listener = TcpListener::bind(args.http_addr)
        .await
        .map_err(|e| format!("cannot listen on --http-addr {}: {e}", args.http_addr))?;
    let grpc_local = grpc_listener.local_addr().map_err(|e| e.to_string())?;
    let http_local = http_listener.local_addr().map_err(|e| e.to_string())?;

    let limiter = Arc::new(Limiter {
        config: config.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        default_algorithm: args.default_algorithm,
        key_prefix: args.key_prefix.clone(),
        shadow_mode: args.shadow_mode,
        bounds: args.bounds(),
    });

    let keys = Arc::new(Keys {
        store: store.clone(),
        metrics: metrics.clone(),
        key_prefix: args.key_prefix.clone(),
        max_domain_bytes: args.max_value_bytes,
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<RlsServer>().await;

    // Background: Redis health (gRPC health status, redis_up gauge, one log line per change).
    let health_task = {
        let store = store.clone();
        let metrics = metrics.clone();
        let reporter = health_reporter.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut up = true;
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let r = store.ping().await;
                let now_up = r.is_ok();
                metrics.set_redis_up(now_up);
                if now_up != up {
                    up = now_up;
                    let status = if up {
                        info!("redis is reachable again");
                        tonic_health::ServingStatus::Serving
                    } else {
                        let e = r.err().map(|e| e.to_string()).unwrap_or_default();
                        warn!("redis is unreachable: {e}");
                        tonic_health::ServingStatus::NotServing
                    };
                    reporter.set_service_status("", status).await;
                    reporter.set_service_status(grpc::SERVICE_NAME, status).await;
                }
            }
        })
    };

    // Background: configuration hot reload.
    let reload_task = if args.config.is_empty() {
        None
    } else {
        let paths = args.config.clone();
        let config = config.clone();
        let metrics = metrics.clone();
        let poll = Duration::from_millis(args.config_poll_ms.max(10));
        let reloader = reload::Reloader { paths, config, metrics, last_sig: sig };
        Some(tokio::spawn(reloader.run(poll, shutdown.clone())))
    };

    let http_limits = http::HttpLimits {
        header_timeout: Duration::from_millis(args.http_header_timeout_ms.max(1)),
        max_connections: args.http_max_connections,
    };
    let http_task = tokio::spawn(http::serve(
        http_listener,
        store.clone(),
        metrics.clone(),
        http_limits,
        shutdown.clone(),
    ));

    info!(
        "listening grpc={grpc_local} http={http_local} redis={}{} algorithm={} domains=[{}]{}{}",
        opts.display_urls(),
        if opts.cluster { " (cluster)" } else { "" },
        args.default_algorithm,
        domains.join(", "),
        if args.shadow_mode { " shadow_mode=on (never denies)" } else { "" },
        args.grpc_tls_mode(),
    );

    // TCP_NODELAY: answers are small writes; with Nagle, one behind an unacknowledged write waits
    // for the client's delayed ACK (40 ms on Linux), which made about 1% of calls take 40 ms.
    // tonic leaves it unset for an incoming built from a listener.
    let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let mut stop = shutdown.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = grpc_tls {
        server = server.tls_config(tls).map_err(|e| format!("bad gRPC TLS certificate or key: {e}"))?;
    }
    let served = server
        .add_service(health_service)
        .add_service(RlsServer { limiter: limiter.clone(), max_request_bytes: args.max_request_bytes })
        .add_service(LeaseServer { limiter, max_request_bytes: args.max_request_bytes })
        .add_service(KeysServer { keys, max_request_bytes: args.max_request_bytes })
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|v| *v).await;
        })
        .await;
    if let Err(e) = served {
        return Err(format!("gRPC server failed: {e}"));
    }
    let _ = shutdown.wait_for(|v| *v).await;
    let _ = health_task.await;
    if let Some(t) = reload_task {
        let _ = t.await;
    }
    let _ = http_task.await;
    info!("stopped");
    Ok(())
}

/// `--validate`: loads the configuration files as the service would, without Redis or sockets.
/// One line on standard output when they load (with a line per ignored field), the error when not.
pub fn validate(paths: &[PathBuf]) -> Result<String, String> {
    if paths.is_empty() {
        return Err("--validate needs --config (a file or directory of limits)".to_owned());
    }
    let (config, _) = config::Config::load(paths)?;
    let mut out =
        format!("ok: {} file(s), domain(s) {}", config.sources.len(), config.domain_names().join(", "));
    for warning in &config.warnings {
        out.push_str("\nwarning: ");
        out.push_str(warning);
    }
    Ok(out)
}
