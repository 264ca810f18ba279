//! lbd's configuration file: TOML parsed into typed values, then checked as a whole.
//!
//! Parsing and checking happen here and only here (as Firecracker's `vmm_config` does): the
//! engine receives a [`Config`] it can trust. Every struct denies unknown keys, and every error
//! names the field it is about as a path, `service[1] "Wowza GUI".real_server[0].ip`, followed
//! by the reason, so an operator can find the line to fix.

use hashbrown::{HashMap, HashSet};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// The Maglev hash seed when the config sets none. Fixed, never random: two balancers with
/// the same config (a restarted one, or an HA peer) must send a client to the same server.
pub const DEFAULT_HASH_SEED: u64 = 0x6c62_645f_6d61_676c; // "lbd_magl"

/// The largest Maglev table the engine accepts (a prime just under 2^24).
pub const MAX_TABLE_SIZE: u32 = 16_777_213;

/// Distinct VIPs lbd can steer: the size of the XDP program's VIP map (`MAX_VIPS` in
/// engine/bpf/steer.c; a test keeps the two equal).
pub const MAX_VIPS: usize = 4096;

/// Queues lbd can serve: queue indices are below this, the size of the XDP program's socket
/// map (`MAX_QUEUES` in engine/bpf/steer.c).
pub const MAX_QUEUES: u32 = 256;

/// Services one balancer holds: the packet path indexes them with 16 bits.
pub const MAX_SERVICES: usize = 65_535;

/// Real servers one service holds: Maglev tables index them with 16 bits, one value of which
/// marks an empty slot.
pub const MAX_REAL_SERVERS: usize = 65_535;

/// A configuration error: the field it is about and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Path of the offending field, e.g. `service[0] "web".ports`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[engine]`: the interface and how it is served.
    pub engine: Engine,
    /// `[ha]`: this node's part in an active/passive pair; none: a standalone balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ha: Option<Ha>,
    /// `[[service]]`: the virtual services. None is fine: a balancer can start empty. Each
    /// is shared between the configs a change makes (`Arc::make_mut` to edit one): copying
    /// a config copies none, and a service the change did not touch need not be checked or
    /// rebuilt again ([`Config::validate_after`]).
    #[serde(rename = "service", default)]
    pub services: Vec<Arc<Service>>,
}

/// `[ha]`: an active/passive pair of balancers on one segment. Both nodes run the same
/// services; this table (like `[engine]`) is each node's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ha {
    /// Which node is preferred: the primary is active when both are well and neither released.
    pub role: HaRole,
    /// `heartbeat`: lbd's own heartbeat decides who is active. `external`: another program
    /// does (keepalived's notify scripts calling `lbctl ha takeover` / `release`).
    #[serde(default)]
    pub mode: HaMode,
    /// This node's address on the VIPs' segment: heartbeats leave from it.
    #[serde(with = "ipv4")]
    pub local_address: Ipv4Addr,
    /// The other node: one address, or a list (heartbeats go to every one, on every path).
    pub peer_address: Addresses,
    /// UDP port of the heartbeat.
    #[serde(default = "default_heartbeat_port")]
    pub heartbeat_port: u16,
    /// TCP port of state and configuration sync.
    #[serde(default = "default_sync_port")]
    pub sync_port: u16,
    /// Milliseconds between heartbeats.
    #[serde(default = "default_ha_interval")]
    pub interval_ms: u32,
    /// No heartbeat for this long: the peer is dead.
    #[serde(default = "default_dead_interval")]
    pub dead_interval_ms: u32,
    /// Whether a primary that comes back takes over from an active secondary on its own
    /// (otherwise it waits for `lbctl ha takeover`).
    #[serde(default)]
    pub preempt: bool,
    /// The shared secret every HA message is authenticated with (at least 16 bytes, readable
    /// by its owner only).
    pub key_file: PathBuf,
    /// Gratuitous ARP rounds for every VIP when this node becomes active (the first at once).
    #[serde(default = "default_takeover_arp_count")]
    pub gratuitous_arp_count: u32,
    /// Milliseconds between those rounds.
    #[serde(default = "default_takeover_arp_interval")]
    pub gratuitous_arp_interval_ms: u32,
}

fn default_heartbeat_port() -> u16 {
    6694
}
fn default_sync_port() -> u16 {
    8848
}
fn default_ha_interval() -> u32 {
    100
}
fn default_dead_interval() -> u32 {
    500
}
fn default_takeover_arp_count() -> u32 {
    3
}
fn default_takeover_arp_interval() -> u32 {
    100
}

/// `ha.role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaRole {
    /// Preferred.
    Primary,
    /// Takes over when the primary cannot serve.
    Secondary,
}

impl fmt::Display for HaRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HaRole::Primary => "primary",
            HaRole::Secondary => "secondary",
        })
    }
}

/// `ha.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaMode {
    /// lbd's own heartbeat between the nodes.
    #[default]
    Heartbeat,
    /// Another program decides; lbd stays passive until told to take over.
    External,
}

/// One IPv4 address or a list of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses(pub Vec<Ipv4Addr>);

impl Serialize for Addresses {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0[..] {
            [one] => serializer.collect_str(one),
            many => serializer.collect_seq(many.iter().map(ToString::to_string)),
        }
    }
}

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Addresses, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let texts = match OneOrMany::deserialize(deserializer)? {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        };
        texts
            .iter()
            .map(|text| {
                text.parse()
                    .map_err(|_| serde::de::Error::custom(format!("invalid IPv4 address {text:?}")))
            })
            .collect::<Result<_, _>>()
            .map(Addresses)
    }
}

