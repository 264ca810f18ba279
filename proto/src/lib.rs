//! The control protocol between `lbctl` and `lbd`: a unix stream socket carrying one JSON
//! request per line and one JSON response per line, in order. No framing beyond the newline,
//! no gRPC: `socat - UNIX-CONNECT:/run/lbd/lbd.sock` is a usable client.
//!
//! ```text
//! > {"version":1,"command":{"name":"drain","service":"Wowza GUI","label":"Wowza Srv 1"}}
//! < {"version":1,"ok":{"kind":"done","message":"Wowza GUI/Wowza Srv 1 drained"}}
//! < {"version":1,"error":"no service named \"Wowza UI\""}
//! ```
//!
//! Every message carries the protocol [`VERSION`]; the daemon refuses other versions with an
//! error naming both. A request line may be at most [`MAX_REQUEST_BYTES`] long. [`decode_request`]
//! never panics on any input (a property test feeds it arbitrary bytes); a bad request becomes
//! an error message for the client, never a crash of the daemon.

use lbd_config::{
    Layer7Protocol, MacAddr, Persistence, PortSet, Protocol, RealServer, Service, ServiceMode,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The longest request line the daemon reads (newline excluded).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// One request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Must equal [`VERSION`].
    pub version: u32,
    /// What to do.
    pub command: Command,
}

/// Everything `lbctl` can ask. Services and real servers are named by their labels. With the
/// `cli` feature this is also `lbctl`'s own command line (one definition for the wire and the
/// command line), but for the commands whose command line differs: `add-vip` and `add-rip`
/// (which build config tables from options) and `config show|save`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Subcommand))]
#[serde(tag = "name", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// Services and real servers with their state and connection counts.
    Status,
    /// Packet, byte and drop counters, per worker and in total.
    Stats,
    /// Adds a virtual service (it may come with real servers).
    #[cfg_attr(feature = "cli", command(skip))]
    AddVip {
        /// The new service, as a `[[service]]` table of the config file.
        service: Service,
    },
    /// Changes some settings of a service.
    EditVip(ServiceEdit),
    /// Removes a service.
    DelVip(ServiceName),
    /// Adds a real server to a service.
    #[cfg_attr(feature = "cli", command(skip))]
    AddRip {
        /// The service.
        service: String,
        /// The new server, as a `[[service.real_server]]` table.
        real_server: RealServer,
    },
    /// Changes some settings of a real server.
    EditRip(RealServerEdit),
    /// Removes a real server.
    DelRip(RealServerName),
    /// Sets a real server's weight.
    SetWeight(WeightChange),
    /// No new clients for the server; its established flows and persisted clients stay.
    Drain(RealServerName),
    /// The server is offline now: no traffic at all, established flows included.
    Halt(RealServerName),
    /// Back from drain or halt.
    Online(RealServerName),
    /// The running config as TOML.
    #[cfg_attr(feature = "cli", command(skip))]
    ConfigShow,
    /// Writes the running config to `path` (default: the file lbd was started with), atomically.
    #[cfg_attr(feature = "cli", command(skip))]
    ConfigSave {
        /// Where to write.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// Re-reads the config file and applies the difference live.
    Reload,
    /// This node's and its peer's part in the HA pair.
    #[cfg_attr(feature = "cli", command(skip))]
    HaStatus,
    /// Makes this node the active one of its pair.
    #[cfg_attr(feature = "cli", command(skip))]
    HaTakeover,
    /// Hands the traffic to the peer: this node becomes passive and stays so while the peer
    /// can serve.
    #[cfg_attr(feature = "cli", command(skip))]
    HaRelease,
}

// The arguments of the commands, as the wire carries them (each variant's fields sit beside
// its "name") and as lbctl's command line parses them (with the `cli` feature): one
// definition for both.

/// A service, named by its label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct ServiceName {
    /// The service's label.
    pub label: String,
}

/// A real server, named by its service's label and its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct RealServerName {
    /// The service's label.
    pub service: String,
    /// The real server's label.
    pub label: String,
}

/// A real server and its new weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct WeightChange {
    /// The service's label.
    pub service: String,
    /// The real server's label.
    pub label: String,
    /// The new weight, 0..65535; 0 drains.
    pub weight: u16,
}

/// A service and what to change in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct ServiceEdit {
    /// The service's label.
    pub label: String,
    /// What to change.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub changes: ServiceChanges,
}

/// A real server and what to change in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct RealServerEdit {
    /// The service's label.
    pub service: String,
    /// The real server's label.
    pub label: String,
    /// What to change.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub changes: RealServerChanges,
}

