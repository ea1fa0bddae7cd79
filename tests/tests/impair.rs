//! The impairment harness itself, on real traffic: a link between two namespaces carries UDP
//! and TCP, and each impairment (loss, delay, jitter, reordering, duplication, rate,
//! blackhole, UDP blocked, NAT rebinding) does what it says, visible both to the sockets and
//! in the link's counters; the flow-hashing balancer spreads, pins and moves flows.
//!
//! Needs root (CI runs as root); without it every test fails saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hybridge_tests::ChildGuard;
use hybridge_tests::impair::{
    BackendState, Balancer, BalancerOptions, Direction, HealthMode, Impairment, Link, Side,
};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);
/// How long a test waits to conclude that something does *not* arrive.
const SILENCE: Duration = Duration::from_millis(400);

fn profile(spec: &str) -> Impairment {
    spec.parse().unwrap()
}

/// A UDP socket inside `side`, on its link address.
fn udp_socket(link: &Link, side: Side) -> UdpSocket {
    let address = SocketAddr::from((link.tunnel_address(side), 0));
    let socket = link
        .enter(side, || std::net::UdpSocket::bind(address))
        .unwrap();
    socket.set_nonblocking(true).unwrap();
    UdpSocket::from_std(socket).unwrap()
}

/// A UDP echo server: answers every datagram with `payload|name|the source it saw`.
fn spawn_udp_echo(socket: UdpSocket, name: &'static str) -> SocketAddr {
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_536];
        while let Ok((len, peer)) = socket.recv_from(&mut buffer).await {
            let mut reply = buffer[..len].to_vec();
            reply.extend_from_slice(format!("|{name}|{peer}").as_bytes());
            let _ = socket.send_to(&reply, peer).await;
        }
    });
    address
}

/// A TCP echo server inside `side`, on its link address.
fn spawn_tcp_echo(link: &Link, side: Side) -> SocketAddr {
    let address = SocketAddr::from((link.tunnel_address(side), 0));
    let listener = link
        .enter(side, || std::net::TcpListener::bind(address))
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    serve_tcp_echo(TcpListener::from_std(listener).unwrap(), None)
}

/// Echoes every connection back, first writing `greeting` (a backend's name) if given.
fn serve_tcp_echo(listener: TcpListener, greeting: Option<&'static str>) -> SocketAddr {
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Some(greeting) = greeting {
                    let _ = stream.write_all(greeting.as_bytes()).await;
                }
                let (mut read, mut write) = stream.split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    address
}

/// A TCP connection from inside `side` to `to`, bounded by `limit`.
async fn tcp_connect(
    link: &Link,
    side: Side,
    to: SocketAddr,
    limit: Duration,
) -> Option<TcpStream> {
    let socket = link.enter(side, TcpSocket::new_v4).unwrap();
    timeout(limit, socket.connect(to)).await.ok()?.ok()
}

/// Sends `seq` and waits (bounded) for its echo; returns the round trip and what the echo
/// server saw. Echoes of earlier pings that arrive late are skipped.
async fn ping(
    socket: &UdpSocket,
    to: SocketAddr,
    seq: u32,
    limit: Duration,
) -> Option<(Duration, String)> {
    let started = Instant::now();
    let payload = format!("ping-{seq}");
    socket.send_to(payload.as_bytes(), to).await.unwrap();
    let mut buffer = vec![0u8; 2048];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (len, _) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buffer))
            .await
            .ok()?
            .unwrap();
        let reply = String::from_utf8_lossy(&buffer[..len]).into_owned();
        if let Some(rest) = reply.strip_prefix(&format!("{payload}|")) {
            return Some((started.elapsed(), rest.to_owned()));
        }
    }
}

