//! The set of live tunnel connections and which services each peer exports.
//!
//! Owns routing a request to a connection (only to peers that export the service and are
//! not draining; power of two choices on open streams). It does not open streams itself or
//! know about HTTP. Readers never lock: the link list is an `ArcSwap` replaced on change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use hybridge_ca::spiffe::SpiffeId;
use tokio::sync::mpsc;

use super::connection::TunnelConnection;
use super::control::{ControlMessage, PeerAnnouncement};
use super::outcome::DisconnectReason;

/// Which side opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Direction {
    Dialed,
    Accepted,
}

impl Direction {
    /// As `/v1/status` names it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Dialed => "dialed",
            Self::Accepted => "accepted",
        }
    }
}

/// The node at the other end of a link, from its certificate: its SPIFFE id and site.
#[derive(Debug)]
pub(crate) struct PeerNode {
    /// `spiffe://TD/site/SITE/node/NAME`.
    pub(crate) id: Arc<str>,
    pub(crate) site: Arc<str>,
}

impl PeerNode {
    /// The peer of a node identity; `None` for any other kind of identity.
    pub(crate) fn of(identity: &SpiffeId) -> Option<PeerNode> {
        match identity {
            SpiffeId::Node { site, .. } => Some(PeerNode {
                id: Arc::from(identity.to_string()),
                site: Arc::from(site.as_str()),
            }),
            _ => None,
        }
    }
}

/// One live, handshaken tunnel connection.
pub struct PeerLink {
    pub connection: TunnelConnection,
    pub peer: SpiffeId,
    pub(crate) direction: Direction,
    pub established: Instant,
    /// The worker whose runtime drives the connection (see `crate::workers`).
    pub worker: usize,
    exports: ArcSwap<HashSet<String>>,
    draining: AtomicBool,
    /// Nothing has arrived from the peer for longer than a healthy link is ever quiet.
    silent: AtomicBool,
    /// Woken when the link goes silent, for requests waiting on it.
    silence: tokio::sync::Notify,
    drain_acknowledged: AtomicBool,
    active_streams: AtomicUsize,
    /// Woken when the last active stream ends (see `streams_finished`).
    streams_idle: tokio::sync::Notify,
    total_streams: AtomicU64,
    policy_version: AtomicU64,
    /// The peer's policy digest, as it last announced it.
    policy_digest: ArcSwap<String>,
    /// The tunnel addresses of the peer site's listening nodes, as it last announced them.
    members: ArcSwap<Vec<std::net::SocketAddr>>,
    control: mpsc::Sender<ControlMessage>,
}

impl PeerLink {
    pub(crate) fn new(
        connection: TunnelConnection,
        peer: SpiffeId,
        direction: Direction,
        announcement: PeerAnnouncement,
        control: mpsc::Sender<ControlMessage>,
    ) -> Self {
        Self {
            connection,
            peer,
            direction,
            established: Instant::now(),
            worker: crate::workers::current(),
            exports: ArcSwap::from_pointee(announcement.exports.into_iter().collect()),
            draining: AtomicBool::new(false),
            silent: AtomicBool::new(false),
            silence: tokio::sync::Notify::new(),
            drain_acknowledged: AtomicBool::new(false),
            active_streams: AtomicUsize::new(0),
            streams_idle: tokio::sync::Notify::new(),
            total_streams: AtomicU64::new(0),
            policy_version: AtomicU64::new(announcement.policy_version),
            policy_digest: ArcSwap::from_pointee(announcement.policy_digest),
            members: ArcSwap::from_pointee(announcement.members),
            control,
        }
    }

    pub fn id(&self) -> usize {
        self.connection.stable_id()
    }

    /// The peer's site, from its certificate.
    pub(crate) fn site(&self) -> &str {
        match &self.peer {
            SpiffeId::Node { site, .. } => site,
            _ => "",
        }
    }

    pub fn exports(&self) -> Arc<HashSet<String>> {
        self.exports.load_full()
    }

    /// Takes what the peer announced in an update.
    pub(crate) fn announce(&self, announcement: PeerAnnouncement) {
        self.exports
            .store(Arc::new(announcement.exports.into_iter().collect()));
        self.policy_version
            .store(announcement.policy_version, Ordering::Relaxed);
        self.policy_digest
            .store(Arc::new(announcement.policy_digest));
        self.members.store(Arc::new(announcement.members));
    }

