//! IPv6 frame-in, frame-out tests: Neighbor Discovery, echo, forwarding through IPv6's tables,
//! extension headers, fragments and the persistence prefix.

use super::*;
use crate::packet::testing;
use etherparse::{Icmpv6Header, Icmpv6Type, PacketBuilder};
use lbd_config::Config;
use std::net::Ipv6Addr;

const OWN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const RS1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const RS2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
/// 2001:2::/48 is IPv6's benchmarking range (RFC 5180), as 198.18.0.0/15 is IPv4's.
const VIP6: &str = "2001:2::100";
const CLIENT6: &str = "2001:2:0:1::7";

fn config_with(prefix: u8) -> Config {
    config_and(prefix, "")
}

/// The test config with `extra` TOML after the first service's servers.
fn config_and(prefix: u8, extra: &str) -> Config {
    Config::from_toml_str(&format!(
        r#"
[engine]
interface = "eth0"
queues = [0]

[[service]]
label = "Wowza Streaming"
vip = "198.18.0.100"
vip6 = "{VIP6}"
ports = "1935"
table_size = 251
persistence_prefix_v6 = {prefix}

[[service.real_server]]
label = "rs1"
ip = "198.18.0.11"
mac = "02:00:00:00:00:11"

[[service.real_server]]
label = "rs2"
ip = "2001:2::12"
mac = "02:00:00:00:00:12"
{extra}
[[service]]
label = "Media UDP"
vip = "2001:2::101"
ports = "5000"
protocol = "udp"
table_size = 251

[[service.real_server]]
label = "rs1"
ip = "198.18.0.11"
mac = "02:00:00:00:00:11"
"#
    ))
    .expect("test config is valid")
}

fn dataplane_with(prefix: u8) -> Dataplane {
    dataplane_of(&config_with(prefix))
}

fn dataplane_of(config: &Config) -> Dataplane {
    testing::dataplane(config, OWN_MAC)
}

fn dataplane() -> Dataplane {
    dataplane_with(128)
}

fn v6(text: &str) -> [u8; 16] {
    text.parse::<Ipv6Addr>().expect("address").octets()
}

fn tcp6(src: &str, sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv6(v6(src), v6(VIP6), 64)
        .tcp(sport, dport, 1000, 64240);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut frame = Vec::new();
    builder.write(&mut frame, b"data").expect("write");
    frame
}

/// The Neighbor Solicitation a host sends to learn `target`'s MAC.
fn solicitation(target: &str) -> Vec<u8> {
    testing::neighbor_solicitation(CLIENT_MAC, v6(CLIENT6), v6(target)).expect("write")
}

/// The ICMPv6 message of a frame with no extension headers: its header (checksum checked
/// against its addresses) and the rest.
fn icmpv6_of(frame: &[u8]) -> (Icmpv6Header, Vec<u8>) {
    let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
    let message = &frame[54..54 + payload_len];
    let (header, rest) = Icmpv6Header::from_slice(message).expect("icmpv6");
    let src: [u8; 16] = frame[22..38].try_into().expect("src");
    let dst: [u8; 16] = frame[38..54].try_into().expect("dst");
    let checksum = header
        .icmp_type
        .calc_checksum(src, dst, rest)
        .expect("checksum");
    assert_eq!(header.checksum, checksum, "ICMPv6 checksum");
    (header, rest.to_vec())
}

#[test]
fn a_solicitation_for_a_vip_is_answered_with_our_mac() {
    let mut dp = dataplane();
    let mut frame = solicitation(VIP6);
    let length = frame.len();
    assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
    assert_eq!(frame.len(), length);
    assert_eq!(frame[0..6], CLIENT_MAC);
    assert_eq!(frame[6..12], OWN_MAC);
    assert_eq!(frame[21], 255, "hop limit");
    assert_eq!(frame[22..38], v6(VIP6), "from the VIP");
    assert_eq!(frame[38..54], v6(CLIENT6), "to the asker");
    let (header, rest) = icmpv6_of(&frame);
    assert_eq!(header.icmp_type.type_u8(), 136);
    // Solicited and Override; the target; our MAC as the target link-layer option.
    assert_eq!(header.to_bytes()[4], 0x60);
    assert_eq!(rest[0..16], v6(VIP6));
    assert_eq!(rest[16..18], [2, 1]);
    assert_eq!(rest[18..24], OWN_MAC);
    assert_eq!(dp.counters().nd_replies, 1);
    assert_eq!(dp.counters().accounted_frames(), dp.counters().rx_frames);
}

