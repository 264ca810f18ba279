//! Frame-in, frame-out tests of every dataplane rule, on byte arrays built with etherparse.

use super::*;
use crate::packet::snapshot::{AdminState, After, ServiceIds};
use etherparse::{Ipv4Header, PacketBuilder, SlicedPacket};
use lbd_config::Config;
use std::net::Ipv4Addr;

const OWN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const RS1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const RS2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];
const VIP: [u8; 4] = [198, 18, 0, 100];
const CLIENT: [u8; 4] = [198, 18, 1, 7];

const CONFIG: &str = r#"
[engine]
interface = "eth0"
queues = [0]

[[service]]
label = "Wowza Streaming"
vip = "198.18.0.100"
ports = "1935"
protocol = "tcp"
table_size = 251

[[service.real_server]]
label = "rs1"
ip = "198.18.0.11"

[[service.real_server]]
label = "rs2"
ip = "198.18.0.12"
mac = "02:00:00:00:00:12"

[[service]]
label = "Wowza GUI"
vip = "198.18.0.100"
ports = "8088"
table_size = 251

[[service.real_server]]
label = "rs1"
ip = "198.18.0.11"

[[service]]
label = "Media UDP"
vip = "198.18.0.101"
ports = "5000-5010"
protocol = "udp"
persistence = "none"
table_size = 251

[[service.real_server]]
label = "rs1"
ip = "198.18.0.11"

[[service.real_server]]
label = "rs2"
ip = "198.18.0.12"
mac = "02:00:00:00:00:12"
"#;

/// The last octet of an IPv4 address (of the lab's real servers).
fn octet(ip: std::net::IpAddr) -> u8 {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets()[3],
        std::net::IpAddr::V6(v6) => v6.octets()[15],
    }
}

fn config() -> Config {
    Config::from_toml_str(CONFIG).expect("test config is valid")
}

/// rs1's MAC comes from the "neighbour table", rs2's is pinned in the config.
fn dataplane_for(config: &Config) -> Dataplane {
    let snapshot = Snapshot::build(
        config,
        &mut ServiceIds::default(),
        OWN_MAC,
        1,
        |ip| (ip == Ipv4Addr::new(198, 18, 0, 11)).then_some(RS1_MAC),
        |_, _| AdminState::Online,
    );
    Dataplane::new(Arc::new(snapshot), TableSizes::default())
}

fn dataplane() -> Dataplane {
    dataplane_for(&config())
}

fn tcp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240)
        .syn();
    let payload = b"";
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("write tcp frame");
    frame
}

fn udp_frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let payload = b"hello";
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("write udp frame");
    frame
}

fn arp_request(dst_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0u8; 42];
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&CLIENT_MAC);
    frame[12..14].copy_from_slice(&[0x08, 0x06]);
    frame[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&CLIENT_MAC);
    frame[28..32].copy_from_slice(&sender_ip);
    frame[38..42].copy_from_slice(&target_ip);
    frame
}

fn icmp_echo(dst: [u8; 4]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv4(CLIENT, dst, 17)
        .icmpv4_echo_request(0x1234, 7);
    let payload = b"ping payload 123";
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("write icmp frame");
    frame
}

/// Sets the fragment fields of an IPv4 frame built above and fixes its header checksum.
fn make_fragment(frame: &mut [u8], more_fragments: bool, offset_units: u16) {
    let flags_and_offset = (u16::from(more_fragments) << 13) | offset_units;
    frame[20..22].copy_from_slice(&flags_and_offset.to_be_bytes());
    let (mut header, _) = Ipv4Header::from_slice(&frame[14..]).expect("ipv4 header");
    header.header_checksum = header.calc_header_checksum();
    frame[14..34].copy_from_slice(&header.to_bytes());
}

#[test]
fn forwards_to_a_real_server_rewriting_only_the_macs() {
    let mut dp = dataplane();
    let original = tcp_frame(CLIENT, VIP, 40000, 1935);
    let mut frame = original.clone();
    assert_eq!(dp.process_at0(&mut frame), Verdict::Transmit);
    assert!(frame[0..6] == RS1_MAC || frame[0..6] == RS2_MAC);
    assert_eq!(frame[6..12], OWN_MAC);
    assert_eq!(frame[12..], original[12..], "the IP packet is untouched");
    assert_eq!(dp.counters().forwarded.packets, 1);
    assert_eq!(dp.counters().services[0].total.bytes, original.len() as u64);
}

#[test]
fn source_ip_persistence_keeps_a_client_on_one_server_across_ports_and_connections() {
    let mut dp = dataplane();
    for client in 1..=50u8 {
        let src = [198, 18, 1, client];
        let mut first = tcp_frame(src, VIP, 40000, 1935);
        assert_eq!(dp.process_at0(&mut first), Verdict::Transmit);
        for sport in [40001, 50000, 61000] {
            let mut again = tcp_frame(src, VIP, sport, 1935);
            assert_eq!(dp.process_at0(&mut again), Verdict::Transmit);
            assert_eq!(again[0..6], first[0..6], "client {client} port {sport}");
        }
    }
}

#[test]
fn clients_spread_over_both_servers() {
    let mut dp = dataplane();
    for client in 1..=200u8 {
        let mut frame = tcp_frame([198, 18, 1, client], VIP, 40000, 1935);
        assert_eq!(dp.process_at0(&mut frame), Verdict::Transmit);
    }
    let per_server = &dp.counters().services[0].real_servers;
    assert!(per_server[0].packets > 60, "{per_server:?}");
    assert!(per_server[1].packets > 60, "{per_server:?}");
}

#[test]
fn two_dataplanes_built_from_one_config_choose_alike() {
    // Two snapshots built apart choose alike; across processes and versions, `maglev::golden`
    // pins the table itself.
    let mut a = dataplane();
    let mut b = dataplane();
    for client in 1..=100u8 {
        let mut fa = tcp_frame([198, 18, 2, client], VIP, 1234, 1935);
        let mut fb = fa.clone();
        a.process_at0(&mut fa);
        b.process_at0(&mut fb);
        assert_eq!(fa, fb);
    }
}

#[test]
fn five_tuple_mode_spreads_one_client_by_port() {
    let mut dp = dataplane();
    let vip2 = [198, 18, 0, 101];
    for sport in 1000..1200 {
        let mut frame = udp_frame(CLIENT, vip2, sport, 5005);
        assert_eq!(dp.process_at0(&mut frame), Verdict::Transmit);
    }
    let per_server = &dp.counters().services[2].real_servers;
    assert!(
        per_server[0].packets > 50 && per_server[1].packets > 50,
        "{per_server:?}"
    );
}

#[test]
fn a_later_fragment_whose_first_was_not_seen_is_dropped() {
    // Even where the VIP and protocol name one service: nothing says which datagram it is of.
    let config = Config::from_toml_str(&CONFIG.replace(
        "ports = \"8088\"\ntable_size",
        "ports = \"8088\"\nprotocol = \"udp\"\ntable_size",
    ))
    .expect("valid");
    let mut dp = dataplane_for(&config);
    let mut whole = tcp_frame(CLIENT, VIP, 40000, 1935);
    assert_eq!(dp.process_at0(&mut whole), Verdict::Transmit);
    let mut later = tcp_frame(CLIENT, VIP, 40000, 1935);
    make_fragment(&mut later, false, 100);
    assert_eq!(
        dp.process_at0(&mut later),
        Verdict::Drop(DropReason::FragmentUnmatched)
    );
    assert_eq!(
        dp.persistence().entries(),
        0,
        "a stray fragment persists nobody"
    );
}

/// Sets the IP identification of a frame built above and fixes its header checksum.
fn set_ip_id(frame: &mut [u8], id: u16) {
    frame[18..20].copy_from_slice(&id.to_be_bytes());
    let (mut header, _) = Ipv4Header::from_slice(&frame[14..]).expect("ipv4 header");
    header.header_checksum = header.calc_header_checksum();
    frame[14..34].copy_from_slice(&header.to_bytes());
}

/// The first and a later fragment of datagram `id` from `src` to port `dport` of the VIP.
fn fragment_pair(src: [u8; 4], dport: u16, id: u16) -> (Vec<u8>, Vec<u8>) {
    let mut first = tcp_frame(src, VIP, 40000, dport);
    set_ip_id(&mut first, id);
    make_fragment(&mut first, true, 0);
    let mut later = tcp_frame(src, VIP, 40000, dport);
    set_ip_id(&mut later, id);
    make_fragment(&mut later, false, 10);
    (first, later)
}

#[test]
fn later_fragments_follow_their_first_where_two_services_share_the_vip() {
    // "Wowza Streaming" (1935) and "Wowza GUI" (8088) are both TCP on the VIP: only the first
    // fragment's port tells them apart. GUI has rs1 alone, so its fragments all go to rs1.
    let mut dp = dataplane();
    for (client, id) in (1..=20u8).zip(100u16..) {
        let (mut first, mut later) = fragment_pair([198, 18, 1, client], 8088, id);
        assert_eq!(dp.process(&mut first, 10), Verdict::Transmit);
        assert_eq!(first[0..6], RS1_MAC);
        assert_eq!(
            dp.process(&mut later, 20),
            Verdict::Transmit,
            "client {client}"
        );
        assert_eq!(later[0..6], RS1_MAC, "client {client}");
    }
    assert_eq!(dp.counters().services[1].real_servers[0].packets, 40);
    // Another datagram of the same client (another IP ID) whose first piece never came: the
    // port is unknown, so it cannot be placed.
    let (_, mut orphan) = fragment_pair([198, 18, 1, 1], 8088, 7);
    assert_eq!(
        dp.process(&mut orphan, 30),
        Verdict::Drop(DropReason::FragmentUnmatched)
    );
    // The first fragment is remembered for a few seconds only.
    let (mut first, mut later) = fragment_pair([198, 18, 1, 1], 8088, 8);
    assert_eq!(dp.process(&mut first, 1_000), Verdict::Transmit);
    assert_eq!(
        dp.process(
            &mut later,
            1_000 + crate::packet::flows::FRAGMENT_TIMEOUT_MS
        ),
        Verdict::Drop(DropReason::FragmentUnmatched)
    );
}

