//! The DR check's packet side: what a worker sees of other stations speaking for a VIP, the
//! questions and probes it sends, and the probe answers it turns into resets. No I/O.
//!
//! - A claim: an ARP packet whose sender address is a VIP (a gratuitous announcement, an
//!   answer to a question, or a request that uses the VIP as its source, as a real server
//!   without `arp_announce=2` sends), or a Neighbor Advertisement for an IPv6 VIP, from a MAC
//!   that is neither ours nor the HA peer's. It is recorded, and answered at once with our own
//!   announcement (RFC 5227 2.4's defence), at most once a second per VIP.
//! - A question: "who has the VIP?", sent from this host's own address (an ARP request, or a
//!   Neighbor Solicitation): a real server that answers ARP for the VIP answers it, and is
//!   caught by the rule above.
//! - A probe: a TCP SYN to VIP:port sent to one real server's MAC from this host's address. A
//!   server that accepts traffic for the VIP answers with a SYN-ACK from the VIP; the worker
//!   records it and sends a reset in its place (the host's kernel never sees it). The control
//!   side matches answers to the probes it asked for (port, sequence number, MAC).

use std::net::IpAddr;
use std::ops::RangeInclusive;

/// The TCP source ports of probes (`PROBE_PORT_MIN`..`PROBE_PORT_MAX` in bpf/steer.c): above
/// Linux's default ephemeral range, so no connection of the host's own uses them.
pub const PROBE_PORTS: RangeInclusive<u16> = 61000..=61999;
/// A VIP is defended at most this often.
pub const DEFENCE_INTERVAL_MS: u64 = 1_000;
/// Distinct (VIP, MAC, kind) claims remembered per worker.
const MAX_CLAIMS: usize = 64;
/// Probe answers remembered per worker (the most recent).
const MAX_ANSWERS: usize = 256;
/// The largest frame this module writes: a Neighbor Solicitation with our link-layer address
/// (an IPv6 SYN is 74 bytes).
pub const PROBE_FRAME_LEN: usize = 14 + 40 + 32;

/// How a station spoke for a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClaimKind {
    /// Announced it: a gratuitous ARP or an unsolicited Neighbor Advertisement.
    Announced,
    /// Answered a question for it: an ARP reply, a solicited advertisement.
    Answered,
    /// Used it as the sender of an ARP request for another address (`arp_announce` not 2).
    UsedAsSender,
}

impl ClaimKind {
    /// Its name in status and logs.
    pub fn name(self) -> &'static str {
        match self {
            ClaimKind::Announced => "announced",
            ClaimKind::Answered => "answered",
            ClaimKind::UsedAsSender => "used_as_sender",
        }
    }
}

/// Another station speaking for a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The VIP.
    pub vip: IpAddr,
    /// The station's MAC.
    pub mac: [u8; 6],
    /// How.
    pub kind: ClaimKind,
    /// Frames seen.
    pub count: u64,
    /// When the last was seen (the worker's clock, ms).
    pub last_ms: u64,
}

/// A probe of one real server: a SYN to `vip`:`port` sent to `mac` from `source`:`our_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerProbe {
    /// The VIP.
    pub vip: IpAddr,
    /// The service port.
    pub port: u16,
    /// The real server's MAC.
    pub mac: [u8; 6],
    /// This host's address, of the VIP's family.
    pub source: IpAddr,
    /// The source port, in [`PROBE_PORTS`].
    pub our_port: u16,
    /// The SYN's sequence number; the answer acknowledges it plus one.
    pub seq: u32,
}

/// A SYN-ACK from a VIP to a probe port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeAnswer {
    /// The VIP it came from.
    pub vip: IpAddr,
    /// The service port it came from.
    pub port: u16,
    /// The MAC it came from.
    pub mac: [u8; 6],
    /// The probe port it went to.
    pub our_port: u16,
    /// What it acknowledged.
    pub ack: u32,
}

impl ProbeAnswer {
    /// Whether this answers `probe`.
    pub fn answers(&self, probe: &ServerProbe) -> bool {
        self.vip == probe.vip
            && self.port == probe.port
            && self.mac == probe.mac
            && self.our_port == probe.our_port
            && self.ack == probe.seq.wrapping_add(1)
    }
}

/// One worker's record of claims and probe answers.
#[derive(Debug, Clone, Default)]
pub struct DrWatch {
    claims: Vec<Claim>,
    defended: Vec<(IpAddr, u64)>,
    answers: std::collections::VecDeque<ProbeAnswer>,
}

impl DrWatch {
    /// Records a claim seen at `now_ms`; true when the VIP is to be defended now.
    pub fn claimed(&mut self, vip: IpAddr, mac: [u8; 6], kind: ClaimKind, now_ms: u64) -> bool {
        match self
            .claims
            .iter_mut()
            .find(|c| c.vip == vip && c.mac == mac && c.kind == kind)
        {
            Some(claim) => {
                claim.count += 1;
                claim.last_ms = now_ms;
            }
            None => {
                if self.claims.len() == MAX_CLAIMS {
                    // The stalest gives way.
                    if let Some(oldest) =
                        (0..self.claims.len()).min_by_key(|&i| self.claims[i].last_ms)
                    {
                        self.claims.swap_remove(oldest);
                    }
                }
                self.claims.push(Claim {
                    vip,
                    mac,
                    kind,
                    count: 1,
                    last_ms: now_ms,
                });
            }
        }
        match self.defended.iter_mut().find(|(v, _)| *v == vip) {
            Some((_, at)) if now_ms < *at + DEFENCE_INTERVAL_MS => false,
            Some((_, at)) => {
                *at = now_ms;
                true
            }
            None => {
                if self.defended.len() < MAX_CLAIMS {
                    self.defended.push((vip, now_ms));
                }
                true
            }
        }
    }

