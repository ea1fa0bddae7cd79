//! The admin API (loopback by default): health, readiness, Prometheus metrics, status JSON
//! and the ACL routes. It reads node state and delegates policy changes to `acl`; it never
//! touches the data path.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::node::NodeState;

pub mod client;
pub mod status;

/// What a listener of the admin server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole admin API (loopback unless `admin.allow_remote`).
    Full,
    /// Only `/healthz` and `/readyz` (`admin.health_listen`, for load balancers).
    HealthOnly,
}

/// Serves the admin API until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    state: Arc<NodeState>,
    scope: Scope,
    cancel: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let (stream, _) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| route(req, state.clone(), scope));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = watched.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

async fn route(
    req: Request<Incoming>,
    state: Arc<NodeState>,
    scope: Scope,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if scope == Scope::HealthOnly && path != "/healthz" && path != "/readyz" {
        return Ok(text(StatusCode::NOT_FOUND, "text/plain", "not found\n"));
    }
    if path.starts_with("/v1/acl") {
        if let Some(response) = crate::acl::api::handle_admin(&state.acl, req).await {
            return Ok(response);
        }
        return Ok(text(StatusCode::NOT_FOUND, "text/plain", "not found\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        ));
    }
    let response = match path.as_str() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if state.is_ready() {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no tunnel is up\n",
                )
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            status::metrics_text(&state),
        ),
        "/v1/status" => {
            let body = serde_json::to_vec_pretty(&status::status_json(&state)).unwrap_or_default();
            text(StatusCode::OK, "application/json", body)
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    Ok(response)
}
