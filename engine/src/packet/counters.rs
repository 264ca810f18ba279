//! Per-worker counters: plain integers owned by one worker, never shared or atomic on the
//! packet path; a reader sums the workers' copies.
//!
//! Every frame a worker takes off its RX ring ends in exactly one counter: forwarded, answered
//! (ARP or ICMP), or dropped under a named [`DropReason`]. A frame passed for transmission is
//! counted when the dataplane decides so; if the TX ring then has no room for it, the driver
//! takes that count back ([`Counters::unsend`]) and counts the drop instead. A reason that
//! exists has a test that produces it.

use std::fmt;

/// Why a frame was not forwarded. Small and `Copy`: the hot path returns it by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Shorter than the headers it claims to carry.
    Truncated,
    /// An EtherType the balancer does not serve (VLAN tags, ...).
    UnsupportedEtherType,
    /// Unicast to another station's MAC address (a flooded frame): not ours to forward.
    NotOurMac,
    /// An ARP packet that is not an Ethernet/IPv4 request (replies, other hardware types).
    ArpNotRequest,
    /// An ARP request for an address that is not a VIP.
    ArpNotVip,
    /// IP header with a bad version, header length or total length; an IPv6 extension
    /// header that runs past its packet, or a second Fragment header.
    BadIpHeader,
    /// More IPv6 extension headers than the balancer walks.
    ExtensionHeaders,
    /// A Neighbor Discovery message the balancer does not answer: a solicitation for an
    /// address that is no VIP, a duplicate address detection probe, or another ND message.
    NdNotAnswered,
    /// IP destination is not a configured VIP.
    NotVip,
    /// VIP matches, but no service serves this protocol and port.
    PortNotServed,
    /// A non-first IP fragment whose first fragment was not seen (it came first, was lost or
    /// dropped, or is forgotten): the ports that say where its datagram goes are in the first
    /// fragment only.
    FragmentUnmatched,
    /// ICMP to a VIP that is not an echo request or an error (or is fragmented).
    IcmpNotEcho,
    /// An ICMP error to a VIP whose quoted packet is unreadable, was not sent from that VIP, or
    /// belongs to no service.
    IcmpErrorUnmatched,
    /// An echo request from an address no reply may go to: broadcast, multicast, unspecified,
    /// loopback, or the VIP itself (RFC 1122 3.2.2.6, 3.3.6).
    IcmpBadSource,
    /// Another station spoke for a VIP (ARP, Neighbor Advertisement): recorded by the DR
    /// check; not answered, because a defence of that VIP went out within the last second.
    VipClaimed,
    /// The service has no real server that can take the frame (all drained or unresolved).
    NoRealServer,
    /// The TX ring had no room: the frame was recycled instead of sent.
    TxRingFull,
}

impl DropReason {
    /// Every reason, in the order counters are kept and printed.
    pub const ALL: [DropReason; 17] = [
        DropReason::Truncated,
        DropReason::UnsupportedEtherType,
        DropReason::NotOurMac,
        DropReason::ArpNotRequest,
        DropReason::ArpNotVip,
        DropReason::BadIpHeader,
        DropReason::ExtensionHeaders,
        DropReason::NdNotAnswered,
        DropReason::NotVip,
        DropReason::PortNotServed,
        DropReason::FragmentUnmatched,
        DropReason::IcmpNotEcho,
        DropReason::IcmpErrorUnmatched,
        DropReason::IcmpBadSource,
        DropReason::VipClaimed,
        DropReason::NoRealServer,
        DropReason::TxRingFull,
    ];

    /// The counter's name in logs and statistics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::UnsupportedEtherType => "unsupported_ethertype",
            DropReason::NotOurMac => "not_our_mac",
            DropReason::ArpNotRequest => "arp_not_request",
            DropReason::ArpNotVip => "arp_not_vip",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::ExtensionHeaders => "extension_headers",
            DropReason::NdNotAnswered => "nd_not_answered",
            DropReason::NotVip => "not_vip",
            DropReason::PortNotServed => "port_not_served",
            DropReason::FragmentUnmatched => "fragment_unmatched",
            DropReason::IcmpNotEcho => "icmp_not_echo",
            DropReason::IcmpErrorUnmatched => "icmp_error_unmatched",
            DropReason::IcmpBadSource => "icmp_bad_source",
            DropReason::VipClaimed => "vip_claimed",
            DropReason::NoRealServer => "no_real_server",
            DropReason::TxRingFull => "tx_ring_full",
        }
    }

    #[inline]
    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a frame passed for transmission was counted as: [`Counters::unsend`] takes it back