    /// The claims seen.
    pub fn claims(&self) -> &[Claim] {
        &self.claims
    }

    /// Records a probe answer.
    pub fn answered(&mut self, answer: ProbeAnswer) {
        if self.answers.len() == MAX_ANSWERS {
            self.answers.pop_front();
        }
        self.answers.push_back(answer);
    }

    /// The most recent probe answers.
    pub fn answers(&self) -> impl Iterator<Item = &ProbeAnswer> {
        self.answers.iter()
    }
}

/// Writes "who has `vip`?" from `mac` and `source` into `buf`: an ARP request (RFC 826) for
/// an IPv4 VIP, a Neighbor Solicitation (to the solicited-node group) for an IPv6 one; returns
/// its length, or 0 when the families differ.
pub fn write_question(buf: &mut [u8], mac: [u8; 6], source: IpAddr, vip: IpAddr) -> usize {
    use etherparse::{Icmpv6Type, PacketBuilder};
    buf.fill(0);
    match (source, vip) {
        (IpAddr::V4(source), IpAddr::V4(vip)) => {
            if buf.len() < 42 {
                return 0;
            }
            buf[0..6].copy_from_slice(&[0xff; 6]);
            buf[6..12].copy_from_slice(&mac);
            buf[12..14].copy_from_slice(&etherparse::EtherType::ARP.0.to_be_bytes());
            buf[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
            buf[22..28].copy_from_slice(&mac);
            buf[28..32].copy_from_slice(&source.octets());
            buf[38..42].copy_from_slice(&vip.octets());
            42.max(crate::packet::dataplane::MIN_FRAME_LEN.min(buf.len()))
        }
        (IpAddr::V6(source), IpAddr::V6(vip)) => {
            let target = vip.octets();
            let mut group = [0u8; 16];
            group[..2].copy_from_slice(&[0xff, 0x02]);
            group[11..13].copy_from_slice(&[0x01, 0xff]);
            group[13..].copy_from_slice(&target[13..]);
            let group_mac = [0x33, 0x33, 0xff, target[13], target[14], target[15]];
            let mut payload = target.to_vec();
            payload.extend_from_slice(&[1, 1]);
            payload.extend_from_slice(&mac);
            write_with(buf, |w| {
                PacketBuilder::ethernet2(mac, group_mac)
                    .ipv6(source.octets(), group, 255)
                    .icmpv6(Icmpv6Type::NeighborSolicitation)
                    .write(w, &payload)
            })
        }
        _ => 0,
    }
}

/// Writes `probe`'s SYN from `own_mac` into `buf` and returns its length (0 when the
/// families of its addresses differ or `buf` is too small).
pub fn write_probe(buf: &mut [u8], own_mac: [u8; 6], probe: &ServerProbe) -> usize {
    use etherparse::PacketBuilder;
    buf.fill(0);
    let builder = PacketBuilder::ethernet2(own_mac, probe.mac);
    let length = match (probe.source, probe.vip) {
        (IpAddr::V4(source), IpAddr::V4(vip)) => write_with(buf, |w| {
            builder
                .ipv4(source.octets(), vip.octets(), 64)
                .tcp(probe.our_port, probe.port, probe.seq, 1024)
                .syn()
                .write(w, &[])
        }),
        (IpAddr::V6(source), IpAddr::V6(vip)) => write_with(buf, |w| {
            builder
                .ipv6(source.octets(), vip.octets(), 64)
                .tcp(probe.our_port, probe.port, probe.seq, 1024)
                .syn()
                .write(w, &[])
        }),
        _ => 0,
    };
    if length == 0 {
        0
    } else {
        length.max(crate::packet::dataplane::MIN_FRAME_LEN.min(buf.len()))
    }
}

/// Turns a probe's SYN-ACK (from `vip`:`port` to `ours`:`our_port`, acknowledging `ack`,
/// from `mac`) into the reset that ends it, in place: the frame keeps its length, the IP
/// length says the rest is padding. False when the frame is too short for it.
#[allow(clippy::too_many_arguments)]
pub fn reset_in_place(
    frame: &mut [u8],
    own_mac: [u8; 6],
    mac: [u8; 6],
    ours: IpAddr,
    our_port: u16,
    vip: IpAddr,
    port: u16,
    ack: u32,
) -> bool {
    use etherparse::PacketBuilder;
    let builder = PacketBuilder::ethernet2(own_mac, mac);
    let mut reset = [0u8; PROBE_FRAME_LEN];
    let length = match (ours, vip) {
        (IpAddr::V4(ours), IpAddr::V4(vip)) => write_with(&mut reset, |w| {
            builder
                .ipv4(ours.octets(), vip.octets(), 64)
                .tcp(our_port, port, ack, 0)
                .rst()
                .write(w, &[])
        }),
        (IpAddr::V6(ours), IpAddr::V6(vip)) => write_with(&mut reset, |w| {
            builder
                .ipv6(ours.octets(), vip.octets(), 64)
                .tcp(our_port, port, ack, 0)
                .rst()
                .write(w, &[])
        }),
        _ => 0,
    };
    if length == 0 || frame.len() < length {
        return false;
    }
    frame[..length].copy_from_slice(&reset[..length]);
    frame[length..].fill(0);
    true
}

/// Runs `write` into `buf`; the bytes written, or 0 when they did not fit.
fn write_with<E>(
    buf: &mut [u8],
    write: impl FnOnce(&mut std::io::Cursor<&mut [u8]>) -> Result<(), E>,
) -> usize {
    let mut cursor = std::io::Cursor::new(buf);
    match write(&mut cursor) {
        Ok(()) => usize::try_from(cursor.position()).unwrap_or(0),
        Err(_) => 0,
    }
}