#[test]
fn a_unicast_solicitation_without_options_is_answered_in_its_own_length() {
    let mut dp = dataplane();
    // A reachability check straight to the VIP, to our MAC, without a source option.
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv6(v6(CLIENT6), v6(VIP6), 255)
        .icmpv6(Icmpv6Type::NeighborSolicitation);
    let mut frame = Vec::new();
    builder.write(&mut frame, &v6(VIP6)).expect("write");
    let length = frame.len();
    assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
    assert_eq!(frame.len(), length);
    let (header, rest) = icmpv6_of(&frame);
    assert_eq!(header.icmp_type.type_u8(), 136);
    assert_eq!(rest, v6(VIP6).to_vec(), "no room, no option");
}

#[test]
fn solicitations_the_balancer_may_not_answer_are_dropped() {
    let mut dp = dataplane();
    // For an address that is no VIP.
    let mut other = solicitation("2001:2::55");
    // Forwarded by a router: hop limit below 255.
    let mut forwarded = solicitation(VIP6);
    forwarded[21] = 64;
    // Duplicate address detection: from the unspecified address.
    let mut probe = solicitation(VIP6);
    probe[22..38].copy_from_slice(&[0; 16]);
    for (name, frame) in [
        ("other", &mut other),
        ("forwarded", &mut forwarded),
        ("dad", &mut probe),
    ] {
        assert_eq!(
            dp.process(frame, 0),
            Verdict::Drop(DropReason::NdNotAnswered),
            "{name}"
        );
    }
    assert_eq!(dp.counters().nd_replies, 0);
}

#[test]
fn an_echo_request_to_a_vip_is_answered_from_it() {
    let mut dp = dataplane();
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv6(v6(CLIENT6), v6(VIP6), 17)
        .icmpv6_echo_request(0x1234, 7);
    let mut frame = Vec::new();
    builder.write(&mut frame, b"ping payload").expect("write");
    assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
    assert_eq!(frame[0..6], CLIENT_MAC);
    assert_eq!(frame[6..12], OWN_MAC);
    assert_eq!(frame[22..38], v6(VIP6));
    assert_eq!(frame[38..54], v6(CLIENT6));
    let (header, rest) = icmpv6_of(&frame);
    assert_eq!(header.icmp_type.type_u8(), 129);
    assert_eq!(rest, b"ping payload");
    assert_eq!(dp.counters().icmp_echo_replies, 1);
    // Never to a multicast source.
    let mut multicast = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv6(v6("ff02::1"), v6(VIP6), 17)
        .icmpv6_echo_request(1, 1)
        .write(&mut multicast, b"x")
        .expect("write");
    assert_eq!(
        dp.process(&mut multicast, 0),
        Verdict::Drop(DropReason::IcmpBadSource)
    );
}