#[test]
fn a_later_fragment_follows_its_first_across_a_change_of_servers() {
    let config = config();
    // (CONFIG ends with "Media UDP", per 5-tuple: rs3 joins it.)
    let with_rs3 = format!(
        "{CONFIG}\n[[service.real_server]]\nlabel = \"rs3\"\nip = \"198.18.0.13\"\nmac = \"02:00:00:00:00:13\"\n"
    );
    let changed = Arc::new(Snapshot::build(
        &Config::from_toml_str(&with_rs3).expect("valid"),
        &mut ServiceIds::default(),
        OWN_MAC,
        2,
        |ip| (ip == Ipv4Addr::new(198, 18, 0, 11)).then_some(RS1_MAC),
        |_, _| AdminState::Online,
    ));
    let vip2 = [198, 18, 0, 101];
    let first_of = |sport: u16| {
        let mut first = udp_frame(CLIENT, vip2, sport, 5005);
        set_ip_id(&mut first, 42);
        make_fragment(&mut first, true, 0);
        first
    };
    // A datagram whose server the change moves.
    let server = |dp: &mut Dataplane, mut frame: Vec<u8>| {
        assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
        <[u8; 6]>::try_from(&frame[0..6]).expect("mac")
    };
    let sport = (1000..3000u16)
        .find(|&p| {
            let mut after = dataplane_for(&config);
            after.set_snapshot(Arc::clone(&changed));
            server(&mut dataplane_for(&config), first_of(p)) != server(&mut after, first_of(p))
        })
        .expect("some datagram moves");
    let mut dp = dataplane_for(&config);
    let chosen = server(&mut dp, first_of(sport));
    dp.set_snapshot(changed);
    for offset in [3, 6, 9] {
        let mut later = udp_frame(CLIENT, vip2, sport, 5005);
        set_ip_id(&mut later, 42);
        make_fragment(&mut later, offset != 9, offset);
        assert_eq!(dp.process(&mut later, 1), Verdict::Transmit);
        assert_eq!(later[0..6], chosen, "offset {offset}");
    }
}

#[test]
fn a_fragmented_segment_of_a_known_connection_goes_to_its_server() {
    // "Media UDP" places each 5-tuple on its own; its flows are known once seen.
    let config = config();
    let vip2 = [198, 18, 0, 101];
    for sport in 1000..1040u16 {
        let mut dp = dataplane_for(&config);
        let mut whole = udp_frame(CLIENT, vip2, sport, 5005);
        assert_eq!(dp.process(&mut whole, 0), Verdict::Transmit);
        // A later, larger datagram of the same flow arrives in two fragments.
        let mut first = udp_frame(CLIENT, vip2, sport, 5005);
        set_ip_id(&mut first, 9);
        make_fragment(&mut first, true, 0);
        let mut later = udp_frame(CLIENT, vip2, sport, 5005);
        set_ip_id(&mut later, 9);
        make_fragment(&mut later, false, 2);
        assert_eq!(dp.process(&mut first, 5), Verdict::Transmit);
        assert_eq!(dp.process(&mut later, 5), Verdict::Transmit);
        assert_eq!(first[0..6], whole[0..6], "port {sport}");
        assert_eq!(later[0..6], whole[0..6], "port {sport}");
    }
}

#[test]
fn five_tuple_fragments_stay_together() {
    let mut dp = dataplane();
    let vip2 = [198, 18, 0, 101];
    let mut first = udp_frame(CLIENT, vip2, 999, 5005);
    make_fragment(&mut first, true, 0);
    let mut second = udp_frame(CLIENT, vip2, 999, 5005);
    make_fragment(&mut second, false, 3);
    assert_eq!(dp.process_at0(&mut first), Verdict::Transmit);
    assert_eq!(dp.process_at0(&mut second), Verdict::Transmit);
    assert_eq!(first[0..6], second[0..6]);
}

#[test]
fn answers_arp_for_a_vip_from_its_own_mac() {
    let mut dp = dataplane();
    let mut frame = arp_request(BROADCAST, CLIENT, VIP);
    assert_eq!(dp.process_at0(&mut frame), Verdict::Transmit);
    let mut expected = vec![0u8; 42];
    expected[0..6].copy_from_slice(&CLIENT_MAC);
    expected[6..12].copy_from_slice(&OWN_MAC);
    expected[12..14].copy_from_slice(&[0x08, 0x06]);
    expected[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]);
    expected[22..28].copy_from_slice(&OWN_MAC);
    expected[28..32].copy_from_slice(&VIP);
    expected[32..38].copy_from_slice(&CLIENT_MAC);
    expected[38..42].copy_from_slice(&CLIENT);
    assert_eq!(frame, expected);
    assert_eq!(dp.counters().arp_replies, 1);
}

#[test]
fn answers_unicast_arp_refresh_for_a_vip() {
    let mut dp = dataplane();
    let mut frame = arp_request(OWN_MAC, CLIENT, VIP);
    assert_eq!(dp.process_at0(&mut frame), Verdict::Transmit);
}

#[test]
fn does_not_answer_arp_for_other_addresses_or_announcements() {
    let mut dp = dataplane();
    let mut other = arp_request(BROADCAST, CLIENT, [198, 18, 0, 11]);
    assert_eq!(
        dp.process_at0(&mut other),
        Verdict::Drop(DropReason::ArpNotVip)
    );
    // Another address's announcement is none of ours (a VIP's: the DR check's, below).
    let mut announcement = arp_request(BROADCAST, [198, 18, 0, 11], [198, 18, 0, 11]);
    assert_eq!(
        dp.process_at0(&mut announcement),
        Verdict::Drop(DropReason::ArpNotVip)
    );
    let mut reply = arp_request(BROADCAST, CLIENT, VIP);
    reply[21] = 2;
    assert_eq!(
        dp.process_at0(&mut reply),
        Verdict::Drop(DropReason::ArpNotRequest)
    );
    let mut short = arp_request(BROADCAST, CLIENT, VIP);
    short.truncate(30);
    assert_eq!(
        dp.process_at0(&mut short),
        Verdict::Drop(DropReason::Truncated)
    );
}

#[test]
fn answers_ping_to_a_vip_with_valid_checksums() {
    let mut dp = dataplane();
    let mut frame = icmp_echo(VIP);
    assert_eq!(dp.process_at0(&mut frame), Verdict::Transmit);
    assert_eq!(frame[0..6], CLIENT_MAC);
    assert_eq!(frame[6..12], OWN_MAC);
    let packet = SlicedPacket::from_ethernet(&frame).expect("reply parses");
    let Some(etherparse::NetSlice::Ipv4(ip)) = packet.net else {
        panic!("not ipv4")
    };
    let header = ip.header();
    assert_eq!(header.source(), VIP);
    assert_eq!(header.destination(), CLIENT);
    assert_eq!(header.ttl(), REPLY_TTL);
    assert_eq!(
        header.header_checksum(),
        header.to_header().calc_header_checksum()
    );
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = packet.transport else {
        panic!("not icmp")
    };
    assert!(matches!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::EchoReply(echo) if echo.id == 0x1234 && echo.seq == 7
    ));
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload())
    );
    assert_eq!(dp.counters().icmp_echo_replies, 1);
}

#[test]
fn drops_are_counted_by_reason() {
    let mut dp = dataplane();
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![0u8; 10], DropReason::Truncated),
        (
            {
                let mut f = tcp_frame(CLIENT, VIP, 1, 1935);
                f[12..14].copy_from_slice(&[0x81, 0x00]); // a VLAN tag
                f
            },
            DropReason::UnsupportedEtherType,
        ),
        (
            {
                let mut f = tcp_frame(CLIENT, VIP, 1, 1935);
                f[0..6].copy_from_slice(&RS1_MAC);
                f
            },
            DropReason::NotOurMac,
        ),
        (
            {
                let mut f = tcp_frame(CLIENT, VIP, 1, 1935);
                f[14] = 0x65; // version 6 in an IPv4 EtherType
                f
            },
            DropReason::BadIpHeader,
        ),
        (
            {
                let mut f = tcp_frame(CLIENT, VIP, 1, 1935);
                f[16..18].copy_from_slice(&10u16.to_be_bytes()); // total length < header
                f
            },
            DropReason::BadIpHeader,
        ),
        (
            {
                let mut f = tcp_frame(CLIENT, VIP, 1, 1935);
                f.truncate(40); // total length says more than the frame holds
                f
            },
            DropReason::Truncated,
        ),
        (
            tcp_frame(CLIENT, [198, 18, 0, 11], 1, 1935),
            DropReason::NotVip,
        ),
        (tcp_frame(CLIENT, VIP, 1, 22), DropReason::PortNotServed),
        (udp_frame(CLIENT, VIP, 1, 1935), DropReason::PortNotServed),
        (
            {
                let mut f = icmp_echo(VIP);
                f[34] = 13; // timestamp request
                f
            },
            DropReason::IcmpNotEcho,
        ),
    ];
    for (i, (mut frame, reason)) in cases.into_iter().enumerate() {
        assert_eq!(
            dp.process_at0(&mut frame),
            Verdict::Drop(reason),
            "case {i}"
        );
    }
    assert_eq!(dp.counters().rx_frames, 10);
    assert_eq!(dp.counters().total_drops(), 10);
    assert_eq!(dp.counters().drops_for(DropReason::BadIpHeader), 2);
}

