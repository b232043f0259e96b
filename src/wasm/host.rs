//! The only module that talks to the host. Every proxy-wasm ABI call is declared here and every
//! status is turned into a value: the SDK's own wrappers panic on statuses they do not expect,
//! and a panic traps the VM, after which Envoy fails every request.

use std::ptr::{null, null_mut};

use crate::request::{Request, Response};
use crate::state::clock::Clock;
use crate::state::store::{SharedStore, StoreError, Versioned};

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

const MAP_REQUEST_HEADERS: u32 = 0;
const MAP_RESPONSE_HEADERS: u32 = 2;
const MAP_RESPONSE_TRAILERS: u32 = 3;
const BUFFER_HTTP_RESPONSE_BODY: u32 = 1;
const BUFFER_GRPC_RECEIVE: u32 = 5;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
const STREAM_HTTP_REQUEST: u32 = 0;
const METRIC_COUNTER: u32 = 0;

#[derive(Clone, Copy)]
#[repr(u32)]
pub enum LogLevel {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_get_status(
        return_status_code: *mut u32,
        return_status_message_data: *mut *mut u8,
        return_status_message_size: *mut usize,
    ) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
}

/// Takes ownership of a buffer the host allocated through our `proxy_on_memory_allocate` (a boxed
/// slice of exactly `size` bytes).
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host filled `size` bytes it obtained from our allocator, and gave them to us.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: pointer and length describe a live string.
    unsafe {
        proxy_log(level as u32, message.as_ptr(), message.len());
    }
}

/// Wall-clock nanoseconds; 0 if the host cannot tell (every bucket then looks full and stays so).
pub fn now_nanos() -> u64 {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64 to a valid location.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    if status == OK {
        nanos
    } else {
        0
    }
}

fn buffer(kind: u32, size: usize) -> Vec<u8> {
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: out-pointers are valid; the buffer returned is ours.
    let status = unsafe { proxy_get_buffer_bytes(kind, 0, size, &mut data, &mut len) };
    if status == OK {
        owned(data, len)
    } else {
        Vec::new()
    }
}

pub fn plugin_configuration(size: usize) -> Vec<u8> {
    buffer(BUFFER_PLUGIN_CONFIGURATION, size)
}

/// The piece of the response body the current callback is about.
pub fn response_body(size: usize) -> Vec<u8> {
    buffer(BUFFER_HTTP_RESPONSE_BODY, size)
}

pub fn grpc_response_body(size: usize) -> Vec<u8> {
    buffer(BUFFER_GRPC_RECEIVE, size)
}

/// The message of the gRPC status a call just closed with (Envoy says there why a connection
/// failed), at most 300 bytes; empty when there is none.
pub fn grpc_status_message() -> String {
    let (mut code, mut data, mut len) = (0u32, null_mut(), 0usize);
    // SAFETY: the host writes one u32 and hands over a buffer that becomes ours.
    let status = unsafe { proxy_get_status(&mut code, &mut data, &mut len) };
    if status != OK || data.is_null() {
        return String::new();
    }
    let bytes = owned(data, len);
    let text = String::from_utf8_lossy(&bytes);
    text.chars().take(300).collect()
}

/// Starts a unary gRPC call on an Envoy cluster; the token identifies its answer.
pub fn grpc_call(
    target: &[u8],
    service: &str,
    method: &str,
    message: &[u8],
    timeout_ms: u32,
    metadata: &[(&str, &str)],
) -> Result<u32, u32> {
    let metadata = serialize_map(metadata);
    let mut token = 0u32;
    // SAFETY: every pointer/length pair describes a live buffer; the host writes one u32.
    let status = unsafe {
        proxy_grpc_call(
            target.as_ptr(),
            target.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    };
    if status == OK {
        Ok(token)
    } else {
        Err(status)
    }
}

/// proxy-wasm's header map encoding: the pair count, each pair's two lengths, then each name and
/// value followed by a NUL.
fn serialize_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        for text in [name, value] {
            out.extend_from_slice(text.as_bytes());
            out.push(0);
        }
    }
    out
}

pub fn set_tick_period_ms(period: u32) {
    // SAFETY: plain value.
    unsafe {
        proxy_set_tick_period_milliseconds(period);
    }
}

/// Lets a paused request go on.
pub fn resume_request() -> bool {
    // SAFETY: plain value.
    unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) == OK }
}