#[test]
fn tcp_to_an_ipv6_vip_is_forwarded_by_mac_rewrite_and_persisted() {
    let mut dp = dataplane();
    let mut servers = std::collections::BTreeSet::new();
    for client in 1..=20 {
        let src = format!("2001:2:0:1::{client:x}");
        let original = tcp6(&src, 40000, 1935, true);
        let mut frame = original.clone();
        assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit, "{src}");
        // Only the Ethernet addresses change.
        assert_eq!(frame[6..12], OWN_MAC);
        assert_eq!(frame[12..], original[12..]);
        let server: [u8; 6] = frame[0..6].try_into().expect("mac");
        assert!(server == RS1_MAC || server == RS2_MAC);
        servers.insert(server);
        // Its handshake completes: the client is persisted; a new connection from another
        // port goes to the same server.
        let mut ack = tcp6(&src, 40000, 1935, false);
        assert_eq!(dp.process(&mut ack, 1), Verdict::Transmit);
        for port in [40001, 40002] {
            let mut again = tcp6(&src, port, 1935, true);
            assert_eq!(dp.process(&mut again, 2), Verdict::Transmit);
            assert_eq!(again[0..6], server, "{src} port {port}");
        }
    }
    assert_eq!(servers.len(), 2, "20 clients use both servers");
    assert_eq!(dp.tables_v6().flows.entries(), 60);
    assert_eq!(dp.tables_v6().persistence.entries(), 20);
    assert_eq!(dp.flows().entries(), 0, "IPv4's tables are untouched");
    assert_eq!(dp.counters().services[0].total.packets, 80);
    // A port that is not served, and an address that is no VIP.
    let mut closed = tcp6(CLIENT6, 40000, 22, true);
    assert_eq!(
        dp.process(&mut closed, 0),
        Verdict::Drop(DropReason::PortNotServed)
    );
    let mut elsewhere = tcp6(CLIENT6, 40000, 1935, true);
    elsewhere[38..54].copy_from_slice(&v6("2001:2::99"));
    assert_eq!(
        dp.process(&mut elsewhere, 0),
        Verdict::Drop(DropReason::NotVip)
    );
}

#[test]
fn with_a_64_bit_prefix_the_addresses_of_one_network_share_a_server() {
    let mut by_prefix = dataplane_with(64);
    let mut by_address = dataplane();
    let mut split = 0;
    for network in 1..=40u16 {
        let first = format!("2001:2:{network:x}:1::a");
        let second = format!("2001:2:{network:x}:1:5ee:beef:1:2");
        let server = |dp: &mut Dataplane, src: &str| {
            let mut frame = tcp6(src, 40000, 1935, true);
            assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
            <[u8; 6]>::try_from(&frame[0..6]).expect("mac")
        };
        assert_eq!(
            server(&mut by_prefix, &first),
            server(&mut by_prefix, &second),
            "{first} and {second}"
        );
        if server(&mut by_address, &first) != server(&mut by_address, &second) {
            split += 1;
        }
    }
    // Without the prefix, whole addresses are hashed: about half the pairs part.
    assert!(split > 5, "{split} of 40 pairs split by address");
}

/// `frame` with an extension header of `kind` (8 bytes, next header TCP) after the fixed
/// header.
fn with_extension(frame: &[u8], kind: u8, body: [u8; 6]) -> Vec<u8> {
    let mut out = frame[..54].to_vec();
    out.push(frame[20]);
    out.push(0);
    out.extend_from_slice(&body);
    out.extend_from_slice(&frame[54..]);
    out[20] = kind;
    let payload = u16::from_be_bytes([out[18], out[19]]) + 8;
    out[18..20].copy_from_slice(&payload.to_be_bytes());
    out
}

#[test]
fn extension_headers_are_walked_with_a_bound_and_checked() {
    let mut dp = dataplane();
    let plain = tcp6(CLIENT6, 40000, 1935, true);
    let mut expected = plain.clone();
    assert_eq!(dp.process(&mut expected, 0), Verdict::Transmit);
    // Destination options (a PadN option) before TCP: the same connection, the same server.
    let mut options = with_extension(&plain, 60, [1, 4, 0, 0, 0, 0]);
    assert_eq!(dp.process(&mut options, 1), Verdict::Transmit);
    assert_eq!(options[0..6], expected[0..6]);
    assert_eq!(dp.tables_v6().flows.entries(), 1);
    // Nine of them: more than the walk takes.
    let mut long = plain.clone();
    for _ in 0..9 {
        long = with_extension(&long, 60, [1, 4, 0, 0, 0, 0]);
    }
    assert_eq!(
        dp.process(&mut long, 1),
        Verdict::Drop(DropReason::ExtensionHeaders)
    );
    // One that claims more length than the packet has.
    let mut overlong = with_extension(&plain, 60, [1, 4, 0, 0, 0, 0]);
    overlong[55] = 200;
    assert_eq!(
        dp.process(&mut overlong, 1),
        Verdict::Drop(DropReason::BadIpHeader)
    );
    // A payload length beyond the frame.
    let mut truncated = plain.clone();
    truncated.truncate(60);
    assert_eq!(
        dp.process(&mut truncated, 1),
        Verdict::Drop(DropReason::Truncated)
    );
}

