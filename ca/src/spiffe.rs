//! SPIFFE identities of hybridge nodes, services and administrators: parsing, validation
//! and URI form.
//!
//! Pure string handling only; certificates and TLS live in `authority` and `tls`.

use std::fmt;

/// Why a SPIFFE id or one of its segments was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// A segment (trust domain, site, node, service or administrator name) is empty or has a
    /// character outside `[a-z0-9._-]`.
    #[error("invalid {kind} {value:?}: must be non-empty and use only a-z 0-9 . _ -")]
    InvalidSegment {
        /// What the segment is ("trust domain", "site", "node name", "service name").
        kind: String,
        /// The rejected text.
        value: String,
    },
    /// The URI does not have one of the three hybridge shapes.
    #[error(
        "invalid SPIFFE id {uri:?}: expected spiffe://TD/site/SITE/node/NAME, spiffe://TD/svc/NAME or spiffe://TD/admin/NAME"
    )]
    Malformed {
        /// The rejected URI.
        uri: String,
    },
}

/// A hybridge identity: a node at a site, a service, or an administrator.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SpiffeId {
    /// `spiffe://TD/site/SITE/node/NAME`
    Node {
        /// Trust domain chosen at `hybridge-ca init`.
        trust_domain: String,
        /// Site the node runs in (for example `onprem`, `cloud`).
        site: String,
        /// Node name, unique within the site.
        name: String,
    },
    /// `spiffe://TD/svc/NAME`
    Service {
        /// Trust domain chosen at `hybridge-ca init`.
        trust_domain: String,
        /// Service name.
        name: String,
    },
    /// `spiffe://TD/admin/NAME`: a person (or automation) allowed to change a node's policy
    /// through the remote admin listener. Never a tunnel peer or a caller of services.
    Admin {
        /// Trust domain chosen at `hybridge-ca init`.
        trust_domain: String,
        /// Administrator name, as in audit log entries.
        name: String,
    },
}

/// Checks one path segment or trust domain: non-empty, only `[a-z0-9._-]`.
///
/// `kind` names the field in the error ("site", "service name", ...).
pub fn validate_segment(kind: &str, s: &str) -> Result<(), SpiffeError> {
    let ok = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::InvalidSegment {
            kind: kind.to_string(),
            value: s.to_string(),
        })
    }
}

impl SpiffeId {
    /// Builds a node id after validating every segment.
    pub fn node(trust_domain: &str, site: &str, name: &str) -> Result<Self, SpiffeError> {
        validate_segment("trust domain", trust_domain)?;
        validate_segment("site", site)?;
        validate_segment("node name", name)?;
        Ok(SpiffeId::Node {
            trust_domain: trust_domain.to_string(),
            site: site.to_string(),
            name: name.to_string(),
        })
    }

    /// Builds a service id after validating every segment.
    pub fn service(trust_domain: &str, name: &str) -> Result<Self, SpiffeError> {
        validate_segment("trust domain", trust_domain)?;
        validate_segment("service name", name)?;
        Ok(SpiffeId::Service {
            trust_domain: trust_domain.to_string(),
            name: name.to_string(),
        })
    }

    /// Builds an administrator id after validating every segment.
    pub fn admin(trust_domain: &str, name: &str) -> Result<Self, SpiffeError> {
        validate_segment("trust domain", trust_domain)?;
        validate_segment("administrator name", name)?;
        Ok(SpiffeId::Admin {
            trust_domain: trust_domain.to_string(),
            name: name.to_string(),
        })
    }

