//! Which peer may serve which service. A peer's announcement of a service is only believed
//! for sites allowed to serve it: the policy's export declarations decide where they name
//! the service; otherwise the sites this node's configuration names as its peers do.
//!
//! It decides, nothing more: routing (`peers`) asks it per link, the session asks it to log
//! refused announcements. It never reads certificates (the site comes from `PeerLink`).

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::acl::AclService;
use crate::config::Config;

/// The export declarations of the policy plus this node's configured default sites.
pub(crate) struct ServingPolicy {
    acl: Arc<AclService>,
    default_sites: ArcSwap<Vec<String>>,
}

/// Why a site may or may not serve a service, for logs and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServingVerdict {
    /// The policy declares the service and lists the site.
    Declared,
    /// The policy does not declare the service; the node's config names the site as a peer.
    ConfiguredPeerSite,
    /// The policy declares the service for other sites only.
    NotDeclaredForSite,
    /// The policy does not declare the service and the node's config does not name the site
    /// as its only peer site.
    Undeclared,
}

impl ServingVerdict {
    pub(crate) fn permits(self) -> bool {
        matches!(self, Self::Declared | Self::ConfiguredPeerSite)
    }

    /// What an operator reads in the log line of a refused announcement.
    pub(crate) fn explain(self) -> &'static str {
        match self {
            Self::Declared => "declared in the policy",
            Self::ConfiguredPeerSite => "the node's config names the site as its peer",
            Self::NotDeclaredForSite => {
                "the policy's [[export]] declaration for the service does not list this site"
            }
            Self::Undeclared => {
                "the policy has no [[export]] declaration for the service and the node's config does not name this site as its only peer site"
            }
        }
    }
}

impl ServingPolicy {
    pub(crate) fn new(acl: Arc<AclService>, config: &Config) -> Self {
        Self {
            acl,
            default_sites: ArcSwap::from_pointee(default_sites(config)),
        }
    }

    /// Takes the default sites of a reloaded configuration.
    pub(crate) fn reconfigure(&self, config: &Config) {
        self.default_sites.store(Arc::new(default_sites(config)));
    }

    pub(crate) fn verdict(&self, service: &str, site: &str) -> ServingVerdict {
        match self.acl.may_serve(service, site) {
            Some(true) => ServingVerdict::Declared,
            Some(false) => ServingVerdict::NotDeclaredForSite,
            None if self.default_sites.load().iter().any(|s| s == site) => {
                ServingVerdict::ConfiguredPeerSite
            }
            None => ServingVerdict::Undeclared,
        }
    }

    pub(crate) fn permits(&self, service: &str, site: &str) -> bool {
        self.verdict(service, site).permits()
    }
}

/// Sites trusted to serve services the policy does not declare: the `[[peer]]` sites of a
/// node that dials (it dials them on purpose), or else the one site a listening node accepts
/// when it accepts exactly one. A node that dials and also accepts, or accepts several sites,
/// cannot tell which of them should serve a service it was never told about, so the sites it
/// merely accepts serve only declared services.
fn default_sites(config: &Config) -> Vec<String> {
    let mut sites: Vec<String> = config.peers.iter().map(|p| p.site.clone()).collect();
    if sites.is_empty()
        && let [only] = config.tunnel.allowed_sites.as_slice()
    {
        sites.push(only.clone());
    }
    sites.sort();
    sites.dedup();
    sites
}
