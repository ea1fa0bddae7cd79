//! A minimal client for a node's admin API, used by `hybridge status` (and tests):
//! one HTTP/1.1 request over a fresh loopback connection, plus the status table rendering.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Splits `http://host:port` into `host:port`.
pub fn authority_of(admin: &str) -> anyhow::Result<String> {
    let rest = admin.strip_prefix("http://").with_context(|| {
        format!(
            "admin URL `{admin}` must start with http:// (the admin API is plain HTTP on loopback)"
        )
    })?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        bail!("admin URL `{admin}` must be http://HOST:PORT");
    }
    Ok(authority.to_owned())
}

/// Sends one request and returns the status and body.
pub async fn request(
    admin: &str,
    method: http::Method,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(http::StatusCode, Bytes)> {
    let authority = authority_of(admin)?;
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .with_context(|| {
            format!("connecting to the admin API at {admin} (is the node running?)")
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .body(Full::new(body))?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("{admin}{path}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// GET that fails unless the answer is 2xx.
pub async fn get(admin: &str, path: &str) -> anyhow::Result<Bytes> {
    let (status, body) = request(admin, http::Method::GET, path, Bytes::new()).await?;
    if !status.is_success() {
        bail!(
            "{admin}{path} answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

/// Renders `/v1/status` as the human-readable `hybridge status` output.
pub fn render_status(doc: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| {
        v.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string())
    };
    let mut out = String::new();
    let _ = writeln!(out, "node      {}", s(&doc["node"]));
    let _ = writeln!(
        out,
        "state     {}   uptime {}s   policy version {}",
        if doc["draining"].as_bool() == Some(true) {
            "draining"
        } else if doc["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "not ready (no tunnel)"
        },
        doc["uptime_seconds"],
        doc["policy_version"]
    );
    let _ = writeln!(
        out,
        "\nPEER                                             REMOTE                 DIR       RTT(ms)  STREAMS  EXPORTS"
    );
    for p in doc["peers"].as_array().into_iter().flatten() {
        let exports: Vec<String> = p["exports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let _ = writeln!(
            out,
            "{:<48} {:<22} {:<9} {:>7.2}  {:>7}  {}{}",
            s(&p["peer"]),
            s(&p["remote"]),
            s(&p["direction"]),
            p["rtt_ms"].as_f64().unwrap_or_default(),
            p["active_streams"],
            exports.join(","),
            if p["draining"].as_bool() == Some(true) {
                " (draining)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(out, "\nEXPORT              UPSTREAM");
    for e in doc["exports"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "{:<19} {}", s(&e["service"]), e["upstream"]);
    }
    let _ = writeln!(out, "\nIMPORT              LISTEN");
    for i in doc["imports"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "{:<19} {}", s(&i["service"]), s(&i["listen"]));
    }
    if let Some(g) = doc["gateway"].as_str() {
        let _ = writeln!(out, "(gateway)           {g}");
    }
    out
}
