//! The DR check, control side: every round it asks the segment who has each VIP and probes
//! every real server with a SYN to VIP:port sent to its MAC (the workers send them:
//! [`crate::packet::drcheck`]); the next round reads what the workers saw. A real server is
//! reported when it answers ARP or Neighbor Discovery for a VIP (it would take the VIP's
//! traffic), or when it does not answer the probe (it does not accept traffic for the VIP: no
//! VIP on its loopback, no redirect). Other stations that claim a VIP are reported too.

use crate::packet::drcheck::{Claim, ClaimKind, PROBE_PORTS, ProbeAnswer, ServerProbe};
use crate::packet::snapshot::Snapshot;
use lbd_config::{Config, Protocol, ServiceMode};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What the check found of one real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerVerdict {
    /// Accepts traffic for its service's VIPs and answers no ARP or ND for them.
    Fine,
    /// Answers ARP (or Neighbor Discovery) for a VIP, or announces it.
    AnswersForVip(ClaimKind),
    /// Did not answer the probe: traffic for the VIP does not reach a listener there.
    RefusesVip,
}

impl ServerVerdict {
    /// What `lbctl status` shows, with the likely cause.
    pub fn describe(self) -> &'static str {
        match self {
            ServerVerdict::Fine => "ok",
            ServerVerdict::AnswersForVip(ClaimKind::UsedAsSender) => {
                "announces the VIP as its ARP sender: set arp_announce=2 (lbctl dr-setup)"
            }
            ServerVerdict::AnswersForVip(_) => {
                "answers ARP/ND for the VIP (it takes the VIP's traffic): set arp_ignore=1 and \
                 arp_announce=2, IPv6 VIP on lo only (lbctl dr-setup)"
            }
            ServerVerdict::RefusesVip => {
                "does not accept the VIP: no VIP on lo and no redirect, or nothing listens \
                 (lbctl dr-setup)"
            }
        }
    }
}

/// A claim as status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenClaim {
    /// The VIP.
    pub vip: IpAddr,
    /// Who.
    pub mac: [u8; 6],
    /// How.
    pub kind: ClaimKind,
    /// Frames seen, over the workers.
    pub frames: u64,
}

/// Probes of one round, per (service label, real server label).
type Round = BTreeMap<(String, String), Vec<ServerProbe>>;

/// The check's state between rounds.
#[derive(Debug, Default)]
pub struct DrCheck {
    /// The round whose answers are awaited.
    pending: Round,
    /// Verdicts of the last evaluated round.
    verdicts: BTreeMap<(String, String), ServerVerdict>,
    /// Claims seen so far (summed over workers at the last evaluation).
    claims: Vec<SeenClaim>,
    /// Their frame counts then: a claim whose count grew since is one of this round.
    counted: BTreeMap<(IpAddr, [u8; 6], ClaimKind), u64>,
    /// (VIP, MAC, kind) already logged.
    logged: BTreeSet<(IpAddr, [u8; 6], ClaimKind)>,
    /// Rounds sent: picks the probe ports.
    rounds: u32,
    /// Per-run secret mixed into sequence numbers.
    secret: u32,
}

impl DrCheck {
    /// A check with no round sent yet.
    pub fn new() -> DrCheck {
        use std::hash::BuildHasher;
        DrCheck {
            secret: hashbrown::DefaultHashBuilder::default().hash_one(0u64) as u32,
            ..DrCheck::default()
        }
    }

    /// The next round: a question for every DR VIP of a family this host has an address of
    /// (`sources`), and a probe of every resolved real server of every DR TCP service on each
    /// such VIP, on the service's first port. Remembered for [`DrCheck::evaluate`].
    pub fn plan(
        &mut self,
        config: &Config,
        snapshot: &Snapshot,
        sources: &[IpAddr],
    ) -> (Vec<(IpAddr, IpAddr)>, Vec<ServerProbe>) {
        let source_for = |vip: &IpAddr| sources.iter().find(|s| s.is_ipv4() == vip.is_ipv4());
        let mut questions = Vec::new();
        let mut round = Round::new();
        let mut next_port = 0u32;
        self.rounds = self.rounds.wrapping_add(1);
        let port_count = u32::from(PROBE_PORTS.end() - PROBE_PORTS.start()) + 1;
        for (service, entry) in config.services.iter().zip(&snapshot.services) {
            if service.mode != ServiceMode::Dr {
                continue;
            }
            for vip in service.vips() {
                let Some(&source) = source_for(&vip) else {
                    continue;
                };
                if !questions.contains(&(source, vip)) {
                    questions.push((source, vip));
                }
                // A UDP service has no handshake to probe with.
                if service.protocol != Protocol::Tcp {
                    continue;
                }
                for rs in entry.real_servers.iter() {
                    let Some(mac) = rs.mac else {
                        continue;
                    };
                    let offset = (self.rounds.wrapping_mul(97) + next_port) % port_count;
                    next_port += 1;
                    let our_port = PROBE_PORTS.start() + offset as u16;
                    let seq = self.secret ^ self.rounds.rotate_left(16) ^ next_port;
                    round
                        .entry((service.label.clone(), rs.label.clone()))
                        .or_default()
                        .push(ServerProbe {
                            vip,
                            port: service.ports.first(),
                            mac,
                            source,
                            our_port,
                            seq,
                        });
                }
            }
        }
        let probes = round.values().flatten().copied().collect();
        self.pending = round;
        (questions, probes)
    }

