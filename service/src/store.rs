//! The Redis side: connection (single node or cluster), the scripts, one decision per call.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, RedisError, Script};

use crate::config::{Algorithm, Unit};
use crate::metrics::Metrics;
use crate::scripts;

/// How to reach Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// One URL, or for a cluster one or more node URLs.
    pub urls: Vec<String>,
    pub cluster: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls_insecure: bool,
    /// Per-call timeout (connect and response).
    pub timeout: Duration,
}

impl RedisOptions {
    /// The URLs with any password hidden, for messages.
    pub fn display_urls(&self) -> String {
        self.urls.iter().map(|u| redact(u)).collect::<Vec<_>>().join(",")
    }
}

fn redact(url: &str) -> String {
    // scheme://user:pass@host -> scheme://user:***@host
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.rsplit_once('@') {
            let user = auth.split_once(':').map(|(u, _)| u).unwrap_or(auth);
            if auth.contains(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_string()
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Outcome of one descriptor's script call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    pub remaining: u64,
    pub reset_ms: u64,
    pub window: i64,
    /// Lease units taken on top of the hits (0 without a lease).
    pub granted: u64,
    /// Until when (Redis' clock, ms since the epoch) the granted units may be spent.
    pub valid_until_ms: i64,
}

/// A lease asked of one descriptor's script.
#[derive(Clone, Copy, Debug)]
pub struct LeaseArgs<'a> {
    /// The grant's id: names the lease's key.
    pub id: &'a str,
    /// The most units to take.
    pub units: u64,
    pub validity_ms: u64,
}

/// The key recording a lease's outstanding units on one descriptor. It extends the descriptor's
/// key, so it shares its hash tag and one script can touch both on a Redis Cluster.
pub fn lease_key(state_key: &str, id: &str) -> String {
    format!("{state_key}:lease:{id}")
}

/// What one descriptor asks of Redis.
#[derive(Clone, Debug)]
pub struct Check {
    pub key: String,
    pub algorithm: Algorithm,
    pub limit: u32,
    pub unit: Unit,
    pub hits: u64,
}

impl Check {
    /// The `period_ms` argument of the scripts.
    fn period_arg(&self) -> i64 {
        match (self.algorithm, self.unit) {
            (Algorithm::FixedWindow, Unit::Month) => 0,
            (Algorithm::FixedWindow, Unit::Year) => -1,
            _ => self.unit.nominal_ms() as i64,
        }
    }
}

const MARGIN_MS: i64 = 1000;

/// A TIME answer slower than this round trip does not update the clock offset: its error would be
/// up to half of it.
const MAX_OFFSET_RTT: Duration = Duration::from_millis(20);

/// When a call's scripts must have run by: locally, to stop waiting, and in Redis' clock, so that a
/// script Redis only gets to after the caller gave up (a stalled or paused Redis) changes nothing.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: tokio::time::Instant,
    redis_ms: i64,
}

fn wall_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[derive(Clone)]
pub struct Store {
    conn: Conn,
    fixed: std::sync::Arc<Script>,
    sliding: std::sync::Arc<Script>,
    bucket: std::sync::Arc<Script>,
    refund: std::sync::Arc<Script>,
    lease_return: std::sync::Arc<Script>,
    idem_claim: std::sync::Arc<Script>,
    idem_complete: std::sync::Arc<Script>,
    timeout: Duration,
    metrics: std::sync::Arc<Metrics>,
    /// Redis' clock minus ours (ms), from the last quick TIME (at start, then every health check).
    offset_ms: Arc<AtomicI64>,
}