/// Service settings to change; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct ServiceChanges {
    /// New label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "cli",
        arg(long = "label", id = "new_label", value_name = "NEW_LABEL")
    )]
    pub label: Option<String>,
    /// New VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub vip: Option<IpAddr>,
    /// New second (IPv6) VIP, for a service whose VIP is IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub vip6: Option<Ipv6Addr>,
    /// New IPv6 persistence prefix length (1..=128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "cli",
        arg(long = "persistence-prefix-v6", value_name = "BITS")
    )]
    pub persistence_prefix_v6: Option<u8>,
    /// New ports: 1935, "1935,8088" or "9000-9010".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub ports: Option<PortSet>,
    /// New protocol: tcp or udp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub protocol: Option<Protocol>,
    /// New persistence: source-ip or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub persistence: Option<Persistence>,
    /// New persistence timeout, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "cli",
        arg(long = "persistence-timeout", value_name = "SECONDS")
    )]
    pub persistence_timeout_s: Option<u32>,
    /// New Maglev table size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub table_size: Option<u32>,
    /// New mode: dr or snat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub mode: Option<ServiceMode>,
    /// New layer 7 protocol (snat): http or tcp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub layer7_protocol: Option<Layer7Protocol>,
}

/// Real-server settings to change; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct RealServerChanges {
    /// New label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "cli",
        arg(long = "label", id = "new_label", value_name = "NEW_LABEL")
    )]
    pub label: Option<String>,
    /// New address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub ip: Option<IpAddr>,
    /// New weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub weight: Option<u16>,
    /// New lower connection threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long = "min-conns"))]
    pub min_connections: Option<u32>,
    /// New upper connection threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long = "max-conns"))]
    pub max_connections: Option<u32>,
    /// New pinned MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub mac: Option<MacAddr>,
    /// New port (snat: port translation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub port: Option<u16>,
}

/// One response line: the result, or an error message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// [`VERSION`].
    pub version: u32,
    /// `"ok": {...}` or `"error": "..."`.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A request's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It worked.
    Ok(Reply),
    /// It did not; the running state is as it was.
    Error(String),
}

impl Response {
    /// A successful response.
    pub fn ok(reply: Reply) -> Response {
        Response {
            version: VERSION,
            outcome: Outcome::Ok(reply),
        }
    }

    /// An error response.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            version: VERSION,
            outcome: Outcome::Error(message.into()),
        }
    }
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    /// For `status`.
    Status(StatusReport),
    /// For `stats`.
    Stats(Box<StatsReport>),
    /// For `ha status`.
    Ha(Box<HaReport>),
    /// For `config show`: the running config as TOML.
    Config {
        /// The TOML text.
        toml: String,
    },
    /// For changes: what was done.
    Done {
        /// One line for the operator.
        message: String,
    },
}

/// `ha status`: this node's part in the pair, and what it knows of its peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HaReport {
    /// `primary` or `secondary`.
    pub role: String,
    /// `heartbeat` or `external`.
    pub mode: String,
    /// `active`, `passive` or `fault`.
    pub state: String,
    /// This node's address on the segment.
    pub local_address: Ipv4Addr,
    /// Takeovers seen.
    pub epoch: u64,
    /// It handed over and stays passive while the peer can serve.
    pub released: bool,
    /// This node's configuration generation.
    pub generation: u64,
    /// The peer, once heard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<HaPeerReport>,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Authentic heartbeats received.
    pub heartbeats_received: u64,
    /// Datagrams refused: not a heartbeat, or failing authentication.
    pub rejected: u64,
    /// Authentic heartbeats refused as replayed or reordered.
    pub replayed: u64,
    /// State and configuration sync.
    #[serde(default)]
    pub sync: HaSyncReport,
}

/// The sync streams: connections and persistent clients, and the active node's configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HaSyncReport {
    /// Each peer's streams.
    pub links: Vec<HaSyncLink>,
    /// Entries sent to the peers.
    pub entries_sent: u64,
    /// Entries received from them.
    pub entries_received: u64,
    /// Received entries the workers installed.
    pub entries_installed: u64,
    /// Received entries kept out (a newer local entry, an unknown service, a full table).
    pub entries_kept_out: u64,
    /// Entries the workers could not queue for the peers (the next refresh sends them).
    pub overflow: u64,
    /// Entries dropped because no peer was connected.
    pub unsent: u64,
    /// Configurations sent to the peers.
    pub configs_sent: u64,
    /// Configurations received and adopted.
    pub configs_adopted: u64,
    /// Connections refused or ended: an address that is no peer, failed authentication, a
    /// malformed or replayed frame.
    pub rejected: u64,
}

