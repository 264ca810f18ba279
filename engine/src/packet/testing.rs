//! Frames as hosts on the link send them, for the unit tests and the benchmarks. Built with
//! etherparse, not with the packet path's own writers, so the code under test does not check
//! itself.

use crate::packet::dataplane::{Dataplane, TableSizes};
use crate::packet::snapshot::{AdminState, ServiceIds, Snapshot};
use etherparse::err::packet::BuildWriteError;
use etherparse::{Icmpv6Type, PacketBuilder};
use lbd_config::Config;
use std::sync::Arc;

/// A packet path over `config` at `own_mac`, with default tables: every real server online,
/// and none of their MACs learned (only pinned ones resolve).
pub fn dataplane(config: &Config, own_mac: [u8; 6]) -> Dataplane {
    let snapshot = Snapshot::build(
        config,
        &mut ServiceIds::default(),
        own_mac,
        1,
        |_| None,
        |_, _| AdminState::Online,
    );
    Dataplane::new(Arc::new(snapshot), TableSizes::default())
}

/// What `asker` sends to learn `target`'s MAC (RFC 4861 7.2.2): a Neighbor Solicitation to
/// the target's solicited-node multicast address (RFC 4291 2.7.1) and its MAC (RFC 2464 7),
/// with the asker's MAC as the source link-layer address option.
pub fn neighbor_solicitation(
    asker_mac: [u8; 6],
    asker: [u8; 16],
    target: [u8; 16],
) -> Result<Vec<u8>, BuildWriteError> {
    let mut group = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
    group[13..].copy_from_slice(&target[13..]);
    let group_mac = [0x33, 0x33, 0xff, target[13], target[14], target[15]];
    let builder = PacketBuilder::ethernet2(asker_mac, group_mac)
        .ipv6(asker, group, 255)
        .icmpv6(Icmpv6Type::NeighborSolicitation);
    let mut payload = target.to_vec();
    // Source link-layer address option: type 1, length 1 (8 bytes).
    payload.extend_from_slice(&[1, 1]);
    payload.extend_from_slice(&asker_mac);
    let mut frame = Vec::new();
    builder.write(&mut frame, &payload)?;
    Ok(frame)
}
