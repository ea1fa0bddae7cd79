//! Just enough IPv4 to impair by protocol and to rewrite UDP endpoints: reading the protocol
//! and the UDP 4-tuple of a raw packet, rewriting its source or destination, and fixing the
//! IPv4 and UDP checksums. Bytes in, bytes out: no I/O.

use std::net::{Ipv4Addr, SocketAddrV4};

pub(crate) const PROTOCOL_UDP: u8 = 17;

/// The parts of an IPv4 packet the relay acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ipv4Summary {
    pub(crate) protocol: u8,
    /// Source and destination for an unfragmented UDP datagram, else `None`.
    pub(crate) udp: Option<(SocketAddrV4, SocketAddrV4)>,
}

/// Reads `packet` as IPv4; `None` for anything else (IPv6, truncated headers).
pub(crate) fn summarize(packet: &[u8]) -> Option<Ipv4Summary> {
    let header_len = ipv4_header_len(packet)?;
    let protocol = packet[9];
    let fragmented = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    let udp =
        (protocol == PROTOCOL_UDP && !fragmented && packet.len() >= header_len + 8).then(|| {
            let ports = &packet[header_len..];
            (
                SocketAddrV4::new(
                    ipv4_at(packet, 12),
                    u16::from_be_bytes([ports[0], ports[1]]),
                ),
                SocketAddrV4::new(
                    ipv4_at(packet, 16),
                    u16::from_be_bytes([ports[2], ports[3]]),
                ),
            )
        });
    Some(Ipv4Summary { protocol, udp })
}

/// Which end of a UDP datagram to rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Source,
    Destination,
}

/// Rewrites one endpoint of the unfragmented UDP datagram in `packet` and recomputes both
/// checksums (a UDP checksum of zero, "none", stays zero). Returns false, leaving the packet
/// untouched, if it is not one.
pub(crate) fn rewrite_udp(packet: &mut [u8], endpoint: Endpoint, to: SocketAddrV4) -> bool {
    if summarize(packet).and_then(|s| s.udp).is_none() {
        return false;
    }
    let Some(header_len) = ipv4_header_len(packet) else {
        return false;
    };
    let (address_at, port_at) = match endpoint {
        Endpoint::Source => (12, header_len),
        Endpoint::Destination => (16, header_len + 2),
    };
    packet[address_at..address_at + 4].copy_from_slice(&to.ip().octets());
    packet[port_at..port_at + 2].copy_from_slice(&to.port().to_be_bytes());

    packet[10..12].copy_from_slice(&[0, 0]);
    let header_sum = checksum(0, &packet[..header_len]);
    packet[10..12].copy_from_slice(&header_sum.to_be_bytes());

    let udp_checksum_at = header_len + 6;
    if packet[udp_checksum_at..udp_checksum_at + 2] != [0, 0] {
        let udp_len = u16::from_be_bytes([packet[header_len + 4], packet[header_len + 5]]);
        let udp_end = (header_len + usize::from(udp_len)).min(packet.len());
        packet[udp_checksum_at..udp_checksum_at + 2].copy_from_slice(&[0, 0]);
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&packet[12..20]);
        pseudo[9] = PROTOCOL_UDP;
        pseudo[10..12].copy_from_slice(&udp_len.to_be_bytes());
        let sum = checksum(sum_words(0, &pseudo), &packet[header_len..udp_end]);
        let sum = if sum == 0 { 0xffff } else { sum };
        packet[udp_checksum_at..udp_checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    true
}

fn ipv4_header_len(packet: &[u8]) -> Option<usize> {
    let first = *packet.first()?;
    let header_len = usize::from(first & 0x0f) * 4;
    (first >> 4 == 4 && header_len >= 20 && packet.len() >= header_len).then_some(header_len)
}

fn ipv4_at(packet: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3])
}

/// The one's-complement sum of `bytes` (padded with a zero byte if odd) added to `sum`.
fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// The Internet checksum (RFC 1071) of `bytes` on top of a partial `sum`.
fn checksum(sum: u32, bytes: &[u8]) -> u16 {
    let mut sum = sum_words(sum, bytes);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP datagram 10.0.0.1:1234 → 10.0.0.2:80 carrying "hello", with the checksums
    /// written out (computed apart from this module, with a few lines of Python).
    fn datagram() -> Vec<u8> {
        vec![
            0x45, 0, 0, 33, 0, 1, 0x40, 0, 64, 17, 0x26, 0xc9, 10, 0, 0, 1, 10, 0, 0, 2, //
            0x04, 0xd2, 0, 80, 0, 13, 0xa2, 0xdd, b'h', b'e', b'l', b'l', b'o',
        ]
    }

    /// A packet whose checksums are right sums to 0xffff over the header (and over the
    /// pseudo-header plus UDP segment), so the complement is zero.
    fn checksums_hold(packet: &[u8]) -> bool {
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&packet[12..20]);
        pseudo[9] = 17;
        pseudo[10..12].copy_from_slice(&packet[24..26]);
        checksum(0, &packet[..20]) == 0 && checksum(sum_words(0, &pseudo), &packet[20..]) == 0
    }

    #[test]
    fn known_checksums() {
        let packet = datagram();
        assert!(checksums_hold(&packet));
    }

    #[test]
    fn summarizes_udp() {
        let summary = summarize(&datagram()).unwrap();
        assert_eq!(summary.protocol, PROTOCOL_UDP);
        assert_eq!(
            summary.udp,
            Some((
                "10.0.0.1:1234".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap()
            ))
        );
        assert_eq!(summarize(&[0x60; 40]), None, "IPv6 is not summarized");
        assert_eq!(summarize(&[0x45, 0, 0]), None, "truncated");
    }

    #[test]
    fn rewrites_source_and_destination_with_valid_checksums() {
        let mut packet = datagram();
        assert!(rewrite_udp(
            &mut packet,
            Endpoint::Source,
            "10.0.0.9:40000".parse().unwrap()
        ));
        assert!(rewrite_udp(
            &mut packet,
            Endpoint::Destination,
            "10.0.0.7:81".parse().unwrap()
        ));
        let summary = summarize(&packet).unwrap();
        assert_eq!(
            summary.udp,
            Some((
                "10.0.0.9:40000".parse().unwrap(),
                "10.0.0.7:81".parse().unwrap()
            ))
        );
        assert!(checksums_hold(&packet));
        assert_eq!(&packet[28..], b"hello");
    }

    #[test]
    fn leaves_other_packets_alone() {
        let mut packet = datagram();
        packet[9] = 6; // TCP
        let before = packet.clone();
        assert!(!rewrite_udp(
            &mut packet,
            Endpoint::Source,
            "10.0.0.9:1".parse().unwrap()
        ));
        assert_eq!(packet, before);
        let mut fragment = datagram();
        fragment[6] = 0x20; // more fragments
        assert_eq!(summarize(&fragment).unwrap().udp, None);
    }
}
