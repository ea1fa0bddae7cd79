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
        "state     {}   uptime {}s   policy version {}   workers {}",
        if doc["draining"].as_bool() == Some(true) {
            "draining"
        } else if doc["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "not ready (no tunnel)"
        },
        doc["uptime_seconds"],
        doc["policy_version"],
        doc["workers"]
    );
    let _ = writeln!(
        out,
        "\nPEER                                             REMOTE                 DIR       WORKER  RTT(ms)  STREAMS  EXPORTS"
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
            "{:<48} {:<22} {:<9} {:>6}  {:>7.2}  {:>7}  {}{}",
            s(&p["peer"]),
            s(&p["remote"]),
            s(&p["direction"]),
            s(&p["worker"]),
            p["rtt_ms"].as_f64().unwrap_or_default(),
            s(&p["active_streams"]),
            exports.join(","),
            if p["draining"].as_bool() == Some(true) {
                " (draining)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "\nEXPORT              ENDPOINT               STATE      ACTIVE  REQUESTS  FAILURES  IDLE"
    );
    for e in doc["exports"].as_array().into_iter().flatten() {
        let upstream = &e["upstream"];
        for endpoint in upstream["endpoints"].as_array().into_iter().flatten() {
            let state = if endpoint["ejected"].as_bool() == Some(true) {
                "ejected"
            } else if endpoint["healthy"].as_bool() == Some(false) {
                "unhealthy"
            } else {
                "up"
            };
            let _ = writeln!(
                out,
                "{:<19} {:<22} {:<9}  {:>6}  {:>8}  {:>8}  {:>4}",
                s(&e["service"]),
                s(&endpoint["addr"]),
                state,
                s(&endpoint["active"]),
                s(&endpoint["total_requests"]),
                s(&endpoint["failures"]),
                s(&endpoint["idle_connections"]),
            );
        }
        let (pending, trips, retries) = (
            &upstream["pending_requests"],
            &upstream["circuit_breaker_trips"],
            &upstream["retries"],
        );
        if [pending, trips, retries]
            .iter()
            .any(|v| v.as_u64() != Some(0))
        {
            let _ = writeln!(
                out,
                "{:<19} pending {pending}, circuit breaker trips {trips}, retries {retries}",
                ""
            );
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_tunnels_per_worker_and_one_row_per_upstream_endpoint() {
        let doc = serde_json::json!({
            "node": "spiffe://td/site/cloud/node/cloud-1",
            "ready": true,
            "draining": false,
            "uptime_seconds": 7,
            "policy_version": 3,
            "workers": 2,
            "peers": [{
                "peer": "spiffe://td/site/onprem/node/onprem-1",
                "remote": "10.0.0.5:40000",
                "direction": "accepted",
                "worker": 2,
                "rtt_ms": 1.5,
                "active_streams": 4,
                "exports": ["ledger"],
                "draining": false,
            }],
            "exports": [{
                "service": "inventory",
                "upstream": {
                    "service": "inventory",
                    "endpoints": [
                        {"addr": "10.1.0.1:8080", "healthy": true, "ejected": false,
                         "active": 1, "total_requests": 120, "failures": 0, "idle_connections": 5},
                        {"addr": "10.1.0.2:8080", "healthy": false, "ejected": false,
                         "active": 0, "total_requests": 9, "failures": 9, "idle_connections": 0},
                    ],
                    "active_requests": 1,
                    "pending_requests": 0,
                    "circuit_breaker_trips": 2,
                    "retries": 0,
                },
            }],
            "imports": [],
            "gateway": null,
        });
        let text = render_status(&doc);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].ends_with("policy version 3   workers 2"), "{text}");
        let tunnel = lines.iter().find(|l| l.contains("10.0.0.5:40000")).unwrap();
        let columns: Vec<&str> = tunnel.split_whitespace().collect();
        assert_eq!(columns[2..6], ["accepted", "2", "1.50", "4"], "{text}");
        let rows: Vec<Vec<&str>> = lines
            .iter()
            .filter(|l| l.starts_with("inventory "))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec!["inventory", "10.1.0.1:8080", "up", "1", "120", "0", "5"],
                vec![
                    "inventory",
                    "10.1.0.2:8080",
                    "unhealthy",
                    "0",
                    "9",
                    "9",
                    "0"
                ],
            ],
            "{text}"
        );
        assert!(
            text.contains("pending 0, circuit breaker trips 2, retries 0"),
            "{text}"
        );
    }
}