#[test]
fn echo_requests_from_addresses_no_reply_may_go_to_are_dropped() {
    let mut dp = dataplane();
    for source in [
        [255, 255, 255, 255],
        [224, 0, 0, 1],
        [239, 1, 2, 3],
        [0, 0, 0, 0],
        [127, 0, 0, 1],
        [240, 0, 0, 1],
        VIP,
    ] {
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
            .ipv4(source, VIP, 17)
            .icmpv4_echo_request(1, 1);
        let mut frame = Vec::new();
        builder.write(&mut frame, b"x").expect("write");
        assert_eq!(
            dp.process_at0(&mut frame),
            Verdict::Drop(DropReason::IcmpBadSource),
            "{source:?}"
        );
    }
    assert_eq!(dp.counters().icmp_echo_replies, 0);
    let mut fine = icmp_echo(VIP);
    assert_eq!(dp.process_at0(&mut fine), Verdict::Transmit);
}

/// A TCP segment with only ACK set, as in the middle of a connection.
fn ack_frame(src: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
        .ipv4(src, VIP, 64)
        .tcp(sport, dport, 1000, 64240)
        .ack(1);
    let mut frame = Vec::new();
    builder.write(&mut frame, b"data").expect("write");
    frame
}

#[test]
fn spoofed_mid_connection_segments_are_forwarded_but_recorded_nowhere() {
    let mut dp = dataplane();
    for i in 0..1000u32 {
        let [_, _, a, b] = i.to_be_bytes();
        let source = [198, 19, a, b];
        let mut frame = ack_frame(source, 40000, 1935);
        assert_eq!(dp.process(&mut frame, 10), Verdict::Transmit, "{source:?}");
        // Where a SYN from that client would go.
        let mut syn = tcp_frame(source, VIP, 40000, 1935);
        let mut fresh = dataplane();
        fresh.process(&mut syn, 10);
        assert_eq!(frame[0..6], syn[0..6]);
    }
    assert_eq!(dp.flows().entries(), 0, "no connection entry");
    assert_eq!(dp.persistence().entries(), 0, "no persistence entry");
    assert_eq!(dp.counters().forwarded.packets, 1000);
}

#[test]
fn a_client_is_persisted_once_its_handshake_completes() {
    let mut dp = dataplane();
    let mut syn = tcp_frame(CLIENT, VIP, 40000, 1935);
    assert_eq!(dp.process(&mut syn, 0), Verdict::Transmit);
    assert_eq!(dp.flows().entries(), 1);
    assert_eq!(dp.persistence().entries(), 0, "a SYN alone persists nobody");
    let mut ack = ack_frame(CLIENT, 40000, 1935);
    assert_eq!(dp.process(&mut ack, 5), Verdict::Transmit);
    assert_eq!(ack[0..6], syn[0..6]);
    assert_eq!(dp.persistence().entries(), 1);
}

#[test]
fn counters_follow_their_service_and_server_across_changes() {
    let config = config();
    let mut dp = dataplane_for(&config);
    let vip2 = [198, 18, 0, 101];
    let mut frame = udp_frame(CLIENT, vip2, 999, 5005);
    assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
    let server = if frame[0..6] == RS1_MAC { 0 } else { 1 };
    let before = dp.counters().services[2].real_servers[server];
    assert_eq!(before.packets, 1);
    // "Wowza Streaming" goes (every later service moves up one place) and "Media UDP" gets a
    // new server in front of its others.
    let mut ids = ServiceIds::default();
    ids.sync(&config);
    let mut changed = config.clone();
    changed.services.remove(0);
    let rs0 = lbd_config::RealServer {
        label: "rs0".into(),
        ..changed.services[1].real_servers[0].clone()
    };
    Arc::make_mut(&mut changed.services[1]).real_servers.insert(
        0,
        lbd_config::RealServer {
            ip: Ipv4Addr::new(198, 18, 0, 10).into(),
            ..rs0
        },
    );
    changed.validate().expect("valid");
    let snapshot = Snapshot::build(
        &changed,
        &mut ids,
        OWN_MAC,
        2,
        |_| None,
        |_, _| AdminState::Online,
    );
    dp.set_snapshot(Arc::new(snapshot));
    assert_eq!(dp.counters().services.len(), 2);
    assert_eq!(dp.counters().services[1].real_servers[server + 1], before);
    assert_eq!(dp.counters().services[1].real_servers[0].packets, 0);
    assert_eq!(dp.counters().services[1].total.packets, 1);
    assert_eq!(dp.counters().forwarded.packets, 1);
}

/// A service whose entry the new snapshot shares keeps its counters as they are, whether it
/// keeps its place or moves.
#[test]
fn counters_stay_with_a_service_the_change_did_not_touch() {
    let config = config();
    let mut dp = dataplane_for(&config);
    let mut frame = udp_frame(CLIENT, [198, 18, 0, 101], 999, 5005);
    assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
    let before = dp.counters().services[2].clone();
    assert_eq!(before.total.packets, 1);
    let mut ids = ServiceIds::default();
    ids.sync(&config);
    let mut next = |dp: &mut Dataplane, changed: &Config, generation| {
        changed.validate().expect("valid");
        let after = After {
            snapshot: dp.snapshot(),
            same_states: true,
        };
        let snapshot = Snapshot::build_after(
            Some(after),
            changed,
            &mut ids,
            OWN_MAC,
            generation,
            |ip| (ip == Ipv4Addr::new(198, 18, 0, 11)).then_some(RS1_MAC),
            |_, _| AdminState::Online,
        );
        dp.set_snapshot(Arc::new(snapshot));
    };
    // "Wowza GUI" changes a weight: every service keeps its place.
    let mut weighted = config.clone();
    Arc::make_mut(&mut weighted.services[0]).real_servers[0].weight = 7;
    let media = Arc::clone(&dp.snapshot().services[2].by_ip);
    next(&mut dp, &weighted, 2);
    assert!(
        Arc::ptr_eq(&dp.snapshot().services[2].by_ip, &media),
        "shared"
    );
    assert_eq!(dp.counters().services[2], before);
    // "Wowza GUI" goes: "Media UDP" moves up one place, its entry still shared.
    let mut removed = weighted.clone();
    removed.services.remove(0);
    next(&mut dp, &removed, 3);
    assert!(
        Arc::ptr_eq(&dp.snapshot().services[1].by_ip, &media),
        "shared"
    );
    assert_eq!(dp.counters().services.len(), 2);
    assert_eq!(dp.counters().services[1], before);
    assert_eq!(dp.counters().forwarded.packets, 1);
}

#[test]
fn no_real_server_when_all_are_drained_or_unresolved() {
    let drained = CONFIG.replace(
        "ip = \"198.18.0.11\"\n",
        "ip = \"198.18.0.11\"\nweight = 0\n",
    );
    let drained = Config::from_toml_str(&drained).expect("valid");
    // rs1 drained everywhere; "Wowza GUI" has only rs1.
    let mut dp = dataplane_for(&drained);
    let mut frame = tcp_frame(CLIENT, VIP, 1, 8088);
    assert_eq!(
        dp.process_at0(&mut frame),
        Verdict::Drop(DropReason::NoRealServer)
    );
    // rs2 (pinned MAC) takes every client of "Wowza Streaming".
    for client in 1..=20u8 {
        let mut frame = tcp_frame([198, 18, 1, client], VIP, 1, 1935);
        assert_eq!(dp.process_at0(&mut frame), Verdict::Transmit);
        assert_eq!(frame[0..6], RS2_MAC);
    }
    // Unresolved: no neighbour entry and no pinned MAC.
    let snapshot = Snapshot::build(
        &config(),
        &mut ServiceIds::default(),
        OWN_MAC,
        1,
        |_| None,
        |_, _| AdminState::Online,
    );
    let mut dp = Dataplane::new(Arc::new(snapshot), TableSizes::default());
    let mut frame = tcp_frame(CLIENT, VIP, 1, 8088);
    assert_eq!(
        dp.process_at0(&mut frame),
        Verdict::Drop(DropReason::NoRealServer)
    );
}

#[test]
fn gratuitous_arp_announces_the_vip() {
    let mut buf = [0u8; MIN_FRAME_LEN];
    let len = write_gratuitous_arp(&mut buf, OWN_MAC, VIP);
    assert_eq!(len, MIN_FRAME_LEN);
    let arp = ArpPacketSlice::from_slice(&buf[14..]).expect("arp");
    assert_eq!(buf[0..6], BROADCAST);
    assert_eq!(arp.operation().0, ARP_OP_REQUEST);
    assert_eq!(arp.sender_hw_addr(), OWN_MAC);
    assert_eq!(arp.sender_protocol_addr(), VIP);
    assert_eq!(arp.target_protocol_addr(), VIP);
}