    /// The member addresses the peer last announced (see `tunnel::members`).
    pub(crate) fn members(&self) -> Arc<Vec<std::net::SocketAddr>> {
        self.members.load_full()
    }

    /// The peer's policy digest (empty if it does not send one).
    pub fn policy_digest(&self) -> Arc<String> {
        self.policy_digest.load_full()
    }

    pub(crate) fn policy_version(&self) -> u64 {
        self.policy_version.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn is_silent(&self) -> bool {
        self.silent.load(Ordering::SeqCst)
    }

    /// Marks the link silent (routing prefers other links; requests waiting on it are
    /// retried or failed) or heard again.
    pub(crate) fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
        if silent {
            self.silence.notify_waiters();
        }
    }

    /// Resolves once the link is silent (at once if it is already).
    pub(crate) async fn went_silent(&self) {
        loop {
            let silence = self.silence.notified();
            tokio::pin!(silence);
            silence.as_mut().enable();
            if self.is_silent() {
                return;
            }
            silence.await;
        }
    }

    /// The peer sent GOAWAY: no new stream starts on this link from now on. Streams already
    /// started are counted in `active_streams` (see `try_stream_guard`).
    pub(crate) fn mark_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Resolves once no stream of ours is active on this link; with `mark_draining` done
    /// first, none can start afterwards, so the peer may then be told we are finished with it.
    pub async fn streams_finished(&self) {
        loop {
            let idle = self.streams_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.active_streams.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// The peer confirmed it stopped sending us new requests after our GOAWAY.
    pub fn drain_acknowledged(&self) -> bool {
        self.drain_acknowledged.load(Ordering::Acquire)
    }

    pub(crate) fn mark_drain_acknowledged(&self) {
        self.drain_acknowledged.store(true, Ordering::Release);
    }

    pub fn active_streams(&self) -> usize {
        self.active_streams.load(Ordering::Relaxed)
    }

    pub fn total_streams(&self) -> u64 {
        self.total_streams.load(Ordering::Relaxed)
    }

    /// Counts a stream as active until the guard drops; `None` if the link is draining.
    ///
    /// The count goes up before the draining flag is read, and `mark_draining` sets the flag
    /// before `streams_finished` reads the count (all `SeqCst`): so either this sees the
    /// GOAWAY and starts nothing, or the drain sees this stream and waits for it. Routing
    /// alone could not promise that: a request routed just before a GOAWAY arrived opened
    /// its stream after the drain was acknowledged, and the draining node closed the
    /// connection under it (502 `tunnel-stream-failed` during a rolling restart).
    pub(crate) fn try_stream_guard(self: &Arc<Self>) -> Option<StreamGuard> {
        self.active_streams.fetch_add(1, Ordering::SeqCst);
        let guard = StreamGuard(self.clone());
        if self.is_draining() {
            return None; // the guard's drop gives the count back
        }
        self.total_streams.fetch_add(1, Ordering::Relaxed);
        Some(guard)
    }

    /// Queues a control message to this peer; drops it if the control writer is gone or
    /// backed up (control messages are advisory and re-sent state, never data).
    pub fn send_control(&self, message: ControlMessage) {
        let _ = self.control.try_send(message);
    }
}

/// Keeps a link's active-stream count up while a request uses it.
pub(crate) struct StreamGuard(Arc<PeerLink>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active_streams.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.streams_idle.notify_waiters();
        }
    }
}

/// The last tunnel to a site that went down: when and why.
#[derive(Clone, Debug)]
pub(crate) struct TunnelDown {
    pub(crate) at: Instant,
    pub(crate) reason: DisconnectReason,
    pub(crate) detail: String,
}

/// All live links of this node.
pub struct PeerSet {
    links: ArcSwap<Vec<Arc<PeerLink>>>,
    /// Bumped on every change, so callers can wait for a route instead of sleeping.
    changed: tokio::sync::watch::Sender<u64>,
    /// The last tunnel down per peer site (sites of authenticated peers only, so bounded),
    /// for saying why a node waits for a tunnel.
    last_down: std::sync::Mutex<HashMap<Arc<str>, TunnelDown>>,
}

impl Default for PeerSet {
    fn default() -> Self {
        Self {
            links: ArcSwap::default(),
            changed: tokio::sync::watch::channel(0).0,
            last_down: std::sync::Mutex::default(),
        }
    }
}

