//! Costs charged from the response: a request was admitted on an estimate; when its response
//! arrives, the usage the response states replaces the estimate in the limit's state, and the
//! headers describe the limit after that charge.

use super::local::Consumed;
use super::{Env, Limiter};
use crate::algorithm::State;
use crate::config::Cost;
use crate::report::metrics::Metric;
use crate::report::{most_restrictive, Reported};
use crate::request::Response;
use crate::state::store::StoreError;

/// The usage a response states in `header`: a whole number, at most `max`; `None` when the header
/// is missing or not a number (then the estimate stands).
pub(super) fn usage(response: &dyn Response, header: &str, max: u64) -> Option<u64> {
    let value = response.header(header)?;
    let text = std::str::from_utf8(&value).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // A number too long to parse is over any maximum.
    Some(text.parse::<u64>().map_or(max, |n| n.min(max)))
}

impl Limiter {
    /// Charges each metered limit the usage its response states (in place of the estimate taken
    /// at admission); `report`, the limit the headers describe, becomes the most restrictive of it
    /// and the limits after their charge. A usage equal to the estimate writes nothing. A store
    /// error leaves the estimate charged (counted in `store_errors`).
    pub(super) fn charge_usage(
        &self,
        env: &Env<'_>,
        metered: &[Consumed],
        response: &dyn Response,
        mut report: Option<Reported>,
    ) -> Option<Reported> {
        for c in metered {
            let Some(rule) = self.config.rules.get(c.at.rule) else { continue };
            let Cost::Response { name, estimate, max } = &rule.cost else { continue };
            let used = usage(response, name, *max).unwrap_or(*estimate);
            if used == *estimate {
                continue;
            }
            match self.correct(env, c, *estimate, used) {
                Ok(Some(after)) => {
                    if used > *estimate {
                        env.observer.add(Metric::Charged(c.at.rule), used - estimate);
                    }
                    // This limit describes itself after the charge.
                    report = report.filter(|r| r.limit != c.at);
                    report = most_restrictive(report, self.reported(env, c, after));
                }
                Ok(None) => env.observer.count(Metric::CasRetriesExhausted),
                Err(_) => env.observer.count(Metric::StoreError),
            }
        }
        report
    }

    /// Replaces `estimate` with `used` in the limit's state; the state after, or `None` when other
    /// workers kept winning the CAS race.
    fn correct(
        &self,
        env: &Env<'_>,
        c: &Consumed,
        estimate: u64,
        used: u64,
    ) -> Result<Option<State>, StoreError> {
        let now = env.now();
        let mut after = None;
        let stored = self.table(c.share).update_at(env.store, c.fp, c.index, |state| {
            let next = if used >= estimate {
                c.algorithm.charge(state, now, used - estimate)
            } else {
                c.algorithm.give_back(state, now, estimate - used, c.held_in)
            };
            after = Some(next);
            next
        })?;
        // The key left its slot (its state had gone back to fresh): nothing to correct.
        Ok(if stored { Some(after.unwrap_or_default()) } else { None })
    }

    fn reported(&self, env: &Env<'_>, c: &Consumed, after: State) -> Option<Reported> {
        let limit = self.config.find(c.at)?.limit?;
        let now = env.now();
        let d = limit.algorithm.status(after, now);
        Some(Reported {
            limit: c.at,
            quota: limit.quota,
            window_seconds: limit.window_seconds_at(now),
            remaining: d.remaining,
            reset_seconds: d.reset_seconds(),
            from_service: false,
        })
    }
}
