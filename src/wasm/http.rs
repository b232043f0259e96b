//! The HTTP context: one request. Each callback runs the core's moment for it and carries out
//! what the moment returns (go on, reply, or call the rate limit service).

use std::rc::Rc;

use crate::decide::{BodyWanted, Env, Exchange, Next};
use crate::global::answer::CallError;
use crate::report::reply::LocalReply;
use crate::request::HeadersGone;
use crate::wasm::host::{self, HostClock, HostRequest, HostResponse, HostStore, HostTrailers, LogLevel};
use crate::wasm::root::{Shared, WAITING_TICK_MS};

const ACTION_CONTINUE: u32 = 0;
const ACTION_PAUSE: u32 = 1;

pub struct Filter {
    /// `None` when the plugin is not configured: the filter then lets everything through.
    shared: Option<Rc<Shared>>,
    /// This HTTP context's id.
    id: u32,
    exchange: Exchange,
    /// A gRPC call started by the last callback, for the ABI layer to route its answer here.
    new_call: Option<u32>,
}

/// Runs `moment` in this request's environment on the host.
fn in_env<R>(shared: &Shared, moment: impl FnOnce(&Env<'_>) -> R) -> R {
    moment(&Env::new(&HostStore, &HostRequest, &HostClock, &shared.events))
}

/// As [`in_env`], for the moments after the request's headers went on, which Envoy no longer lets
/// a filter read.
fn after_request<R>(shared: &Shared, moment: impl FnOnce(&Env<'_>) -> R) -> R {
    moment(&Env::new(&HostStore, &HeadersGone, &HostClock, &shared.events))
}

impl Filter {
    pub fn new(shared: Option<Rc<Shared>>, context_id: u32) -> Filter {
        Filter { shared, id: context_id, exchange: Exchange::for_request(context_id), new_call: None }
    }

    pub fn inert() -> Filter {
        Filter::new(None, 0)
    }

    pub fn take_new_call(&mut self) -> Option<u32> {
        self.new_call.take()
    }

    pub fn on_request_headers(&mut self) -> u32 {
        let Some(shared) = self.shared.clone() else { return ACTION_CONTINUE };
        let action = in_env(&shared, |env| {
            let next = shared.limiter.decide(env, &mut self.exchange);
            self.carry_out(&shared, env, next)
        });
        shared.start_background(host::now_nanos(), Some(self.id));
        action
    }

    /// The service answered (`Ok(body)`) or the call failed. The request is paused: whatever
    /// happens, it must end here, answered or resumed.
    pub fn on_global_answer(&mut self, context_id: u32, answer: Result<Vec<u8>, CallError>) {
        let Some(shared) = self.shared.clone() else { return };
        if !self.exchange.is_awaiting() {
            return;
        }
        host::set_effective_context(context_id);
        in_env(&shared, |env| {
            match shared.limiter.answered(env, &mut self.exchange, answer.as_deref().map_err(Clone::clone)) {
                Next::Reply(reply) => end_with(&reply),
                // Still paused: the tick resumes it at its turn.
                Next::Delay { .. } => shared.tick_every(WAITING_TICK_MS),
                Next::Continue | Next::Ask(_) => {
                    for (name, value) in self.exchange.take_upstream_headers() {
                        host::add_request_header(&name, &value);
                    }
                    resume();
                }
            }
        });
    }

    pub fn on_response_headers(&mut self, end_of_stream: bool) -> u32 {
        let Some(shared) = self.shared.clone() else { return ACTION_CONTINUE };
        shared.limiter.keep_response(&mut self.exchange, &HostResponse, end_of_stream);
        let headers =
            after_request(&shared, |env| shared.limiter.settle(env, &mut self.exchange, &HostResponse));
        shared.start_background(host::now_nanos(), Some(self.id));
        for (name, value) in headers.limit {
            host::set_response_header(name, &value);
        }
        // The service's replace the upstream's of the same name, and may repeat a name.
        for (i, (name, value)) in headers.service.iter().enumerate() {
            let again = headers.service[..i].iter().any(|(n, _)| n == name);
            if again {
                host::add_response_header(name, value);
            } else {
                host::set_response_header(name, value);
            }
        }
        ACTION_CONTINUE
    }

    /// A piece of the response body goes by: read only when it is kept for an idempotency key.
    pub fn on_response_body(&mut self, size: usize, end_of_stream: bool) -> u32 {
        let Some(shared) = self.shared.as_ref() else { return ACTION_CONTINUE };
        let chunk = match shared.limiter.wants_response_body(&self.exchange) {
            BodyWanted::Nothing => return ACTION_CONTINUE,
            BodyWanted::Bytes if size > 0 => host::response_body(size),
            BodyWanted::Bytes | BodyWanted::EndOnly => Vec::new(),
        };
        shared.limiter.response_body(&mut self.exchange, &chunk, end_of_stream);
        ACTION_CONTINUE
    }

    /// The response's trailers: the usage they may state, and the response's end.
    pub fn on_response_trailers(&mut self) -> u32 {
        let Some(shared) = self.shared.clone() else { return ACTION_CONTINUE };
        after_request(&shared, |env| shared.limiter.trailers(env, &mut self.exchange, &HostTrailers));
        shared.start_background(host::now_nanos(), Some(self.id));
        self.on_response_body(0, true)
    }

    /// The stream is over (Envoy deletes the context however the stream ended).
    pub fn on_end(&mut self) {
        let Some(shared) = self.shared.clone() else { return };
        after_request(&shared, |env| shared.limiter.end(env, &mut self.exchange));
        // The context is going: its idempotency key's completion is a call of the root's.
        shared.start_background(host::now_nanos(), None);
    }

    fn carry_out(&mut self, shared: &Shared, env: &Env<'_>, next: Next<'_>) -> u32 {
        let ask = match next {
            Next::Continue => return ACTION_CONTINUE,
            Next::Reply(reply) => return respond(&reply),
            Next::Delay { .. } => {
                shared.tick_every(WAITING_TICK_MS);
                return ACTION_PAUSE;
            }
            Next::Ask(ask) => ask,
        };
        let metadata: Vec<(&str, &str)> = ask.metadata.iter().map(|(n, v)| (*n, v.as_str())).collect();
        match host::grpc_call(ask.target, ask.service, ask.method, &ask.message, ask.timeout_ms, &metadata) {
            Ok(token) => {
                self.new_call = Some(token);
                ACTION_PAUSE
            }
            Err(host_status) => {
                let error = CallError::CannotCall { cluster: ask.cluster.to_owned(), host_status };
                let next = shared.limiter.answered(env, &mut self.exchange, Err(error));
                self.carry_out(shared, env, next)
            }
        }
    }
}

/// Answers a paused request with `reply`. If the host refuses it, a bare reply with the same status
/// is tried, then the request is let go: a paused request must end, even if not as decided.
fn end_with(reply: &LocalReply<'_>) {
    if respond(reply) == ACTION_PAUSE
        || host::send_local_response(reply.status, &[], &[], reply.grpc_status).is_ok()
    {
        return;
    }
    host::log(LogLevel::Error, "ratelimit-wasm: could not answer a paused request; resuming it so it ends");
    resume();
}

fn resume() {
    if !host::resume_request() {
        host::log(LogLevel::Error, "ratelimit-wasm: could not resume a paused request");
    }
}

fn respond(reply: &LocalReply<'_>) -> u32 {
    let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(n, v)| (n.as_ref(), v.as_ref())).collect();
    match host::send_local_response(reply.status, &headers, &reply.body, reply.grpc_status) {
        Ok(()) => ACTION_PAUSE,
        Err(code) => {
            host::log(
                LogLevel::Warn,
                &format!("ratelimit-wasm: could not send a local response (status {code})"),
            );
            ACTION_CONTINUE
        }
    }
}