/// when the frame cannot be sent after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Forwarded to a service's real server (indices in the snapshot in use).
    Forward {
        /// Service index.
        service: u16,
        /// Real-server index within the service.
        real_server: u16,
    },
    /// Forwarded to a service's fallback server.
    Fallback {
        /// Service index.
        service: u16,
    },
    /// An ARP reply.
    ArpReply,
    /// An ICMP or ICMPv6 echo reply.
    EchoReply,
    /// A Neighbor Advertisement answering a solicitation.
    NdReply,
    /// An unsolicited Neighbor Advertisement the worker wrote.
    UnsolicitedNa,
    /// Our announcement of a VIP in place of another station's claim.
    VipDefence,
    /// The reset that ends a DR probe's SYN-ACK.
    ProbeReset,
    /// A DR check question or probe the worker wrote.
    DrProbe,
    /// A gratuitous ARP the worker wrote (not a received frame).
    GratuitousArp,
}

/// Packets and bytes, for a service or a real server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Frames forwarded.
    pub packets: u64,
    /// Bytes of those frames, Ethernet header included.
    pub bytes: u64,
}

impl Traffic {
    #[inline]
    fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }

    fn remove(&mut self, len: usize) {
        self.packets = self.packets.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(len as u64);
    }
}

/// One worker's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames taken from the RX ring.
    pub rx_frames: u64,
    /// Frames forwarded to a real server.
    pub forwarded: Traffic,
    /// ARP replies sent for VIPs.
    pub arp_replies: u64,
    /// ICMP and ICMPv6 echo replies sent from VIPs.
    pub icmp_echo_replies: u64,
    /// Neighbor Advertisements sent for VIPs, answering solicitations.
    pub nd_replies: u64,
    /// Gratuitous ARP frames sent.
    pub gratuitous_arps: u64,
    /// Unsolicited Neighbor Advertisements sent (IPv6's gratuitous ARP).
    pub unsolicited_nas: u64,
    /// Announcements of a VIP sent in place of another station's claim of it.
    pub vip_defences: u64,
    /// DR probes' SYN-ACKs turned into resets.
    pub probe_resets: u64,
    /// DR check questions and probes sent (frames the worker wrote).
    pub dr_probes: u64,
    /// Frames sent to a service's fallback server (also counted as forwarded).
    pub fallback: u64,
    /// ICMP errors about a connection sent to its real server (also counted as forwarded).
    pub icmp_errors: u64,
    /// Drops, indexed by [`DropReason`].
    pub drops: [u64; DropReason::ALL.len()],
    /// Per service (snapshot order), per real server (service's order).
    pub services: Vec<ServiceTraffic>,
}

/// A service's traffic and its real servers'.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTraffic {
    /// Frames forwarded for this service.
    pub total: Traffic,
    /// Frames forwarded to each real server.
    pub real_servers: Vec<Traffic>,
}

impl ServiceTraffic {
    /// Nothing counted yet, for a service of `real_servers` servers.
    pub fn for_servers(real_servers: usize) -> ServiceTraffic {
        ServiceTraffic {
            total: Traffic::default(),
            real_servers: vec![Traffic::default(); real_servers],
        }
    }
}

impl Counters {
    /// Counters shaped for services with these numbers of real servers.
    pub fn for_services(real_servers_per_service: impl IntoIterator<Item = usize>) -> Counters {
        Counters {
            services: real_servers_per_service
                .into_iter()
                .map(ServiceTraffic::for_servers)
                .collect(),
            ..Counters::default()
        }
    }

    /// Counts one drop.
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    /// The count for one drop reason.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Total drops over all reasons.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Counts one forwarded frame of `len` bytes for a service's real server.
    #[inline(always)]
    pub fn forward(&mut self, service: usize, real_server: usize, len: usize) {
        self.forwarded.add(len);
        if let Some(service) = self.services.get_mut(service) {
            service.total.add(len);
            if let Some(rs) = service.real_servers.get_mut(real_server) {
                rs.add(len);
            }
        }
    }

    /// Counts one frame of `len` bytes sent to a service's fallback server.
    #[inline]
    pub fn forward_fallback(&mut self, service: usize, len: usize) {
        self.forwarded.add(len);
        self.fallback += 1;
        if let Some(service) = self.services.get_mut(service) {
            service.total.add(len);
        }
    }

