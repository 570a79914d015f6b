//! The agent's local HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (liveness),
//! `/readyz` (readiness, with the failing checks named), `/status` (the JSON document that
//! `edgeship status` renders).
//!
//! Served by hyper (HTTP/1.1 only, header read timeout, a bounded number of connections) on
//! the address in `[admin] listen`, loopback by default: it has no authentication. Handlers
//! only read live figures; this module must never block the pipeline or change its state.

mod collect;
pub(crate) mod exposition;
pub(crate) mod health;

use crate::live::Live;
use crate::status::StatusDoc;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

pub(crate) use collect::render as render_metrics;

/// Binds `addr` and serves until the returned task is aborted. Returns the bound address
/// (useful with port 0).
pub(crate) async fn serve(
    addr: SocketAddr,
    live: Live,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: wait instead of spinning.
                    tracing::warn!(error = %e, "admin endpoint cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let live = live.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = answer(&live, &req);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                drop(permit);
            });
        }
    });
    Ok((bound, task))
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static headers are valid")
}

const TEXT: &str = "text/plain; charset=utf-8";

fn answer<B>(live: &Live, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET is served\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(live),
        ),
        "/healthz" => {
            if health::alive(live) {
                reply(StatusCode::OK, TEXT, "ok\n".into())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "the spool thread has stopped\n".into(),
                )
            }
        }
        "/readyz" => {
            let checks = health::readiness(live);
            let ready = checks.iter().all(|c| c.ok);
            let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
            for c in &checks {
                body.push_str(&format!(
                    "{} {}: {}\n",
                    if c.ok { "ok  " } else { "FAIL" },
                    c.name,
                    c.detail
                ));
            }
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, TEXT, body)
        }
        "/status" => {
            let doc = StatusDoc::from_live(live, health::readiness(live));
            match serde_json::to_string_pretty(&doc) {
                Ok(json) => reply(StatusCode::OK, "application/json", json + "\n"),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n")),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /healthz, /readyz or /status\n".into(),
        ),
    }
}
