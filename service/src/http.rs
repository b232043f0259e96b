//! HTTP/1.1 server for `/healthz` and `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::metrics::Metrics;
use crate::store::Store;

async fn handle(
    req: Request<Incoming>,
    store: Store,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, ctype, body) = match req.uri().path() {
        "/healthz" => match store.ping().await {
            Ok(()) => (StatusCode::OK, "text/plain", "ok: redis answers\n".to_string()),
            Err(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("unavailable: redis does not answer: {e}\n"),
            ),
        },
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics.render()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// What one client may hold of the HTTP port.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// A connection that has not sent a whole request head within this time is closed.
    pub header_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

pub async fn serve(
    listener: TcpListener,
    store: Store,
    metrics: Arc<Metrics>,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // Take a slot before accepting, so a client over the cap is not even read from.
        let slot = tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            s = slots.clone().acquire_owned() => s,
        };
        let Ok(slot) = slot else { return };
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else { continue };
        let store = store.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(req, store.clone(), metrics.clone()));
            // hyper's header timeout only runs with a timer; without one a half-sent request is
            // held forever.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(slot);
        });
    }
}
