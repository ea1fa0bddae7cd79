//! Header rules at the boundary: hop-by-hop removal, forwarding headers, request ids, and the
//! conversion between `http::HeaderMap` and frame header pairs.
//!
//! Pure functions over header maps; no I/O. Everything the bridge adds or removes is here.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::tunnel::frame::HeaderPair;

/// Header names the bridge owns; callers can never set them.
pub(crate) const BRIDGE_PREFIX: &str = "x-hybridge-";
/// Reason header on every response the bridge itself produces.
pub(crate) const ERROR_HEADER: &str = "x-hybridge-error";
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Removes hop-by-hop headers (as Envoy does): `connection` and every header it names,
/// `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` unless it is
/// exactly `trailers` (which gRPC requires end to end).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if name != http::header::TE {
            headers.remove(name);
        }
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
    let te_is_trailers = {
        let mut values = headers.get_all(http::header::TE).iter();
        matches!((values.next(), values.next()), (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    };
    if !te_is_trailers {
        headers.remove(http::header::TE);
    }
}

/// Removes every `x-hybridge-*` header: identity and bridge metadata never come from callers.
pub(crate) fn remove_bridge_headers(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with(BRIDGE_PREFIX))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Headers through which a caller could claim a client identity or origin that an upstream
/// may trust (Envoy's `forward_client_cert_details: SANITIZE`): removed at both edges.
pub(crate) const CALLER_TRUST_HEADERS: [&str; 3] =
    ["x-forwarded-client-cert", "forwarded", "x-real-ip"];

/// Headers that make common frameworks route a request as another method or path than the
/// one decided on (Symfony, Laravel and Express method overrides; `X-Original-URL` and
/// `X-Rewrite-URL` of IIS-fronted and older Symfony/Zend apps): removed at both edges, so an
/// allow for `POST /api/` cannot become a `DELETE` or another path upstream.
pub(crate) const REQUEST_REWRITE_HEADERS: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// Removes what neither a caller nor a peer node may pass on to an upstream: hop-by-hop
/// headers, `x-hybridge-*`, [`CALLER_TRUST_HEADERS`] and [`REQUEST_REWRITE_HEADERS`]. The
/// import edge runs it on the caller's request and the export edge again on the peer's, so
/// the authoritative side does not depend on the other being honest.
pub(crate) fn remove_untrusted(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
    remove_bridge_headers(headers);
    for name in CALLER_TRUST_HEADERS.iter().chain(&REQUEST_REWRITE_HEADERS) {
        headers.remove(*name);
    }
}

/// Prepares a caller's request headers for the tunnel and returns the request id.
///
/// Removes what [`remove_untrusted`] removes; appends the caller's address to `x-forwarded-for`; overwrites
/// `x-forwarded-proto` with the scheme the caller used to reach this node; keeps a
/// well-formed `x-request-id` or generates one. `Expect: 100-continue` is answered here, not
/// forwarded. The README's header table lists the same rules.
pub fn prepare_request(
    headers: &mut HeaderMap,
    client_ip: std::net::IpAddr,
    proto: &'static str,
) -> String {
    remove_untrusted(headers);
    // hyper has already met `Expect: 100-continue` toward the client (it sends the 100 when
    // the body is first read); like Envoy, we do not make the upstream repeat the exchange.
    if headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        headers.remove(http::header::EXPECT);
    }
    let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.trim().is_empty() => format!("{existing}, {client_ip}"),
        _ => client_ip.to_string(),
    };
    headers.remove("x-forwarded-for");
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    let existing = headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned);
    match existing {
        Some(id) => id,
        None => {
            let id = new_request_id();
            if let Ok(value) = HeaderValue::from_str(&id) {
                headers.insert(REQUEST_ID, value);
            }
            id
        }
    }
}

/// A random UUID v4 in its usual text form.
pub(crate) fn new_request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Converts a header map to frame pairs.
pub fn to_pairs(headers: &HeaderMap) -> Vec<HeaderPair> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                Bytes::copy_from_slice(n.as_str().as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            )
        })
        .collect()
}

/// Converts frame pairs from a peer into a header map, refusing invalid names or values.
pub fn from_pairs(pairs: Vec<HeaderPair>) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        let name = HeaderName::from_bytes(&name)
            .map_err(|_| "invalid header name from peer".to_owned())?;
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| format!("invalid value for header {name} from peer"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Total size of a header block as HTTP/2 counts it (name + value + 32 per field).
pub(crate) fn header_block_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go_te_trailers_stays() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
        ]);
        remove_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["te", "content-type"]);
        let mut h = map(&[("te", "gzip")]);
        remove_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn caller_cannot_assert_identity_and_forwarding_headers_are_added() {
        let mut h = map(&[
            ("x-hybridge-caller", "admin"),
            ("X-Hybridge-Error", "x"),
            ("x-forwarded-for", "10.1.1.1"),
            ("x-request-id", "abc-123"),
            (
                "x-forwarded-client-cert",
                "By=spiffe://x;URI=spiffe://td/svc/admin",
            ),
            ("Forwarded", "for=10.0.0.1;proto=https"),
            ("x-real-ip", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
            ("x-http-method-override", "DELETE"),
            ("X-Original-URL", "/api/internal/x"),
        ]);
        let id = prepare_request(&mut h, "127.0.0.9".parse().unwrap(), "http");
        assert_eq!(id, "abc-123");
        assert!(h.keys().all(|k| !k.as_str().starts_with("x-hybridge-")));
        for name in CALLER_TRUST_HEADERS.iter().chain(&REQUEST_REWRITE_HEADERS) {
            assert!(!h.contains_key(*name), "{name} passed through");
        }
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.9");
        assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn a_request_id_is_generated_when_absent() {
        let mut h = HeaderMap::new();
        let id = prepare_request(&mut h, "::1".parse().unwrap(), "https");
        assert_eq!(id.len(), 36);
        assert_eq!(h[REQUEST_ID], id.as_str());
        assert_eq!(&id[14..15], "4");
    }

    #[test]
    fn pairs_round_trip_and_bad_peer_headers_are_refused() {
        let h = map(&[("a", "1"), ("a", "2"), ("b", "x")]);
        assert_eq!(from_pairs(to_pairs(&h)).unwrap(), h);
        assert!(from_pairs(vec![(Bytes::from_static(b"bad name"), Bytes::new())]).is_err());
        assert!(
            from_pairs(vec![(
                Bytes::from_static(b"a"),
                Bytes::from_static(b"x\ny")
            )])
            .is_err()
        );
    }
}