impl Ha {
    fn check(&self) -> Result<(), ConfigError> {
        let field = |name: &str| format!("ha.{name}");
        check_unicast(IpAddr::V4(self.local_address))
            .map_err(|reason| ConfigError::new(field("local_address"), reason))?;
        if self.peer_address.0.is_empty() {
            return Err(ConfigError::new(
                field("peer_address"),
                "at least one address is needed",
            ));
        }
        for peer in &self.peer_address.0 {
            check_unicast(IpAddr::V4(*peer))
                .map_err(|reason| ConfigError::new(field("peer_address"), reason))?;
            if *peer == self.local_address {
                return Err(ConfigError::new(
                    field("peer_address"),
                    format!("{peer} is this node's own local_address"),
                ));
            }
        }
        for (name, port) in [
            ("heartbeat_port", self.heartbeat_port),
            ("sync_port", self.sync_port),
        ] {
            if port == 0 {
                return Err(ConfigError::new(field(name), "port 0 is not a port"));
            }
        }
        if self.heartbeat_port == self.sync_port {
            return Err(ConfigError::new(
                field("sync_port"),
                "must differ from heartbeat_port",
            ));
        }
        if !(10..=10_000).contains(&self.interval_ms) {
            return Err(ConfigError::new(
                field("interval_ms"),
                format!("{} must be in 10..=10000", self.interval_ms),
            ));
        }
        if self.dead_interval_ms < 3 * self.interval_ms || self.dead_interval_ms > 60_000 {
            return Err(ConfigError::new(
                field("dead_interval_ms"),
                format!(
                    "{} must be at least 3 x interval_ms ({}) and at most 60000: one lost \
                     heartbeat must not look like a dead peer",
                    self.dead_interval_ms,
                    3 * self.interval_ms
                ),
            ));
        }
        if self.key_file.as_os_str().is_empty() {
            return Err(ConfigError::new(field("key_file"), "a key file is needed"));
        }
        if self.gratuitous_arp_count > 10 {
            return Err(ConfigError::new(
                field("gratuitous_arp_count"),
                format!("{} must be in 0..=10", self.gratuitous_arp_count),
            ));
        }
        if !(10..=5_000).contains(&self.gratuitous_arp_interval_ms) {
            return Err(ConfigError::new(
                field("gratuitous_arp_interval_ms"),
                format!("{} must be in 10..=5000", self.gratuitous_arp_interval_ms),
            ));
        }
        Ok(())
    }
}

/// `[engine]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Engine {
    /// The NIC (or veth) the VIPs live on.
    pub interface: String,
    /// NIC queues to serve: one AF_XDP socket and one worker each.
    pub queues: Vec<u32>,
    /// Pin worker i to `cores[i]`; empty: no pinning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cores: Vec<usize>,
    /// How AF_XDP moves frames.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// How a worker with no traffic waits.
    #[serde(default)]
    pub polling: Polling,
    /// Where `lbctl` reaches the daemon.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Maglev hash seed; the same on both members of an HA pair.
    #[serde(default = "default_hash_seed")]
    pub hash_seed: u64,
    /// Bytes per UMEM frame: 2048 or 4096.
    #[serde(default = "default_frame_size")]
    pub frame_size: u32,
    /// UMEM frames per queue: a power of two, at least twice `ring_size` (default: four times).
    #[serde(default = "default_frame_count")]
    pub frame_count: u32,
    /// Entries in each AF_XDP ring: a power of two in 64..=16384.
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    /// Frames per RX/TX batch: 1..=ring_size.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Frames one transmit call turns into skbs in copy mode (Linux 6.17's
    /// `XDP_MAX_TX_SKB_BUDGET`): 0 for the kernel's default (32), else 32..=ring_size (default
    /// 64). Older kernels ignore it.
    #[serde(default = "default_tx_skb_budget")]
    pub tx_skb_budget: u32,
    /// Gratuitous ARP rounds sent for every VIP at start: 0..=10.
    #[serde(default = "default_gratuitous_arp_count")]
    pub gratuitous_arp_count: u32,
    /// Group allowed to use the control socket (mode 0660); none: root only (mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_group: Option<String>,
    /// Connections tracked per worker (flow table entries); the oldest idle ones make room.
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: u32,
    /// Clients remembered per worker for source-IP persistence.
    #[serde(default = "default_persistence_table_size")]
    pub persistence_table_size: u32,
    /// How often the DR check asks who has each VIP and probes every real server through it;
    /// 0: never. 1000..=3600000.
    #[serde(default = "default_dr_check_interval")]
    pub dr_check_interval_ms: u32,
    /// Where the HTTP listener serves `/metrics` and the status page (`"127.0.0.1:9180"`);
    /// none: no listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Whether the status page offers Drain, Halt and Online (a POST with the token).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http_actions: bool,
    /// The token a page action must carry: a file of at least 16 bytes, owned by lbd's user,
    /// mode 600. Required with `http_actions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_token_file: Option<PathBuf>,
    /// How lbd logs: `text` (for people; colour only on a terminal) or `json` (one object a
    /// line, for log shippers).
    #[serde(default, skip_serializing_if = "LogFormat::is_text")]
    pub log_format: LogFormat,
}

/// `engine.log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    fn is_text(&self) -> bool {
        *self == LogFormat::Text
    }
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/lbd/lbd.sock")
}
fn default_hash_seed() -> u64 {
    DEFAULT_HASH_SEED
}
fn default_frame_size() -> u32 {
    4096
}
fn default_frame_count() -> u32 {
    // Four rings' worth: fill, RX, TX and completion can each hold a full ring at once, so
    // a burst that fills RX while TX completions lag never finds the fill ring empty.
    16384
}
fn default_ring_size() -> u32 {
    // What the fill ring holds is all a worker that is not running (preempted, or its core
    // busy with the kernel's softirq work) can absorb: 4096 frames are 8 ms at 500 kpps. With
    // 2048 the 10-million-frame paced run lost frames to an empty fill ring.
    4096
}
fn default_batch_size() -> u32 {
    64
}
fn default_tx_skb_budget() -> u32 {
    // One batch per transmit call, and valid for every allowed ring size. On veth no budget
    // from 32 to 4096 forwarded measurably more (scripts/bench-pps): the per-frame skb work
    // dwarfs the call; the option saves calls where that work is cheaper.
    64
}
fn default_gratuitous_arp_count() -> u32 {
    3
}
fn default_flow_table_size() -> u32 {
    262_144
}
fn default_persistence_table_size() -> u32 {
    65_536
}
fn default_dr_check_interval() -> u32 {
    10_000
}

/// `engine.xdp_mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Zero-copy where the driver supports it, copy mode otherwise.
    #[default]
    Auto,
    /// Copy mode: works on every interface (veth included).
    Copy,
    /// Zero-copy: the NIC writes into the UMEM; start fails if the driver cannot.
    #[serde(rename = "zerocopy")]
    ZeroCopy,
}

