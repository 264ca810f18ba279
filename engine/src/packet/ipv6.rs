//! IPv6 on the packet path: the header and its extension headers read in place, and the
//! answers the balancer gives for its VIPs (Neighbor Advertisements, echo replies), written in
//! place. No I/O; every rule is a unit test in [`crate::packet::dataplane`]'s tests.
//!
//! - The fixed header is checked at fixed offsets (version 6, a payload length the frame
//!   holds). Extension headers are walked, at most [`MAX_EXTENSION_HEADERS`] of them (a chain
//!   built to be long costs a bounded walk); a header that runs past the packet is a bad header.
//! - A Fragment header (RFC 8200 4.5) names the datagram by its 32-bit identification; the
//!   first piece (offset 0) carries the transport header, later ones do not. An atomic
//!   fragment (offset 0, no more fragments: RFC 6946) is a whole datagram.
//! - Neighbor Solicitation for a VIP (RFC 4861 7.2.4) is turned into the solicited Neighbor
//!   Advertisement from the interface's MAC, with the Override flag (the VIP is ours alone).

use crate::packet::counters::DropReason;
use crate::packet::dataplane::{Ip, Quoted};
use crate::packet::flows::NO_FLAGS;

/// IPv6 fields, relative to the frame start (after a 14-byte Ethernet header).
mod field {
    use std::ops::Range;
    pub const VERSION: usize = 14;
    pub const PAYLOAD_LEN: Range<usize> = 18..20;
    pub const NEXT_HEADER: usize = 20;
    pub const HOP_LIMIT: usize = 21;
    pub const SRC: Range<usize> = 22..38;
    pub const DST: Range<usize> = 38..54;
    /// Ethernet and the fixed IPv6 header.
    pub const HEADER_END: usize = 54;
}

const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_AUTHENTICATION: u8 = 51;
const NEXT_DESTINATION_OPTIONS: u8 = 60;
/// ICMPv6's next-header value.
pub const NEXT_ICMPV6: u8 = 58;
const NEXT_TCP: u8 = 6;
/// TCP flags byte within the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// Extension headers walked before a packet is given up on (Linux accepts any number; real
/// traffic to a service carries none or one or two).
pub const MAX_EXTENSION_HEADERS: usize = 8;

const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ND_NEIGHBOR_SOLICITATION: u8 = 135;
const ND_NEIGHBOR_ADVERTISEMENT: u8 = 136;
const ND_OPTION_TARGET_LINK_ADDRESS: u8 = 2;
/// Solicited and Override (RFC 4861 4.4).
const NA_SOLICITED_OVERRIDE: u8 = 0x60;
const NA_OVERRIDE: u8 = 0x20;
/// ND messages carry hop limit 255: proof that they were not forwarded (RFC 4861 7.1.1).
const ND_HOP_LIMIT: u8 = 255;
/// Hop limit of the echo replies the balancer originates.
const REPLY_HOP_LIMIT: u8 = 64;
/// An NS or NA without options: ICMPv6 header and target address.
const ND_MESSAGE_LEN: usize = 24;
/// With one link-layer address option.
const ND_MESSAGE_WITH_LINK_ADDRESS_LEN: usize = 32;
/// Length of an unsolicited Neighbor Advertisement frame.
pub const UNSOLICITED_NA_LEN: usize = field::HEADER_END + ND_MESSAGE_WITH_LINK_ADDRESS_LEN;
/// ff02::1, all nodes on the link.
const ALL_NODES: u128 = 0xff02 << 112 | 1;

/// Reads and checks an IPv6 frame's header and walks its extension headers.
#[inline]
pub fn parse(frame: &[u8]) -> Result<Ip<u128>, DropReason> {
    let Some(header) = frame.first_chunk::<{ field::HEADER_END }>() else {
        return Err(DropReason::Truncated);
    };
    if header[field::VERSION] >> 4 != 6 {
        return Err(DropReason::BadIpHeader);
    }
    let payload_len = usize::from(u16::from_be_bytes([
        header[field::PAYLOAD_LEN.start],
        header[field::PAYLOAD_LEN.start + 1],
    ]));
    let end = field::HEADER_END + payload_len;
    if end > frame.len() {
        return Err(DropReason::Truncated);
    }
    let address = |range: std::ops::Range<usize>| {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&header[range]);
        u128::from_be_bytes(bytes)
    };
    let Walked { next, at, fragment } =
        walk(&frame[..end], field::HEADER_END, header[field::NEXT_HEADER])?;
    let (id, offset, more, fragment_protocol) = fragment.unwrap_or((0, 0, false, next));
    let first_fragment = offset == 0;
    let transport = if first_fragment {
        frame.get(at..end).unwrap_or_default()
    } else {
        &[]
    };
    let ports = transport
        .first_chunk::<4>()
        .map(|ports| u32::from_be_bytes(*ports));
    let tcp_flags = match transport.get(TCP_FLAGS_OFFSET) {
        Some(&flags) if next == NEXT_TCP => u16::from(flags),
        _ => NO_FLAGS,
    };
    Ok(Ip {
        src: address(field::SRC),
        dst: address(field::DST),
        protocol: next,
        id,
        fragment_protocol,
        fragmented: !first_fragment || more,
        first_fragment,
        l4: at,
        l4_end: end,
        ports,
        tcp_flags,
    })
}