#[test]
fn incremental_checksum_matches_rfc_1624_example() {
    // RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000.
    assert_eq!(incremental_checksum(0xdd2f, 0x5555, 0x3285), 0x0000);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes arrive, processing never panics and keeps the frame's length.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut dp = dataplane();
            let mut frame = bytes.clone();
            dp.process_at0(&mut frame);
            prop_assert_eq!(frame.len(), bytes.len());
        }

        /// Random bytes behind an Ethernet header addressed to the balancer, so the IPv4 and
        /// ARP parsers see them (random destination MACs would stop at the first check).
        #[test]
        fn arbitrary_payloads_to_our_mac_never_panic(
            arp in any::<bool>(),
            payload in prop::collection::vec(any::<u8>(), 0..120),
        ) {
            let mut dp = dataplane();
            let mut frame = Vec::with_capacity(14 + payload.len());
            frame.extend_from_slice(&OWN_MAC);
            frame.extend_from_slice(&CLIENT_MAC);
            frame.extend_from_slice(if arp { &[0x08, 0x06] } else { &[0x08, 0x00] });
            frame.extend_from_slice(&payload);
            let len = frame.len();
            dp.process_at0(&mut frame);
            prop_assert_eq!(frame.len(), len);
        }

        /// Valid headers with random fields and truncation never panic either.
        #[test]
        fn mutated_valid_frames_never_panic(
            flip in prop::collection::vec((0usize..60, any::<u8>()), 0..6),
            cut in 0usize..80,
        ) {
            let mut dp = dataplane();
            for base in [tcp_frame(CLIENT, VIP, 1, 1935), icmp_echo(VIP), arp_request(BROADCAST, CLIENT, VIP)] {
                let mut frame = base;
                for &(at, value) in &flip {
                    if at < frame.len() {
                        frame[at] = value;
                    }
                }
                frame.truncate(cut.max(1).min(frame.len()));
                dp.process_at0(&mut frame);
            }
        }
    }
}

impl Dataplane {
    /// `process` at time 0, for the rules that do not depend on time.
    fn process_at0(&mut self, frame: &mut [u8]) -> Verdict {
        self.process(frame, 0)
    }
}

mod live_changes {
    //! Established connections and persistent clients across snapshot changes.
    use super::*;
    use crate::packet::snapshot::{AdminState, ServiceIds};

    const TWO: &str = r#"
[engine]
interface = "eth0"
queues = [0]

[[service]]
label = "web"
vip = "198.18.0.100"
ports = "8088"
table_size = 251
persistence = "PERSISTENCE"
persistence_timeout_s = 300

[[service.real_server]]
label = "rs1"
ip = "198.18.0.11"
mac = "02:00:00:00:00:11"

[[service.real_server]]
label = "rs2"
ip = "198.18.0.12"
mac = "02:00:00:00:00:12"
"#;

    fn with_third_server(text: &str) -> String {
        format!(
            "{text}\n[[service.real_server]]\nlabel = \"rs3\"\nip = \"198.18.0.13\"\nmac = \"02:00:00:00:00:13\"\n"
        )
    }

    fn snapshot(text: &str, generation: u64, admin: &[(&str, AdminState)]) -> Arc<Snapshot> {
        let config = Config::from_toml_str(text).expect("valid");
        Arc::new(Snapshot::build(
            &config,
            &mut ServiceIds::default(),
            OWN_MAC,
            generation,
            |_| None,
            |_, rs| {
                admin
                    .iter()
                    .find(|(label, _)| *label == rs)
                    .map_or(AdminState::Online, |(_, state)| *state)
            },
        ))
    }