/// `engine.polling`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polling {
    /// Spin while traffic flows and for 50 ms after the last frame, then sleep on the socket:
    /// an idle worker costs next to nothing, a busy one never sleeps.
    #[default]
    Adaptive,
    /// Never sleep: each worker keeps its core at 100%, for cores dedicated to lbd.
    Busy,
}

/// `[[service]]`: a virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The operator's name for it; unique.
    pub label: String,
    /// The virtual IP clients connect to: IPv4 or IPv6.
    #[serde(with = "ip")]
    pub vip: IpAddr,
    /// A second, IPv6 VIP for an IPv4 `vip`: the service reached on both families.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<Ipv6Addr>,
    /// The ports served: `1935`, `"1935,8088"`, `"9000-9010"`.
    pub ports: PortSet,
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// How it is balanced: `dr` (lbd forwards frames, Layer 4) or `snat` (HAProxy proxies
    /// connections, Layer 7).
    #[serde(default, skip_serializing_if = "ServiceMode::is_dr")]
    pub mode: ServiceMode,
    /// SNAT only: `http` (HAProxy speaks HTTP: X-Forwarded-For) or `tcp` (bytes as they come).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer7_protocol: Option<Layer7Protocol>,
    /// What keeps a client on its server.
    #[serde(default)]
    pub persistence: Persistence,
    /// How long a client's source IP stays on its server after its last packet (IPVS `-p`).
    #[serde(default = "default_persistence_timeout")]
    pub persistence_timeout_s: u32,
    /// IPv6 clients are kept together by this many leading bits of their address (64: a
    /// viewer whose privacy address changes stays on its server). 1..=128.
    #[serde(
        default = "default_persistence_prefix_v6",
        skip_serializing_if = "is_default_persistence_prefix_v6"
    )]
    pub persistence_prefix_v6: u8,
    /// Maglev lookup table size: a prime, larger than the number of real servers.
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// `[service.health_check]`: how the real servers are checked (each may override it).
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Where new clients go when no real server can take them (all down, halted or drained);
    /// without it such frames are dropped and counted. Set up like a real server (DR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<IpAddr>,
    /// `[[service.real_server]]`.
    #[serde(rename = "real_server", default)]
    pub real_servers: Vec<RealServer>,
}

fn default_persistence_timeout() -> u32 {
    300
}
fn default_persistence_prefix_v6() -> u8 {
    128
}
fn is_default_persistence_prefix_v6(prefix: &u8) -> bool {
    *prefix == 128
}

impl Service {
    /// Its VIPs: `vip`, then `vip6` when there is one.
    pub fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.vip).chain(self.vip6.map(IpAddr::V6))
    }

    /// Whether `address` is one of its VIPs.
    pub fn has_vip(&self, address: IpAddr) -> bool {
        self.vips().any(|vip| vip == address)
    }

    /// The mask of the leading `persistence_prefix_v6` bits of an IPv6 address.
    pub fn client_mask_v6(&self) -> u128 {
        match self.persistence_prefix_v6 {
            0 => 0,
            prefix => u128::MAX << (128 - u32::from(prefix.min(128))),
        }
    }
}

/// How the packet path names a real server within its service: its IPv4 address, or a
/// 32-bit fold of its IPv6 address (FNV-1a). A service refuses two servers with one key.
pub fn real_server_key(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => v6.octets().iter().fold(0x811c_9dc5u32, |hash, &byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        }),
    }
}
fn default_table_size() -> u32 {
    65537
}

/// `service.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (IP protocol 6).
    #[default]
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl Protocol {
    /// The IP header's protocol number.
    pub fn ip_protocol_number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl FromStr for Protocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Protocol, String> {
        match text {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("{text:?} is not a protocol (tcp or udp)")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// `service.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// Direct Routing: lbd forwards the client's frames to a real server, which answers the
    /// client itself.
    #[default]
    Dr,
    /// Source NAT through HAProxy: a full proxy, for real servers that cannot hold the VIP,
    /// sit on another subnet, or listen on another port.
    Snat,
}

impl ServiceMode {
    /// The default, left out of a saved file.
    pub fn is_dr(&self) -> bool {
        *self == ServiceMode::Dr
    }
}

impl FromStr for ServiceMode {
    type Err = String;

    fn from_str(text: &str) -> Result<ServiceMode, String> {
        match text {
            "dr" => Ok(ServiceMode::Dr),
            "snat" => Ok(ServiceMode::Snat),
            _ => Err(format!("{text:?} is not a mode (dr or snat)")),
        }
    }
}

impl fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceMode::Dr => "dr",
            ServiceMode::Snat => "snat",
        })
    }
}

/// `service.layer7_protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer7Protocol {
    /// Bytes as they come (RTMP, anything over TCP).
    #[default]
    Tcp,
    /// HTTP: requests parsed, X-Forwarded-For added.
    Http,
}

impl FromStr for Layer7Protocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Layer7Protocol, String> {
        match text {
            "tcp" => Ok(Layer7Protocol::Tcp),
            "http" => Ok(Layer7Protocol::Http),
            _ => Err(format!("{text:?} is not a layer 7 protocol (http or tcp)")),
        }
    }
}

impl fmt::Display for Layer7Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer7Protocol::Tcp => "tcp",
            Layer7Protocol::Http => "http",
        })
    }
}

/// `service.persistence`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Persistence {
    /// All of a client's connections (and fragments) go to one server: hash the source IP.
    #[default]
    SourceIp,
    /// Hash the 5-tuple: each connection on its own.
    None,
}

impl FromStr for Persistence {
    type Err = String;

    fn from_str(text: &str) -> Result<Persistence, String> {
        match text {
            "source-ip" => Ok(Persistence::SourceIp),
            "none" => Ok(Persistence::None),
            _ => Err(format!("{text:?} is not a persistence (source-ip or none)")),
        }
    }
}