impl PeerSet {
    /// Remembers why the last tunnel to `site` went down.
    pub(crate) fn record_down(&self, site: &Arc<str>, reason: DisconnectReason, detail: &str) {
        if let Ok(mut last) = self.last_down.lock() {
            last.insert(
                site.clone(),
                TunnelDown {
                    at: Instant::now(),
                    reason,
                    detail: detail.to_owned(),
                },
            );
        }
    }

    /// When and why the last tunnel to `site` went down, if one ever did.
    pub(crate) fn last_down(&self, site: &str) -> Option<TunnelDown> {
        self.last_down.lock().ok()?.get(site).cloned()
    }

    pub(crate) fn insert(&self, link: Arc<PeerLink>) {
        self.links.rcu(|links| {
            let mut next = Vec::clone(links);
            next.push(link.clone());
            next
        });
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn remove(&self, id: usize) {
        self.links.rcu(|links| {
            links
                .iter()
                .filter(|l| l.id() != id)
                .cloned()
                .collect::<Vec<_>>()
        });
        self.changed.send_modify(|n| *n += 1);
    }

    /// Signals a change that is not an insert or remove (exports, draining).
    pub(crate) fn touch(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits until `condition` holds over the current links (re-checked on every change).
    pub async fn wait_until(&self, mut condition: impl FnMut(&[Arc<PeerLink>]) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if condition(&self.links.load()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Bumps on every change of the links (inserted, removed, announced, draining).
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn links(&self) -> Arc<Vec<Arc<PeerLink>>> {
        self.links.load_full()
    }

    /// Picks a link for `service` among those whose peer `may_serve` it, and counts the
    /// stream that is about to start on it (see `PeerLink::try_stream_guard`). A link that
    /// turned out to be draining in between is passed over; each pass looks at one link
    /// fewer, so this ends.
    pub(crate) fn route(
        &self,
        service: &str,
        may_serve: &dyn Fn(&PeerLink) -> bool,
    ) -> Option<(Arc<PeerLink>, StreamGuard)> {
        for _ in 0..=self.links.load().len() {
            let link = self.pick(service, may_serve)?;
            if let Some(guard) = link.try_stream_guard() {
                return Some((link, guard));
            }
        }
        None
    }

    /// Like [`PeerSet::route`], for a retry: never `avoid`, and no silent link.
    pub(crate) fn reroute(
        &self,
        service: &str,
        may_serve: &dyn Fn(&PeerLink) -> bool,
        avoid: usize,
    ) -> Option<(Arc<PeerLink>, StreamGuard)> {
        self.route(service, &|l: &PeerLink| {
            l.id() != avoid && !l.is_silent() && may_serve(l)
        })
    }

    /// Picks a link for `service`: among non-draining links that export it, the less busy
    /// of two chosen at random (so one hot connection does not take every request). Links
    /// driven by the calling worker come first, so a request stays on its thread; the
    /// others are used when the worker has none.
    fn pick(&self, service: &str, may_serve: &dyn Fn(&PeerLink) -> bool) -> Option<Arc<PeerLink>> {
        let links = self.links.load();
        let worker = crate::workers::current();
        let usable =
            |l: &PeerLink| !l.is_draining() && l.exports.load().contains(service) && may_serve(l);
        // This worker's heard links, then any heard link, then (rather than no route) a
        // silent one: it may only be slow. Counted, then reached by index: no allocation.
        let own_heard = |l: &PeerLink| l.worker == worker && !l.is_silent() && usable(l);
        let heard = |l: &PeerLink| !l.is_silent() && usable(l);
        let tiers: [&dyn Fn(&PeerLink) -> bool; 3] = [&own_heard, &heard, &usable];
        for tier in tiers {
            let count = links.iter().filter(|l| tier(l)).count();
            let nth = |i: usize| links.iter().filter(|l| tier(l)).nth(i);
            if let Some(Some(link)) =
                crate::p2c::pick(count, nth, |l| l.map_or(usize::MAX, |l| l.active_streams()))
            {
                return Some(link.clone());
            }
        }
        None
    }

    pub(crate) fn broadcast(&self, message: &ControlMessage) {
        for link in self.links.load().iter() {
            link.send_control(message.clone());
        }
    }
}
