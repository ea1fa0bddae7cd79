//! Admin HTTP routes under `/v1/acl/…`, called by the daemon's admin server for the callers it
//! let through (`admin::access`): JSON in and out, 16 MiB body limit, changes audited under the
//! actor the server names. It owns no listener, no authorisation and no policy logic.

use std::path::Path;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use serde::{Deserialize, Serialize};

use super::error::AclError;
use super::file::parse_acl_file;
use super::model::{ExportDeclaration, Rule, RuleSpec};
use super::service::AclService;
use super::store::AuditEntry;
use crate::http::path::decision_path;
use crate::http::percent::{percent_decode, query_param};

/// Largest request body accepted (413 beyond): room for a policy of ~100,000 rules (10,000
/// rules are ~1.4 MB of TOML).
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Audit entries returned by `GET /v1/acl/log` without `limit`.
pub(crate) const DEFAULT_LOG_LIMIT: usize = 50;

/// `GET /v1/acl/rules` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RuleList {
    /// This node's local revision: counts changes, differs between nodes.
    pub(crate) version: u64,
    /// The policy's identity: equal on every node holding the same policy.
    #[serde(default)]
    pub(crate) digest: String,
    pub(crate) rules: Vec<Rule>,
    /// Which sites may serve which services.
    #[serde(default)]
    pub(crate) exports: Vec<ExportDeclaration>,
}

/// `POST /v1/acl/rules` and `DELETE /v1/acl/rules/{id}` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RuleChanged {
    pub(crate) version: u64,
    pub(crate) rule: Rule,
}

/// `GET /v1/acl/log` response, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuditLog {
    pub(crate) entries: Vec<AuditEntry>,
}

/// Error body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
}

type AdminResponse = Response<Full<Bytes>>;

/// Serves the ACL admin routes, recording changes under `actor` (`uid:1000(alice)`,
/// `spiffe://TD/admin/alice`); `None` for paths this module does not own, so the admin server
/// can try its other routes.
///
/// - `GET /v1/acl/rules` → [`RuleList`]
/// - `POST /v1/acl/rules` (JSON [`RuleSpec`]) → 201 [`RuleChanged`]
/// - `DELETE /v1/acl/rules/{id}` → [`RuleChanged`]
/// - `POST /v1/acl/apply?dry_run=true&file=NAME` (TOML body) → `ApplyDiff`; 400 names the line
/// - `GET /v1/acl/check?from=&site=&to=&method=&path=` → `Explanation`
/// - `GET /v1/acl/log?limit=` → [`AuditLog`]
pub(crate) async fn handle_admin(
    svc: &AclService,
    req: Request<Incoming>,
    actor: &str,
) -> Option<AdminResponse> {
    handle_admin_request(svc, req, actor).await
}

/// [`handle_admin`] over any body type (tests use `Full<Bytes>`).
pub(crate) async fn handle_admin_request<B>(
    svc: &AclService,
    req: Request<B>,
    actor: &str,
) -> Option<AdminResponse>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_string();
    let route = path.strip_prefix("/v1/acl/")?;
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let response = match (route, &method) {
        ("rules", &Method::GET) => json(
            StatusCode::OK,
            &RuleList {
                version: svc.version(),
                digest: svc.digest(),
                rules: svc.list(),
                exports: svc.exports(),
            },
        ),
        ("rules", &Method::POST) => add_rule(svc, req, actor).await,
        ("apply", &Method::POST) => apply(svc, req, actor, &query).await,
        ("check", &Method::GET) => check(svc, &query),
        ("log", &Method::GET) => audit_log(svc, &query),
        ("rules" | "apply" | "check" | "log", _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed on {path}"),
        ),
        (other, &Method::DELETE) if other.starts_with("rules/") => {
            remove_rule(svc, &other["rules/".len()..], actor)
        }
        (other, _) if other.starts_with("rules/") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed on {path}"),
        ),
        _ => return None,
    };
    Some(response)
}

/// `POST /v1/acl/rules`: adds the rule in the JSON body.
async fn add_rule<B>(svc: &AclService, req: Request<B>, actor: &str) -> AdminResponse
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match read_body(req).await {
        Err(response) => response,
        Ok(body) => match serde_json::from_slice::<RuleSpec>(&body) {
            Err(e) => error(StatusCode::BAD_REQUEST, format!("rule JSON: {e}")),
            Ok(spec) => match blocking(|| svc.add(spec, actor)) {
                Ok(rule) => json(
                    StatusCode::CREATED,
                    &RuleChanged {
                        version: svc.version(),
                        rule,
                    },
                ),
                Err(e) => acl_error(&e),
            },
        },
    }
}