/// A UDP datagram to the IPv6-only service split at `offset_units` (8-byte units) with the
/// fragment header's `more` flag and identification `id`.
fn udp_fragment(src: &str, id: u32, offset_units: u16, more: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv6(v6(src), v6("2001:2::101"), 64)
        .udp(40000, 5000);
    let mut frame = Vec::new();
    builder.write(&mut frame, &[7; 64]).expect("write");
    let offset_flags = offset_units << 3 | u16::from(more);
    let [a, b] = offset_flags.to_be_bytes();
    let [c, d, e, f] = id.to_be_bytes();
    let mut fragment = with_extension(&frame, 44, [a, b, c, d, e, f]);
    if offset_units > 0 {
        // A later piece carries data, not the UDP header: make it look like nothing else.
        fragment[62..70].copy_from_slice(&[0xee; 8]);
    }
    fragment
}

#[test]
fn later_fragments_follow_their_first_and_strays_are_dropped() {
    let mut dp = dataplane();
    let mut first = udp_fragment(CLIENT6, 0xabcd, 0, true);
    assert_eq!(dp.process(&mut first, 0), Verdict::Transmit);
    assert_eq!(first[0..6], RS1_MAC);
    let mut later = udp_fragment(CLIENT6, 0xabcd, 9, false);
    assert_eq!(dp.process(&mut later, 1), Verdict::Transmit);
    assert_eq!(later[0..6], RS1_MAC);
    let mut stray = udp_fragment(CLIENT6, 0x1111, 9, false);
    assert_eq!(
        dp.process(&mut stray, 1),
        Verdict::Drop(DropReason::FragmentUnmatched)
    );
    // An atomic fragment (offset 0, no more) is a whole datagram.
    let mut atomic = udp_fragment("2001:2:0:1::99", 0x2222, 0, false);
    assert_eq!(dp.process(&mut atomic, 2), Verdict::Transmit);
    assert_eq!(dp.tables_v6().fragments.entries(), 1);
}