    fn ack(client: u8) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
            .ipv4([198, 18, 1, client], VIP, 64)
            .tcp(40000, 8088, 2, 64240)
            .ack(1);
        let mut frame = Vec::new();
        builder.write(&mut frame, b"data").expect("write");
        frame
    }

    fn server_of(dp: &mut Dataplane, frame: Vec<u8>, now_ms: u64) -> Option<[u8; 6]> {
        let mut frame = frame;
        match dp.process(&mut frame, now_ms) {
            Verdict::Transmit => Some(frame[0..6].try_into().expect("6 bytes")),
            Verdict::Drop(_) => None,
        }
    }

    /// Opens one connection per client and returns where each went.
    fn open_all(dp: &mut Dataplane, now_ms: u64) -> Vec<[u8; 6]> {
        (1..=100u8)
            .map(|client| {
                server_of(
                    dp,
                    tcp_frame([198, 18, 1, client], VIP, 40000, 8088),
                    now_ms,
                );
                server_of(dp, ack(client), now_ms).expect("forwarded")
            })
            .collect()
    }

    #[test]
    fn a_new_server_does_not_move_established_connections() {
        for persistence in ["source-ip", "none"] {
            let text = TWO.replace("PERSISTENCE", persistence);
            let mut dp = Dataplane::new(snapshot(&text, 1, &[]), TableSizes::default());
            let before = open_all(&mut dp, 1_000);
            dp.set_snapshot(snapshot(&with_third_server(&text), 2, &[]));
            for client in 1..=100u8 {
                let now = server_of(&mut dp, ack(client), 2_000).expect("forwarded");
                assert_eq!(
                    now,
                    before[usize::from(client) - 1],
                    "{persistence}: client {client} moved"
                );
            }
            // New clients do reach the new server.
            let fresh: Vec<_> = (101..=250u8)
                .filter_map(|c| server_of(&mut dp, tcp_frame([198, 18, 1, c], VIP, 1, 8088), 2_000))
                .collect();
            assert!(fresh.contains(&[2, 0, 0, 0, 0, 0x13]), "{persistence}");
        }
    }

    #[test]
    fn drain_keeps_known_clients_and_sends_new_ones_elsewhere() {
        let text = TWO.replace("PERSISTENCE", "source-ip");
        let mut dp = Dataplane::new(snapshot(&text, 1, &[]), TableSizes::default());
        let before = open_all(&mut dp, 1_000);
        dp.set_snapshot(snapshot(&text, 2, &[("rs1", AdminState::Drain)]));
        for client in 1..=100u8 {
            // The open connection stays...
            assert_eq!(
                server_of(&mut dp, ack(client), 2_000),
                Some(before[usize::from(client) - 1])
            );
            // ...and so does a new connection of a persisted client.
            let next = server_of(
                &mut dp,
                tcp_frame([198, 18, 1, client], VIP, 50000, 8088),
                2_000,
            );
            assert_eq!(
                next,
                Some(before[usize::from(client) - 1]),
                "client {client}"
            );
        }
        for client in 101..=200u8 {
            let fresh = server_of(
                &mut dp,
                tcp_frame([198, 18, 1, client], VIP, 1, 8088),
                2_000,
            );
            assert_eq!(
                fresh,
                Some(RS2_MAC),
                "new client {client} on a drained server"
            );
        }
        // Once the persistence timeout has passed, a drained server's client moves on.
        let later = 2_000 + 300_001 + 900_000;
        let rs1_client = (1..=100u8)
            .find(|c| before[usize::from(*c) - 1] == RS1_MAC)
            .expect("some client on rs1");
        let moved = server_of(
            &mut dp,
            tcp_frame([198, 18, 1, rs1_client], VIP, 60000, 8088),
            later,
        );
        assert_eq!(moved, Some(RS2_MAC));
    }

    #[test]
    fn halt_and_removal_move_even_established_connections() {
        let text = TWO.replace("PERSISTENCE", "source-ip");
        for halted in [true, false] {
            let mut dp = Dataplane::new(snapshot(&text, 1, &[]), TableSizes::default());
            let before = open_all(&mut dp, 1_000);
            let next = if halted {
                snapshot(&text, 2, &[("rs1", AdminState::Halt)])
            } else {
                let without_rs1 = text.replace(
                    "[[service.real_server]]\nlabel = \"rs1\"\nip = \"198.18.0.11\"\nmac = \"02:00:00:00:00:11\"\n",
                    "",
                );
                snapshot(&without_rs1, 2, &[])
            };
            dp.set_snapshot(next);
            for client in 1..=100u8 {
                let now = server_of(&mut dp, ack(client), 2_000);
                assert_eq!(
                    now,
                    Some(RS2_MAC),
                    "halted={halted}: client {client} (was {:?})",
                    before[usize::from(client) - 1]
                );
            }
        }
    }

    #[test]
    fn a_server_that_fails_its_checks_loses_even_established_connections() {
        use crate::packet::snapshot::ServerState;
        let text = TWO.replace("PERSISTENCE", "source-ip");
        let config = Config::from_toml_str(&text).expect("valid");
        let mut dp = Dataplane::new(snapshot(&text, 1, &[]), TableSizes::default());
        let before = open_all(&mut dp, 1_000);
        assert!(before.contains(&RS1_MAC));
        let rs1_down = Snapshot::build(
            &config,
            &mut ServiceIds::default(),
            OWN_MAC,
            2,
            |_| None,
            |_, rs| ServerState {
                healthy: rs != "rs1",
                ..ServerState::default()
            },
        );
        assert_eq!(rs1_down.services[0].real_servers[0].state_name(), "down");
        dp.set_snapshot(Arc::new(rs1_down));
        for client in 1..=100u8 {
            assert_eq!(
                server_of(&mut dp, ack(client), 2_000),
                Some(RS2_MAC),
                "client {client}"
            );
        }
    }

    #[test]
    fn a_full_server_keeps_its_connections_but_takes_no_new_one() {
        use crate::packet::snapshot::ServerState;
        let text = TWO.replace("PERSISTENCE", "source-ip");
        let config = Config::from_toml_str(&text).expect("valid");
        let mut dp = Dataplane::new(snapshot(&text, 1, &[]), TableSizes::default());
        let before = open_all(&mut dp, 1_000);
        let full = Snapshot::build(
            &config,
            &mut ServiceIds::default(),
            OWN_MAC,
            2,
            |_| None,
            |_, rs| ServerState {
                full: rs == "rs1",
                ..ServerState::default()
            },
        );
        assert_eq!(full.services[0].real_servers[0].state_name(), "full");
        dp.set_snapshot(Arc::new(full));
        for client in 1..=100u8 {
            let index = usize::from(client) - 1;
            // The open connection stays...
            assert_eq!(server_of(&mut dp, ack(client), 2_000), Some(before[index]));
            // ...but a new one, even from a client persisted to rs1, goes to rs2.
            let next = server_of(
                &mut dp,
                tcp_frame([198, 18, 1, client], VIP, 50000, 8088),
                2_000,
            );
            assert_eq!(next, Some(RS2_MAC), "client {client}");
        }
    }

    #[test]
    fn a_drained_server_keeps_connections_that_no_table_holds() {
        // The tables lost every entry (a flood filled them, lbd restarted): the segments of
        // connections opened before the drain still reach their server.
        for persistence in ["source-ip", "none"] {
            let text = TWO.replace("PERSISTENCE", persistence);
            let mut before = Dataplane::new(snapshot(&text, 1, &[]), TableSizes::default());
            let servers = open_all(&mut before, 1_000);
            assert!(servers.contains(&RS1_MAC) && servers.contains(&RS2_MAC));
            let mut after = Dataplane::new(
                snapshot(&text, 2, &[("rs1", AdminState::Drain)]),
                TableSizes::default(),
            );
            for client in 1..=100u8 {
                assert_eq!(
                    server_of(&mut after, ack(client), 2_000),
                    Some(servers[usize::from(client) - 1]),
                    "{persistence}: client {client}"
                );
            }
            assert_eq!(after.flows().entries(), 0);
            // New connections still avoid the drained server.
            for client in 101..=200u8 {
                let fresh = server_of(
                    &mut after,
                    tcp_frame([198, 18, 1, client], VIP, 1, 8088),
                    2_000,
                );
                assert_eq!(fresh, Some(RS2_MAC), "{persistence}: new client {client}");
            }
        }
    }

    #[test]
    fn a_server_drained_by_weight_zero_keeps_connections_that_no_table_holds() {
        use crate::packet::snapshot::ServerState;
        let text = TWO.replace("PERSISTENCE", "none");
        let mut before = Dataplane::new(snapshot(&text, 1, &[]), TableSizes::default());
        let servers = open_all(&mut before, 1_000);
        // `set-weight rs1 0`: the control side remembers rs1's weight (100) for this table.
        let zero = text.replace(
            "ip = \"198.18.0.11\"\n",
            "ip = \"198.18.0.11\"\nweight = 0\n",
        );
        let drained = Snapshot::build(
            &Config::from_toml_str(&zero).expect("valid"),
            &mut ServiceIds::default(),
            OWN_MAC,
            2,
            |_| None,
            |_, rs| ServerState {
                weight_before_zero: if rs == "rs1" { 100 } else { 0 },
                ..ServerState::default()
            },
        );
        assert_eq!(drained.services[0].real_servers[0].state_name(), "drain");
        let mut after = Dataplane::new(Arc::new(drained), TableSizes::default());
        for client in 1..=100u8 {
            assert_eq!(
                server_of(&mut after, ack(client), 2_000),
                Some(servers[usize::from(client) - 1]),
                "client {client}"
            );
        }
    }

    #[test]
    fn persisted_clients_survive_a_change_of_the_service_ports() {
        let text = TWO.replace("PERSISTENCE", "source-ip");
        let mut dp = Dataplane::new(snapshot(&text, 1, &[]), TableSizes::default());
        let before = open_all(&mut dp, 1_000);
        // New ports (the first one changes too) and rs1 drained in the same breath: rs1's
        // clients are known only by their persistence entries now.
        let edited = text.replace("ports = \"8088\"", "ports = \"8080,8088\"");
        dp.set_snapshot(snapshot(&edited, 2, &[("rs1", AdminState::Drain)]));
        for client in 1..=100u8 {
            let next = server_of(
                &mut dp,
                tcp_frame([198, 18, 1, client], VIP, 50000, 8080),
                2_000,
            );
            assert_eq!(
                next,
                Some(before[usize::from(client) - 1]),
                "client {client}"
            );
        }
    }

    fn fin(sport: u16) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
            .ipv4(CLIENT, VIP, 64)
            .tcp(sport, 8088, 9, 64240)
            .fin()
            .ack(1);
        let mut frame = Vec::new();
        builder.write(&mut frame, &[]).expect("write");
        frame
    }

    #[test]
    fn a_new_syn_on_a_closing_tuple_is_a_new_connection() {
        let two = TWO.replace("PERSISTENCE", "none");
        let three = with_third_server(&two);
        // A source port whose Maglev choice changes when rs3 arrives.
        let choice = |text: &str, sport: u16| {
            let mut dp = Dataplane::new(snapshot(text, 1, &[]), TableSizes::default());
            server_of(&mut dp, tcp_frame(CLIENT, VIP, sport, 8088), 0)
        };
        let sport = (1000..3000u16)
            .find(|&p| choice(&two, p) != choice(&three, p))
            .expect("some port moves");
        let mut dp = Dataplane::new(snapshot(&two, 1, &[]), TableSizes::default());
        let old = server_of(&mut dp, tcp_frame(CLIENT, VIP, sport, 8088), 0);
        assert_eq!(server_of(&mut dp, fin(sport), 10), old);
        dp.set_snapshot(snapshot(&three, 2, &[]));
        // The closing connection's last segments still reach its server...
        assert_eq!(server_of(&mut dp, fin(sport), 20), old);
        // ...but a new SYN on the same tuple is a new connection, placed by the new table.
        assert_eq!(
            server_of(&mut dp, tcp_frame(CLIENT, VIP, sport, 8088), 30),
            choice(&three, sport)
        );
    }

    mod shared_with_peers {
        //! The nodes of a group sharing entries ([`crate::packet::sync`]): what a node offers,
        //! when, and what a peer's entries do here.
        use super::*;
        use crate::packet::sync::{Outbox, SyncEntry};
        use crossbeam::queue::ArrayQueue;
        use std::sync::atomic::{AtomicU64, Ordering};

        fn node(text: &str) -> (Dataplane, Arc<ArrayQueue<SyncEntry>>, Arc<AtomicU64>) {
            let mut dp = Dataplane::new(snapshot(text, 1, &[]), TableSizes::default());
            let queue = Arc::new(ArrayQueue::new(1024));
            let dumps = Arc::new(AtomicU64::new(0));
            dp.share_through(Outbox::new(queue.clone(), dumps.clone()));
            (dp, queue, dumps)
        }

        fn drain(queue: &ArrayQueue<SyncEntry>) -> Vec<SyncEntry> {
            std::iter::from_fn(|| queue.pop()).collect()
        }

        /// Runs the walk a dump request starts to its end.
        fn dump(dp: &mut Dataplane, dumps: &AtomicU64, now_ms: u64) {
            dumps.fetch_add(1, Ordering::Relaxed);
            let walks = dp.outbox_counters().expect("sharing").walks;
            for _ in 0..10_000 {
                dp.share(now_ms);
                if dp.outbox_counters().expect("sharing").walks > walks {
                    return;
                }
            }
            panic!("the walk never ended");
        }

        fn fin(client: u8) -> Vec<u8> {
            let builder = PacketBuilder::ethernet2(CLIENT_MAC, OWN_MAC)
                .ipv4([198, 18, 1, client], VIP, 64)
                .tcp(40000, 8088, 2, 64240)
                .ack(1)
                .fin();
            let mut frame = Vec::new();
            builder.write(&mut frame, b"").expect("write");
            frame
        }

        fn source_ip() -> String {
            TWO.replace("PERSISTENCE", "source-ip")
        }

        #[test]
        fn a_connection_is_offered_once_established_and_at_each_change_of_state() {
            let (mut dp, queue, _) = node(&source_ip());
            server_of(&mut dp, tcp_frame([198, 18, 1, 1], VIP, 40000, 8088), 1_000);
            assert!(
                drain(&queue).is_empty(),
                "a half-open connection stays here"
            );
            let mac = server_of(&mut dp, ack(1), 1_010).expect("forwarded");
            let server = u32::from_be_bytes([198, 18, 0, mac[5] - 0x11 + 11]);
            let key = FlowKey {
                src: u32::from_be_bytes([198, 18, 1, 1]),
                dst: u32::from_be_bytes(VIP),
                ports: 40000 << 16 | 8088,
                protocol: IP_PROTO_TCP,
            };
            assert_eq!(
                drain(&queue),
                [
                    SyncEntry::Flow {
                        key,
                        real_server: server,
                        state: FlowState::Established,
                        remaining_ms: 900_000,
                    },
                    SyncEntry::Persist {
                        client: key.src,
                        service: service_key(key.dst, IP_PROTO_TCP, 8088),
                        real_server: server,
                        remaining_ms: 300_000,
                    },
                ]
            );
            // Data on it changes nothing a peer needs to hear of...
            server_of(&mut dp, ack(1), 2_000);
            assert!(drain(&queue).is_empty());
            // ...its end does.
            server_of(&mut dp, fin(1), 3_000);
            assert!(matches!(
                drain(&queue)[..],
                [SyncEntry::Flow {
                    state: FlowState::Closing,
                    remaining_ms: 120_000,
                    ..
                }]
            ));
        }

        #[test]
        fn a_peers_connections_keep_their_servers_where_maglev_now_chooses_others() {
            let text = source_ip();
            let (mut active, queue, _) = node(&text);
            let before = open_all(&mut active, 1_000);
            let shared = drain(&queue);
            assert_eq!(shared.len(), 200, "a connection and a client each");
            // The other node already has a third server: Maglev moves some clients there.
            let grown = with_third_server(&text);
            let mut alone = Dataplane::new(snapshot(&grown, 1, &[]), TableSizes::default());
            let moved = (1..=100u8)
                .filter(|&c| server_of(&mut alone, ack(c), 50) != Some(before[usize::from(c) - 1]))
                .count();
            assert!(moved > 10, "only {moved} clients would move: a weak test");
            let (mut passive, _, _) = node(&grown);
            let installed = passive.install(&shared, 50);
            assert_eq!((installed.installed, installed.kept_out), (200, 0));
            for client in 1..=100u8 {
                assert_eq!(
                    server_of(&mut passive, ack(client), 60),
                    Some(before[usize::from(client) - 1]),
                    "client {client}"
                );
                // A new connection of the client: its persisted server too.
                let mut syn = tcp_frame([198, 18, 1, client], VIP, 50000, 8088);
                assert_eq!(passive.process(&mut syn, 60), Verdict::Transmit);
                assert_eq!(syn[0..6], before[usize::from(client) - 1]);
            }
        }

        #[test]
        fn a_peers_entries_are_not_offered_back_until_carried_here() {
            let text = source_ip();
            let (mut active, queue, _) = node(&text);
            open_all(&mut active, 1_000);
            let shared = drain(&queue);
            let (mut passive, passive_queue, dumps) = node(&text);
            passive.install(&shared, 0);
            dump(&mut passive, &dumps, 10);
            assert!(drain(&passive_queue).is_empty(), "nothing echoes back");
            // Carried here from now on (a takeover): offered as this node's.
            server_of(&mut passive, ack(7), 20);
            assert!(matches!(
                drain(&passive_queue)[..],
                [SyncEntry::Flow { .. }, SyncEntry::Persist { .. }]
            ));
            dump(&mut passive, &dumps, 30);
            assert_eq!(drain(&passive_queue).len(), 2, "one connection, one client");
        }

        #[test]
        fn a_walk_offers_every_live_entry_this_node_carries() {
            let (mut dp, queue, dumps) = node(&source_ip());
            open_all(&mut dp, 1_000);
            // And half-open connections, which stay here.
            for client in 101..=150u8 {
                server_of(
                    &mut dp,
                    tcp_frame([198, 18, 1, client], VIP, 1, 8088),
                    1_000,
                );
            }
            drain(&queue);
            dp.share(2_000);
            assert!(drain(&queue).is_empty(), "no walk before one is due");
            dump(&mut dp, &dumps, 2_000);
            let walked = drain(&queue);
            let flows = walked
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        SyncEntry::Flow {
                            remaining_ms: 899_000,
                            ..
                        }
                    )
                })
                .count();
            let clients = walked
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        SyncEntry::Persist {
                            remaining_ms: 299_000,
                            ..
                        }
                    )
                })
                .count();
            assert_eq!((flows, clients, walked.len()), (100, 100, 200));
            // The refresh comes by itself.
            dp.share(2_000 + crate::packet::sync::REFRESH_MS);
            for _ in 0..1_000 {
                dp.share(2_001 + crate::packet::sync::REFRESH_MS);
            }
            assert_eq!(drain(&queue).len(), 200);
        }

        #[test]
        fn a_newer_local_entry_and_unknown_services_keep_a_peers_entry_out() {
            let text = source_ip();
            let (mut active, queue, _) = node(&text);
            open_all(&mut active, 1_000);
            let shared = drain(&queue);
            let (mut other, _, _) = node(&text);
            open_all(&mut other, 500_000);
            // Its own entries were renewed later than the peer's copies say.
            assert_eq!(other.install(&shared, 1_000).installed, 0);
            let elsewhere = TWO
                .replace("PERSISTENCE", "source-ip")
                .replace("8088", "9000");
            let (mut unrelated, _, _) = node(&elsewhere);
            let installed = unrelated.install(&shared, 1_000);
            assert_eq!((installed.installed, installed.kept_out), (0, 200));
            assert_eq!(unrelated.flows().entries(), 0);
        }
    }
}