    /// Reads what the workers saw since the pending round was sent: every probed server gets
    /// a verdict (a claim counts when its frames grew since the last round: a server that
    /// stops answering ARP is fine again), claims are summed. Returns the log lines of what
    /// changed: (warning?, text).
    pub fn evaluate(
        &mut self,
        snapshot: &Snapshot,
        claims: &[Claim],
        answers: &[ProbeAnswer],
    ) -> Vec<(bool, String)> {
        let mut events = Vec::new();
        self.claims = sum_claims(claims);
        let summed: BTreeMap<(IpAddr, [u8; 6], ClaimKind), u64> = self
            .claims
            .iter()
            .map(|c| ((c.vip, c.mac, c.kind), c.frames))
            .collect();
        for claim in &self.claims {
            if self.logged.insert((claim.vip, claim.mac, claim.kind)) {
                events.push((
                    true,
                    format!(
                        "{} {} the VIP {}{}; lbd defends it with its own announcement",
                        crate::io::host::format_mac(claim.mac),
                        claim.kind.name().replace('_', " "),
                        claim.vip,
                        owner(snapshot, claim.mac)
                            .map(|(s, r)| format!(" (real server {r:?} of {s:?})"))
                            .unwrap_or_default(),
                    ),
                ));
            }
        }
        let grown: Vec<&SeenClaim> = self
            .claims
            .iter()
            .filter(|c| {
                let before = self.counted.get(&(c.vip, c.mac, c.kind)).copied();
                before.is_none_or(|frames| c.frames > frames)
            })
            .collect();
        let mut verdicts = BTreeMap::new();
        for (key, probes) in std::mem::take(&mut self.pending) {
            let mac = probes.first().map(|p| p.mac);
            let claim = grown
                .iter()
                .filter(|c| Some(c.mac) == mac)
                .map(|c| c.kind)
                .min();
            let accepted = probes
                .iter()
                .all(|probe| answers.iter().any(|a| a.answers(probe)));
            let verdict = match (claim, accepted) {
                (Some(kind), _) => ServerVerdict::AnswersForVip(kind),
                (None, false) => ServerVerdict::RefusesVip,
                (None, true) => ServerVerdict::Fine,
            };
            if self.verdicts.get(&key) != Some(&verdict) {
                events.push((
                    verdict != ServerVerdict::Fine,
                    format!(
                        "DR check: real server {:?} of {:?}: {}",
                        key.1,
                        key.0,
                        verdict.describe()
                    ),
                ));
            }
            verdicts.insert(key, verdict);
        }
        self.verdicts = verdicts;
        self.counted = summed;
        events
    }

    /// The verdict on a real server, once a round has been evaluated.
    pub fn verdict(&self, service: &str, real_server: &str) -> Option<ServerVerdict> {
        self.verdicts
            .get(&(service.to_owned(), real_server.to_owned()))
            .copied()
    }
}

/// Claims as the workers saw them, summed over workers.
pub fn sum_claims(claims: &[Claim]) -> Vec<SeenClaim> {
    let mut summed: BTreeMap<(IpAddr, [u8; 6], ClaimKind), u64> = BTreeMap::new();
    for claim in claims {
        *summed
            .entry((claim.vip, claim.mac, claim.kind))
            .or_default() += claim.count;
    }
    summed
        .into_iter()
        .map(|((vip, mac, kind), frames)| SeenClaim {
            vip,
            mac,
            kind,
            frames,
        })
        .collect()
}