/// `[[service.real_server]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealServer {
    /// The operator's name for it; unique within the service.
    pub label: String,
    /// Its own address, IPv4 or IPv6 (DR: on the balancer's segment, and it holds the VIP on
    /// loopback). Either family serves VIPs of both: frames reach it by its MAC.
    #[serde(with = "ip")]
    pub ip: IpAddr,
    /// SNAT only: the port it listens on (port translation); default: the port the client
    /// connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative share of new clients; 0 = drain.
    #[serde(default = "default_weight")]
    pub weight: u16,
    /// Lower connection threshold (IPVS -y): below it, a server at its limit takes clients again.
    #[serde(default)]
    pub min_connections: u32,
    /// Upper connection threshold (IPVS -x); 0 = unlimited.
    #[serde(default)]
    pub max_connections: u32,
    /// Pinned MAC; otherwise learned from the kernel's neighbour table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// This server's own health check, instead of the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// `health_check.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// Connect to the port.
    #[default]
    Tcp,
    /// GET `path`, expect `expect_status` (and `expect_body` in the body).
    Http,
    /// Run `command`; exit 0 means up.
    External,
    /// Not checked: always up.
    None,
}

/// `[service.health_check]` / `[service.real_server.health_check]`. Checks go from the host's
/// own stack to the real server's own IP. The defaults find a dead server within 3 seconds
/// (fall x interval + timeout = 2.8 s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// tcp | http | external | none.
    #[serde(default)]
    pub kind: HealthKind,
    /// Port to check; default: the service's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP path.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// HTTP Host header; default: the real server's IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Expected HTTP status.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// A substring the HTTP body must contain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_body: Option<String>,
    /// External check: run by `sh -c` with LBD_RS_IP, LBD_RS_PORT, LBD_SERVICE, LBD_VIP set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Milliseconds between checks.
    #[serde(default = "default_health_interval")]
    pub interval_ms: u32,
    /// Milliseconds one check may take.
    #[serde(default = "default_health_timeout")]
    pub timeout_ms: u32,
    /// Consecutive successes that bring a down server up.
    #[serde(default = "default_rise_fall")]
    pub rise: u32,
    /// Consecutive failures that take an up server down.
    #[serde(default = "default_rise_fall")]
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: HealthKind::Tcp,
            port: None,
            path: default_health_path(),
            host: None,
            expect_status: default_expect_status(),
            expect_body: None,
            command: None,
            interval_ms: default_health_interval(),
            timeout_ms: default_health_timeout(),
            rise: default_rise_fall(),
            fall: default_rise_fall(),
        }
    }
}

fn default_health_path() -> String {
    "/".to_owned()
}
fn default_expect_status() -> u16 {
    200
}
fn default_health_interval() -> u32 {
    1000
}
fn default_health_timeout() -> u32 {
    800
}
fn default_rise_fall() -> u32 {
    2
}

impl HealthCheck {
    fn check(&self, path: &str) -> Result<(), ConfigError> {
        let field = |name: &str| format!("{path}.{name}");
        if self.kind == HealthKind::External && self.command.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::new(
                field("command"),
                "an external check needs a command",
            ));
        }
        if self.kind == HealthKind::Http && !self.path.starts_with('/') {
            return Err(ConfigError::new(
                field("path"),
                format!("{:?} must start with /", self.path),
            ));
        }
        // Both go into the request line and a header: a CR or LF would let the text write
        // headers or requests of its own, and a space would end the request target.
        if let Some(bad) = self
            .path
            .chars()
            .find(|c| c.is_control() || c.is_whitespace())
        {
            return Err(ConfigError::new(
                field("path"),
                format!(
                    "{:?} contains {bad:?}: no spaces or control characters",
                    self.path
                ),
            ));
        }
        if let Some(host) = &self.host
            && (host.is_empty() || host.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            return Err(ConfigError::new(
                field("host"),
                format!("{host:?} is not a host name (no spaces or control characters)"),
            ));
        }
        // It goes into HAProxy's configuration for a SNAT service: a line break there would
        // let it write directives of its own.
        if let Some(body) = &self.expect_body
            && body.chars().any(char::is_control)
        {
            return Err(ConfigError::new(
                field("expect_body"),
                format!("{body:?} contains a control character"),
            ));
        }
        if self.port == Some(0) {
            return Err(ConfigError::new(field("port"), "port 0 is not a port"));
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(ConfigError::new(
                field("interval_ms"),
                format!("{} must be in 100..=3600000", self.interval_ms),
            ));
        }
        if self.timeout_ms < 10 || self.timeout_ms > self.interval_ms {
            return Err(ConfigError::new(
                field("timeout_ms"),
                format!(
                    "{} must be at least 10 and at most interval_ms ({})",
                    self.timeout_ms, self.interval_ms
                ),
            ));
        }
        for (name, value) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&value) {
                return Err(ConfigError::new(
                    field(name),
                    format!("{value} must be in 1..=100"),
                ));
            }
        }
        Ok(())
    }
}

fn default_weight() -> u16 {
    100
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<MacAddr, String> {
        let bad = || format!("invalid MAC address {text:?} (expected 02:00:00:00:00:11)");
        let separator = if text.contains('-') { '-' } else { ':' };
        let mut mac = [0u8; 6];
        let mut parts = text.split(separator);
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            // from_str_radix alone would take "+2".
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<MacAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of ports kept as sorted, merged, non-overlapping inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// Whether a port is in both sets (both are sorted, disjoint ranges: one walk).
    pub fn overlaps(&self, other: &PortSet) -> bool {
        let (mut a, mut b) = (
            self.ranges.iter().peekable(),
            other.ranges.iter().peekable(),
        );
        while let (Some(&&(a_start, a_end)), Some(&&(b_start, b_end))) = (a.peek(), b.peek()) {
            if a_start <= b_end && b_start <= a_end {
                return true;
            }
            if a_end < b_end {
                a.next();
            } else {
                b.next();
            }
        }
        false
    }

    /// Builds a set from ranges (start <= end each), merging overlaps and neighbours.
    fn from_ranges(mut ranges: Vec<(u16, u16)>) -> PortSet {
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(start) <= u32::from(last.1) + 1 => {
                    last.1 = last.1.max(end);
                }
                _ => merged.push((start, end)),
            }
        }
        PortSet { ranges: merged }
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.ranges
            .iter()
            .any(|&(start, end)| (start..=end).contains(&port))
    }

    /// Every port, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.ranges.iter().flat_map(|&(start, end)| start..=end)
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        self.ranges
            .iter()
            .map(|&(start, end)| usize::from(end - start) + 1)
            .sum()
    }

    /// True when no port is in the set (never so for a parsed config).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The lowest port (0 for an empty set).
    pub fn first(&self) -> u16 {
        self.ranges.first().map_or(0, |r| r.0)
    }
}