/// One peer's sync streams.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HaSyncLink {
    /// The peer's address.
    pub peer: Ipv4Addr,
    /// This node's stream to it is up.
    pub sending: bool,
    /// Its stream to this node is up.
    pub receiving: bool,
}

/// The peer, as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HaPeerReport {
    /// Its address.
    pub address: Ipv4Addr,
    /// `primary` or `secondary`.
    pub role: String,
    /// `active`, `passive` or `fault`; `dead` when not heard within the dead interval.
    pub state: String,
    /// Milliseconds since its last heartbeat.
    pub heard_ms_ago: u64,
    /// Its configuration generation.
    pub generation: u64,
}

/// `status`: the system overview.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Configuration generation in force (1 at start, +1 per applied change).
    pub generation: u64,
    /// The HA pair, when this node is part of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<Box<HaReport>>,
    /// Services in config order.
    pub services: Vec<ServiceStatus>,
    /// Other stations the DR check saw speaking for a VIP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vip_claims: Vec<VipClaim>,
}

/// Another station speaking for a VIP, as the DR check saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VipClaim {
    /// The VIP.
    pub vip: IpAddr,
    /// The station's MAC.
    pub mac: String,
    /// `announced`, `answered` or `used_as_sender`.
    pub kind: String,
    /// The real server with that MAC (`Wowza Srv 1 in Wowza GUI`), when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real_server: Option<String>,
    /// Frames seen.
    pub frames: u64,
}

/// One service in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Label.
    pub label: String,
    /// VIP.
    pub vip: IpAddr,
    /// The second (IPv6) VIP, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<Ipv6Addr>,
    /// Ports, e.g. `1935,8088`.
    pub ports: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Balancing method: `Layer 4`.
    pub method: String,
    /// Forwarding mode: `DR`.
    pub mode: String,
    /// Tracked connections to the service.
    pub conns: u64,
    /// The fallback server: `198.18.0.50 (standby)` or `(in use)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Real servers in config order.
    pub real_servers: Vec<RealServerStatus>,
}

/// One real server in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RealServerStatus {
    /// Label.
    pub label: String,
    /// Address.
    pub ip: IpAddr,
    /// The port it listens on, when a SNAT service translates the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Configured weight.
    pub weight: u16,
    /// Tracked connections to it (a SNAT service's: HAProxy's sessions to it now).
    pub conns: u64,
    /// `up`, `down`, `drain`, `full`, `halt` or `unresolved`.
    pub state: String,
    /// MAC in use, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The last health check: `ok (HTTP 200) at 21:04:05 UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// The DR check's verdict: `ok`, or what is wrong and its likely cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dr_check: Option<String>,
    /// What its health checks did since lbd started (DR services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCounts>,
}

/// A real server's health checks, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCounts {
    /// Checks run.
    pub checks: u64,
    /// Checks that failed.
    pub failed: u64,
    /// Times it came up.
    pub went_up: u64,
    /// Times it went down.
    pub went_down: u64,
    /// How long the last check took, in microseconds.
    pub last_micros: u64,
}

/// `stats`: counters per worker and summed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// One entry per worker (queue order).
    pub workers: Vec<WorkerStats>,
    /// The sum over workers.
    pub total: WorkerStats,
    /// The SNAT services, as HAProxy counts them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer7: Vec<Layer7Stats>,
}

/// One worker's counters (or their sum).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Queue served (absent in the total).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// Frames received.
    pub rx_frames: u64,
    /// Frames forwarded to real servers.
    pub forwarded_packets: u64,
    /// Bytes forwarded.
    pub forwarded_bytes: u64,
    /// ARP replies sent.
    pub arp_replies: u64,
    /// ICMP echo replies sent.
    pub icmp_echo_replies: u64,
    /// Gratuitous ARPs sent.
    pub gratuitous_arps: u64,
    /// Neighbor Advertisements sent answering solicitations for IPv6 VIPs.
    #[serde(default)]
    pub nd_replies: u64,
    /// Unsolicited Neighbor Advertisements sent (IPv6's gratuitous ARP).
    #[serde(default)]
    pub unsolicited_nas: u64,
    /// ICMP errors about a connection sent on to its real server (counted as forwarded too).
    #[serde(default)]
    pub icmp_errors: u64,
    /// Announcements of a VIP sent in place of another station's claim of it.
    #[serde(default)]
    pub vip_defences: u64,
    /// DR check questions and probes sent.
    #[serde(default)]
    pub dr_probes: u64,
    /// Real servers' answers to DR probes, reset.
    #[serde(default)]
    pub probe_resets: u64,
    /// Frames sent to fallback servers.
    #[serde(default)]
    pub fallback_packets: u64,
    /// Tracked connections.
    pub flows: u64,
    /// Remembered persistent clients.
    pub persistent_clients: u64,
    /// Entries not recorded because their table was full of live entries, by table
    /// (`flows`, `persistence`, `fragments`; only tables that were full).
    #[serde(default)]
    pub table_full: BTreeMap<String, u64>,
    /// Half-open or closing connections that gave way to new ones in a full flow table.
    #[serde(default)]
    pub flow_evictions: u64,
    /// Drops by reason (only reasons seen).
    pub drops: BTreeMap<String, u64>,
    /// The kernel's counters for the worker's AF_XDP socket: frames that never reached lbd
    /// (absent when the kernel gave none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<SocketStats>,
    /// Per service, config order.
    pub services: Vec<ServiceStats>,
}

