//! A userspace L4 load balancer that behaves like a cloud network load balancer (AWS NLB):
//! every UDP flow and every TCP connection is hashed by its source (address, port) onto one
//! backend and stays there; UDP gets a NAT entry per flow (replies leave from the
//! balancer's address), TCP is spliced.
//!
//! A backend can be marked blackholed or refusing, so a test can kill one target and see
//! whether a client redialling from a fresh source port lands on another. It balances;
//! it does not health-check.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::netns;

/// How new flows choose among backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthMode {
    /// Hash over the backends that are up (all of them if none is): a target known to be
    /// unhealthy gets no new flows.
    SkipDown,
    /// Hash over every backend, up or not: an NLB before it knows a target's health (or when
    /// every target fails its checks). A new flow hashed to a dead backend goes nowhere.
    Ignore,
}

/// What a backend does to the traffic the balancer sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Up,
    /// The target vanished: UDP is dropped both ways, TCP connections (new and open) stall.
    Blackholed,
    /// The target's host answers but nothing listens: UDP is dropped, TCP connections (new
    /// and open) are reset.
    Refusing,
}

/// Everything a balancer needs to start.
#[derive(Clone, Debug)]
pub struct BalancerOptions {
    /// Where it listens, for UDP and TCP on the same port; port 0 picks one free for both.
    pub listen: SocketAddr,
    pub backends: Vec<SocketAddr>,
    /// Runs inside this network namespace (by name, as `ip netns` knows it), if given.
    pub namespace: Option<String>,
    pub health: HealthMode,
    /// A UDP flow with no datagram either way for this long is forgotten (NLB: 120 s).
    pub udp_idle_timeout: Duration,
    /// Changes which flows hash where.
    pub seed: u64,
}

impl BalancerOptions {
    pub fn new(listen: SocketAddr, backends: &[SocketAddr]) -> Self {
        Self {
            listen,
            backends: backends.to_vec(),
            namespace: None,
            health: HealthMode::SkipDown,
            udp_idle_timeout: Duration::from_secs(120),
            seed: 0,
        }
    }
}

/// What one backend received through the balancer. Counts only grow.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalancerCounters {
    pub udp_flows: u64,
    pub udp_datagrams: u64,
    /// Datagrams (either way) dropped because the backend was not up.
    pub udp_dropped: u64,
    pub tcp_connections: u64,
    pub tcp_reset: u64,
    pub tcp_stalled: u64,
}

#[derive(Default)]
struct AtomicBackendCounters {
    udp_flows: AtomicU64,
    udp_datagrams: AtomicU64,
    udp_dropped: AtomicU64,
    tcp_connections: AtomicU64,
    tcp_reset: AtomicU64,
    tcp_stalled: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Clone, Copy, Hash)]
enum Protocol {
    Udp,
    Tcp,
}

struct UdpFlow {
    backend: usize,
    upstream: Arc<UdpSocket>,
    last_seen: Instant,
    cancel: CancellationToken,
}

struct Shared {
    listen: SocketAddr,
    backends: Vec<SocketAddr>,
    states: Vec<watch::Sender<BackendState>>,
    health: Mutex<HealthMode>,
    udp_flows: Mutex<HashMap<SocketAddr, UdpFlow>>,
    counters: Vec<AtomicBackendCounters>,
    udp_idle_timeout: Duration,
    seed: u64,
}

impl Shared {
    fn state(&self, backend: usize) -> BackendState {
        *self.states[backend].borrow()
    }