#[test]
fn a_long_connection_keeps_its_client_persisted() {
    let text = CONFIG.replace(
        "ports = \"1935\"\nprotocol = \"tcp\"",
        "ports = \"1935\"\nprotocol = \"tcp\"\npersistence_timeout_s = 10",
    );
    let config = Config::from_toml_str(&text).expect("valid");
    let mut dp = dataplane_for(&config);
    let mut syn = tcp_frame(CLIENT, VIP, 40000, 1935);
    assert_eq!(dp.process(&mut syn, 0), Verdict::Transmit);
    // The stream goes on for a minute, far past the 10 s persistence timeout...
    for second in 1..=60u64 {
        let mut segment = tcp_frame(CLIENT, VIP, 40000, 1935);
        segment[47] = 0x10; // ACK
        assert_eq!(dp.process(&mut segment, second * 1000), Verdict::Transmit);
    }
    // ...and the client's persistence entry lived on with it.
    let key = (
        u32::from_be_bytes(CLIENT),
        u64::from(dp.snapshot().services[0].id),
    );
    assert!(dp.persistence().get(&key, 60_000).is_some());
    assert!(dp.persistence().get(&key, 75_000).is_none());
}

#[test]
fn the_fallback_server_takes_new_clients_only_when_no_real_server_can() {
    const FALLBACK_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x50];
    let text = CONFIG.replace(
        "ports = \"1935\"\nprotocol = \"tcp\"",
        "ports = \"1935\"\nprotocol = \"tcp\"\nfallback = \"198.18.0.50\"",
    );
    let config = Config::from_toml_str(&text).expect("valid");
    let build = |admin: AdminState| {
        Snapshot::build(
            &config,
            &mut ServiceIds::default(),
            OWN_MAC,
            1,
            |ip| match octet(ip) {
                11 => Some(RS1_MAC),
                50 => Some(FALLBACK_MAC),
                _ => None,
            },
            move |_, _| admin,
        )
    };
    let mut standby = Dataplane::new(Arc::new(build(AdminState::Online)), TableSizes::default());
    let mut frame = tcp_frame(CLIENT, VIP, 1, 1935);
    assert_eq!(standby.process(&mut frame, 0), Verdict::Transmit);
    assert_ne!(frame[0..6], FALLBACK_MAC);
    let mut all_halted = Dataplane::new(Arc::new(build(AdminState::Halt)), TableSizes::default());
    let mut frame = tcp_frame(CLIENT, VIP, 1, 1935);
    assert_eq!(all_halted.process(&mut frame, 0), Verdict::Transmit);
    assert_eq!(frame[0..6], FALLBACK_MAC);
    assert_eq!(all_halted.counters().fallback, 1);
    // "Wowza GUI" has no fallback: dropped and counted.
    let mut frame = tcp_frame(CLIENT, VIP, 1, 8088);
    assert_eq!(
        all_halted.process(&mut frame, 0),
        Verdict::Drop(DropReason::NoRealServer)
    );
}

#[test]
fn a_frame_that_is_not_sent_after_all_is_taken_back_from_its_counter() {
    let mut dp = dataplane();
    let vip2 = [198, 18, 0, 101];
    let mut first = udp_frame(CLIENT, vip2, 999, 5005);
    set_ip_id(&mut first, 77);
    make_fragment(&mut first, true, 0);
    let mut later = udp_frame(CLIENT, vip2, 999, 5005);
    set_ip_id(&mut later, 77);
    make_fragment(&mut later, false, 3);
    let frames = [
        arp_request(BROADCAST, CLIENT, VIP),
        icmp_echo(VIP),
        tcp_frame(CLIENT, VIP, 40000, 1935),
        tcp_frame(CLIENT, VIP, 40000, 8088),
        first,
        later,
    ];
    for (i, mut frame) in frames.into_iter().enumerate() {
        let before = dp.counters().clone();
        assert_eq!(dp.process(&mut frame, 10), Verdict::Transmit, "frame {i}");
        dp.unsend(&frame, 10);
        let mut expected = before;
        expected.rx_frames += 1;
        assert_eq!(dp.counters(), &expected, "frame {i}");
    }
    // The fallback server's frames too.
    let text = CONFIG.replace(
        "ports = \"1935\"\nprotocol = \"tcp\"",
        "ports = \"1935\"\nprotocol = \"tcp\"\nfallback = \"198.18.0.50\"",
    );
    let config = Config::from_toml_str(&text).expect("valid");
    let halted = Snapshot::build(
        &config,
        &mut ServiceIds::default(),
        OWN_MAC,
        1,
        |ip| (octet(ip) == 50).then_some([2, 0, 0, 0, 0, 0x50]),
        |_, _| AdminState::Halt,
    );
    let mut dp = Dataplane::new(Arc::new(halted), TableSizes::default());
    let mut frame = tcp_frame(CLIENT, VIP, 1, 1935);
    assert_eq!(dp.process(&mut frame, 0), Verdict::Transmit);
    assert_eq!(dp.counters().fallback, 1);
    dp.unsend(&frame, 0);
    assert_eq!(
        (dp.counters().fallback, dp.counters().forwarded.packets),
        (0, 0)
    );
    assert_eq!(dp.counters().services[0].total.packets, 0);
}

