//! Service ACLs: model, redb store, immutable snapshot, decision, declarative files, admin
//! routes and CLI. It owns policy; it must not forward traffic or own the admin listener.
//!
//! # Precedence
//!
//! A caller is always qualified by its site: the site of the node it entered through (for a
//! request from a peer, the site in that node's certificate; for a local caller, this node's
//! site). A rule *matches* a request when its destination is the request's destination or
//! `*`, its source is the caller or `*`, its `source_site` (when given) lists the caller's
//! site, and, for a rule with L7 conditions, the request method is in `methods` (when given;
//! compared case-insensitively) and the path is `path_prefix` or lies below it on segment
//! boundaries (when given: `/api` covers `/api`, `/api/` and `/api/x`, not `/apiary`). Paths
//! are canonical before any decision (`crate::http::path`) and so are rule prefixes
//! (`model::check_path_prefix`). Among the matching rules the most specific decides,
//! comparing in order:
//!
//! | step | more specific wins                                       | example winner                  |
//! |------|----------------------------------------------------------|---------------------------------|
//! | 1    | exact destination beats `*`                              | `* → billing` over `web → *`    |
//! | 2    | exact source beats `*`                                   | `web → billing` over `* → billing` |
//! | 3    | a rule restricted to caller sites beats one without      | `web@dc1 → billing` over `web → billing` |
//! | 4    | a rule with method/path conditions beats one without     | `web → billing GET /api` over `web → billing` |
//! | 5    | between L7 rules, the longer `path_prefix` wins          | `/api/v1` over `/api`           |
//! | 6    | on equal precedence, `deny` beats `allow`                |                                 |
//! | 7    | equal precedence and action: smaller id (determinism)    |                                 |
//! | —    | no matching rule: deny (`default-deny`)                  |                                 |
//!
//! The snapshot indexes rules by (destination, source) into four buckets visited in steps 1–2
//! order (exact/exact, exact/`*`, `*`/exact, `*`/`*`), each pre-sorted by steps 3–7, so a
//! decision is at most four hash lookups and a scan of the first bucket with a match.
//!
//! # Export declarations
//!
//! The policy also says which sites may serve a service (`[[export]]` in the file): a peer of
//! another site that announces the service is never routed to. See `AclSnapshot::may_serve`.
//!
//! # Layout
//!
//! `model` (rules and checks), `snapshot` (index, decision, explanation), `store` (redb),
//! `file` (declarative TOML), `service` (`AclService`, what the node shares), `denylog` (deny
//! log rate limit), `api` (admin HTTP routes), `cli` (`hybridge acl …`), `error`.

pub(crate) mod api;
pub(crate) mod cli;
pub(crate) mod denylog;
pub(crate) mod error;
pub(crate) mod file;
pub(crate) mod model;
pub(crate) mod service;
pub(crate) mod snapshot;
pub mod store;

pub use file::parse_acl_file;
pub use model::{Action, PolicySpec, Rule, RuleSpec};
pub use service::AclService;
pub use snapshot::AclSnapshot;
pub(crate) use snapshot::Decision;