/// Pings until one answers (the link may still be coming back); panics after `WAIT`.
async fn ping_until_answered(socket: &UdpSocket, to: SocketAddr) -> (Duration, String) {
    let deadline = Instant::now() + WAIT;
    for seq in 1_000_000.. {
        if let Some(answer) = ping(socket, to, seq, Duration::from_millis(500)).await {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "no ping to {to} answered within {WAIT:?}"
        );
    }
    unreachable!()
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

/// Writes `data` through an echo connection while reading the echo; returns the SHA-256 of
/// what came back.
async fn echo_through(stream: TcpStream, data: &[u8]) -> [u8; 32] {
    let (mut read, mut write) = stream.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        write.write_all(&data).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 65_536];
    loop {
        let len = read.read(&mut buffer).await.unwrap();
        if len == 0 {
            break;
        }
        hasher.update(&buffer[..len]);
    }
    writer.await.unwrap();
    hasher.finalize().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Waits (bounded, polling the counters) until `direction` has accounted for `packets`
/// packets, forwarded or dropped.
async fn wait_accounted(link: &Link, direction: Direction, packets: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let counters = link.counters(direction);
        // A duplicate is counted when admitted and written (twice) later.
        if counters.packets + counters.dropped() >= packets + counters.duplicated {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the link accounted for only {counters:?} of {packets} packets"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Sends `count` numbered datagrams from `from` to `to`, 50 at a time, each batch waiting
/// until the link has taken it, so no socket or device queue overflows on the way.
async fn send_numbered(link: &Link, from: &UdpSocket, to: SocketAddr, count: u32) {
    let before = link.counters(Direction::AtoB);
    let already = (before.packets + before.dropped()).saturating_sub(before.duplicated);
    for seq in 0..count {
        from.send_to(&seq.to_be_bytes(), to).await.unwrap();
        if seq % 50 == 49 {
            wait_accounted(link, Direction::AtoB, already + u64::from(seq) + 1).await;
        }
    }
    wait_accounted(link, Direction::AtoB, already + u64::from(count)).await;
}

/// Reads numbered datagrams on `socket` as they come (so its receive buffer never fills)
/// until the test is done with them.
fn spawn_receiver(socket: UdpSocket) -> tokio::sync::mpsc::Receiver<u32> {
    let (sender, numbers) = tokio::sync::mpsc::channel(100_000);
    tokio::spawn(async move {
        let mut buffer = [0u8; 64];
        while let Ok((len, _)) = socket.recv_from(&mut buffer).await {
            assert_eq!(len, 4);
            let number = u32::from_be_bytes(buffer[..4].try_into().unwrap());
            if sender.send(number).await.is_err() {
                return;
            }
        }
    });
    numbers
}

/// Takes exactly `count` numbers from a receiver (bounded); returns them in order of arrival.
async fn receive_numbered(numbers: &mut tokio::sync::mpsc::Receiver<u32>, count: u64) -> Vec<u32> {
    let mut received = Vec::new();
    while (received.len() as u64) < count {
        let number = timeout(WAIT, numbers.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} datagrams arrived", received.len()))
            .unwrap();
        received.push(number);
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_link_carries_udp_and_tcp() {
    let link = Link::new("clean");
    let echo = spawn_udp_echo(udp_socket(&link, Side::B), "b");
    let client = udp_socket(&link, Side::A);
    for seq in 0..20 {
        let (_, seen) = ping(&client, echo, seq, WAIT)
            .await
            .expect("clean link drops nothing");
        assert_eq!(
            seen,
            format!("b|{}", client.local_addr().unwrap()),
            "no NAT before rebinding"
        );
    }

    let data = random_bytes(4 << 20, 1);
    let server = spawn_tcp_echo(&link, Side::B);
    let stream = tcp_connect(&link, Side::A, server, WAIT).await.unwrap();
    assert_eq!(echo_through(stream, &data).await, sha256(&data));

    for direction in Direction::BOTH {
        let counters = link.counters(direction);
        assert_eq!(counters.dropped(), 0, "{direction:?}: {counters:?}");
        assert!(
            counters.bytes > 4 << 20,
            "{direction:?} carried the echo: {counters:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_reaches_each_side_on_its_veth_and_sides_only_reach_each_other_on_the_link() {
    let link = Link::new("plan");
    // A listener inside B on its veth address answers the host...
    let inside = SocketAddr::from((link.address(Side::B), 0));
    let listener = link
        .enter(Side::B, || std::net::TcpListener::bind(inside))
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let admin = serve_tcp_echo(TcpListener::from_std(listener).unwrap(), Some("b-admin"));
    let mut from_host = timeout(WAIT, TcpStream::connect(admin))
        .await
        .unwrap()
        .unwrap();
    let mut greeting = [0u8; 7];
    from_host.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"b-admin");

    // ...and a listener in the host on B's host address answers B.
    let upstream = TcpListener::bind((link.host_address(Side::B), 0))
        .await
        .unwrap();
    let upstream = serve_tcp_echo(upstream, Some("host-up"));
    let mut from_b = tcp_connect(&link, Side::B, upstream, WAIT).await.unwrap();
    let mut greeting = [0u8; 7];
    from_b.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"host-up");

    // A has no route to B's veth address: only the link joins them.
    let socket = link.enter(Side::A, TcpSocket::new_v4).unwrap();
    let error = socket.connect(admin).await.unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENETUNREACH), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_drops_about_a_tenth_of_datagrams_and_tcp_still_delivers_every_byte() {
    let link = Link::new("loss");
    link.set_direction(Direction::AtoB, profile("loss=10%"));
    let receiver = udp_socket(&link, Side::B);
    let target = receiver.local_addr().unwrap();
    let mut numbers = spawn_receiver(receiver);
    let sender = udp_socket(&link, Side::A);
    send_numbered(&link, &sender, target, 1000).await;
    let counters = link.counters(Direction::AtoB);
    assert!(
        (60..=140).contains(&counters.lost),
        "10% of 1000 datagrams lost, give or take: {counters:?}"
    );
    assert_eq!(counters.lost + counters.packets, 1000, "{counters:?}");
    let received = receive_numbered(&mut numbers, counters.packets).await;
    assert_eq!(received.len() as u64, 1000 - counters.lost);

    link.set(profile("loss=10%"));
    let data = random_bytes(256 << 10, 2);
    let server = spawn_tcp_echo(&link, Side::B);
    let stream = timeout(WAIT, async {
        loop {
            // A lost SYN makes a connect slow, not impossible.
            if let Some(stream) = tcp_connect(&link, Side::A, server, Duration::from_secs(5)).await
            {
                return stream;
            }
        }
    })
    .await
    .unwrap();
    let started = Instant::now();
    let echoed = timeout(Duration::from_secs(120), echo_through(stream, &data))
        .await
        .unwrap();
    assert_eq!(echoed, sha256(&data), "TCP delivered every byte, in order");
    let lost = link.counters(Direction::AtoB).lost + link.counters(Direction::BtoA).lost;
    assert!(
        lost > counters.lost,
        "TCP segments were lost too ({lost} in all), after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_ms_each_way_makes_round_trips_of_at_least_a_hundred() {
    let link = Link::new("delay");
    link.set(profile("delay=50ms"));
    let echo = spawn_udp_echo(udp_socket(&link, Side::B), "b");
    let client = udp_socket(&link, Side::A);
    for seq in 0..5 {
        let (rtt, _) = ping(&client, echo, seq, WAIT).await.unwrap();
        assert!(rtt >= Duration::from_millis(100), "ping {seq}: {rtt:?}");
        assert!(rtt < Duration::from_secs(5), "ping {seq}: {rtt:?}");
    }
    let server = spawn_tcp_echo(&link, Side::B);
    let started = Instant::now();
    let stream = tcp_connect(&link, Side::A, server, WAIT).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "SYN and SYN-ACK: {:?}",
        started.elapsed()
    );
    assert_eq!(
        echo_through(stream, b"over a long path").await,
        sha256(b"over a long path")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_varies_the_delay_but_keeps_the_order() {
    let link = Link::new("jitter");
    link.set(profile("delay=40ms,jitter=30ms"));
    let echo = spawn_udp_echo(udp_socket(&link, Side::B), "b");
    let client = udp_socket(&link, Side::A);
    let mut rtts = Vec::new();
    for seq in 0..20 {
        rtts.push(ping(&client, echo, seq, WAIT).await.unwrap().0);
    }
    let (min, max) = (rtts.iter().min().unwrap(), rtts.iter().max().unwrap());
    assert!(*min >= Duration::from_millis(20), "{rtts:?}");
    assert!(
        *max - *min >= Duration::from_millis(10),
        "jitter varies the round trip: {rtts:?}"
    );

    let receiver = udp_socket(&link, Side::B);
    let target = receiver.local_addr().unwrap();
    let mut numbers = spawn_receiver(receiver);
    send_numbered(&link, &client, target, 300).await;
    let received = receive_numbered(&mut numbers, 300).await;
    assert_eq!(
        received,
        (0..300).collect::<Vec<_>>(),
        "jitter alone never reorders"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_reorders_and_duplication_duplicates() {
    let link = Link::new("reorder");
    link.set_direction(
        Direction::AtoB,
        profile("reorder=20%,reorder_gap=20ms,duplicate=5%"),
    );
    let receiver = udp_socket(&link, Side::B);
    let target = receiver.local_addr().unwrap();
    let mut numbers = spawn_receiver(receiver);
    let sender = udp_socket(&link, Side::A);
    send_numbered(&link, &sender, target, 300).await;
    let counters = link.counters(Direction::AtoB);
    assert!(
        counters.reordered > 20 && counters.duplicated > 3,
        "{counters:?}"
    );
    let received = receive_numbered(&mut numbers, 300 + counters.duplicated).await;
    let mut highest = 0;
    let overtaken = received
        .iter()
        .filter(|number| {
            let late = **number < highest;
            highest = highest.max(**number);
            late
        })
        .count();
    assert!(
        overtaken > 20,
        "{overtaken} datagrams arrived after a later one"
    );
    let distinct: BTreeSet<u32> = received.iter().copied().collect();
    assert_eq!(
        distinct,
        (0..300).collect(),
        "nothing lost, only reordered and duplicated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_paces_a_transfer() {
    let link = Link::new("rate");
    link.set_direction(Direction::AtoB, profile("rate=1MB,queue=200ms"));
    let server = spawn_tcp_echo(&link, Side::B);
    let stream = tcp_connect(&link, Side::A, server, WAIT).await.unwrap();
    let data = random_bytes(512 << 10, 3);
    let started = Instant::now();
    let echoed = timeout(Duration::from_secs(60), echo_through(stream, &data))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(echoed, sha256(&data));
    // 512 KiB plus headers at 1 MB/s cannot take less than 0.52 s.
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_udp_stops_udp_but_not_tcp() {
    let link = Link::new("block");
    let echo = spawn_udp_echo(udp_socket(&link, Side::B), "b");
    let client = udp_socket(&link, Side::A);
    let server = spawn_tcp_echo(&link, Side::B);
    ping(&client, echo, 0, WAIT).await.unwrap();

    link.set(profile("block_udp"));
    assert_eq!(
        ping(&client, echo, 1, SILENCE).await,
        None,
        "UDP is blocked"
    );
    let stream = tcp_connect(&link, Side::A, server, WAIT)
        .await
        .expect("TCP still connects");
    assert_eq!(echo_through(stream, b"tcp only").await, sha256(b"tcp only"));
    assert!(link.counters(Direction::AtoB).udp_blocked >= 1);

    link.set(Impairment::clean());
    ping_until_answered(&client, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_stops_udp_and_tcp_and_lifting_it_restores_both() {
    let link = Link::new("blackhole");
    let echo = spawn_udp_echo(udp_socket(&link, Side::B), "b");
    let client = udp_socket(&link, Side::A);
    let server = spawn_tcp_echo(&link, Side::B);
    let mut open = tcp_connect(&link, Side::A, server, WAIT).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut echoed = [0u8; 6];
    open.read_exact(&mut echoed).await.unwrap();

    link.set(profile("blackhole"));
    assert_eq!(ping(&client, echo, 1, SILENCE).await, None);
    assert!(
        tcp_connect(&link, Side::A, server, SILENCE).await.is_none(),
        "no new TCP connection"
    );
    open.write_all(b"during").await.unwrap();
    assert!(
        timeout(SILENCE, open.read_exact(&mut echoed))
            .await
            .is_err(),
        "nothing echoed"
    );
    let counters = link.counters(Direction::AtoB);
    assert!(counters.blackholed >= 3, "{counters:?}");

    link.set(Impairment::clean());
    ping_until_answered(&client, echo).await;
    // The open connection retransmits and carries on where it stopped.
    timeout(WAIT, open.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"during");
    let stream = tcp_connect(&link, Side::A, server, WAIT).await.unwrap();
    assert_eq!(echo_through(stream, b"after").await, sha256(b"after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_changes_the_source_b_sees_and_drops_replies_to_the_old_one() {
    let link = Link::new("rebind");
    let echo = spawn_udp_echo(udp_socket(&link, Side::B), "b");
    let client = udp_socket(&link, Side::A);
    let own = client.local_addr().unwrap();
    let (_, seen) = ping(&client, echo, 0, WAIT).await.unwrap();
    assert_eq!(seen, format!("b|{own}"));

    link.rebind_udp(None);
    let (_, seen) = ping(&client, echo, 1, WAIT)
        .await
        .expect("the reply finds its way back");
    let first: SocketAddr = seen.strip_prefix("b|").unwrap().parse().unwrap();
    assert_eq!(first.ip(), own.ip());
    assert_ne!(first.port(), own.port(), "B sees a new source port");
    let (_, again) = ping(&client, echo, 2, WAIT).await.unwrap();
    assert_eq!(again, seen, "the new mapping holds for the flow");

    let rebound = Ipv4Addr::new(10, 201, 0, 77);
    link.rebind_udp(Some(rebound));
    let (_, seen) = ping(&client, echo, 3, WAIT).await.unwrap();
    let second: SocketAddr = seen.strip_prefix("b|").unwrap().parse().unwrap();
    assert_eq!(second.ip(), rebound);
    assert!(link.counters(Direction::AtoB).translated >= 3);

    // B answering the mapping from before the rebinding reaches nobody.
    let stray = udp_socket(&link, Side::B);
    stray.send_to(b"to the old mapping", first).await.unwrap();
    wait_accounted(
        &link,
        Direction::BtoA,
        link.counters(Direction::BtoA).packets + 1,
    )
    .await;
    assert_eq!(link.counters(Direction::BtoA).nat_unmapped, 1);
}

#[test]
fn dropping_the_link_kills_what_runs_inside_and_removes_namespaces_and_veths() {
    let link = Link::new("drop");
    let mut sleeper = ChildGuard::spawn({
        let mut command = link.command(Side::A, "sleep");
        command.arg("600");
        command
    });
    let namespaces = [
        link.namespace(Side::A).to_owned(),
        link.namespace(Side::B).to_owned(),
    ];
    let veths = [
        link.host_interface(Side::A).to_owned(),
        link.host_interface(Side::B).to_owned(),
    ];
    for namespace in &namespaces {
        assert!(std::path::Path::new("/run/netns").join(namespace).exists());
    }
    drop(link);

    let deadline = Instant::now() + WAIT;
    while sleeper.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the process inside the namespace still runs"
        );
        // Reaping has no readiness signal without a pidfd.
        std::thread::sleep(Duration::from_millis(5));
    }
    for namespace in &namespaces {
        assert!(
            !std::path::Path::new("/run/netns").join(namespace).exists(),
            "{namespace}"
        );
    }
    for veth in &veths {
        assert!(
            !std::path::Path::new("/sys/class/net").join(veth).exists(),
            "{veth}"
        );
    }
}

/// A UDP echo backend on loopback answering with `name`.
async fn udp_backend(name: &'static str) -> SocketAddr {
    spawn_udp_echo(UdpSocket::bind("127.0.0.1:0").await.unwrap(), name)
}

/// Which backend answered a ping through the balancer (the echo names it).
fn backend_name(seen: &str) -> String {
    seen.split('|').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancer_spreads_udp_flows_and_keeps_each_on_one_backend() {
    let backends = [udp_backend("b0").await, udp_backend("b1").await];
    let balancer = Balancer::new("127.0.0.1:0".parse().unwrap(), &backends);
    let mut used = BTreeSet::new();
    for _ in 0..16 {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let source = client.local_addr().unwrap();
        let expected = balancer.udp_backend_for(source);
        for seq in 0..3 {
            let (_, seen) = ping(&client, balancer.local_addr(), seq, WAIT)
                .await
                .unwrap();
            assert_eq!(
                backend_name(&seen),
                format!("b{expected}"),
                "flow {source}, datagram {seq}"
            );
        }
        assert_eq!(balancer.udp_flow_backend(source), Some(expected));
        used.insert(expected);
    }
    assert_eq!(used.len(), 2, "16 flows hash onto both backends");
    let flows = balancer.counters(0).udp_flows + balancer.counters(1).udp_flows;
    assert_eq!(flows, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_source_port_lands_on_the_live_backend_when_one_is_down() {
    let backends = [udp_backend("b0").await, udp_backend("b1").await];
    let balancer = Balancer::new("127.0.0.1:0".parse().unwrap(), &backends);
    let pinned = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_, seen) = ping(&pinned, balancer.local_addr(), 0, WAIT).await.unwrap();
    let dead: usize = backend_name(&seen)[1..].parse().unwrap();
    let live = 1 - dead;

    balancer.set_down(dead, true);
    assert_eq!(
        ping(&pinned, balancer.local_addr(), 1, SILENCE).await,
        None,
        "the flow stays on the dead backend"
    );
    assert!(balancer.counters(dead).udp_dropped >= 1);
    for _ in 0..8 {
        let fresh = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (_, seen) = ping(&fresh, balancer.local_addr(), 2, WAIT)
            .await
            .expect("a fresh flow avoids the dead backend");
        assert_eq!(backend_name(&seen), format!("b{live}"));
    }

    // Before the balancer knows the backend is dead, a fresh port may hash onto it anyway.
    balancer.set_health_mode(HealthMode::Ignore);
    let (mut onto_dead, mut onto_live) = (false, false);
    for _ in 0..64 {
        let fresh = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let answered = ping(&fresh, balancer.local_addr(), 3, Duration::from_millis(150)).await;
        if balancer.udp_flow_backend(fresh.local_addr().unwrap()) == Some(dead) {
            assert_eq!(answered, None);
            onto_dead = true;
        } else {
            assert_eq!(backend_name(&answered.unwrap().1), format!("b{live}"));
            onto_live = true;
        }
        if onto_dead && onto_live {
            break;
        }
    }
    assert!(
        onto_dead && onto_live,
        "fresh ports hash onto both backends"
    );

    balancer.set_down(dead, false);
    ping(&pinned, balancer.local_addr(), 4, WAIT)
        .await
        .expect("the pinned flow recovers");
}

/// A TCP connection from a loopback port the caller learns before connecting.
async fn tcp_from_fresh_port(balancer: &Balancer) -> (TcpStream, usize) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let expected = balancer.tcp_backend_for(socket.local_addr().unwrap());
    let stream = timeout(WAIT, socket.connect(balancer.local_addr()))
        .await
        .unwrap()
        .unwrap();
    (stream, expected)
}

async fn greeting(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut name = [0u8; 2];
    timeout(WAIT, stream.read_exact(&mut name)).await.unwrap()?;
    Ok(String::from_utf8_lossy(&name).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balancer_hashes_tcp_connections_and_resets_those_of_a_refusing_backend() {
    let mut backends = Vec::new();
    for name in ["b0", "b1"] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        backends.push(serve_tcp_echo(listener, Some(name)));
    }
    let balancer = Balancer::new("127.0.0.1:0".parse().unwrap(), &backends);
    let mut open = Vec::new();
    for _ in 0..12 {
        let (mut stream, expected) = tcp_from_fresh_port(&balancer).await;
        assert_eq!(greeting(&mut stream).await.unwrap(), format!("b{expected}"));
        open.push((stream, expected));
    }
    let used: BTreeSet<usize> = open.iter().map(|(_, backend)| *backend).collect();
    assert_eq!(used.len(), 2, "12 connections hash onto both backends");

    balancer.set_state(0, BackendState::Refusing);
    for (stream, backend) in &mut open {
        stream.write_all(b"x").await.unwrap_or(());
        let mut byte = [0u8; 1];
        let read = timeout(WAIT, stream.read(&mut byte)).await.unwrap();
        if *backend == 0 {
            assert!(matches!(read, Err(_) | Ok(0)), "reset: {read:?}");
        } else {
            assert_eq!(read.unwrap(), 1, "the other backend's connections carry on");
        }
    }
    for _ in 0..4 {
        let (mut stream, expected) = tcp_from_fresh_port(&balancer).await;
        assert_eq!(expected, 1);
        assert_eq!(greeting(&mut stream).await.unwrap(), "b1");
    }
    assert!(balancer.counters(0).tcp_reset >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_inside_side_b_serves_side_a_across_the_impaired_link() {
    let link = Link::new("balanced");
    link.set(profile("delay=10ms"));
    let backends = [
        spawn_udp_echo(udp_socket(&link, Side::B), "b0"),
        spawn_udp_echo(udp_socket(&link, Side::B), "b1"),
    ];
    let balancer = Balancer::start(BalancerOptions {
        namespace: Some(link.namespace(Side::B).to_owned()),
        ..BalancerOptions::new(
            SocketAddr::from((link.tunnel_address(Side::B), 0)),
            &backends,
        )
    })
    .unwrap();
    assert_eq!(balancer.local_addr().ip(), link.tunnel_address(Side::B));

    let client = udp_socket(&link, Side::A);
    let (rtt, seen) = ping(&client, balancer.local_addr(), 0, WAIT).await.unwrap();
    assert!(rtt >= Duration::from_millis(20), "{rtt:?}");
    let seen_by_backend: SocketAddr = seen.split('|').nth(1).unwrap().parse().unwrap();
    assert_ne!(
        seen_by_backend,
        client.local_addr().unwrap(),
        "backends see the balancer's flow socket"
    );

    // A NAT rebinding looks like a new flow to the balancer, which hashes it afresh.
    let flows =
        |balancer: &Balancer| balancer.counters(0).udp_flows + balancer.counters(1).udp_flows;
    assert_eq!(flows(&balancer), 1);
    link.rebind_udp(None);
    ping(&client, balancer.local_addr(), 1, WAIT).await.unwrap();
    assert_eq!(flows(&balancer), 2);
}