#[derive(Debug)]
pub enum StoreError {
    Redis(RedisError),
    Timeout(Duration),
    /// The script ran after the call's deadline (by Redis' clock) and so changed nothing.
    Expired,
    /// A script answered something other than its documented reply (a foreign script under the
    /// same SHA, a mismatched Redis): the answer is not trusted.
    Reply(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Redis(e) => write!(f, "{e}"),
            StoreError::Timeout(d) => write!(f, "no answer from Redis within {d:?}"),
            StoreError::Expired => write!(f, "Redis ran the script after the call's deadline"),
            StoreError::Reply(r) => write!(f, "unexpected script reply: {r}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl Store {
    /// Connects (and checks with a PING). Fails if Redis cannot be reached now.
    pub async fn connect(opts: &RedisOptions, metrics: std::sync::Arc<Metrics>) -> Result<Store, String> {
        let conn = tokio::time::timeout(opts.timeout * 3, Self::open(opts))
            .await
            .map_err(|_| format!("no answer within {:?}", opts.timeout * 3))??;
        let store = Store {
            conn,
            fixed: std::sync::Arc::new(Script::new(&scripts::fixed_window())),
            sliding: std::sync::Arc::new(Script::new(&scripts::sliding_window())),
            bucket: std::sync::Arc::new(Script::new(&scripts::token_bucket())),
            refund: std::sync::Arc::new(Script::new(scripts::REFUND)),
            lease_return: std::sync::Arc::new(Script::new(scripts::LEASE_RETURN)),
            idem_claim: std::sync::Arc::new(Script::new(scripts::IDEM_CLAIM)),
            idem_complete: std::sync::Arc::new(Script::new(scripts::IDEM_COMPLETE)),
            timeout: opts.timeout,
            metrics,
            offset_ms: Arc::new(AtomicI64::new(0)),
        };
        store.ping().await.map_err(|e| e.to_string())?;
        store.load_scripts().await.map_err(|e| e.to_string())?;
        Ok(store)
    }

    /// SCRIPT LOAD of every script (on a cluster: on every master), so the first requests do not
    /// all meet NOSCRIPT at once. Later NOSCRIPTs (a restarted Redis) are handled per call.
    async fn load_scripts(&self) -> Result<(), StoreError> {
        let all = [
            &self.fixed,
            &self.sliding,
            &self.bucket,
            &self.refund,
            &self.lease_return,
            &self.idem_claim,
            &self.idem_complete,
        ];
        for s in all {
            let inv = s.prepare_invoke();
            match self.conn.clone() {
                Conn::Single(mut c) => self.timed(inv.load_async(&mut c)).await?,
                Conn::Cluster(mut c) => self.timed(inv.load_async(&mut c)).await?,
            };
        }
        Ok(())
    }

    async fn open(opts: &RedisOptions) -> Result<Conn, String> {
        // TCP_NODELAY, as on the gRPC port: a script call is a small write, which Nagle would
        // hold behind an unacknowledged one for Redis' delayed ACK.
        let no_delay = || redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let err = |e: RedisError| e.to_string();
        if opts.cluster {
            let mut b = redis::cluster::ClusterClientBuilder::new(opts.urls.clone())
                .tcp_settings(no_delay())
                .connection_timeout(opts.timeout)
                .response_timeout(opts.timeout)
                .retries(1);
            if let Some(u) = &opts.username {
                b = b.username(u);
            }
            if let Some(p) = &opts.password {
                b = b.password(p);
            }
            if opts.urls.iter().any(|u| u.starts_with("rediss://")) {
                b = b.tls(if opts.tls_insecure { redis::TlsMode::Insecure } else { redis::TlsMode::Secure });
            }
            let client = b.build().map_err(err)?;
            let c = client.get_async_connection().await.map_err(err)?;
            Ok(Conn::Cluster(c))
        } else {
            let url = opts.urls.first().ok_or("no Redis URL given")?;
            let mut info = url.as_str().into_connection_info().map_err(err)?;
            let mut settings = info.redis_settings().clone();
            if let Some(u) = &opts.username {
                settings = settings.set_username(u);
            }
            if let Some(p) = &opts.password {
                settings = settings.set_password(p);
            }
            info = info.set_redis_settings(settings).set_tcp_settings(no_delay());
            if opts.tls_insecure {
                if let redis::ConnectionAddr::TcpTls { host, port, .. } = info.addr().clone() {
                    info = info.set_addr(redis::ConnectionAddr::TcpTls {
                        host,
                        port,
                        insecure: true,
                        tls_params: None,
                    });
                }
            }
            let client = redis::Client::open(info).map_err(err)?;
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(opts.timeout))
                .set_response_timeout(Some(opts.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let c = ConnectionManager::new_with_config(client, cfg).await.map_err(err)?;
            Ok(Conn::Single(c))
        }
    }

    async fn timed<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        self.timed_until(tokio::time::Instant::now() + self.timeout, f).await
    }

    async fn timed_until<T, F>(&self, until: tokio::time::Instant, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        let t0 = Instant::now();
        let r = tokio::time::timeout_at(until, f).await;
        self.metrics.observe_redis(t0.elapsed());
        let r = match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout(t0.elapsed())),
        };
        if r.is_err() {
            self.metrics.redis_error();
        }
        r
    }