/// Where a walk over extension headers ended.
struct Walked {
    /// The header after the last extension header (the transport protocol).
    next: u8,
    /// Where that header starts.
    at: usize,
    /// A Fragment header's identification, offset (8-byte units), more-fragments flag and
    /// next header.
    fragment: Option<(u32, u16, bool, u8)>,
}

/// Walks the extension headers of `packet` (which ends where the packet does) from `at`, the
/// first being `next`: at most [`MAX_EXTENSION_HEADERS`], none past the end.
fn walk(packet: &[u8], mut at: usize, mut next: u8) -> Result<Walked, DropReason> {
    let end = packet.len();
    let mut fragment: Option<(u32, u16, bool, u8)> = None;
    let mut walked = 0;
    // Extension headers until the transport header (or one the balancer does not read).
    loop {
        let is_extension = matches!(
            next,
            NEXT_HOP_BY_HOP
                | NEXT_ROUTING
                | NEXT_FRAGMENT
                | NEXT_AUTHENTICATION
                | NEXT_DESTINATION_OPTIONS
        );
        if !is_extension {
            break;
        }
        if walked == MAX_EXTENSION_HEADERS {
            return Err(DropReason::ExtensionHeaders);
        }
        let length = match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DESTINATION_OPTIONS => {
                let Some(&[following, units]) = packet.get(at..).and_then(|h| h.first_chunk())
                else {
                    return Err(DropReason::BadIpHeader);
                };
                next = following;
                (usize::from(units) + 1) * 8
            }
            NEXT_AUTHENTICATION => {
                let Some(&[following, units]) = packet.get(at..).and_then(|h| h.first_chunk())
                else {
                    return Err(DropReason::BadIpHeader);
                };
                next = following;
                (usize::from(units) + 2) * 4
            }
            NEXT_FRAGMENT => {
                let Some(h) = packet.get(at..).and_then(|h| h.first_chunk::<8>()) else {
                    return Err(DropReason::BadIpHeader);
                };
                if fragment.is_some() {
                    return Err(DropReason::BadIpHeader);
                }
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                fragment = Some((id, offset_flags >> 3, offset_flags & 1 == 1, h[0]));
                next = h[0];
                8
            }
            _ => break,
        };
        at += length;
        walked += 1;
        if at > end {
            return Err(DropReason::BadIpHeader);
        }
        // A later fragment's rest is data, not headers.
        if matches!(fragment, Some((_, offset, _, _)) if offset != 0) {
            break;
        }
    }
    Ok(Walked { next, at, fragment })
}

/// The connection an ICMPv6 error's quote is about (RFC 4443 2.4: as much of the packet as
/// fits), when it holds the ports of a first (or only) fragment.
pub fn quoted(quote: &[u8]) -> Option<Quoted<u128>> {
    let header = quote.first_chunk::<40>()?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let address = |at: usize| -> Option<u128> {
        Some(u128::from_be_bytes(*header.get(at..)?.first_chunk()?))
    };
    let walked = walk(quote, 40, header[6]).ok()?;
    if matches!(walked.fragment, Some((_, offset, _, _)) if offset != 0) {
        return None;
    }
    let ports = u32::from_be_bytes(*quote.get(walked.at..)?.first_chunk()?);
    Some(Quoted {
        vip: address(8)?,
        client: address(24)?,
        protocol: walked.next,
        client_ports: ports.rotate_left(16),
    })
}