/// The lowest port of `ports` that `served` (disjoint ranges: start -> (end, service)) holds,
/// with the service that holds it.
/// Services a change may touch for [`Config::validate_after`] to check them against the
/// others one by one; a larger change goes through the maps of the full pass.
const SMALL_CHANGE: usize = 8;

fn first_served(served: &BTreeMap<u16, (u16, usize)>, ports: &PortSet) -> Option<(u16, usize)> {
    ports.ranges.iter().find_map(|&(start, end)| {
        // A served range that begins at or before `start` and reaches it...
        let covering = served
            .range(..=start)
            .next_back()
            .filter(|(_, (served_end, _))| *served_end >= start)
            .map(|(_, &(_, service))| (start, service));
        // ...or the first that begins inside `start..=end`.
        covering.or_else(|| {
            served
                .range(start..=end)
                .next()
                .map(|(&served_start, &(_, service))| (served_start, service))
        })
    })
}

impl FromStr for PortSet {
    type Err = String;

    fn from_str(text: &str) -> Result<PortSet, String> {
        let port = |part: &str| -> Result<u16, String> {
            let part = part.trim();
            // u16::from_str alone would take "+80".
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{part:?} is not a port (1-65535)"));
            }
            match part.parse::<u16>() {
                Ok(0) => Err("port 0 is not a port".to_owned()),
                Ok(port) => Ok(port),
                Err(_) => Err(format!("{part:?} is not a port (1-65535)")),
            }
        };
        let mut ranges = Vec::new();
        for item in text.split(',') {
            if item.trim().is_empty() {
                return Err(format!("empty entry in port list {text:?}"));
            }
            let range = match item.split_once('-') {
                Some((start, end)) => {
                    let (start, end) = (port(start)?, port(end)?);
                    if start > end {
                        return Err(format!("range {}: start is above end", item.trim()));
                    }
                    (start, end)
                }
                None => {
                    let single = port(item)?;
                    (single, single)
                }
            };
            ranges.push(range);
        }
        Ok(PortSet::from_ranges(ranges))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(start, end)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for PortSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PortSet, D::Error> {
        deserializer.deserialize_any(PortSetVisitor)
    }
}

/// `ports = 1935` and `ports = "1935,8088"` are both natural to write, so take either.
struct PortSetVisitor;

impl serde::de::Visitor<'_> for PortSetVisitor {
    type Value = PortSet;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port number or a string like \"1935,8088\" or \"9000-9010\"")
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortSet, E> {
        match u16::try_from(n) {
            Ok(port) if port > 0 => Ok(PortSet::from_ranges(vec![(port, port)])),
            _ => Err(E::custom(format!("{n} is not a port (1-65535)"))),
        }
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortSet, E> {
        self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<PortSet, E> {
        text.parse().map_err(E::custom)
    }
}

/// `IpAddr`'s own serde error is "invalid IP address syntax"; this one quotes the text.
mod ip {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::IpAddr;

    pub fn serialize<S: Serializer>(ip: &IpAddr, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(ip)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<IpAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        // Named by the family it was meant to be: IPv6 addresses are the ones with colons.
        let family = if text.contains(':') { "IPv6" } else { "IPv4" };
        text.parse()
            .map_err(|_| serde::de::Error::custom(format!("invalid {family} address {text:?}")))
    }
}

/// `Ipv4Addr`'s own serde error is "invalid IPv4 address syntax"; this one quotes the text.
mod ipv4 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::Ipv4Addr;

    pub fn serialize<S: Serializer>(ip: &Ipv4Addr, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(ip)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Ipv4Addr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map_err(|_| serde::de::Error::custom(format!("invalid IPv4 address {text:?}")))
    }
}