    /// Parses `spiffe://TD/site/SITE/node/NAME`, `spiffe://TD/svc/NAME` or
    /// `spiffe://TD/admin/NAME`.
    pub(crate) fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let malformed = || SpiffeError::Malformed {
            uri: uri.to_string(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(malformed)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "site", site, "node", name] => SpiffeId::node(td, site, name),
            [td, "svc", name] => SpiffeId::service(td, name),
            [td, "admin", name] => SpiffeId::admin(td, name),
            _ => Err(malformed()),
        }
    }

    /// The trust domain of any kind of id.
    pub fn trust_domain(&self) -> &str {
        match self {
            SpiffeId::Node { trust_domain, .. }
            | SpiffeId::Service { trust_domain, .. }
            | SpiffeId::Admin { trust_domain, .. } => trust_domain,
        }
    }

    /// The URI form, as placed in the certificate's URI SAN.
    pub fn to_uri(&self) -> String {
        match self {
            SpiffeId::Node {
                trust_domain,
                site,
                name,
            } => format!("spiffe://{trust_domain}/site/{site}/node/{name}"),
            SpiffeId::Service { trust_domain, name } => {
                format!("spiffe://{trust_domain}/svc/{name}")
            }
            SpiffeId::Admin { trust_domain, name } => {
                format!("spiffe://{trust_domain}/admin/{name}")
            }
        }
    }

    /// `"node"`, `"service"` or `"admin"`.
    #[cfg(test)]
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            SpiffeId::Node { .. } => "node",
            SpiffeId::Service { .. } => "service",
            SpiffeId::Admin { .. } => "admin",
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_round_trips() {
        let id = SpiffeId::parse("spiffe://corp.example/site/onprem/node/edge-1").unwrap();
        assert_eq!(
            id,
            SpiffeId::Node {
                trust_domain: "corp.example".into(),
                site: "onprem".into(),
                name: "edge-1".into()
            }
        );
        assert_eq!(id.to_uri(), "spiffe://corp.example/site/onprem/node/edge-1");
        assert_eq!(id.to_string(), id.to_uri());
        assert_eq!(id.trust_domain(), "corp.example");
    }

    #[test]
    fn service_round_trips() {
        let id = SpiffeId::parse("spiffe://td/svc/billing_v2").unwrap();
        assert_eq!(
            id,
            SpiffeId::Service {
                trust_domain: "td".into(),
                name: "billing_v2".into()
            }
        );
        assert_eq!(id.to_uri(), "spiffe://td/svc/billing_v2");
    }

    #[test]
    fn admin_round_trips() {
        let id = SpiffeId::parse("spiffe://corp.example/admin/alice").unwrap();
        assert_eq!(
            id,
            SpiffeId::Admin {
                trust_domain: "corp.example".into(),
                name: "alice".into()
            }
        );
        assert_eq!(id.to_uri(), "spiffe://corp.example/admin/alice");
        assert_eq!(id.to_string(), id.to_uri());
        assert_eq!((id.trust_domain(), id.kind()), ("corp.example", "admin"));
        assert_eq!(SpiffeId::admin("corp.example", "alice").unwrap(), id);
        assert_eq!(
            SpiffeId::admin("td", "Alice").unwrap_err().to_string(),
            "invalid administrator name \"Alice\": must be non-empty and use only a-z 0-9 . _ -"
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in [
            "http://td/svc/a",
            "spiffe://td/svc",
            "spiffe://td/svc/a/b",
            "spiffe://td/site/x/node",
            "spiffe:///svc/a",
            "spiffe://td/svc/",
            "spiffe://TD/svc/a",
            "spiffe://td/svc/Bad Name",
            "spiffe://td/other/a",
            "spiffe://td/admin",
            "spiffe://td/admin/",
            "spiffe://td/admin/a/b",
            "spiffe://td/admin/Bob",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            SpiffeId::parse("spiffe://td/root/x")
                .unwrap_err()
                .to_string(),
            "invalid SPIFFE id \"spiffe://td/root/x\": expected spiffe://TD/site/SITE/node/NAME, spiffe://TD/svc/NAME or spiffe://TD/admin/NAME"
        );
    }

    #[test]
    fn segment_error_names_the_kind() {
        let err = validate_segment("site", "Bad Site").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid site \"Bad Site\": must be non-empty and use only a-z 0-9 . _ -"
        );
        assert!(validate_segment("service name", "").is_err());
        assert!(validate_segment("site", "a.b_c-9").is_ok());
    }
}
