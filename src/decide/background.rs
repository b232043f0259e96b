//! Calls to the rate limit service that no request waits for, started by the glue from its root
//! context (their answers come back there, whatever became of the request that asked): lease
//! refreshes, and usage charged to a global rule after its response.

use super::leased::Refresh;
use super::{Env, Limiter};
use crate::config::Cost;
use crate::global::answer::{read_answer, CallError};
use crate::global::descriptors::Charge;
use crate::global::protocol as rls;
use crate::global::GlobalCall;
use crate::idempotency::protocol as keys;
use crate::report::metrics::Metric;
use crate::report::Observer;
use crate::state::store::SharedStore;

/// gRPC metadata that makes the service count a call's hits even past the limit: the usage has
/// happened (the service's "charge" mode).
pub const CHARGE_HEADER: &str = "x-ratelimit-wasm-charge";

#[derive(Debug, PartialEq, Eq)]
pub enum Background {
    /// A lease running low.
    Refresh(Refresh),
    /// Usage a response stated beyond the estimate, charged to global rule `rule`.
    Usage { rule: usize, call: GlobalCall },
    /// An idempotency key kept by the service, completed or released (`Keys/Complete`).
    KeyComplete { entry: usize, message: Vec<u8> },
}

impl Background {
    pub fn message(&self) -> &[u8] {
        match self {
            Background::Refresh(r) => &r.call.message,
            Background::Usage { call, .. } => &call.message,
            Background::KeyComplete { message, .. } => message,
        }
    }

    /// The gRPC service and method it calls.
    pub fn method(&self) -> (&'static str, &'static str) {
        match self {
            Background::Refresh(_) | Background::Usage { .. } => (rls::SERVICE, rls::METHOD),
            Background::KeyComplete { .. } => (keys::SERVICE, keys::COMPLETE),
        }
    }
}

impl Limiter {
    /// The calls requests asked for since the last time, for the glue to start.
    pub fn take_background(&self) -> Vec<Background> {
        std::mem::take(&mut *self.background())
    }

    pub fn has_background(&self) -> bool {
        !self.background().is_empty()
    }

    /// The gRPC metadata a background call carries.
    pub fn background_metadata(&self, call: &Background) -> Vec<(&'static str, String)> {
        match call {
            Background::Refresh(r) => self.lease_metadata(&r.ask),
            Background::Usage { .. } => vec![(CHARGE_HEADER, "1".to_owned())],
            Background::KeyComplete { .. } => Vec::new(),
        }
    }

    /// A background call was answered, or failed.
    pub fn background_answered(
        &self,
        store: &dyn SharedStore,
        now: u64,
        call: &Background,
        answer: Result<&[u8], CallError>,
        observer: &dyn Observer,
    ) {
        match call {
            Background::Refresh(refresh) => self.refreshed(store, now, refresh, answer, observer),
            Background::Usage { .. } => {
                // The usage is counted by the service whatever its answer; only a failed call
                // leaves it uncounted.
                if let Err(e) = answer.and_then(read_answer) {
                    observer.count(Metric::GlobalFailure);
                    observer.global_failure(&format!("usage charge not counted: {e}"));
                }
            }
            Background::KeyComplete { entry, .. } => {
                // The claim then lapses after its in_flight_timeout.
                if let Err(e) = answer {
                    observer.count(Metric::KeyStoreError(*entry));
                    observer.global_failure(&format!("idempotency key not completed: {e}"));
                }
            }
        }
    }

    /// Response headers: the usage a response states beyond the estimate of each global rule that
    /// admitted the request with a cost from the response, charged by a background call. The
    /// units charged by rule.
    pub(super) fn charge_global_usage(
        &self,
        env: &Env<'_>,
        pending: &[(usize, Charge)],
        response: &dyn crate::request::Response,
    ) -> Vec<(usize, u64)> {
        let mut charged = Vec::new();
        for (index, charge) in pending {
            let Some(rule) = self.config.rules.get(*index) else { continue };
            let Cost::Response { name, estimate, max } = &rule.cost else { continue };
            let used = super::metering::usage(response, name, *max).unwrap_or(*estimate);
            let Some(extra) = used.checked_sub(*estimate).filter(|e| *e > 0) else { continue };
            env.observer.add(Metric::Charged(*index), extra);
            self.background().push(Background::Usage { rule: *index, call: charge.call(extra) });
            charged.push((*index, extra));
        }
        charged
    }
}