impl Config {
    /// Parses and checks a config file's text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new("(file)", describe(text, &e)))?;
        let config: Config = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| ConfigError::new(field_path(e.path(), text), describe(text, e.inner())))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        Config::from_toml_str(&text)
    }

    /// The config as TOML; reads back to an equal `Config`. (A hand-built `Config` whose
    /// `control_socket` is not UTF-8 cannot be written as TOML: it comes back as a comment.)
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialize the config: {e}\n"))
    }

    /// Checks what the types alone cannot: relations between fields and value ranges.
    /// Checks a config built or changed in code (by the control socket) exactly as a file's
    /// config is checked when read.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_after(None)
    }

    /// [`Config::validate`] for a config made from `previous`, a valid one: the services it
    /// still shares with `previous` (the same `Arc`) passed their own checks there and are
    /// only checked against the others again. A change to one of a thousand services checks
    /// one service, and the thousand against each other through maps.
    pub fn validate_after(&self, previous: Option<&Config>) -> Result<(), ConfigError> {
        let checked: HashSet<*const Service> = previous
            .map(|previous| previous.services.iter().map(Arc::as_ptr).collect())
            .unwrap_or_default();
        if let Some(previous) = previous
            && self.passes_as_a_small_change(previous, &checked)
        {
            return Ok(());
        }
        self.validate_skipping(&checked)
    }

    /// Whether a config made from `previous` (a valid one) by changing a few services is
    /// valid, judged by those services alone: each on its own and against every other
    /// service, with the counts, the engine and the pair. The rules between two services
    /// (labels, VIP modes, ports) hold for every pair the change did not touch, as they did
    /// in `previous`. False for a problem, or for a change too large for this way: the full
    /// pass then finds the problem and names it as it always does.
    fn passes_as_a_small_change(
        &self,
        previous: &Config,
        shared: &HashSet<*const Service>,
    ) -> bool {
        let changed: Vec<(usize, &Service)> = self
            .services
            .iter()
            .enumerate()
            .filter(|(_, service)| !shared.contains(&Arc::as_ptr(service)))
            .map(|(i, service)| (i, &**service))
            .take(SMALL_CHANGE + 1)
            .collect();
        if changed.len() > SMALL_CHANGE
            || self.services.len() > MAX_SERVICES
            || self.engine.check().is_err()
            || self.ha != previous.ha
            || changed
                .iter()
                .any(|(_, service)| service.check("").is_err())
        {
            return false;
        }
        if let Some(ha) = &self.ha {
            let nodes = || {
                std::iter::once(&ha.local_address)
                    .chain(&ha.peer_address.0)
                    .map(|&node| IpAddr::V4(node))
            };
            let at_a_node = |service: &Service| {
                nodes().any(|node| {
                    service.has_vip(node) || service.real_servers.iter().any(|rs| rs.ip == node)
                })
            };
            if changed.iter().any(|(_, service)| at_a_node(service)) {
                return false;
            }
        }
        let clash = |a: &Service, b: &Service| {
            a.label == b.label
                || a.vips().any(|vip| {
                    b.has_vip(vip)
                        && (a.mode != b.mode
                            || (a.protocol == b.protocol && a.ports.overlaps(&b.ports)))
                })
        };
        let clashes = changed.iter().any(|&(i, a)| {
            self.services
                .iter()
                .enumerate()
                .any(|(j, b)| i != j && clash(a, b))
        });
        let vips: HashSet<IpAddr> = self.services.iter().flat_map(|s| s.vips()).collect();
        !clashes && vips.len() <= MAX_VIPS
    }

    /// The full pass of [`Config::validate`], skipping the own checks of the services in
    /// `checked`.
    fn validate_skipping(&self, checked: &HashSet<*const Service>) -> Result<(), ConfigError> {
        let count = self.services.len();
        self.engine.check()?;
        if let Some(ha) = &self.ha {
            ha.check()?;
            // A VIP or real server at a node's own address would take that node's traffic.
            for (i, service) in self.services.iter().enumerate() {
                let node = std::iter::once(&ha.local_address).chain(&ha.peer_address.0);
                for &address in node {
                    let address = IpAddr::V4(address);
                    let path = format!("service[{i}] {:?}", service.label);
                    if service.has_vip(address) {
                        return Err(ConfigError::new(
                            format!("{path}.vip"),
                            format!("{address} is an address of a node of the HA pair"),
                        ));
                    }
                    if let Some(j) = service.real_servers.iter().position(|rs| rs.ip == address) {
                        return Err(ConfigError::new(
                            format!("{path}.real_server[{j}].ip"),
                            format!("{address} is an address of a node of the HA pair"),
                        ));
                    }
                }
            }
        }
        if self.services.len() > MAX_SERVICES {
            return Err(ConfigError::new(
                format!("service[{MAX_SERVICES}]"),
                format!(
                    "{} services; lbd holds at most {MAX_SERVICES}",
                    self.services.len()
                ),
            ));
        }
        let mut vips = HashSet::with_capacity(count);
        // What the services before this one hold, so that each is checked against them all
        // in one look-up rather than one comparison per earlier service: a change to a
        // config of a thousand services is validated in its length, not its square.
        let mut labels: HashMap<&str, usize> = HashMap::with_capacity(count);
        // A VIP's mode is its first service's.
        let mut vip_modes: HashMap<IpAddr, (ServiceMode, usize)> = HashMap::with_capacity(count);
        // Per VIP and protocol, the port ranges served so far (disjoint): start -> (end,
        // service).
        let mut served: HashMap<(IpAddr, Protocol), BTreeMap<u16, (u16, usize)>> =
            HashMap::with_capacity(count);
        for (i, service) in self.services.iter().enumerate() {
            let path = || format!("service[{i}] {:?}", service.label);
            if !checked.contains(&Arc::as_ptr(service)) {
                service.check(&path())?;
            }
            for vip in service.vips() {
                if vips.insert(vip) && vips.len() > MAX_VIPS {
                    return Err(ConfigError::new(
                        format!("{}.vip", path()),
                        format!(
                            "{vip} would be VIP number {}; lbd steers at most {MAX_VIPS} \
                             distinct VIPs",
                            vips.len()
                        ),
                    ));
                }
            }
            if let Some(&j) = labels.get(service.label.as_str()) {
                return Err(ConfigError::new(
                    format!("{}.label", path()),
                    format!("duplicate label, also used by service[{j}]"),
                ));
            }
            labels.insert(&service.label, i);
            for vip in service.vips() {
                // A DR VIP is lbd's (it answers ARP, the XDP program takes its frames); a SNAT
                // VIP is the host's (HAProxy listens on it).
                let &mut (mode, j) = vip_modes.entry(vip).or_insert((service.mode, i));
                if mode != service.mode {
                    let earlier = &self.services[j];
                    return Err(ConfigError::new(
                        format!("{}.mode", path()),
                        format!(
                            "{vip} is the VIP of service[{j}] {:?} in mode {}: a VIP serves \
                             one mode, dr or snat",
                            earlier.label, earlier.mode
                        ),
                    ));
                }
                let ranges = served.entry((vip, service.protocol)).or_default();
                if let Some((port, j)) = first_served(ranges, &service.ports) {
                    return Err(ConfigError::new(
                        format!("{}.ports", path()),
                        format!(
                            "{}:{port}/{} is already served by service[{j}] {:?}",
                            SocketAddrText(vip),
                            service.protocol,
                            self.services[j].label
                        ),
                    ));
                }
                for &(start, end) in &service.ports.ranges {
                    ranges.insert(start, (end, i));
                }
            }
        }
        Ok(())
    }
}