/// An ICMP error (`kind`, `code`) from a router to the VIP, quoting the first bytes of
/// `quoted`, a packet a real server sent from the VIP.
fn icmp_error(kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc]; // next-hop MTU 1500
    message.extend_from_slice(&quoted[14..quoted.len().min(14 + 28)]);
    let checksum = etherparse::checksum::Sum16BitWords::new()
        .add_slice(&message)
        .ones_complement()
        .to_be();
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0xfe], OWN_MAC)
        .ipv4([198, 18, 0, 254], VIP, 64)
        .write(&mut frame, etherparse::IpNumber::ICMP, &message)
        .expect("write icmp error");
    frame
}

/// What a real server sent the client on a connection: from VIP:`sport` to `client`:`dport`.
fn reply_of(client: [u8; 4], sport: u16, dport: u16, udp: bool) -> Vec<u8> {
    let mut frame = if udp {
        udp_frame(VIP, client, sport, dport)
    } else {
        tcp_frame(VIP, client, sport, dport)
    };
    frame[14 + 6] = 0x40; // don't fragment: what path MTU discovery sends
    frame
}

#[test]
fn an_icmp_error_goes_to_the_server_of_the_connection_it_quotes() {
    let mut dp = dataplane();
    // Many clients' connections, so both servers carry some.
    let mut owners = std::collections::HashMap::new();
    for last in 1..=20u8 {
        let client = [198, 18, 1, last];
        let mut syn = tcp_frame(client, VIP, 40000, 1935);
        assert_eq!(dp.process_at0(&mut syn), Verdict::Transmit);
        owners.insert(last, <[u8; 6]>::try_from(&syn[0..6]).expect("mac"));
    }
    assert!(owners.values().any(|m| *m == RS1_MAC) && owners.values().any(|m| *m == RS2_MAC));
    for (last, owner) in &owners {
        // Fragmentation needed (3/4), about the server's segment to the client.
        let quoted = reply_of([198, 18, 1, *last], 1935, 40000, false);
        let mut error = icmp_error(3, 4, &quoted);
        let original = error.clone();
        assert_eq!(
            dp.process_at0(&mut error),
            Verdict::Transmit,
            "client .{last}"
        );
        assert_eq!(error[0..6], *owner, "client .{last}");
        assert_eq!(error[6..12], OWN_MAC);
        assert_eq!(error[12..], original[12..], "the error itself is untouched");
    }
    // Time exceeded goes the same way; nothing new is recorded.
    let mut exceeded = icmp_error(11, 0, &reply_of([198, 18, 1, 1], 1935, 40000, false));
    assert_eq!(dp.process_at0(&mut exceeded), Verdict::Transmit);
    assert_eq!(exceeded[0..6], owners[&1]);
    assert_eq!(dp.flows().entries(), 20);
    assert_eq!(dp.counters().icmp_errors, 21);
    assert_eq!(dp.counters().accounted_frames(), dp.counters().rx_frames);
}

#[test]
fn an_icmp_error_about_an_unknown_connection_goes_where_its_client_would() {
    let mut dp = dataplane();
    // UDP, five-tuple placement: the error follows the client's datagrams, though no table
    // holds its flow yet.
    let client = [198, 18, 1, 9];
    let mut datagram = udp_frame(client, [198, 18, 0, 101], 41000, 5003);
    let mut fresh = dataplane();
    assert_eq!(fresh.process_at0(&mut datagram), Verdict::Transmit);
    let mut quoted = udp_frame([198, 18, 0, 101], client, 5003, 41000);
    quoted[14 + 6] = 0x40;
    let mut error = icmp_error(3, 4, &quoted);
    error[30..34].copy_from_slice(&[198, 18, 0, 101]);
    let header = etherparse::Ipv4HeaderSlice::from_slice(&error[14..])
        .expect("ip")
        .to_header();
    let mut fixed = header.clone();
    fixed.header_checksum = fixed.calc_header_checksum();
    error[14..34].copy_from_slice(&fixed.to_bytes());
    assert_eq!(dp.process_at0(&mut error), Verdict::Transmit);
    assert_eq!(error[0..6], datagram[0..6]);
}

#[test]
fn icmp_errors_about_nothing_served_are_dropped() {
    let mut dp = dataplane();
    let cases = [
        // A port no service of the VIP has.
        icmp_error(3, 4, &reply_of(CLIENT, 22, 40000, false)),
        // Quoting a packet that another address sent.
        {
            let mut other = reply_of(CLIENT, 1935, 40000, false);
            other[26..30].copy_from_slice(&[198, 18, 0, 11]);
            icmp_error(3, 4, &other)
        },
        // A quote too short to hold the ports.
        {
            let quoted = reply_of(CLIENT, 1935, 40000, false);
            let mut error = icmp_error(3, 4, &quoted[..34]);
            error.truncate(14 + 20 + 8 + 20);
            let total = (error.len() - 14) as u16;
            error[16..18].copy_from_slice(&total.to_be_bytes());
            error
        },
    ];
    for (i, mut frame) in cases.into_iter().enumerate() {
        assert_eq!(
            dp.process_at0(&mut frame),
            Verdict::Drop(DropReason::IcmpErrorUnmatched),
            "case {i}"
        );
    }
}

mod dr_check {
    //! Other stations speaking for a VIP, and real servers' answers to DR probes.
    use super::*;
    use crate::packet::drcheck::{ClaimKind, ServerProbe, write_probe, write_question};
    use etherparse::{NetSlice, TransportSlice};

    const PROBE_SOURCE: [u8; 4] = [198, 18, 0, 2];

    fn with_probe_source(mut dp: Dataplane) -> Dataplane {
        let mut snapshot = (**dp.snapshot()).clone();
        snapshot.probe_v4 = Some(u32::from_be_bytes(PROBE_SOURCE));
        snapshot.peer_macs = vec![[2, 0, 0, 0, 0, 3]];
        dp.set_snapshot(Arc::new(snapshot));
        dp
    }

    #[test]
    fn a_claim_of_a_vip_is_recorded_and_answered_with_our_announcement() {
        let mut dp = with_probe_source(dataplane());
        // A real server announces the VIP (a gratuitous ARP, as one sends at boot).
        let mut claim = arp_request(BROADCAST, VIP, VIP);
        claim[6..12].copy_from_slice(&RS1_MAC);
        claim[22..28].copy_from_slice(&RS1_MAC);
        assert_eq!(dp.process(&mut claim, 1_000), Verdict::Transmit);
        // It became our own announcement, to everyone.
        let mut ours = [0u8; MIN_FRAME_LEN];
        write_gratuitous_arp(&mut ours, OWN_MAC, VIP);
        assert_eq!(claim[..42], ours[..42]);
        assert_eq!(dp.counters().vip_defences, 1);
        // Within the second it is recorded, not answered again.
        let mut again = arp_request(BROADCAST, VIP, VIP);
        again[6..12].copy_from_slice(&RS1_MAC);
        again[22..28].copy_from_slice(&RS1_MAC);
        assert_eq!(
            dp.process(&mut again.clone(), 1_500),
            Verdict::Drop(DropReason::VipClaimed)
        );
        // An answer to a question for the VIP, and a request that uses it as sender.
        let mut answer = arp_request(OWN_MAC, VIP, PROBE_SOURCE);
        answer[6..12].copy_from_slice(&RS2_MAC);
        answer[21] = 2;
        answer[22..28].copy_from_slice(&RS2_MAC);
        assert_eq!(
            dp.process(&mut answer, 1_600),
            Verdict::Drop(DropReason::VipClaimed)
        );
        let mut sender = arp_request(BROADCAST, VIP, [198, 18, 0, 1]);
        sender[6..12].copy_from_slice(&RS2_MAC);
        sender[22..28].copy_from_slice(&RS2_MAC);
        assert_eq!(dp.process(&mut sender, 2_100), Verdict::Transmit);
        let claims = dp.dr_watch().claims();
        let seen = |mac, kind| {
            claims
                .iter()
                .find(|c| c.mac == mac && c.kind == kind)
                .map(|c| c.count)
        };
        assert_eq!(seen(RS1_MAC, ClaimKind::Announced), Some(2));
        assert_eq!(seen(RS2_MAC, ClaimKind::Answered), Some(1));
        assert_eq!(seen(RS2_MAC, ClaimKind::UsedAsSender), Some(1));
        // Ours and the HA peer's announcements are no claim.
        let mut peer = arp_request(BROADCAST, VIP, VIP);
        peer[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 3]);
        peer[22..28].copy_from_slice(&[2, 0, 0, 0, 0, 3]);
        assert_eq!(
            dp.process(&mut peer, 5_000),
            Verdict::Drop(DropReason::ArpNotVip)
        );
        assert_eq!(dp.dr_watch().claims().len(), 3);
        assert_eq!(dp.counters().accounted_frames(), dp.counters().rx_frames);
    }

    /// A real server's SYN-ACK from VIP:1935 to our probe port.
    fn syn_ack(our_port: u16, ack: u32) -> Vec<u8> {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(RS1_MAC, OWN_MAC)
            .ipv4(VIP, PROBE_SOURCE, 64)
            .tcp(1935, our_port, 777, 64240)
            .syn()
            .ack(ack)
            .write(&mut frame, &[])
            .expect("write");
        frame
    }

    #[test]
    fn a_probe_answer_is_recorded_and_reset() {
        let mut dp = with_probe_source(dataplane());
        let mut answer = syn_ack(61005, 1235);
        assert_eq!(dp.process_at0(&mut answer), Verdict::Transmit);
        let packet = SlicedPacket::from_ethernet(&answer).expect("parse");
        let Some(NetSlice::Ipv4(ip)) = packet.net else {
            panic!("not IPv4")
        };
        assert_eq!(ip.header().source(), PROBE_SOURCE);
        assert_eq!(ip.header().destination(), VIP);
        let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
            panic!("not TCP")
        };
        assert!(tcp.rst() && !tcp.syn());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (61005, 1935));
        assert_eq!(tcp.sequence_number(), 1235);
        assert_eq!(
            tcp.calc_checksum_ipv4(ip.header().source(), ip.header().destination()),
            Ok(tcp.checksum())
        );
        assert_eq!(answer[0..6], RS1_MAC);
        assert_eq!(answer[6..12], OWN_MAC);
        let answers: Vec<_> = dp.dr_watch().answers().copied().collect();
        assert_eq!(answers.len(), 1);
        assert!(answers[0].answers(&ServerProbe {
            vip: IpAddr::from(VIP),
            port: 1935,
            mac: RS1_MAC,
            source: IpAddr::from(PROBE_SOURCE),
            our_port: 61005,
            seq: 1234,
        }));
        assert_eq!(dp.counters().probe_resets, 1);
        // Not to a probe port, or without a probe address: no VIP's, dropped.
        let mut stray = syn_ack(40000, 1);
        assert_eq!(
            dp.process_at0(&mut stray),
            Verdict::Drop(DropReason::NotVip)
        );
        let mut unasked = syn_ack(61005, 1235);
        assert_eq!(
            dataplane().process_at0(&mut unasked),
            Verdict::Drop(DropReason::NotVip)
        );
    }

    #[test]
    fn questions_and_probes_are_well_formed_frames() {
        let mut buf = [0u8; crate::packet::drcheck::PROBE_FRAME_LEN];
        let len = write_question(
            &mut buf,
            OWN_MAC,
            IpAddr::from(PROBE_SOURCE),
            IpAddr::from(VIP),
        );
        assert_eq!(len, MIN_FRAME_LEN);
        assert_eq!(
            buf[..14],
            [[0xff; 6], OWN_MAC, [0x08, 0x06, 0, 0, 0, 0]].concat()[..14]
        );
        assert_eq!(buf[28..32], PROBE_SOURCE);
        assert_eq!(buf[38..42], VIP);
        let probe = ServerProbe {
            vip: IpAddr::from(VIP),
            port: 1935,
            mac: RS1_MAC,
            source: IpAddr::from(PROBE_SOURCE),
            our_port: 61001,
            seq: 99,
        };
        let len = write_probe(&mut buf, OWN_MAC, &probe);
        let packet = SlicedPacket::from_ethernet(&buf[..len]).expect("parse");
        let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
            panic!("not TCP")
        };
        assert!(tcp.syn() && !tcp.ack());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (61001, 1935));
        assert_eq!(buf[0..6], RS1_MAC);
        // The real server's kernel checks the checksum.
        let Some(NetSlice::Ipv4(ip)) = packet.net else {
            panic!("not IPv4")
        };
        assert_eq!(
            tcp.calc_checksum_ipv4(ip.header().source(), ip.header().destination()),
            Ok(tcp.checksum())
        );
    }
}