/// The one's complement sum of ICMPv6's pseudo-header (RFC 8200 8.1) and message.
fn icmpv6_checksum(src: &[u8], dst: &[u8], message: &[u8]) -> u16 {
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
    etherparse::checksum::Sum16BitWords::new()
        .add_slice(src)
        .add_slice(dst)
        .add_4bytes(length.to_be_bytes())
        .add_2bytes([0, NEXT_ICMPV6])
        .add_slice(message)
        .ones_complement()
        .to_be()
}

/// What the balancer does with an ICMPv6 message to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Icmpv6 {
    /// A Neighbor Solicitation for this target.
    Solicitation([u8; 16]),
    /// A Neighbor Advertisement for this target, from this MAC (its target link-layer
    /// option's, else the frame's source).
    Advertisement([u8; 16], [u8; 6]),
    /// An echo request.
    EchoRequest,
    /// An error (types below 128: destination unreachable, packet too big, time exceeded,
    /// parameter problem) quoting the packet it is about.
    Error,
    /// Anything else.
    Other,
}

/// Classifies the ICMPv6 message of a whole (unfragmented) packet `ip`.
pub fn classify_icmpv6(frame: &[u8], ip: &Ip<u128>) -> Icmpv6 {
    let message = frame.get(ip.l4..ip.l4_end).unwrap_or_default();
    match message {
        [ND_NEIGHBOR_SOLICITATION, 0, ..] if message.len() >= ND_MESSAGE_LEN => {
            let mut target = [0u8; 16];
            target.copy_from_slice(&message[8..24]);
            Icmpv6::Solicitation(target)
        }
        [ND_NEIGHBOR_ADVERTISEMENT, 0, ..] if message.len() >= ND_MESSAGE_LEN => {
            let mut target = [0u8; 16];
            target.copy_from_slice(&message[8..24]);
            let option = message
                .get(ND_MESSAGE_LEN..ND_MESSAGE_WITH_LINK_ADDRESS_LEN)
                .filter(|o| o[0] == ND_OPTION_TARGET_LINK_ADDRESS && o[1] == 1)
                .and_then(|o| <[u8; 6]>::try_from(&o[2..8]).ok());
            let source = <[u8; 6]>::try_from(&frame[6..12]).unwrap_or_default();
            Icmpv6::Advertisement(target, option.unwrap_or(source))
        }
        [ICMPV6_ECHO_REQUEST, 0, ..] if message.len() >= 8 => Icmpv6::EchoRequest,
        [kind, ..] if *kind < 128 && message.len() >= 8 => Icmpv6::Error,
        _ => Icmpv6::Other,
    }
}

/// Turns a Neighbor Solicitation for `target` (a VIP) into the advertisement that answers it,
/// from `own_mac`. False (the frame unchanged) when it may not be answered: not sent with hop
/// limit 255, or a duplicate address detection probe (unspecified source: its answer would
/// need more room than its frame has), or a multicast one without the asker's link-layer
/// address. The frame keeps its length: the advertisement (with our link-layer address when
/// there is room for it) is at most as long, the IPv6 payload length says how long.
pub fn answer_solicitation(
    frame: &mut [u8],
    ip: &Ip<u128>,
    target: [u8; 16],
    own_mac: [u8; 6],
) -> bool {
    if frame.get(field::HOP_LIMIT) != Some(&ND_HOP_LIMIT) || ip.src == 0 {
        return false;
    }
    let message_len = ip.l4_end - ip.l4;
    let room_for_address = message_len >= ND_MESSAGE_WITH_LINK_ADDRESS_LEN;
    let asked_by_multicast = ip.dst >> 120 == 0xff;
    // RFC 4861 7.2.4: the answer to a multicast solicitation carries our address.
    if asked_by_multicast && !room_for_address {
        return false;
    }
    // The asker's MAC: its Ethernet source (the source link-layer option says the same).
    let mut asker_mac = [0u8; 6];
    asker_mac.copy_from_slice(&frame[6..12]);
    let l4 = ip.l4;
    let reply_len = if room_for_address {
        ND_MESSAGE_WITH_LINK_ADDRESS_LEN
    } else {
        ND_MESSAGE_LEN
    };
    let src = frame[field::SRC].to_vec();
    // IPv6 header: from the VIP to the asker, hop limit 255, the new payload length.
    frame[field::DST].copy_from_slice(&src);
    frame[field::SRC].copy_from_slice(&target);
    frame[field::HOP_LIMIT] = ND_HOP_LIMIT;
    let payload = u16::try_from(l4 - field::HEADER_END + reply_len).unwrap_or(u16::MAX);
    frame[field::PAYLOAD_LEN].copy_from_slice(&payload.to_be_bytes());
    // Extension headers before the message (none in practice) stay as they are.
    let message = &mut frame[l4..l4 + reply_len];
    message[0] = ND_NEIGHBOR_ADVERTISEMENT;
    message[1] = 0;
    message[2..4].copy_from_slice(&[0, 0]);
    message[4..8].copy_from_slice(&[NA_SOLICITED_OVERRIDE, 0, 0, 0]);
    // message[8..24] is the target already.
    if room_for_address {
        message[24] = ND_OPTION_TARGET_LINK_ADDRESS;
        message[25] = 1;
        message[26..32].copy_from_slice(&own_mac);
    }
    // What the solicitation held past the advertisement is padding now.
    frame[l4 + reply_len..ip.l4_end].fill(0);
    finish_icmpv6(frame, l4, reply_len);
    frame.copy_within(6..12, 0);
    frame[0..6].copy_from_slice(&asker_mac);
    frame[6..12].copy_from_slice(&own_mac);
    true
}