    fn flows(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, UdpFlow>> {
        self.udp_flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The backend a new flow from `client` goes to now.
    fn choose(&self, protocol: Protocol, client: SocketAddr) -> usize {
        let mut hasher = std::hash::DefaultHasher::new();
        (self.seed, protocol, client, self.listen).hash(&mut hasher);
        let hash = hasher.finish() as usize;
        let all = self.backends.len();
        let mode = *self.health.lock().unwrap_or_else(PoisonError::into_inner);
        let up: Vec<usize> = (0..all)
            .filter(|b| self.state(*b) == BackendState::Up)
            .collect();
        match mode {
            HealthMode::SkipDown if !up.is_empty() => up[hash % up.len()],
            HealthMode::SkipDown | HealthMode::Ignore => hash % all,
        }
    }
}

/// A running balancer; stops (and closes every flow) on drop.
pub struct Balancer {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Balancer {
    /// A balancer on `listen` (in this namespace) over `backends`; panics if it cannot bind.
    pub fn new(listen: SocketAddr, backends: &[SocketAddr]) -> Balancer {
        Balancer::start(BalancerOptions::new(listen, backends)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn start(options: BalancerOptions) -> anyhow::Result<Balancer> {
        anyhow::ensure!(
            !options.backends.is_empty(),
            "a balancer needs at least one backend"
        );
        let cancel = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("impair-balancer".into())
            .spawn(move || {
                let started = (|| {
                    if let Some(namespace) = &options.namespace {
                        super::sys::enter_network_namespace(&netns::path(namespace))
                            .with_context(|| format!("entering namespace {namespace}"))?;
                    }
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    let sockets = runtime.block_on(bind(options.listen))?;
                    anyhow::Ok((runtime, sockets))
                })();
                let (runtime, (tcp, udp)) = match started {
                    Ok(started) => started,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let Ok(listen) = tcp.local_addr() else {
                    return;
                };
                let shared = Arc::new(Shared {
                    listen,
                    states: options
                        .backends
                        .iter()
                        .map(|_| watch::Sender::new(BackendState::Up))
                        .collect(),
                    counters: options
                        .backends
                        .iter()
                        .map(|_| Default::default())
                        .collect(),
                    backends: options.backends,
                    health: Mutex::new(options.health),
                    udp_flows: Mutex::new(HashMap::new()),
                    udp_idle_timeout: options.udp_idle_timeout,
                    seed: options.seed,
                });
                if ready_tx.send(Ok(shared.clone())).is_err() {
                    return;
                }
                runtime.block_on(serve(shared, tcp, Arc::new(udp), stop));
            })?;
        let shared = ready_rx
            .recv()
            .context("the balancer thread ended before it was ready")??;
        Ok(Balancer {
            shared,
            cancel,
            thread: Some(thread),
        })
    }

    /// The address it listens on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// Marks backend `index` blackholed (`true`) or up (`false`).
    pub fn set_down(&self, index: usize, down: bool) {
        let state = if down {
            BackendState::Blackholed
        } else {
            BackendState::Up
        };
        self.set_state(index, state);
    }

    pub fn set_state(&self, index: usize, state: BackendState) {
        self.shared.states[index].send_replace(state);
    }

    pub fn set_health_mode(&self, mode: HealthMode) {
        *self
            .shared
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
    }

    pub fn counters(&self, index: usize) -> BalancerCounters {
        let counters = &self.shared.counters[index];
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BalancerCounters {
            udp_flows: read(&counters.udp_flows),
            udp_datagrams: read(&counters.udp_datagrams),
            udp_dropped: read(&counters.udp_dropped),
            tcp_connections: read(&counters.tcp_connections),
            tcp_reset: read(&counters.tcp_reset),
            tcp_stalled: read(&counters.tcp_stalled),
        }
    }

    /// The backend the UDP flow from `client` is pinned to, if the balancer has one.
    pub fn udp_flow_backend(&self, client: SocketAddr) -> Option<usize> {
        self.shared.flows().get(&client).map(|flow| flow.backend)
    }

    /// The backend a new UDP flow from `client` would be hashed to now.
    pub fn udp_backend_for(&self, client: SocketAddr) -> usize {
        self.shared.choose(Protocol::Udp, client)
    }

    /// The backend a new TCP connection from `client` would be hashed to now.
    pub fn tcp_backend_for(&self, client: SocketAddr) -> usize {
        self.shared.choose(Protocol::Tcp, client)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds TCP and UDP on the same address; with port 0, retries until a port is free for both.
async fn bind(listen: SocketAddr) -> anyhow::Result<(TcpListener, UdpSocket)> {
    for _ in 0..64 {
        let tcp = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding TCP {listen}"))?;
        let address = tcp.local_addr()?;
        match UdpSocket::bind(address).await {
            Ok(udp) => return Ok((tcp, udp)),
            Err(_) if listen.port() == 0 => continue,
            Err(e) => return Err(e).with_context(|| format!("binding UDP {address}")),
        }
    }
    anyhow::bail!(
        "no port free for both TCP and UDP on {} after 64 tries",
        listen.ip()
    )
}

async fn serve(
    shared: Arc<Shared>,
    tcp: TcpListener,
    udp: Arc<UdpSocket>,
    cancel: CancellationToken,
) {
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(sweep_idle_flows(shared.clone(), cancel.clone()));
    tasks.spawn(serve_udp(shared.clone(), udp, cancel.clone()));
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = tcp.accept() => accepted,
        };
        let Ok((client, address)) = accepted else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tasks.spawn(serve_tcp(shared.clone(), client, address, cancel.clone()));
    }
    tasks.close();
    tasks.wait().await;
    for (_, flow) in shared.flows().drain() {
        flow.cancel.cancel();
    }
}

async fn serve_udp(shared: Arc<Shared>, listen: Arc<UdpSocket>, cancel: CancellationToken) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            () = cancel.cancelled() => return,
            received = listen.recv_from(&mut buffer) => received,
        };
        let Ok((len, client)) = received else {
            continue;
        };
        let Some((backend, upstream)) = udp_flow(&shared, &listen, client, &cancel).await else {
            continue;
        };
        let counters = &shared.counters[backend];
        if shared.state(backend) == BackendState::Up {
            bump(&counters.udp_datagrams);
            let _ = upstream.send(&buffer[..len]).await;
        } else {
            bump(&counters.udp_dropped);
        }
    }
}

/// The flow for datagrams from `client`: the existing one, or a new one hashed to a backend
/// with its own upstream socket and a task carrying the backend's replies back.
async fn udp_flow(
    shared: &Arc<Shared>,
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
    cancel: &CancellationToken,
) -> Option<(usize, Arc<UdpSocket>)> {
    if let Some(flow) = shared.flows().get_mut(&client) {
        flow.last_seen = Instant::now();
        return Some((flow.backend, flow.upstream.clone()));
    }
    let backend = shared.choose(Protocol::Udp, client);
    let target = shared.backends[backend];
    let unspecified = match target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let upstream = Arc::new(UdpSocket::bind(unspecified).await.ok()?);
    upstream.connect(target).await.ok()?;
    let flow_cancel = cancel.child_token();
    shared.flows().insert(
        client,
        UdpFlow {
            backend,
            upstream: upstream.clone(),
            last_seen: Instant::now(),
            cancel: flow_cancel.clone(),
        },
    );
    bump(&shared.counters[backend].udp_flows);
    tokio::spawn(carry_udp_replies(
        shared.clone(),
        listen.clone(),
        upstream.clone(),
        client,
        backend,
        flow_cancel,
    ));
    Some((backend, upstream))
}

async fn carry_udp_replies(
    shared: Arc<Shared>,
    listen: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    backend: usize,
    cancel: CancellationToken,
) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            () = cancel.cancelled() => return,
            received = upstream.recv(&mut buffer) => received,
        };
        // A connected UDP socket reports an ICMP error from an earlier send as a failed
        // receive; the flow goes on.
        let Ok(len) = received else {
            continue;
        };
        if shared.state(backend) != BackendState::Up {
            bump(&shared.counters[backend].udp_dropped);
            continue;
        }
        if let Some(flow) = shared.flows().get_mut(&client) {
            flow.last_seen = Instant::now();
        }
        let _ = listen.send_to(&buffer[..len], client).await;
    }
}