/// `POST /v1/acl/apply`: replaces the policy with the TOML body (or, `dry_run`, shows the
/// diff); errors name the `file` the operator applied.
async fn apply<B>(svc: &AclService, req: Request<B>, actor: &str, query: &str) -> AdminResponse
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let dry_run = query_param(query, "dry_run").is_some_and(|v| v == "true" || v == "1");
    let file = query_param(query, "file").unwrap_or_else(|| "request body".into());
    match read_body(req).await {
        Err(response) => response,
        Ok(body) => match std::str::from_utf8(&body) {
            Err(_) => error(StatusCode::BAD_REQUEST, format!("{file}: not UTF-8")),
            Ok(text) => match parse_acl_file(Path::new(&file), text) {
                Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
                Ok(policy) => match blocking(|| svc.apply(policy, actor, dry_run)) {
                    Ok(diff) => json(StatusCode::OK, &diff),
                    Err(e) => acl_error(&e),
                },
            },
        },
    }
}

/// `GET /v1/acl/check`: how the policy decides the call the query describes; 400 for a path a
/// listener would refuse.
fn check(svc: &AclService, query: &str) -> AdminResponse {
    match (query_param(query, "from"), query_param(query, "to")) {
        (Some(from), Some(to)) => {
            let site = query_param(query, "site").filter(|s| !s.is_empty());
            let method = query_param(query, "method").filter(|m| !m.is_empty());
            let path = query_param(query, "path").filter(|p| !p.is_empty());
            let path = match canonical_check_path(path) {
                Ok(path) => path,
                Err(refused) => return error(StatusCode::BAD_REQUEST, refused),
            };
            json(
                StatusCode::OK,
                &svc.explain(
                    site.as_deref(),
                    &from,
                    &to,
                    method.as_deref(),
                    path.as_deref(),
                ),
            )
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            "check needs query parameters `from` and `to`".into(),
        ),
    }
}

/// `GET /v1/acl/log`: the last `limit` audit entries.
fn audit_log(svc: &AclService, query: &str) -> AdminResponse {
    let limit = match query_param(query, "limit") {
        None => Ok(DEFAULT_LOG_LIMIT),
        Some(v) => v.parse::<usize>().map_err(|_| v),
    };
    match limit {
        Err(v) => error(
            StatusCode::BAD_REQUEST,
            format!("limit {v:?} is not a non-negative integer"),
        ),
        Ok(limit) => match blocking(|| svc.audit(limit)) {
            Ok(entries) => json(StatusCode::OK, &AuditLog { entries }),
            Err(e) => acl_error(&e),
        },
    }
}

/// `DELETE /v1/acl/rules/{id}` (`id` still percent-encoded): removes the rule.
fn remove_rule(svc: &AclService, id: &str, actor: &str) -> AdminResponse {
    let id = percent_decode(id);
    match blocking(|| svc.remove(&id, actor)) {
        Ok(rule) => json(
            StatusCode::OK,
            &RuleChanged {
                version: svc.version(),
                rule,
            },
        ),
        Err(e) => acl_error(&e),
    }
}

/// The canonical form of the path an operator asks about, which is what a listener decides
/// on; for a path a listener refuses (with the default `escaped_slashes = "reject"`), why.
fn canonical_check_path(path: Option<String>) -> Result<Option<String>, String> {
    let Some(typed) = path else { return Ok(None) };
    decision_path(&typed)
        .map(Some)
        .map_err(|e| format!("path {typed:?} is refused with 400 invalid-path: {e}"))
}

/// Runs a redb call (which may fsync) without stalling the other tasks of a multi-threaded
/// runtime; on a current-thread runtime it simply runs inline.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Collects the body, refusing more than [`MAX_BODY_BYTES`] with 413.
async fn read_body<B>(req: Request<B>) -> Result<Bytes, AdminResponse>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("reading request body: {e}"),
        )),
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> AdminResponse {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding response: {e}"),
        ),
    }
}

fn error(status: StatusCode, message: String) -> AdminResponse {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-hybridge-error", HeaderValue::from_static("acl-admin"));
    response
}