    /// A TIME round trip: checks Redis answers and, when quick, refreshes the clock offset
    /// that deadlines are translated with.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("TIME");
        let cmd = &mut cmd;
        let (t0, sent) = (wall_ms(), Instant::now());
        let (secs, micros): (i64, i64) = match self.conn.clone() {
            Conn::Single(mut c) => self.timed(cmd.query_async(&mut c)).await?,
            Conn::Cluster(mut c) => self.timed(cmd.query_async(&mut c)).await?,
        };
        let rtt = sent.elapsed();
        if rtt <= MAX_OFFSET_RTT {
            let ours = t0 + rtt.as_millis() as i64 / 2;
            self.offset_ms.store(secs * 1000 + micros / 1000 - ours, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The deadline of a call that may wait `budget` for its scripts (capped at the Redis timeout).
    pub fn deadline(&self, budget: Option<Duration>) -> Deadline {
        let budget = budget.map_or(self.timeout, |b| b.min(self.timeout));
        Deadline {
            at: tokio::time::Instant::now() + budget,
            redis_ms: wall_ms() + self.offset_ms.load(Ordering::Relaxed) + budget.as_millis() as i64,
        }
    }

    /// Checks and consumes, atomically in Redis, unless Redis runs the script after `deadline`;
    /// with `lease`, also takes the lease's units in the same step. With `charge` the hits are
    /// counted whatever the result, even past the limit (see `scripts`); a charge takes no lease.
    pub async fn check(
        &self,
        c: &Check,
        deadline: Deadline,
        lease: Option<LeaseArgs<'_>>,
        charge: bool,
    ) -> Result<Outcome, StoreError> {
        let script = match c.algorithm {
            Algorithm::FixedWindow => &self.fixed,
            Algorithm::SlidingWindow => &self.sliding,
            Algorithm::TokenBucket => &self.bucket,
        };
        let mut inv = script.prepare_invoke();
        inv.key(&c.key).arg(c.limit).arg(c.hits).arg(c.period_arg()).arg(MARGIN_MS).arg(deadline.redis_ms);
        // Without a lease the call is the same as before leases existed: no second key, no
        // lease arguments.
        if let Some(l) = lease {
            inv.key(lease_key(&c.key, l.id)).arg(l.units).arg(l.validity_ms);
        } else if charge {
            // No lease (0 units), then the charge flag; an ordinary call passes none of these.
            inv.arg(0).arg(0).arg(1);
        }
        let reply: Vec<i64> = match self.conn.clone() {
            Conn::Single(mut conn) => self.timed_until(deadline.at, inv.invoke_async(&mut conn)).await?,
            Conn::Cluster(mut conn) => self.timed_until(deadline.at, inv.invoke_async(&mut conn)).await?,
        };
        let [allowed, remaining, reset, window, granted, valid_until] = reply[..] else {
            return Err(StoreError::Reply(format!("{reply:?}")));
        };
        if allowed < 0 {
            return Err(StoreError::Expired);
        }
        Ok(Outcome {
            allowed: allowed == 1,
            remaining: remaining.max(0) as u64,
            reset_ms: reset.max(0) as u64,
            window,
            granted: granted.max(0) as u64,
            valid_until_ms: valid_until,
        })
    }

    /// Gives back up to `units` of lease `id` on one descriptor (see `scripts::LEASE_RETURN`);
    /// `close` ends the lease. Returns the units given back.
    pub async fn lease_return(
        &self,
        c: &Check,
        id: &str,
        units: u64,
        close: bool,
    ) -> Result<u64, StoreError> {
        let mut inv = self.lease_return.prepare_invoke();
        inv.key(&c.key).key(lease_key(&c.key, id)).arg(c.algorithm.tag()).arg(units).arg(u8::from(close));
        let r: i64 = match self.conn.clone() {
            Conn::Single(mut conn) => self.timed(inv.invoke_async(&mut conn)).await?,
            Conn::Cluster(mut conn) => self.timed(inv.invoke_async(&mut conn)).await?,
        };
        Ok(r.max(0) as u64)
    }

    /// Gives back the hits an allowed check took (best effort).
    pub async fn refund(&self, c: &Check, o: &Outcome) -> Result<(), StoreError> {
        let mut inv = self.refund.prepare_invoke();
        inv.key(&c.key)
            .arg(c.algorithm.tag())
            .arg(c.hits)
            .arg(o.window)
            .arg(c.unit.nominal_ms())
            .arg(c.limit.max(1));
        match self.conn.clone() {
            Conn::Single(mut conn) => self.timed(inv.invoke_async::<i64>(&mut conn)).await?,
            Conn::Cluster(mut conn) => self.timed(inv.invoke_async::<i64>(&mut conn)).await?,
        };
        Ok(())
    }
}

/// A response kept with a completed idempotency record, as the scripts store it: `headers` is
/// `name:value` lines joined by `\n` (names are HTTP tokens and values hold no line break, so
/// the split is exact).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptResponse {
    pub status: u32,
    pub headers: String,
    pub body: Vec<u8>,
}

/// What `Claim` found (see `scripts::IDEM_CLAIM`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed,
    InFlight,
    Mismatch,
    Completed(Option<KeptResponse>),
}