impl Engine {
    fn check(&self) -> Result<(), ConfigError> {
        let field = |name: &str| format!("engine.{name}");
        // The kernel's rules (dev_valid_name): IFNAMSIZ-1 bytes, no '/', ':' or whitespace.
        let name = &self.interface;
        if name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(ConfigError::new(
                field("interface"),
                format!(
                    "{name:?} is not an interface name (1-15 bytes, no '/', ':' or whitespace)"
                ),
            ));
        }
        if self.queues.is_empty() {
            return Err(ConfigError::new(
                field("queues"),
                "at least one queue is needed",
            ));
        }
        for (i, queue) in self.queues.iter().enumerate() {
            if *queue >= MAX_QUEUES {
                return Err(ConfigError::new(
                    field("queues"),
                    format!(
                        "queue {queue} is above {} (lbd serves queues 0..{MAX_QUEUES})",
                        MAX_QUEUES - 1
                    ),
                ));
            }
            if self.queues[..i].contains(queue) {
                return Err(ConfigError::new(
                    field("queues"),
                    format!("queue {queue} is listed twice"),
                ));
            }
        }
        if !self.cores.is_empty() && self.cores.len() != self.queues.len() {
            return Err(ConfigError::new(
                field("cores"),
                format!(
                    "{} core(s) for {} queue(s): give one core per queue, or none",
                    self.cores.len(),
                    self.queues.len()
                ),
            ));
        }
        if self.frame_size != 2048 && self.frame_size != 4096 {
            return Err(ConfigError::new(
                field("frame_size"),
                format!("{} must be 2048 or 4096", self.frame_size),
            ));
        }
        if !self.ring_size.is_power_of_two() || !(64..=16384).contains(&self.ring_size) {
            return Err(ConfigError::new(
                field("ring_size"),
                format!("{} must be a power of two in 64..=16384", self.ring_size),
            ));
        }
        if !self.frame_count.is_power_of_two() || self.frame_count < 2 * self.ring_size {
            return Err(ConfigError::new(
                field("frame_count"),
                format!(
                    "{} must be a power of two and at least twice ring_size ({})",
                    self.frame_count, self.ring_size
                ),
            ));
        }
        if self.batch_size == 0 || self.batch_size > self.ring_size {
            return Err(ConfigError::new(
                field("batch_size"),
                format!(
                    "{} must be in 1..=ring_size ({})",
                    self.batch_size, self.ring_size
                ),
            ));
        }
        if self.tx_skb_budget != 0 && !(32..=self.ring_size).contains(&self.tx_skb_budget) {
            return Err(ConfigError::new(
                field("tx_skb_budget"),
                format!(
                    "{} must be 0 (the kernel's default) or in 32..=ring_size ({})",
                    self.tx_skb_budget, self.ring_size
                ),
            ));
        }
        for (name, size) in [
            ("flow_table_size", self.flow_table_size),
            ("persistence_table_size", self.persistence_table_size),
        ] {
            if !(1024..=16_777_216).contains(&size) {
                return Err(ConfigError::new(
                    field(name),
                    format!("{size} must be in 1024..=16777216"),
                ));
            }
        }
        if let Some(group) = &self.control_group
            && (group.is_empty() || group.contains(char::is_whitespace))
        {
            return Err(ConfigError::new(
                field("control_group"),
                format!("{group:?} is not a group name"),
            ));
        }
        if self.http_actions && self.http_listen.is_none() {
            return Err(ConfigError::new(
                field("http_actions"),
                "needs engine.http_listen: the actions are buttons of the status page",
            ));
        }
        if self.http_actions && self.http_token_file.is_none() {
            return Err(ConfigError::new(
                field("http_token_file"),
                "required with http_actions: every action must carry the token it holds",
            ));
        }
        if self.dr_check_interval_ms != 0
            && !(1_000..=3_600_000).contains(&self.dr_check_interval_ms)
        {
            return Err(ConfigError::new(
                field("dr_check_interval_ms"),
                format!(
                    "{} must be 0 (off) or in 1000..=3600000",
                    self.dr_check_interval_ms
                ),
            ));
        }
        if self.gratuitous_arp_count > 10 {
            return Err(ConfigError::new(
                field("gratuitous_arp_count"),
                format!("{} must be in 0..=10", self.gratuitous_arp_count),
            ));
        }
        Ok(())
    }
}

impl Service {
    /// What a service's mode allows: DR forwards frames unchanged (no port translation, any
    /// check lbd runs); SNAT goes through HAProxy (TCP only, its own tcp and http checks).
    fn check_mode(&self, path: &str) -> Result<(), ConfigError> {
        match self.mode {
            ServiceMode::Dr => {
                if self.layer7_protocol.is_some() {
                    return Err(ConfigError::new(
                        format!("{path}.layer7_protocol"),
                        "only a mode = \"snat\" service has a layer 7 protocol",
                    ));
                }
                if let Some(i) = self.real_servers.iter().position(|rs| rs.port.is_some()) {
                    return Err(ConfigError::new(
                        format!("{path}.real_server[{i}].port"),
                        "port translation needs mode = \"snat\": in DR mode the frame reaches \
                         the real server unchanged, on the service's port",
                    ));
                }
            }
            ServiceMode::Snat => {
                if self.vips().any(|vip| vip.is_ipv6()) {
                    let field = if self.vip.is_ipv6() { "vip" } else { "vip6" };
                    return Err(ConfigError::new(
                        format!("{path}.{field}"),
                        "a mode = \"snat\" service has an IPv4 VIP only, so far",
                    ));
                }
                if self.protocol != Protocol::Tcp {
                    return Err(ConfigError::new(
                        format!("{path}.protocol"),
                        "a mode = \"snat\" service is TCP (HAProxy proxies TCP connections)",
                    ));
                }
                let checks = std::iter::once((format!("{path}.health_check"), &self.health_check))
                    .chain(self.real_servers.iter().enumerate().filter_map(|(i, rs)| {
                        let check = rs.health_check.as_ref()?;
                        Some((format!("{path}.real_server[{i}].health_check"), check))
                    }));
                for (field, check) in checks {
                    if check.kind == HealthKind::External {
                        return Err(ConfigError::new(
                            format!("{field}.kind"),
                            "HAProxy checks a mode = \"snat\" service: tcp, http or none",
                        ));
                    }
                    // HAProxy's kind of check is the backend's: a server may change only how
                    // often and where it is checked, or not be checked.
                    if ![self.health_check.kind, HealthKind::None].contains(&check.kind) {
                        return Err(ConfigError::new(
                            format!("{field}.kind"),
                            format!(
                                "{:?}: in a mode = \"snat\" service a real server's check is \
                                 of the service's kind ({:?}) or none",
                                check.kind, self.health_check.kind
                            ),
                        ));
                    }
                }
                if let Some(i) = self.real_servers.iter().position(|rs| rs.port == Some(0)) {
                    return Err(ConfigError::new(
                        format!("{path}.real_server[{i}].port"),
                        "port 0 is not a port",
                    ));
                }
            }
        }
        Ok(())
    }