/// The kernel's counters for an AF_XDP socket (`XDP_STATISTICS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketStats {
    /// Frames dropped before the RX ring, e.g. larger than a UMEM frame holds.
    pub rx_dropped: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the kernel found no buffer on the fill ring.
    pub fill_ring_empty: u64,
    /// Invalid RX descriptors.
    pub rx_invalid: u64,
    /// Invalid TX descriptors.
    pub tx_invalid: u64,
    /// Times the kernel found the TX ring empty when woken.
    pub tx_ring_empty: u64,
}

impl SocketStats {
    /// Adds another socket's counters.
    pub fn add(&mut self, other: &SocketStats) {
        self.rx_dropped += other.rx_dropped;
        self.rx_ring_full += other.rx_ring_full;
        self.fill_ring_empty += other.fill_ring_empty;
        self.rx_invalid += other.rx_invalid;
        self.tx_invalid += other.tx_invalid;
        self.tx_ring_empty += other.tx_ring_empty;
    }

    /// Frames the kernel received for lbd and dropped (ring full, no buffer, too large).
    pub fn lost_frames(&self) -> u64 {
        self.rx_dropped + self.rx_ring_full
    }
}

/// Traffic of one service and its real servers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStats {
    /// Label.
    pub label: String,
    /// Frames forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Per real server, config order.
    pub real_servers: Vec<RealServerStats>,
}

/// A SNAT service's (or one of its real servers') sessions and bytes, from HAProxy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Layer7Stats {
    /// Label.
    pub label: String,
    /// Sessions open now.
    pub current_sessions: u64,
    /// Sessions since HAProxy started.
    pub total_sessions: u64,
    /// Bytes from the clients.
    pub bytes_in: u64,
    /// Bytes to the clients.
    pub bytes_out: u64,
    /// Per real server, config order (empty for a real server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub real_servers: Vec<Layer7Stats>,
}

/// Traffic of one real server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RealServerStats {
    /// Label.
    pub label: String,
    /// Frames forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
}

/// Decodes one request line (without its newline). The error is the message to send back.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "request of {} bytes is over the limit of {MAX_REQUEST_BYTES}",
            line.len()
        ));
    }
    let text = std::str::from_utf8(line).map_err(|e| format!("request is not UTF-8: {e}"))?;
    // Look at the version first, so a newer client gets "version" rather than a field error.
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
    match value.get("version").map(serde_json::Value::as_u64) {
        Some(Some(v)) if v == u64::from(VERSION) => {}
        Some(Some(v)) => {
            return Err(format!(
                "protocol version {v} is not supported; this lbd speaks version {VERSION}"
            ));
        }
        _ => return Err("request has no numeric \"version\"".to_owned()),
    }
    serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))
}