async fn sweep_idle_flows(shared: Arc<Shared>, cancel: CancellationToken) {
    let period = (shared.udp_idle_timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let idle_since = Instant::now() - shared.udp_idle_timeout;
        shared.flows().retain(|_, flow| {
            let keep = flow.last_seen > idle_since;
            if !keep {
                flow.cancel.cancel();
            }
            keep
        });
    }
}

async fn serve_tcp(
    shared: Arc<Shared>,
    client: TcpStream,
    address: SocketAddr,
    cancel: CancellationToken,
) {
    let backend = shared.choose(Protocol::Tcp, address);
    let counters = &shared.counters[backend];
    bump(&counters.tcp_connections);
    let mut state = shared.states[backend].subscribe();
    let current = *state.borrow_and_update();
    let server = match current {
        BackendState::Refusing => None,
        BackendState::Blackholed => {
            bump(&counters.tcp_stalled);
            // Nothing answers: hold the connection until the client gives up.
            let mut client = client;
            let mut sink = [0u8; 4096];
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    read = client.read(&mut sink) => if !matches!(read, Ok(n) if n > 0) { return },
                }
            }
        }
        BackendState::Up => {
            let connect = TcpStream::connect(shared.backends[backend]);
            tokio::time::timeout(Duration::from_secs(5), connect)
                .await
                .ok()
                .and_then(Result::ok)
        }
    };
    let Some(server) = server else {
        bump(&counters.tcp_reset);
        let _ = client.set_zero_linger();
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    splice(client, server, state, &counters.tcp_reset, cancel).await;
}

/// Copies both ways until both ends finish; pauses while the backend is blackholed and
/// resets both connections if it starts refusing.
async fn splice(
    mut client: TcpStream,
    mut server: TcpStream,
    state: watch::Receiver<BackendState>,
    resets: &AtomicU64,
    cancel: CancellationToken,
) {
    {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let both = async {
            tokio::try_join!(
                pump(&mut client_read, &mut server_write, state.clone()),
                pump(&mut server_read, &mut client_write, state.clone()),
            )
        };
        let mut watched = state.clone();
        let refusing = async {
            while *watched.borrow_and_update() != BackendState::Refusing {
                if watched.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = both => {}
            () = refusing => {}
            () = cancel.cancelled() => {}
        }
    }
    if *state.borrow() == BackendState::Refusing {
        bump(resets);
        let _ = (client.set_zero_linger(), server.set_zero_linger());
    }
}

async fn pump(
    reader: &mut (impl AsyncRead + Unpin),
    writer: &mut (impl AsyncWrite + Unpin),
    mut state: watch::Receiver<BackendState>,
) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        wait_until_up(&mut state).await?;
        let len = reader.read(&mut buffer).await?;
        wait_until_up(&mut state).await?;
        if len == 0 {
            return writer.shutdown().await;
        }
        writer.write_all(&buffer[..len]).await?;
    }
}

async fn wait_until_up(state: &mut watch::Receiver<BackendState>) -> std::io::Result<()> {
    loop {
        match *state.borrow_and_update() {
            BackendState::Up => return Ok(()),
            BackendState::Refusing => return Err(std::io::ErrorKind::ConnectionReset.into()),
            BackendState::Blackholed => {}
        }
        if state.changed().await.is_err() {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
    }
}