mod census {
    //! Connection counts kept as connections open, change and close, against a walk of the
    //! flow table, over random traffic, time, snapshot changes and peers' entries.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A TCP segment from client, source port, to port, with flags.
        Tcp(u8, u16, u16, u8),
        Udp(u8, u16),
        Wait(u64),
        /// The config as is, rs2 drained, rs2 halted, or the GUI moved to port 8089.
        Change(u8),
        /// A peer's connection to rs1 or rs2.
        Install(u8, u16, bool, FlowState),
        /// Sweep everything expired and compare.
        Check,
    }

    fn op() -> impl Strategy<Value = Op> {
        use tcp_flags::*;
        let flags = prop::sample::select(vec![SYN, ACK, FIN | ACK, RST, RST | ACK, SYN | ACK]);
        let state = prop::sample::select(vec![
            FlowState::SynSent,
            FlowState::Established,
            FlowState::Closing,
        ]);
        prop_oneof![
            8 => (0..6u8, 0..3u16, prop::sample::select(vec![1935u16, 8088, 8089]), flags)
                .prop_map(|(c, s, d, f)| Op::Tcp(c, s, d, f)),
            2 => (0..6u8, 5000..5003u16).prop_map(|(c, d)| Op::Udp(c, d)),
            3 => prop::sample::select(vec![500u64, 9_000, 50_000, 110_000, 290_000, 890_000])
                .prop_map(Op::Wait),
            1 => (0..4u8).prop_map(Op::Change),
            1 => (0..6u8, 0..3u16, any::<bool>(), state)
                .prop_map(|(c, s, rs2, st)| Op::Install(c, s, rs2, st)),
            2 => Just(Op::Check),
        ]
    }

    fn tcp(client: u8, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut frame = tcp_frame([198, 18, 1, client], VIP, 40000 + sport, dport);
        // Ethernet 14 + IPv4 20 + 13: the flags byte; the dataplane reads no TCP checksum.
        frame[14 + 20 + 13] = flags;
        frame
    }

    fn snapshot(variant: u8, generation: u64, ids: &mut ServiceIds) -> Arc<Snapshot> {
        let text = if variant == 3 {
            CONFIG.replace("ports = \"8088\"", "ports = \"8089\"")
        } else {
            CONFIG.to_string()
        };
        let config = Config::from_toml_str(&text).expect("valid");
        let admin = match variant {
            1 => AdminState::Drain,
            2 => AdminState::Halt,
            _ => AdminState::Online,
        };
        Arc::new(Snapshot::build(
            &config,
            ids,
            OWN_MAC,
            generation,
            |ip| (ip == Ipv4Addr::new(198, 18, 0, 11)).then_some(RS1_MAC),
            |_, rs| {
                if rs == "rs2" {
                    admin
                } else {
                    AdminState::Online
                }
            },
        ))
    }

    /// What the report gave before the census: a walk of every live connection.
    fn walked(dp: &Dataplane, now_ms: u64) -> Vec<Vec<u64>> {
        let snapshot = dp.snapshot();
        let mut counts: Vec<Vec<u64>> = snapshot
            .services
            .iter()
            .map(|s| vec![0; s.real_servers.len()])
            .collect();
        for (key, entry) in dp.flows().live(now_ms) {
            let Some(&service) =
                snapshot
                    .by_port
                    .get(&service_key(key.dst, key.protocol, key.ports as u16))
            else {
                continue;
            };
            let service = usize::from(service);
            if let Some(&rs) = snapshot.services[service].by_ip.get(&entry.real_server)
                && entry.state.is_active()
            {
                counts[service][usize::from(rs)] += 1;
            }
        }
        counts
    }

    proptest! {
        #[test]
        fn counts_match_a_walk_of_the_live_connections(
            ops in prop::collection::vec(op(), 1..200),
        ) {
            let mut ids = ServiceIds::default();
            let mut dp = Dataplane::new(snapshot(0, 1, &mut ids), TableSizes::default());
            let mut generation = 1;
            let mut now = 1_000u64;
            for op in ops.into_iter().chain([Op::Check]) {
                match op {
                    Op::Tcp(c, s, d, f) => {
                        dp.process(&mut tcp(c, s, d, f), now);
                    }
                    Op::Udp(c, d) => {
                        dp.process(&mut udp_frame([198, 18, 1, c], [198, 18, 0, 101], 40000, d), now);
                    }
                    Op::Wait(ms) => now += ms,
                    Op::Change(variant) => {
                        generation += 1;
                        dp.set_snapshot(snapshot(variant, generation, &mut ids));
                    }
                    Op::Install(c, s, rs2, state) => {
                        let entry = SyncEntry::Flow {
                            key: FlowKey {
                                src: u32::from_be_bytes([198, 18, 1, c]),
                                dst: u32::from_be_bytes(VIP),
                                ports: u32::from(40000 + s) << 16 | 1935,
                                protocol: 6,
                            },
                            real_server: u32::from_be_bytes([198, 18, 0, 11 + u8::from(rs2)]),
                            state,
                            remaining_ms: 600_000,
                        };
                        dp.install(&[entry], now);
                    }
                    Op::Check => {
                        dp.v4.flows.sweep(now);
                        prop_assert_eq!(dp.connections(), walked(&dp, now));
                    }
                }
            }
        }
    }

    #[test]
    fn a_connection_counts_from_its_handshake_to_its_fin_and_an_idle_one_until_it_is_swept() {
        use tcp_flags::*;
        let mut dp = Dataplane::new(
            snapshot(0, 1, &mut ServiceIds::default()),
            TableSizes::default(),
        );
        let streaming = |dp: &Dataplane| dp.connections()[0].iter().sum::<u64>();
        dp.process(&mut tcp(1, 0, 1935, SYN), 1_000);
        assert_eq!(streaming(&dp), 0, "a bare SYN is no connection yet");
        dp.process(&mut tcp(1, 0, 1935, ACK), 1_001);
        dp.process(&mut tcp(2, 0, 1935, SYN), 1_002);
        dp.process(&mut tcp(2, 0, 1935, ACK), 1_003);
        assert_eq!(streaming(&dp), 2);
        dp.process(&mut tcp(1, 0, 1935, FIN | ACK), 2_000);
        assert_eq!(streaming(&dp), 1, "a closing connection no longer counts");
        // The other goes idle: it counts until the sweep after its 900 s expiry.
        let expired = 1_003 + 900_000;
        dp.sweep_expired(expired - 1);
        let mut now = expired - 1;
        while now < expired + SWEEP_PASS_MS + 20 {
            now += 10;
            dp.sweep_expired(now);
        }
        assert_eq!(streaming(&dp), 0, "swept within a pass of its expiry");
    }
}