    /// Takes back the count of a frame of `len` bytes that was counted as `sent` but could not
    /// be sent.
    pub fn unsend(&mut self, sent: Sent, len: usize) {
        match sent {
            Sent::Forward {
                service,
                real_server,
            } => {
                self.forwarded.remove(len);
                if let Some(service) = self.services.get_mut(usize::from(service)) {
                    service.total.remove(len);
                    if let Some(rs) = service.real_servers.get_mut(usize::from(real_server)) {
                        rs.remove(len);
                    }
                }
            }
            Sent::Fallback { service } => {
                self.forwarded.remove(len);
                self.fallback = self.fallback.saturating_sub(1);
                if let Some(service) = self.services.get_mut(usize::from(service)) {
                    service.total.remove(len);
                }
            }
            Sent::ArpReply => self.arp_replies = self.arp_replies.saturating_sub(1),
            Sent::EchoReply => self.icmp_echo_replies = self.icmp_echo_replies.saturating_sub(1),
            Sent::GratuitousArp => self.gratuitous_arps = self.gratuitous_arps.saturating_sub(1),
            Sent::NdReply => self.nd_replies = self.nd_replies.saturating_sub(1),
            Sent::UnsolicitedNa => self.unsolicited_nas = self.unsolicited_nas.saturating_sub(1),
            Sent::VipDefence => self.vip_defences = self.vip_defences.saturating_sub(1),
            Sent::ProbeReset => self.probe_resets = self.probe_resets.saturating_sub(1),
            Sent::DrProbe => self.dr_probes = self.dr_probes.saturating_sub(1),
        }
    }

    /// Frames taken off the RX ring that some counter accounts for: forwarded, answered or
    /// dropped. Equal to `rx_frames` at every batch boundary.
    pub fn accounted_frames(&self) -> u64 {
        self.forwarded.packets
            + self.arp_replies
            + self.icmp_echo_replies
            + self.nd_replies
            + self.vip_defences
            + self.probe_resets
            + self.total_drops()
    }

    /// Adds another worker's counters into these (same service shape expected; extra entries
    /// are appended).
    pub fn merge(&mut self, other: &Counters) {
        self.rx_frames += other.rx_frames;
        self.forwarded.packets += other.forwarded.packets;
        self.forwarded.bytes += other.forwarded.bytes;
        self.arp_replies += other.arp_replies;
        self.icmp_echo_replies += other.icmp_echo_replies;
        self.gratuitous_arps += other.gratuitous_arps;
        self.nd_replies += other.nd_replies;
        self.unsolicited_nas += other.unsolicited_nas;
        self.vip_defences += other.vip_defences;
        self.probe_resets += other.probe_resets;
        self.dr_probes += other.dr_probes;
        self.fallback += other.fallback;
        self.icmp_errors += other.icmp_errors;
        for (mine, theirs) in self.drops.iter_mut().zip(other.drops) {
            *mine += theirs;
        }
        if self.services.len() < other.services.len() {
            self.services
                .resize(other.services.len(), ServiceTraffic::default());
        }
        for (mine, theirs) in self.services.iter_mut().zip(&other.services) {
            mine.total.packets += theirs.total.packets;
            mine.total.bytes += theirs.total.bytes;
            if mine.real_servers.len() < theirs.real_servers.len() {
                mine.real_servers
                    .resize(theirs.real_servers.len(), Traffic::default());
            }
            for (a, b) in mine.real_servers.iter_mut().zip(&theirs.real_servers) {
                a.packets += b.packets;
                a.bytes += b.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_indices_match_the_table() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason}");
        }
    }

    #[test]
    fn merge_sums_everything() {
        let mut a = Counters::for_services([2]);
        a.forward(0, 1, 100);
        a.drop(DropReason::NotVip);
        let mut b = Counters::for_services([2, 1]);
        b.forward(1, 0, 60);
        b.drop(DropReason::NotVip);
        a.merge(&b);
        assert_eq!(a.forwarded.packets, 2);
        assert_eq!(a.forwarded.bytes, 160);
        assert_eq!(a.drops_for(DropReason::NotVip), 2);
        assert_eq!(a.services[0].real_servers[1].packets, 1);
        assert_eq!(a.services[1].real_servers[0].bytes, 60);
    }
}
