//! The limiter: one request's life in the filter, in four moments the wasm glue calls in order.
//!
//! - **decide** (request headers): the status endpoint, then every local rule ([`local`]: check
//!   all, then consume from all or none), then one call to the rate limit service for the global
//!   rules, whose answer comes back through **answered**;
//! - **settle** (response headers, then body): the limit headers of a request that passed, a
//!   usage cost charged, and the response kept for its idempotency key ([`idempotent`]);
//! - **end** (the stream is over, however it ended: completed, reset, answered locally);
//! - **tick** (every worker, every 100 ms): background work.
//!
//! What a request carries from one moment to the next is its [`Exchange`], owned by the HTTP
//! context; every moment runs in an [`Env`]: the store, the request, the clock and the observer.

mod background;
mod holdings;
mod idempotent;
mod leased;
mod lifecycle;
mod local;
mod metering;
mod queue;
mod standings;

use std::cell::Cell;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard, PoisonError};

pub use background::Background;
pub use idempotent::BodyWanted;
pub use leased::Refresh;
pub use lifecycle::{Ask, Exchange, Next, ResponseHeaders};
pub use local::{Consumed, Turn, Verdict};

use crate::config::TableShare;
use crate::config::{Config, Delay};
use crate::global::protocol::call_target;
use crate::report::Observer;
use crate::request::Request;
use crate::state::clock::Clock;
use crate::state::store::SharedStore;
use crate::state::table::Table;
use holdings::Holdings;
use queue::Queue;

/// What every moment of a request works with.
pub struct Env<'a> {
    pub store: &'a dyn SharedStore,
    pub request: &'a dyn Request,
    pub observer: &'a dyn Observer,
    clock: Option<&'a dyn Clock>,
    now: Cell<Option<u64>>,
}

impl<'a> Env<'a> {
    /// The clock is read once, when a moment first needs the time (a response that only gets its
    /// headers never reads it).
    pub fn new(
        store: &'a dyn SharedStore,
        request: &'a dyn Request,
        clock: &'a dyn Clock,
        observer: &'a dyn Observer,
    ) -> Env<'a> {
        Env { store, request, observer, clock: Some(clock), now: Cell::new(None) }
    }

    /// At a given instant.
    pub fn at(
        store: &'a dyn SharedStore,
        request: &'a dyn Request,
        now: u64,
        observer: &'a dyn Observer,
    ) -> Env<'a> {
        Env { store, request, observer, clock: None, now: Cell::new(Some(now)) }
    }

    /// Nanoseconds since the epoch, the same for the whole moment.
    pub fn now(&self) -> u64 {
        if let Some(now) = self.now.get() {
            return now;
        }
        let now = self.clock.map_or(0, |c| c.now_nanos());
        self.now.set(Some(now));
        now
    }
}

/// A configured limiter, shared by every request of a worker. Its one mutable part is what the
/// worker's requests hold of concurrency limits (behind a lock that a worker, which runs one
/// callback at a time, never waits on; it lets tests share a limiter between threads).
pub struct Limiter {
    config: Config,
    seed: u64,
    holdings: Mutex<Holdings>,
    /// Requests of this worker held for their turn.
    queue: Mutex<Queue>,
    /// Idempotency keys claimed so far, to make each claim's owner token unique.
    claims: AtomicU64,
    /// Calls this worker's requests asked for that no request waits for, for the glue to start.
    background: Mutex<Vec<Background>>,
    /// Where calls to the rate limit service go, as the host takes it.
    call_target: Vec<u8>,
}

impl Limiter {
    pub fn new(config: Config, seed: u64) -> Limiter {
        let call_target = config
            .global
            .as_ref()
            .map(|g| call_target(&g.cluster, g.authority.as_deref()))
            .unwrap_or_default();
        Limiter {
            call_target,
            config,
            seed,
            holdings: Mutex::new(Holdings::default()),
            queue: Mutex::new(Queue::default()),
            claims: AtomicU64::new(0),
            background: Mutex::new(Vec::new()),
        }
    }

    /// Concurrency units this worker's requests hold, in all.
    pub fn units_held(&self) -> u64 {
        self.holdings().units()
    }

    /// A panic cannot happen while the lock is held (no code there panics); were it poisoned, the
    /// holdings are still whole.
    fn holdings(&self) -> MutexGuard<'_, Holdings> {
        self.holdings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn background(&self) -> MutexGuard<'_, Vec<Background>> {
        self.background.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests of this worker held for their turn (the glue ticks faster while there are some).
    pub fn waiting(&self) -> usize {
        self.queue().len()
    }

    /// Whether one more request of the bucket `key` may wait for its turn in this worker.
    fn may_queue(&self, key: u64, delay: &Delay) -> bool {
        self.queue().waiting_for(key) < delay.max_queued
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where calls to the rate limit service go, as the host takes it.
    pub fn call_target(&self) -> &[u8] {
        &self.call_target
    }

    /// The slots of one rule's (or the status endpoint's) share of the table.
    pub fn table(&self, share: TableShare) -> Table<'_> {
        Table::new(&self.config.key_prefix, share)
    }
}

#[cfg(test)]
mod tests;