/// The service and real server whose MAC `mac` is.
pub fn owner(snapshot: &Snapshot, mac: [u8; 6]) -> Option<(String, String)> {
    snapshot.services.iter().find_map(|service| {
        service
            .real_servers
            .iter()
            .find(|rs| rs.mac == Some(mac))
            .map(|rs| (service.label.to_string(), rs.label.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::snapshot::{AdminState, ServiceIds};

    fn setup() -> (Config, Snapshot) {
        let config = Config::from_toml_str(
            "[engine]\ninterface = \"eth0\"\nqueues = [0]\n[[service]]\nlabel = \"s\"\n\
             vip = \"198.18.0.100\"\nvip6 = \"2001:2::100\"\nports = \"1935\"\ntable_size = 7\n\
             [[service.real_server]]\nlabel = \"a\"\nip = \"198.18.0.11\"\nmac = \"02:00:00:00:00:11\"\n\
             [[service.real_server]]\nlabel = \"b\"\nip = \"198.18.0.12\"\nmac = \"02:00:00:00:00:12\"\n\
             [[service.real_server]]\nlabel = \"c\"\nip = \"198.18.0.13\"\nmac = \"02:00:00:00:00:13\"\n\
             [[service]]\nlabel = \"u\"\nvip = \"198.18.0.101\"\nports = \"5000\"\nprotocol = \"udp\"\n\
             table_size = 7\n[[service.real_server]]\nlabel = \"a\"\nip = \"198.18.0.11\"\n\
             mac = \"02:00:00:00:00:11\"\n",
        )
        .expect("valid");
        let snapshot = Snapshot::build(
            &config,
            &mut ServiceIds::default(),
            [2, 0, 0, 0, 0, 2],
            1,
            |_| None,
            |_, _| AdminState::Online,
        );
        (config, snapshot)
    }

    fn answer(probe: &ServerProbe) -> ProbeAnswer {
        ProbeAnswer {
            vip: probe.vip,
            port: probe.port,
            mac: probe.mac,
            our_port: probe.our_port,
            ack: probe.seq.wrapping_add(1),
        }
    }

    #[test]
    fn each_server_is_judged_by_its_answers_and_claims() {
        let (config, snapshot) = setup();
        let mut check = DrCheck::new();
        let sources: [IpAddr; 1] = ["198.18.0.2".parse().expect("address")];
        let (questions, probes) = check.plan(&config, &snapshot, &sources);
        // Without an IPv6 source, IPv4 only: two VIPs asked for, three servers probed (the
        // UDP service's server is not).
        assert_eq!(questions.len(), 2);
        assert_eq!(probes.len(), 3);
        assert!(probes.iter().all(|p| PROBE_PORTS.contains(&p.our_port)));
        let mac = |last: u8| [2, 0, 0, 0, 0, last];
        // a answers; b answers and answers ARP; c stays silent.
        let answers: Vec<ProbeAnswer> = probes
            .iter()
            .filter(|p| p.mac != mac(0x13))
            .map(answer)
            .collect();
        let claims = [Claim {
            vip: "198.18.0.100".parse().expect("vip"),
            mac: mac(0x12),
            kind: ClaimKind::Answered,
            count: 2,
            last_ms: 0,
        }];
        let events = check.evaluate(&snapshot, &claims, &answers);
        assert_eq!(check.verdict("s", "a"), Some(ServerVerdict::Fine));
        assert_eq!(
            check.verdict("s", "b"),
            Some(ServerVerdict::AnswersForVip(ClaimKind::Answered))
        );
        assert_eq!(check.verdict("s", "c"), Some(ServerVerdict::RefusesVip));
        assert!(
            events
                .iter()
                .any(|(warn, text)| *warn && text.contains("\"b\" of \"s\""))
        );
        assert!(
            events
                .iter()
                .any(|(_, text)| text.contains("02:00:00:00:00:12 answered the VIP 198.18.0.100"))
        );
        // An answer to another round's probe (another sequence number) does not count.
        let (_, probes) = check.plan(&config, &snapshot, &sources);
        let stale: Vec<ProbeAnswer> = probes
            .iter()
            .map(|p| ProbeAnswer {
                ack: p.seq.wrapping_add(2),
                ..answer(p)
            })
            .collect();
        let events = check.evaluate(&snapshot, &[], &stale);
        assert_eq!(check.verdict("s", "a"), Some(ServerVerdict::RefusesVip));
        // Only changes are logged: b's verdict changed (its claim is gone), a's too.
        assert_eq!(events.len(), 2, "{events:?}");
    }
}