/// Encodes a message as one line, newline included.
pub fn encode_line<T: Serialize>(message: &T) -> String {
    let mut line = serde_json::to_string(message)
        .unwrap_or_else(|e| format!(r#"{{"version":{VERSION},"error":"cannot encode: {e}"}}"#));
    line.push('\n');
    line
}

/// Decodes one response line.
pub fn decode_response(line: &str) -> Result<Response, String> {
    serde_json::from_str(line.trim_end()).map_err(|e| format!("malformed response from lbd: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(command: Command) {
        let request = Request {
            version: VERSION,
            command,
        };
        let line = encode_line(&request);
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert_eq!(decode_request(line.trim_end().as_bytes()), Ok(request));
    }

    #[test]
    fn every_command_round_trips() {
        let service: Service = std::sync::Arc::unwrap_or_clone(
            lbd_config::Config::from_toml_str(
                "[engine]\ninterface = \"eth0\"\nqueues = [0]\n[[service]]\nlabel = \"GUI\"\n\
                 vip = \"198.18.0.100\"\nports = 8088\n",
            )
            .expect("valid")
            .services
            .remove(0),
        );
        let real_server = RealServer {
            label: "a".into(),
            ip: Ipv4Addr::new(198, 18, 0, 11).into(),
            port: Some(8080),
            weight: 5,
            min_connections: 0,
            max_connections: 0,
            mac: None,
            health_check: None,
        };
        let s = || "GUI".to_owned();
        let l = || "a".to_owned();
        for command in [
            Command::Status,
            Command::Stats,
            Command::AddVip { service },
            Command::EditVip(ServiceEdit {
                label: s(),
                changes: ServiceChanges {
                    ports: Some("80,443".parse().expect("ports")),
                    ..ServiceChanges::default()
                },
            }),
            Command::DelVip(ServiceName { label: s() }),
            Command::AddRip {
                service: s(),
                real_server,
            },
            Command::EditRip(RealServerEdit {
                service: s(),
                label: l(),
                changes: RealServerChanges {
                    weight: Some(7),
                    ..RealServerChanges::default()
                },
            }),
            Command::DelRip(RealServerName {
                service: s(),
                label: l(),
            }),
            Command::SetWeight(WeightChange {
                service: s(),
                label: l(),
                weight: 0,
            }),
            Command::Drain(RealServerName {
                service: s(),
                label: l(),
            }),
            Command::Halt(RealServerName {
                service: s(),
                label: l(),
            }),
            Command::Online(RealServerName {
                service: s(),
                label: l(),
            }),
            Command::ConfigShow,
            Command::ConfigSave { path: None },
            Command::ConfigSave {
                path: Some("/tmp/x.toml".into()),
            },
            Command::Reload,
        ] {
            round_trip(command);
        }
    }

    #[test]
    fn the_documented_lines_decode() {
        let request = decode_request(
            br#"{"version":1,"command":{"name":"drain","service":"Wowza GUI","label":"Wowza Srv 1"}}"#,
        )
        .expect("valid");
        assert_eq!(
            request.command,
            Command::Drain(RealServerName {
                service: "Wowza GUI".into(),
                label: "Wowza Srv 1".into()
            })
        );
        let ok = decode_response(
            r#"{"version":1,"ok":{"kind":"done","message":"Wowza GUI/Wowza Srv 1 drained"}}"#,
        )
        .expect("valid");
        assert!(matches!(ok.outcome, Outcome::Ok(Reply::Done { .. })));
        let error = decode_response(r#"{"version":1,"error":"no service named \"Wowza UI\""}"#)
            .expect("valid");
        assert_eq!(
            error.outcome,
            Outcome::Error("no service named \"Wowza UI\"".into())
        );
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let cases: [(&[u8], &str); 8] = [
            (b"{not json", "malformed JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (br#"{"command":{"name":"status"}}"#, "no numeric \"version\""),
            (
                br#"{"version":2,"command":{"name":"status"}}"#,
                "version 2 is not supported",
            ),
            (
                br#"{"version":1,"command":{"name":"explode"}}"#,
                "unknown variant `explode`",
            ),
            (
                br#"{"version":1,"command":{"name":"set-weight","service":"a","label":"b","weight":"x"}}"#,
                "invalid type",
            ),
            (
                br#"{"version":1,"command":{"name":"set-weight","service":"a","label":"b","weight":70000}}"#,
                "70000",
            ),
            (
                br#"{"version":1,"command":{"name":"status"},"extra":1}"#,
                "unknown field `extra`",
            ),
        ];
        for (line, expected) in cases {
            let error = decode_request(line).expect_err("must be rejected");
            assert!(
                error.contains(expected),
                "{error:?} should say {expected:?}"
            );
        }
        let huge = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(
            decode_request(&huge)
                .expect_err("too big")
                .contains("over the limit")
        );
    }

    proptest! {
        /// The decoder is total: any bytes give a request or an error, never a panic.
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
        }

        /// Nor on JSON-shaped noise around real command names.
        #[test]
        fn decoder_never_panics_on_json_noise(
            name in prop::sample::select(vec!["status", "add-vip", "edit-rip", "set-weight", "drain", "config-save", "x"]),
            field in "[a-z_]{0,12}",
            value in prop_oneof![Just("1".to_owned()), Just("\"s\"".to_owned()), Just("null".to_owned()), Just("[]".to_owned()), Just("{}".to_owned()), "-?[0-9]{1,25}"],
        ) {
            let line = format!(r#"{{"version":1,"command":{{"name":"{name}","{field}":{value}}}}}"#);
            let _ = decode_request(line.as_bytes());
        }
    }
}
