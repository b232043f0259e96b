//! Load client for `make bench` (bench/bench.py, "Global" section): drives a running
//! ratelimit-service over gRPC (`ShouldRateLimit`) and prints one JSON line with the decisions per
//! second and the latency of the calls.
//!
//! ```sh
//! cargo run --release -p ratelimit-service --example rls_load -- \
//!     --addr 127.0.0.1:8081 --domain bench --tasks 32 --connections 2 --seconds 5 --keys 16
//! ```
//!
//! Each request carries one descriptor shaped like the one ratelimit-wasm sends for a global rule
//! keyed by a header (`rule=g`, `x-key=k<i>`), with a limit override that never denies. The
//! runtime has as many worker threads as the CPUs the process may use (pin it with `taskset`).

use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tonic::transport::Channel;

#[derive(Parser)]
struct Opts {
    /// The service's gRPC address.
    #[arg(long)]
    addr: String,
    #[arg(long, default_value = "bench")]
    domain: String,
    /// Concurrent requests in flight (one task each, a call at a time).
    #[arg(long, default_value_t = 32)]
    tasks: usize,
    /// HTTP/2 connections the tasks share (round robin).
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Measured duration.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Unmeasured warm-up before it.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Distinct descriptor values (x-key=k0..k<keys-1>), spread over the requests.
    #[arg(long, default_value_t = 16)]
    keys: usize,
    /// Requests per unit of the limit override (never reached by default).
    #[arg(long, default_value_t = 1_000_000_000)]
    limit: u32,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    over: u64,
    errors: u64,
    latencies_us: Vec<u32>,
}

fn request(domain: &str, key: &str, limit: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_string(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry { key: "rule".into(), value: "g".into() },
                Entry { key: "x-key".into(), value: key.to_string() },
            ],
            limit: Some(RateLimitOverride { requests_per_unit: limit, unit: 1 }), // SECOND
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

async fn worker(
    mut client: RateLimitServiceClient<Channel>,
    opts: Arc<Opts>,
    first_key: usize,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Tally {
    let keys: Vec<String> = (0..opts.keys.max(1)).map(|i| format!("k{i}")).collect();
    let mut t = Tally::default();
    let mut i = first_key;
    while !stop.load(Ordering::Relaxed) {
        let req = request(&opts.domain, &keys[i % keys.len()], opts.limit);
        i += 1;
        let t0 = Instant::now();
        let res = client.should_rate_limit(req).await;
        if !measuring.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
            continue;
        }
        let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
        match res {
            Ok(r) if r.get_ref().overall_code == Code::OverLimit as i32 => t.over += 1,
            Ok(_) => t.ok += 1,
            Err(_) => t.errors += 1,
        }
        t.latencies_us.push(us);
    }
    t
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)])
}

async fn run(opts: Opts) -> Result<String, Box<dyn Error>> {
    let opts = Arc::new(opts);
    let mut channels = Vec::new();
    for _ in 0..opts.connections.max(1) {
        let ch = Channel::from_shared(format!("http://{}", opts.addr))?.connect().await?;
        channels.push(RateLimitServiceClient::new(ch));
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = tokio::task::JoinSet::new();
    for n in 0..opts.tasks.max(1) {
        let client = channels[n % channels.len()].clone();
        set.spawn(worker(client, opts.clone(), n, measuring.clone(), stop.clone()));
    }
    tokio::time::sleep(Duration::from_secs_f64(opts.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let mut total = Tally::default();
    while let Some(t) = set.join_next().await {
        let t = t?;
        total.ok += t.ok;
        total.over += t.over;
        total.errors += t.errors;
        total.latencies_us.extend(t.latencies_us);
    }
    total.latencies_us.sort_unstable();
    let decisions = total.ok + total.over;
    Ok(format!(
        "{{\"decisions\": {decisions}, \"ok\": {}, \"over_limit\": {}, \"errors\": {}, \"seconds\": {elapsed:.3}, \
         \"per_sec\": {:.1}, \"p50_us\": {:.0}, \"p99_us\": {:.0}, \"tasks\": {}, \"connections\": {}, \"keys\": {}, \
         \"runtime_threads\": {}}}",
        total.ok,
        total.over,
        total.errors,
        decisions as f64 / elapsed,
        percentile(&total.latencies_us, 0.50),
        percentile(&total.latencies_us, 0.99),
        opts.tasks.max(1),
        channels.len(),
        opts.keys.max(1),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    ))
}

fn main() -> std::process::ExitCode {
    let opts = Opts::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rls_load: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts)) {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rls_load: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
