//! The proxy-wasm ABI (0.2.1) exports: Envoy calls these, and they route each call to the root
//! context (configuration) or the HTTP context (one request) it is for.
//!
//! The filter implements the ABI itself instead of using the proxy-wasm SDK's dispatcher: that
//! dispatcher unwraps host results and panics on statuses it does not expect, and a panic traps the
//! VM, after which Envoy fails every request. Here no callback can panic: a context that is not
//! found is a no-op, and the context table is never borrowed across a callback, so a callback that
//! re-enters (a local reply sent from a request callback) finds no borrow in the way.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::global::answer::{answer_size, CallError};
use crate::wasm::host::{self, LogLevel};
use crate::wasm::http::Filter;
use crate::wasm::root::Root;

const ACTION_CONTINUE: u32 = 0;

#[derive(Default)]
struct Contexts {
    roots: HashMap<u32, Root>,
    filters: HashMap<u32, Filter>,
    /// gRPC call token -> the HTTP context that made the call.
    calls: HashMap<u32, u32>,
}

thread_local! {
    static CONTEXTS: RefCell<Contexts> = RefCell::new(Contexts::default());
}

fn with_contexts<R>(f: impl FnOnce(&mut Contexts) -> R) -> Option<R> {
    CONTEXTS.with(|c| c.try_borrow_mut().ok().map(|mut c| f(&mut c)))
}

/// Runs `f` on the HTTP context `id`, taken out of the table for the call.
fn with_filter<R>(id: u32, default: R, f: impl FnOnce(&mut Filter) -> R) -> R {
    let Some(mut filter) = with_contexts(|c| c.filters.remove(&id)).flatten() else { return default };
    let result = f(&mut filter);
    if let Some(token) = filter.take_new_call() {
        with_contexts(|c| c.calls.insert(token, id));
    }
    with_contexts(|c| c.filters.insert(id, filter));
    result
}

fn with_root<R>(id: u32, default: R, f: impl FnOnce(&mut Root) -> R) -> R {
    let Some(mut root) = with_contexts(|c| c.roots.remove(&id)).flatten() else { return default };
    let result = f(&mut root);
    with_contexts(|c| c.roots.insert(id, root));
    result
}

#[no_mangle]
pub extern "C" fn _initialize() {
    std::panic::set_hook(Box::new(|info| {
        host::log(LogLevel::Error, &format!("ratelimit-wasm: panic: {info}"));
    }));
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host asks for memory it then fills and hands over (see `host::owned`).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let buffer = vec![0u8; size].into_boxed_slice();
    Box::into_raw(buffer).cast::<u8>()
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    if parent_context_id == 0 {
        with_contexts(|c| c.roots.insert(context_id, Root::new(context_id)));
    } else {
        let filter = with_root(parent_context_id, None, |root| Some(root.new_filter(context_id)));
        with_contexts(|c| c.filters.insert(context_id, filter.unwrap_or_else(Filter::inert)));
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _vm_configuration_size: usize) -> bool {
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, plugin_configuration_size: usize) -> bool {
    with_root(context_id, false, |root| root.configure(plugin_configuration_size))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    with_root(context_id, (), Root::on_tick);
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: bool,
) -> u32 {
    with_filter(context_id, ACTION_CONTINUE, Filter::on_request_headers)
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    end_of_stream: bool,
) -> u32 {
    with_filter(context_id, ACTION_CONTINUE, |f| f.on_response_headers(end_of_stream))
}

/// Exported for idempotency keys, to keep a response for replay; a request that holds no key
/// returns at once without a host call. Trailers, below, end a response whose body did not, and
/// may state a usage to charge.
#[no_mangle]
pub extern "C" fn proxy_on_response_body(context_id: u32, body_size: usize, end_of_stream: bool) -> u32 {
    with_filter(context_id, ACTION_CONTINUE, |f| f.on_response_body(body_size, end_of_stream))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(context_id: u32, _num_trailers: usize) -> u32 {
    with_filter(context_id, ACTION_CONTINUE, Filter::on_response_trailers)
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(context_id: u32, token_id: u32, response_size: usize) {
    let answer = answer_size(response_size).map(host::grpc_response_body);
    let Some(owner) = with_contexts(|c| c.calls.remove(&token_id)).flatten() else {
        // A root context's call: a lease refresh or a usage charge.
        with_root(context_id, false, |root| root.on_background_answer(token_id, answer));
        return;
    };
    with_filter(owner, (), |f| f.on_global_answer(owner, answer));
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(context_id: u32, token_id: u32, status_code: u32) {
    // A unary call that already delivered its message is not in `calls` (or the root's) any more.
    let error = CallError::Status { code: status_code, message: host::grpc_status_message() };
    let Some(owner) = with_contexts(|c| c.calls.remove(&token_id)).flatten() else {
        with_root(context_id, false, |root| root.on_background_answer(token_id, Err(error)));
        return;
    };
    with_filter(owner, (), |f| f.on_global_answer(owner, Err(error)));
}

// No `proxy_on_done`, `proxy_on_log` or gRPC metadata callbacks: Envoy skips a callback the
// module does not export, and each of the first two would be one more entry into the VM for
// every request, to do nothing. The request's end runs from `proxy_on_delete`. The bench builds a
// variant with the two (feature `done-log-exports`) to measure what they would cost.

#[cfg(feature = "done-log-exports")]
#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> bool {
    true
}

#[cfg(feature = "done-log-exports")]
#[no_mangle]
pub extern "C" fn proxy_on_log(_context_id: u32) {}

/// Envoy deletes an HTTP context when its stream is over, however it ended (completed, reset by
/// either side, answered locally): the request's last moment.
#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    let filter = with_contexts(|c| {
        c.roots.remove(&context_id);
        c.calls.retain(|_, owner| *owner != context_id);
        c.filters.remove(&context_id)
    });
    if let Some(mut filter) = filter.flatten() {
        filter.on_end();
    }
}