#[test]
fn an_unsolicited_advertisement_announces_the_vip_to_all_nodes() {
    let mut buf = [0u8; ipv6::UNSOLICITED_NA_LEN];
    let len = ipv6::write_unsolicited_na(&mut buf, OWN_MAC, v6(VIP6));
    assert_eq!(len, 86);
    assert_eq!(buf[0..6], [0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(buf[6..12], OWN_MAC);
    assert_eq!(buf[21], 255);
    assert_eq!(buf[38..54], v6("ff02::1"));
    let (header, rest) = icmpv6_of(&buf);
    assert_eq!(header.icmp_type.type_u8(), 136);
    assert_eq!(header.to_bytes()[4], 0x20, "Override, not Solicited");
    assert_eq!(rest[0..16], v6(VIP6));
    assert_eq!(rest[18..24], OWN_MAC);
}

#[test]
fn a_packet_too_big_goes_to_the_server_of_the_connection_it_quotes() {
    let mut dp = dataplane();
    let mut owners = Vec::new();
    for client in 1..=20 {
        let src = format!("2001:2:0:1::{client:x}");
        let mut syn = tcp6(&src, 40000, 1935, true);
        assert_eq!(dp.process(&mut syn, 0), Verdict::Transmit);
        owners.push((src, <[u8; 6]>::try_from(&syn[0..6]).expect("mac")));
    }
    for (src, owner) in &owners {
        // What the server sent the client, as the router quotes it.
        let mut sent = Vec::new();
        PacketBuilder::ethernet2(*owner, CLIENT_MAC)
            .ipv6(v6(VIP6), v6(src), 64)
            .tcp(1935, 40000, 5000, 64240)
            .ack(1001)
            .write(&mut sent, &[0; 1400])
            .expect("write");
        let mut error = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xfe], OWN_MAC)
            .ipv6(v6("2001:2::fe"), v6(VIP6), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut error, &sent[14..14 + 1184])
            .expect("write");
        assert_eq!(dp.process(&mut error, 1), Verdict::Transmit, "{src}");
        assert_eq!(error[0..6], *owner, "{src}");
    }
    assert_eq!(dp.counters().icmp_errors, 20);
    // About a port not served: dropped.
    let mut sent = Vec::new();
    PacketBuilder::ethernet2(RS1_MAC, CLIENT_MAC)
        .ipv6(v6(VIP6), v6(CLIENT6), 64)
        .tcp(22, 40000, 1, 1)
        .write(&mut sent, &[])
        .expect("write");
    let mut error = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xfe], OWN_MAC)
        .ipv6(v6("2001:2::fe"), v6(VIP6), 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut error, &sent[14..])
        .expect("write");
    assert_eq!(
        dp.process(&mut error, 1),
        Verdict::Drop(DropReason::IcmpErrorUnmatched)
    );
}

#[test]
fn an_advertisement_for_a_vip_from_another_station_is_recorded_and_answered() {
    let mut dp = dataplane();
    // A real server with the VIP on an interface other than lo announces it.
    let mut claim = [0u8; ipv6::UNSOLICITED_NA_LEN];
    ipv6::write_unsolicited_na(&mut claim, RS1_MAC, v6(VIP6));
    assert_eq!(dp.process(&mut claim, 0), Verdict::Transmit);
    let mut ours = [0u8; ipv6::UNSOLICITED_NA_LEN];
    ipv6::write_unsolicited_na(&mut ours, OWN_MAC, v6(VIP6));
    assert_eq!(claim, ours, "our own announcement in its place");
    let claims = dp.dr_watch().claims();
    assert_eq!(claims.len(), 1);
    assert_eq!(
        (claims[0].mac, claims[0].kind),
        (RS1_MAC, crate::packet::drcheck::ClaimKind::Announced)
    );
    // An advertisement for another address is none of ours.
    let mut other = [0u8; ipv6::UNSOLICITED_NA_LEN];
    ipv6::write_unsolicited_na(&mut other, RS1_MAC, v6("2001:2::55"));
    assert_eq!(
        dp.process(&mut other, 0),
        Verdict::Drop(DropReason::NdNotAnswered)
    );
}

#[test]
fn the_dr_question_for_an_ipv6_vip_is_a_solicitation_the_balancer_itself_would_answer() {
    let mut buf = [0u8; crate::packet::drcheck::PROBE_FRAME_LEN];
    let source = "2001:2::2".parse().expect("address");
    let vip = VIP6.parse().expect("vip");
    let len = crate::packet::drcheck::write_question(&mut buf, CLIENT_MAC, source, vip);
    assert_eq!(len, 86);
    // It is what a host resolving the VIP sends: the balancer's own path answers it.
    let mut frame = buf[..len].to_vec();
    assert_eq!(dataplane().process(&mut frame, 0), Verdict::Transmit);
    assert_eq!(frame[0..6], CLIENT_MAC);
    let (header, _) = icmpv6_of(&frame);
    assert_eq!(header.icmp_type.type_u8(), 136);
}