/// An idempotency `Complete`: the record's claim `owner` releases it, or completes it for `ttl_ms`
/// with the response `kept`, if any.
#[derive(Clone, Copy, Debug)]
pub enum Completion<'a> {
    Release,
    Complete { ttl_ms: u64, kept: Option<&'a KeptResponse> },
}

impl Store {
    /// Claims idempotency record `key` for `owner` unless it exists (see `scripts::IDEM_CLAIM`);
    /// changes nothing if Redis runs the script after `deadline`.
    pub async fn idem_claim(
        &self,
        key: &str,
        request: &str,
        owner: &str,
        in_flight_ms: u64,
        deadline: Deadline,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut inv = self.idem_claim.prepare_invoke();
        inv.key(key).arg(request).arg(owner).arg(in_flight_ms).arg(deadline.redis_ms);
        let reply: (i64, i64, i64, Vec<u8>, Vec<u8>) = match self.conn.clone() {
            Conn::Single(mut conn) => self.timed_until(deadline.at, inv.invoke_async(&mut conn)).await?,
            Conn::Cluster(mut conn) => self.timed_until(deadline.at, inv.invoke_async(&mut conn)).await?,
        };
        let (outcome, kept, status, headers, body) = reply;
        Ok(match outcome {
            1 => ClaimOutcome::Claimed,
            2 => ClaimOutcome::InFlight,
            3 => ClaimOutcome::Mismatch,
            4 if kept == 1 => {
                let status =
                    u32::try_from(status).map_err(|_| StoreError::Reply(format!("status {status}")))?;
                let headers =
                    String::from_utf8(headers).map_err(|_| StoreError::Reply("headers not UTF-8".into()))?;
                ClaimOutcome::Completed(Some(KeptResponse { status, headers, body }))
            }
            4 => ClaimOutcome::Completed(None),
            -1 => return Err(StoreError::Expired),
            -2 => return Err(StoreError::Reply(format!("{key} is not an idempotency record"))),
            n => return Err(StoreError::Reply(format!("claim outcome {n}"))),
        })
    }

    /// Releases or completes idempotency record `key` if it is in flight and `owner`'s claim (see
    /// `scripts::IDEM_COMPLETE`). Returns whether it did.
    pub async fn idem_complete(
        &self,
        key: &str,
        owner: &str,
        what: Completion<'_>,
    ) -> Result<bool, StoreError> {
        let mut inv = self.idem_complete.prepare_invoke();
        inv.key(key).arg(owner);
        match what {
            Completion::Release => inv.arg(1).arg(0).arg(0),
            Completion::Complete { ttl_ms, kept: None } => inv.arg(0).arg(ttl_ms).arg(0),
            Completion::Complete { ttl_ms, kept: Some(k) } => {
                inv.arg(0).arg(ttl_ms).arg(1).arg(k.status).arg(&k.headers).arg(&k.body[..])
            }
        };
        let done: i64 = match self.conn.clone() {
            Conn::Single(mut conn) => self.timed(inv.invoke_async(&mut conn)).await?,
            Conn::Cluster(mut conn) => self.timed(inv.invoke_async(&mut conn)).await?,
        };
        Ok(done == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(redact("redis://user:secret@host:6379/0"), "redis://user:***@host:6379/0");
        assert_eq!(redact("rediss://:secret@h"), "rediss://:***@h");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