fn acl_error(e: &AclError) -> AdminResponse {
    let status = match e {
        AclError::InvalidRule { .. }
        | AclError::InvalidExport { .. }
        | AclError::DuplicateExport(_)
        | AclError::File(_) => StatusCode::BAD_REQUEST,
        AclError::DuplicateId(_) => StatusCode::CONFLICT,
        AclError::NotFound(_) => StatusCode::NOT_FOUND,
        AclError::InUse { .. }
        | AclError::Permissions { .. }
        | AclError::Storage(_)
        | AclError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn call(
        svc: &AclService,
        method: Method,
        uri: &str,
        body: &str,
    ) -> Option<(StatusCode, serde_json::Value)> {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from(body.to_string())))
            .ok()?;
        let response = handle_admin_request(svc, req, "uid:1000(alice)").await?;
        let status = response.status();
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, serde_json::from_slice(&bytes).ok()?))
    }

    fn open() -> Result<(tempfile::TempDir, Arc<AclService>), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let svc = AclService::open(&dir.path().join("hybridge.redb"))?;
        Ok((dir, svc))
    }

    #[tokio::test]
    async fn routes() -> Result<(), Box<dyn std::error::Error>> {
        let (_dir, svc) = open()?;
        let svc = &*svc;
        let rule = r#"{"source":"web","destination":"billing","action":"allow","methods":["GET"]}"#;
        let (status, body) = call(svc, Method::POST, "/v1/acl/rules", rule)
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(
            (body["version"].as_u64(), body["rule"]["id"].as_str()),
            (Some(1), Some("web-to-billing"))
        );

        let (status, body) = call(
            svc,
            Method::POST,
            "/v1/acl/rules",
            r#"{"source":"web","destination":"billing","action":"maybe"}"#,
        )
        .await
        .ok_or("no response")?;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("rule JSON: "))
        );

        let (status, body) = call(svc, Method::GET, "/v1/acl/rules", "")
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["rules"].as_array().map(Vec::len), Some(1));

        let (status, body) = call(
            svc,
            Method::GET,
            "/v1/acl/check?from=web&to=billing&method=GET&path=%2Fapi",
            "",
        )
        .await
        .ok_or("no response")?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (body["action"].as_str(), body["rule"].as_str()),
            (Some("allow"), Some("web-to-billing"))
        );
        assert_eq!(body["path"].as_str(), Some("/api"));

        // The path is decided on in its canonical form, and one a listener refuses is a 400.
        let (status, body) = call(
            svc,
            Method::GET,
            "/v1/acl/check?from=web&to=billing&method=GET&path=%2Fx%2F..%2Fapi%2F%252e%2F",
            "",
        )
        .await
        .ok_or("no response")?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["path"].as_str(), Some("/api/"));
        let (status, body) = call(
            svc,
            Method::GET,
            "/v1/acl/check?from=web&to=billing&path=%2Fapi%252Fx",
            "",
        )
        .await
        .ok_or("no response")?;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"].as_str().is_some_and(|e| e.starts_with(
                "path \"/api%2Fx\" is refused with 400 invalid-path: escaped slash `%2F`"
            )),
            "{body}"
        );

        let toml = "[[rule]]\nsource = \"web\"\ndestination = \"billing\"\naction = \"deny\"\nid = \"x\"\nbogus = 1\n";
        let (status, body) = call(svc, Method::POST, "/v1/acl/apply?file=acl.toml", toml)
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("acl.toml:6: rule 1: unknown field `bogus`")),
            "{body}"
        );

        let toml = toml.replace("bogus = 1\n", "");
        let (status, body) = call(svc, Method::POST, "/v1/acl/apply?dry_run=true", &toml)
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (
                body["added"].as_array().map(Vec::len),
                body["removed"].as_array().map(Vec::len)
            ),
            (Some(1), Some(1))
        );
        assert_eq!(svc.version(), 1);
        let (status, body) = call(svc, Method::POST, "/v1/acl/apply", &toml)
            .await
            .ok_or("no response")?;
        assert_eq!(
            (status, body["version_after"].as_u64()),
            (StatusCode::OK, Some(2))
        );

        let (status, _) = call(svc, Method::DELETE, "/v1/acl/rules/nope", "")
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = call(svc, Method::DELETE, "/v1/acl/rules/x", "")
            .await
            .ok_or("no response")?;
        assert_eq!(
            (status, body["version"].as_u64()),
            (StatusCode::OK, Some(3))
        );

        let (status, body) = call(svc, Method::GET, "/v1/acl/log?limit=2", "")
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::OK);
        let ops: Vec<_> = body["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["op"].as_str())
            .collect();
        assert_eq!(ops, vec![Some("remove"), Some("apply")]);
        let entries = body["entries"].as_array().cloned().unwrap_or_default();
        assert!(
            entries.iter().all(|e| e["actor"] == "uid:1000(alice)"),
            "{body}"
        );

        let (status, _) = call(svc, Method::PUT, "/v1/acl/rules", "")
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, _) = call(svc, Method::GET, "/v1/acl/check?from=web", "")
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(call(svc, Method::GET, "/v1/status", "").await.is_none());
        assert!(call(svc, Method::GET, "/v1/acl/other", "").await.is_none());
        Ok(())
    }

    #[tokio::test]
    async fn body_limit_is_413() -> Result<(), Box<dyn std::error::Error>> {
        let (_dir, svc) = open()?;
        let big = "#".repeat(MAX_BODY_BYTES + 1);
        let (status, _) = call(&svc, Method::POST, "/v1/acl/apply", &big)
            .await
            .ok_or("no response")?;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(svc.version(), 0);
        Ok(())
    }
}