/// Writes the ICMPv6 checksum of the message at `l4..l4 + len`.
fn finish_icmpv6(frame: &mut [u8], l4: usize, len: usize) {
    let checksum = icmpv6_checksum(&frame[field::SRC], &frame[field::DST], &frame[l4..l4 + len]);
    frame[l4 + 2..l4 + 4].copy_from_slice(&checksum.to_be_bytes());
}

/// Turns an echo request into the reply from the VIP it was sent to.
pub fn answer_echo(frame: &mut [u8], ip: &Ip<u128>, own_mac: [u8; 6]) {
    let l4 = ip.l4;
    frame[l4] = ICMPV6_ECHO_REPLY;
    let mut src = [0u8; 16];
    src.copy_from_slice(&frame[field::SRC]);
    frame.copy_within(field::DST, field::SRC.start);
    frame[field::DST].copy_from_slice(&src);
    frame[field::HOP_LIMIT] = REPLY_HOP_LIMIT;
    frame[l4 + 2..l4 + 4].copy_from_slice(&[0, 0]);
    let len = ip.l4_end - l4;
    finish_icmpv6(frame, l4, len);
    frame.copy_within(6..12, 0);
    frame[6..12].copy_from_slice(&own_mac);
}

/// Whether an echo reply may go to `source`: not multicast, unspecified or loopback.
pub fn may_answer(source: u128) -> bool {
    let address = std::net::Ipv6Addr::from(source);
    !(address.is_multicast() || address.is_unspecified() || address.is_loopback())
}

/// Writes an unsolicited Neighbor Advertisement announcing `vip` at `mac` to all nodes (RFC
/// 4861 7.2.6: what IPv6 has for gratuitous ARP), Override set, and returns its length.
pub fn write_unsolicited_na(
    buf: &mut [u8; UNSOLICITED_NA_LEN],
    mac: [u8; 6],
    vip: [u8; 16],
) -> usize {
    buf.fill(0);
    // 33:33 + the low 32 bits of ff02::1 (RFC 2464 7).
    buf[0..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    buf[6..12].copy_from_slice(&mac);
    buf[12..14].copy_from_slice(&etherparse::EtherType::IPV6.0.to_be_bytes());
    buf[field::VERSION] = 0x60;
    buf[field::PAYLOAD_LEN]
        .copy_from_slice(&(ND_MESSAGE_WITH_LINK_ADDRESS_LEN as u16).to_be_bytes());
    buf[field::NEXT_HEADER] = NEXT_ICMPV6;
    buf[field::HOP_LIMIT] = ND_HOP_LIMIT;
    buf[field::SRC].copy_from_slice(&vip);
    buf[field::DST].copy_from_slice(&ALL_NODES.to_be_bytes());
    let l4 = field::HEADER_END;
    buf[l4] = ND_NEIGHBOR_ADVERTISEMENT;
    buf[l4 + 4] = NA_OVERRIDE;
    buf[l4 + 8..l4 + 24].copy_from_slice(&vip);
    buf[l4 + 24] = ND_OPTION_TARGET_LINK_ADDRESS;
    buf[l4 + 25] = 1;
    buf[l4 + 26..l4 + 32].copy_from_slice(&mac);
    finish_icmpv6(buf, l4, ND_MESSAGE_WITH_LINK_ADDRESS_LEN);
    UNSOLICITED_NA_LEN
}