/// Makes `context_id` the context later host calls act on (needed in gRPC callbacks).
pub fn set_effective_context(context_id: u32) -> bool {
    // SAFETY: plain value.
    unsafe { proxy_set_effective_context(context_id) == OK }
}

fn map_value(map: u32, name: &str) -> Option<Vec<u8>> {
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: key pointer/length are valid; the value returned is ours.
    let status = unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut len) };
    (status == OK).then(|| owned(data, len))
}

pub fn set_response_header(name: &str, value: &str) -> bool {
    // SAFETY: pointers and lengths describe live strings.
    let status = unsafe {
        proxy_replace_header_map_value(
            MAP_RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    status == OK
}

/// Adds a header to `map` (request or response headers), keeping those of the same name.
fn add_header(map: u32, name: &str, value: &str) -> bool {
    // SAFETY: pointers and lengths describe live strings.
    let status =
        unsafe { proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
    status == OK
}

pub fn add_response_header(name: &str, value: &str) -> bool {
    add_header(MAP_RESPONSE_HEADERS, name, value)
}

pub fn add_request_header(name: &str, value: &str) -> bool {
    add_header(MAP_REQUEST_HEADERS, name, value)
}

/// `path` is the property path with its segments separated by NUL bytes.
fn property(path: &[u8]) -> Option<Vec<u8>> {
    let (mut data, mut len) = (null_mut(), 0usize);
    // SAFETY: path pointer/length are valid; the value returned is ours.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut len) };
    (status == OK && !data.is_null()).then(|| owned(data, len))
}

/// Serialises headers as the ABI wants them: count, then (name length, value length) pairs, then
/// each name and value followed by a NUL.
fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + headers.iter().map(|(n, v)| 10 + n.len() + v.len()).sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (name, value) in headers {
        bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in headers {
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
    }
    bytes
}

/// Answers the request from the filter; returns the host status on failure. `grpc_status` is
/// what a gRPC request gets in `grpc-status` (Envoy ignores it for other requests).
pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
    grpc_status: Option<u32>,
) -> Result<(), u32> {
    let details = "ratelimit_wasm_denied";
    let headers = serialize_headers(headers);
    // SAFETY: every pointer/length pair describes a live buffer.
    let result = unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            if body.is_empty() { null() } else { body.as_ptr() },
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status.and_then(|s| i32::try_from(s).ok()).unwrap_or(-1),
        )
    };
    if result == OK {
        Ok(())
    } else {
        Err(result)
    }
}

pub fn define_counter(name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: name pointer/length are valid; the host writes one u32.
    let status = unsafe { proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

pub fn increment(id: u32, by: i64) {
    // SAFETY: plain values.
    unsafe {
        proxy_increment_metric(id, by);
    }
}

/// The host's wall clock.
pub struct HostClock;

impl Clock for HostClock {
    fn now_nanos(&self) -> u64 {
        now_nanos()
    }
}

/// Envoy's shared data for this VM id.
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let (mut data, mut len, mut cas) = (null_mut(), 0usize, 0u32);
        // SAFETY: key pointer/length are valid; out-pointers are valid; the value is ours.
        let status = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut len, &mut cas) };
        match status {
            OK => Ok(Some(Versioned { value: owned(data, len), cas })),
            NOT_FOUND => Ok(None),
            other => Err(StoreError::Host(other)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        // SAFETY: pointers and lengths describe live buffers.
        let status =
            unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
        match status {
            OK => Ok(()),
            CAS_MISMATCH => Err(StoreError::CasMismatch),
            other => Err(StoreError::Host(other)),
        }
    }
}

/// The request being processed by the current HTTP context.
/// The response headers of the current stream, for a cost charged from the response.
pub struct HostResponse;

impl Response for HostResponse {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        map_value(MAP_RESPONSE_HEADERS, name)
    }
}

/// The response's trailers, read as a response's headers are.
pub struct HostTrailers;

impl Response for HostTrailers {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        map_value(MAP_RESPONSE_TRAILERS, name)
    }
}

pub struct HostRequest;

impl Request for HostRequest {
    fn header(&self, name: &str) -> Option<Vec<u8>> {
        map_value(MAP_REQUEST_HEADERS, name)
    }

    fn source_address(&self) -> Option<Vec<u8>> {
        property(b"source\0address")
    }
}