    fn check(&self, path: &str) -> Result<(), ConfigError> {
        if self.label.trim().is_empty() {
            return Err(ConfigError::new(
                format!("{path}.label"),
                "must not be empty",
            ));
        }
        check_unicast(self.vip)
            .map_err(|reason| ConfigError::new(format!("{path}.vip"), reason))?;
        if let Some(vip6) = self.vip6 {
            if self.vip.is_ipv6() {
                return Err(ConfigError::new(
                    format!("{path}.vip6"),
                    "a second VIP is for an IPv4 vip; this one is IPv6 already",
                ));
            }
            check_unicast(IpAddr::V6(vip6))
                .map_err(|reason| ConfigError::new(format!("{path}.vip6"), reason))?;
        }
        if !(1..=128).contains(&self.persistence_prefix_v6) {
            return Err(ConfigError::new(
                format!("{path}.persistence_prefix_v6"),
                format!(
                    "{} is not a prefix length in 1..=128",
                    self.persistence_prefix_v6
                ),
            ));
        }
        if self.ports.is_empty() {
            return Err(ConfigError::new(format!("{path}.ports"), "no port given"));
        }
        if !is_prime(self.table_size) || !(3..=MAX_TABLE_SIZE).contains(&self.table_size) {
            return Err(ConfigError::new(
                format!("{path}.table_size"),
                format!(
                    "{} must be a prime in 3..={MAX_TABLE_SIZE} (65537 is a good size)",
                    self.table_size
                ),
            ));
        }
        if self.real_servers.len() > MAX_REAL_SERVERS {
            return Err(ConfigError::new(
                format!("{path}.real_server[{MAX_REAL_SERVERS}]"),
                format!(
                    "{} real servers; a service holds at most {MAX_REAL_SERVERS}",
                    self.real_servers.len()
                ),
            ));
        }
        if self.real_servers.len() >= self.table_size as usize {
            return Err(ConfigError::new(
                format!("{path}.table_size"),
                format!(
                    "{} slots for {} real servers: the table must be larger (100x is good)",
                    self.table_size,
                    self.real_servers.len()
                ),
            ));
        }
        self.health_check.check(&format!("{path}.health_check"))?;
        self.check_mode(path)?;
        if let Some(fallback) = self.fallback {
            check_unicast(fallback)
                .map_err(|reason| ConfigError::new(format!("{path}.fallback"), reason))?;
            if self.has_vip(fallback) {
                return Err(ConfigError::new(
                    format!("{path}.fallback"),
                    "is the service's VIP; the fallback server needs its own address",
                ));
            }
        }
        for (i, rs) in self.real_servers.iter().enumerate() {
            // Formatted only for an error: this runs for every server with every change.
            let rs_path = |field: &str| format!("{path}.real_server[{i}].{field}");
            if let Some(check) = &rs.health_check {
                check.check(&rs_path("health_check"))?;
            }
            if rs.label.trim().is_empty() {
                return Err(ConfigError::new(rs_path("label"), "must not be empty"));
            }
            check_unicast(rs.ip).map_err(|reason| ConfigError::new(rs_path("ip"), reason))?;
            if self.has_vip(rs.ip) {
                return Err(ConfigError::new(
                    rs_path("ip"),
                    "is the service's VIP; a real server needs its own address",
                ));
            }
            for (j, earlier) in self.real_servers[..i].iter().enumerate() {
                if earlier.label == rs.label {
                    return Err(ConfigError::new(
                        rs_path("label"),
                        format!("duplicate label {:?}, also real_server[{j}]", rs.label),
                    ));
                }
                if earlier.ip == rs.ip {
                    return Err(ConfigError::new(
                        rs_path("ip"),
                        format!("{} is already real_server[{j}] {:?}", rs.ip, earlier.label),
                    ));
                }
                if real_server_key(earlier.ip) == real_server_key(rs.ip) {
                    return Err(ConfigError::new(
                        rs_path("ip"),
                        format!(
                            "{} and real_server[{j}] {:?} ({}) share the packet path's 32-bit \
                             key for a server; give one another address",
                            rs.ip, earlier.label, earlier.ip
                        ),
                    ));
                }
            }
            if rs.max_connections != 0 && rs.min_connections > rs.max_connections {
                return Err(ConfigError::new(
                    rs_path("min_connections"),
                    format!(
                        "{} is above max_connections ({})",
                        rs.min_connections, rs.max_connections
                    ),
                ));
            }
            if let Some(MacAddr(mac)) = rs.mac
                && (mac[0] & 1 != 0 || mac == [0; 6])
            {
                return Err(ConfigError::new(
                    rs_path("mac"),
                    format!("{} is not a unicast address", MacAddr(mac)),
                ));
            }
        }
        Ok(())
    }
}

/// An address in `host:port` form: IPv6 in brackets.
struct SocketAddrText(IpAddr);

impl fmt::Display for SocketAddrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "[{v6}]"),
        }
    }
}

fn check_unicast(ip: IpAddr) -> Result<(), String> {
    let kind = match ip {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        _ if ip.is_loopback() => "loopback",
        IpAddr::V4(v4) if v4.is_broadcast() => "broadcast",
        IpAddr::V4(v4) if v4.is_link_local() => "link-local",
        IpAddr::V6(v6) if v6.is_unicast_link_local() => "link-local",
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => "IPv4-mapped",
        _ => return Ok(()),
    };
    Err(format!(
        "{ip} is a {kind} address; a unicast address is needed"
    ))
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    // Odd divisors in 32 bits: checked for every service with every change.
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The key path serde saw, written as the checks write theirs: a service is named by index
/// and label, `service[1] "Wowza GUI".real_server[0].ip`, so both kinds of error read alike.
fn field_path(path: &serde_path_to_error::Path, text: &str) -> String {
    use serde_path_to_error::Segment;
    let mut field = String::new();
    let mut in_services = false;
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                field.push_str(&format!("[{index}]"));
                if in_services && let Some(label) = service_label(text, *index) {
                    field.push_str(&format!(" {label:?}"));
                }
            }
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(name);
            }
            Segment::Unknown => field.push_str(".?"),
        }
        in_services = field == "service";
    }
    if field.is_empty() {
        "(file)".to_owned()
    } else {
        field
    }
}

/// `service[index].label` read loosely from the text: the typed parse has just failed, but
/// the file is valid TOML, so the label is usually there to find.
fn service_label(text: &str, index: usize) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    let label = table.get("service")?.get(index)?.get("label")?.as_str()?;
    Some(label.to_owned())
}

/// toml's message with the line it points at (its own Display draws a multi-line snippet).
fn describe(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests;