#[test]
fn ipv6_connections_and_clients_are_shared_and_keep_their_servers_on_the_peer() {
    use crate::packet::sync::{Outbox, SyncEntry};
    use crossbeam::queue::ArrayQueue;
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut active = dataplane_with(64);
    let queue = Arc::new(ArrayQueue::new(4096));
    let dumps = Arc::new(AtomicU64::new(0));
    active.share_through(Outbox::new(queue.clone(), dumps.clone()));
    let mut before = Vec::new();
    for client in 1..=60 {
        let src = format!("2001:2:{client:x}::1");
        let mut syn = tcp6(&src, 40000, 1935, true);
        assert_eq!(active.process(&mut syn, 1_000), Verdict::Transmit);
        let mut ack = tcp6(&src, 40000, 1935, false);
        assert_eq!(active.process(&mut ack, 1_010), Verdict::Transmit);
        before.push((src, <[u8; 6]>::try_from(&ack[0..6]).expect("mac")));
    }
    let offered: Vec<SyncEntry> = std::iter::from_fn(|| queue.pop()).collect();
    assert_eq!(
        offered.len(),
        120,
        "a connection and a client (prefix) each"
    );
    assert!(matches!(offered[0], SyncEntry::Flow6 { .. }));
    assert!(
        matches!(offered[1], SyncEntry::Persist6 { client, .. } if client == u128::from_be_bytes(v6("2001:2:1::")))
    );
    // Through the wire: three records a connection, two a client.
    let mut wire = Vec::new();
    for entry in &offered {
        entry.encode_into(&mut wire);
    }
    assert_eq!(wire.len(), 60 * (3 + 2) * crate::packet::sync::RECORD_LEN);
    let (received, refused) = SyncEntry::decode_all(&wire);
    assert_eq!((received.as_slice(), refused), (offered.as_slice(), 0));
    // The peer has a third server: Maglev would move some clients there.
    let grown = config_and(
        64,
        "\n[[service.real_server]]\nlabel = \"rs3\"\nip = \"2001:2::13\"\nmac = \"02:00:00:00:00:13\"\n",
    );
    let moved = before
        .iter()
        .filter(|(src, mac)| {
            let mut ack = tcp6(src, 40000, 1935, false);
            dataplane_of(&grown).process(&mut ack, 50);
            ack[0..6] != mac[..]
        })
        .count();
    assert!(moved > 5, "only {moved} of 60 would move: a weak test");
    let mut passive = dataplane_of(&grown);
    let installed = passive.install(&received, 50);
    assert_eq!((installed.installed, installed.kept_out), (120, 0));
    for (src, mac) in &before {
        let mut ack = tcp6(src, 40000, 1935, false);
        assert_eq!(passive.process(&mut ack, 60), Verdict::Transmit);
        assert_eq!(&ack[0..6], mac, "{src}");
        // A new connection from another address of its /64: its persisted server.
        let mut syn = tcp6(&src.replace("::1", "::2"), 50000, 1935, true);
        assert_eq!(passive.process(&mut syn, 60), Verdict::Transmit);
        assert_eq!(&syn[0..6], mac, "{src}'s /64");
    }
    // A full dump walks the IPv6 tables too.
    dumps.fetch_add(1, Ordering::Relaxed);
    for _ in 0..100 {
        active.share(2_000);
    }
    let dumped: Vec<SyncEntry> = std::iter::from_fn(|| queue.pop()).collect();
    assert_eq!(dumped.len(), 120);
}

#[test]
fn an_ipv6_entry_cut_short_on_the_wire_is_refused() {
    use crate::packet::sync::{RECORD_LEN, SyncEntry};
    let entry = SyncEntry::Flow6 {
        key: crate::packet::flows::FlowKey {
            src: 1,
            dst: 2,
            ports: 3,
            protocol: 6,
        },
        real_server: 4,
        state: crate::packet::flows::FlowState::Established,
        remaining_ms: 5,
    };
    let mut wire = Vec::new();
    entry.encode_into(&mut wire);
    let (entries, refused) = SyncEntry::decode_all(&wire[..2 * RECORD_LEN]);
    assert_eq!((entries.len(), refused), (0, 2));
    // A continuation alone is nothing.
    let (entries, refused) = SyncEntry::decode_all(&wire[RECORD_LEN..]);
    assert_eq!((entries.len(), refused), (0, 2));
}
