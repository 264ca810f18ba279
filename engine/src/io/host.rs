//! Facts lbd reads from the host it runs on: the interface's MAC, MTU and queues (sysfs), the
//! host's own addresses (getifaddrs) and the real servers' MACs (the kernel's IPv4 neighbour
//! table, /proc/net/arp). [`HostFacts`] is the door the control side reads them through, with
//! a fake behind it in tests.
//!
//! lbd never resolves a real server's MAC by itself: the host stack does, as it would for any
//! neighbour. When an entry is missing, lbd makes the kernel resolve it by sending one empty
//! UDP datagram to the discard port (9) of the real server; the kernel ARPs for it, and the
//! answer appears in the table. A MAC once learned is kept when the kernel's entry ages out:
//! the balancer's own traffic bypasses the host stack, so the kernel has no reason to keep it.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::{Path, PathBuf};

/// `ATF_COM` in /proc/net/arp's flags column: the entry is complete (has a MAC).
const ATF_COM: u32 = 0x2;
/// The discard service (RFC 863): where the resolution trigger goes.
const DISCARD_PORT: u16 = 9;

fn sysfs_interface(interface: &str) -> PathBuf {
    Path::new("/sys/class/net").join(interface)
}

/// Whether the interface exists in this network namespace.
pub fn interface_exists(interface: &str) -> bool {
    !interface.is_empty() && !interface.contains('/') && sysfs_interface(interface).exists()
}

/// The interface's MAC address.
pub fn interface_mac(interface: &str) -> io::Result<[u8; 6]> {
    let text = fs::read_to_string(sysfs_interface(interface).join("address"))?;
    parse_mac(text.trim()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{interface} has no Ethernet address ({})", text.trim()),
        )
    })
}

/// How many RX queues the interface has.
pub fn rx_queue_count(interface: &str) -> io::Result<u32> {
    let mut count = 0;
    for entry in fs::read_dir(sysfs_interface(interface).join("queues"))? {
        if entry?.file_name().to_string_lossy().starts_with("rx-") {
            count += 1;
        }
    }
    Ok(count)
}

/// The interface's MTU: the largest IP packet it carries, so frames of up to MTU + 14 bytes.
pub fn interface_mtu(interface: &str) -> io::Result<u32> {
    let text = fs::read_to_string(sysfs_interface(interface).join("mtu"))?;
    text.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("mtu {text:?}: {e}")))
}

/// Whether the interface is up and connected (its operstate; `unknown`, which some virtual
/// devices report, counts as up).
pub fn link_up(interface: &str) -> bool {
    fs::read_to_string(sysfs_interface(interface).join("operstate"))
        .is_ok_and(|state| matches!(state.trim(), "up" | "unknown"))
}

/// Every IPv4 and IPv6 address of this host (of its network namespace), with its interface.
pub fn local_addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addresses
        .filter_map(|interface| {
            let address = interface.address?;
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some((interface.interface_name, ip))
        })
        .collect())
}

/// The label lbd gives the addresses it puts on its interface (`eth0:lbd`): the SNAT VIPs. An
/// address with it is lbd's, not the host's own.
pub const LABEL_SUFFIX: &str = ":lbd";

/// Every IPv4 network of this host: interface (or address label), address, prefix length.
pub fn local_networks() -> io::Result<Vec<(String, Ipv4Addr, u8)>> {
    let addresses = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addresses
        .filter_map(|interface| {
            let ip = interface.address?.as_sockaddr_in()?.ip();
            let mask = interface.netmask?.as_sockaddr_in()?.ip();
            let prefix = u8::try_from(u32::from(mask).leading_ones()).unwrap_or(32);
            Some((interface.interface_name, ip, prefix))
        })
        .collect())
}

/// Puts `ip`/32 on `interface`, labelled `<interface>:lbd`; nothing when it is there already.
pub fn hold_address(interface: &str, ip: Ipv4Addr) -> io::Result<()> {
    match change_address(interface, ip, true) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Takes `ip`/32 off `interface`; nothing when it is not there.
pub fn release_address(interface: &str, ip: Ipv4Addr) -> io::Result<()> {
    match change_address(interface, ip, false) {
        Err(error) if error.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        other => other,
    }
}

/// One RTM_NEWADDR or RTM_DELADDR, and the kernel's answer.
fn change_address(interface: &str, ip: Ipv4Addr, add: bool) -> io::Result<()> {
    use netlink_packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
        NetlinkPayload,
    };
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

    let index: u32 = fs::read_to_string(sysfs_interface(interface).join("ifindex"))?
        .trim()
        .parse()
        .map_err(io::Error::other)?;
    let label = format!("{interface}{LABEL_SUFFIX}");
    if label.len() > 15 {
        return Err(io::Error::other(format!(
            "interface name {interface:?} leaves no room for lbd's address label {label:?} \
             (15 bytes at most)"
        )));
    }
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = 32;
    message.header.index = index;
    message
        .attributes
        .push(AddressAttribute::Local(std::net::IpAddr::V4(ip)));
    message
        .attributes
        .push(AddressAttribute::Address(std::net::IpAddr::V4(ip)));
    message.attributes.push(AddressAttribute::Label(label));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let inner = if add {
        header.flags |= NLM_F_CREATE | NLM_F_EXCL;
        RouteNetlinkMessage::NewAddress(message)
    } else {
        RouteNetlinkMessage::DelAddress(message)
    };
    let socket = send_route_request(header, inner)?;
    let mut reply = vec![0; 4096];
    let received = socket.recv(&mut &mut reply[..], 0)?;
    let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..received])
        .map_err(|e| io::Error::other(e.to_string()))?;
    match answer.payload {
        NetlinkPayload::Error(error) if error.code.is_none() => Ok(()),
        NetlinkPayload::Error(error) => Err(error.to_io()),
        other => Err(io::Error::other(format!(
            "unexpected netlink answer: {other:?}"
        ))),
    }
}

/// Sends one rtnetlink request on a new socket, which is returned for the answers.
fn send_route_request(
    header: netlink_packet_core::NetlinkHeader,
    message: netlink_packet_route::RouteNetlinkMessage,
) -> io::Result<netlink_sys::Socket> {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut request = vec![0; packet.header.length as usize];
    packet.serialize(&mut request);
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&request, 0)?;
    Ok(socket)
}

/// Whether this process may listen on ports below 1024: it has CAP_NET_BIND_SERVICE, or the
/// kernel lets anyone (`net.ipv4.ip_unprivileged_port_start`).
pub fn may_bind_low_ports() -> bool {
    const CAP_NET_BIND_SERVICE: u32 = 10;
    let capability = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps >> CAP_NET_BIND_SERVICE & 1 == 1);
    let unprivileged = fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .is_some_and(|start| start == 0);
    capability || unprivileged
}

/// Reads a secret (the pair's key, the HTTP actions' token): a regular file of at least
/// `min_bytes` bytes (surrounding whitespace aside), owned by the user lbd runs as and readable
/// by nobody else: its holder may act as lbd's own operator. The error says what is wrong.
pub fn read_secret(path: &std::path::Path, min_bytes: usize) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::MetadataExt;
    let metadata = fs::metadata(path).map_err(|e| e.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file".to_owned());
    }
    let owner = nix::unistd::geteuid().as_raw();
    if metadata.uid() != owner {
        return Err(format!(
            "owned by uid {}, not by lbd's user (uid {owner}): its owner could change it",
            metadata.uid()
        ));
    }
    if metadata.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:o} lets other users read or change it (chmod 600)",
            metadata.mode() & 0o777
        ));
    }
    let secret = fs::read(path).map_err(|e| e.to_string())?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < min_bytes {
        return Err(format!(
            "{} bytes; at least {min_bytes} are needed (head -c 32 /dev/urandom | base64)",
            secret.len()
        ));
    }
    Ok(secret)
}

/// What the control side needs from the host, in one place that tests can replace.
pub trait HostFacts: Send {
    /// Every IPv4 and IPv6 address of this host, with its interface (or address label).
    fn local_addresses(&self) -> io::Result<Vec<(String, IpAddr)>>;
    /// Every IPv4 network of this host: interface (or label), address, prefix length.
    fn local_networks(&self) -> io::Result<Vec<(String, Ipv4Addr, u8)>>;
    /// The complete IPv4 neighbour entries on the balancer's interface.
    fn neighbours(&self) -> io::Result<HashMap<IpAddr, [u8; 6]>>;
    /// Makes the kernel resolve `ip`'s MAC.
    fn trigger_resolution(&self, ip: IpAddr) -> io::Result<()>;
    /// Puts a SNAT VIP on the balancer's interface (the host stack, and HAProxy, take it).
    fn hold_vip(&self, ip: Ipv4Addr) -> io::Result<()>;
    /// Takes a SNAT VIP off it.
    fn release_vip(&self, ip: Ipv4Addr) -> io::Result<()>;
}

/// The host lbd runs on, for its interface.
#[derive(Debug, Clone)]
pub struct SystemHost {
    /// The balancer's interface.
    pub interface: String,
}

impl HostFacts for SystemHost {
    fn local_addresses(&self) -> io::Result<Vec<(String, IpAddr)>> {
        local_addresses()
    }

    fn neighbours(&self) -> io::Result<HashMap<IpAddr, [u8; 6]>> {
        neighbours(&self.interface)
    }

    fn trigger_resolution(&self, ip: IpAddr) -> io::Result<()> {
        trigger_resolution(ip)
    }

    fn local_networks(&self) -> io::Result<Vec<(String, Ipv4Addr, u8)>> {
        local_networks()
    }

    fn hold_vip(&self, ip: Ipv4Addr) -> io::Result<()> {
        hold_address(&self.interface, ip)
    }

    fn release_vip(&self, ip: Ipv4Addr) -> io::Result<()> {
        release_address(&self.interface, ip)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Complete IPv4 neighbour entries on `interface`, from /proc/net/arp's text.
pub fn parse_neighbours(table: &str, interface: &str) -> HashMap<Ipv4Addr, [u8; 6]> {
    // IP address  HW type  Flags  HW address  Mask  Device
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            let [ip, _hw_type, flags, mac, _mask, device] = columns[..] else {
                return None;
            };
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            let mac = parse_mac(mac)?;
            (device == interface && flags & ATF_COM != 0 && mac != [0; 6])
                .then_some((ip.parse().ok()?, mac))
        })
        .collect()
}

/// The kernel's complete IPv4 (from /proc/net/arp) and IPv6 (over rtnetlink) neighbour
/// entries on `interface`.
pub fn neighbours(interface: &str) -> io::Result<HashMap<IpAddr, [u8; 6]>> {
    let mut table: HashMap<IpAddr, [u8; 6]> =
        parse_neighbours(&fs::read_to_string("/proc/net/arp")?, interface)
            .into_iter()
            .map(|(ip, mac)| (IpAddr::V4(ip), mac))
            .collect();
    // The IPv4 table alone still serves when the IPv6 dump fails.
    table.extend(
        neighbours_v6(interface)
            .unwrap_or_default()
            .into_iter()
            .map(|(ip, mac)| (IpAddr::V6(ip), mac)),
    );
    Ok(table)
}

/// The kernel's IPv6 neighbour entries with a MAC on `interface` (one RTM_GETNEIGH dump).
fn neighbours_v6(interface: &str) -> io::Result<HashMap<Ipv6Addr, [u8; 6]>> {
    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
    };
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

    let index: u32 = fs::read_to_string(sysfs_interface(interface).join("ifindex"))?
        .trim()
        .parse()
        .map_err(io::Error::other)?;
    let mut message = NeighbourMessage::default();
    message.header.family = AddressFamily::Inet6;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket = send_route_request(header, RouteNetlinkMessage::GetNeighbour(message))?;
    let mut table = HashMap::new();
    let mut reply = vec![0; 65536];
    loop {
        let received = socket.recv(&mut &mut reply[..], 0)?;
        let mut offset = 0;
        while offset < received {
            let answer =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[offset..received])
                    .map_err(|e| io::Error::other(e.to_string()))?;
            let length = answer.header.length as usize;
            match answer.payload {
                NetlinkPayload::Done(_) => return Ok(table),
                NetlinkPayload::Error(error) if error.code.is_some() => {
                    return Err(error.to_io());
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(entry))
                    if entry.header.ifindex == index
                        && !matches!(
                            entry.header.state,
                            NeighbourState::Incomplete
                                | NeighbourState::Failed
                                | NeighbourState::None
                        ) =>
                {
                    let mut ip = None;
                    let mut mac = None;
                    for attribute in entry.attributes {
                        match attribute {
                            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                                ip = Some(a);
                            }
                            NeighbourAttribute::LinkLocalAddress(bytes) => {
                                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok();
                            }
                            _ => {}
                        }
                    }
                    if let (Some(ip), Some(mac)) = (ip, mac)
                        && mac != [0; 6]
                    {
                        table.insert(ip, mac);
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// Makes the kernel resolve `ip`'s MAC by sending it an empty datagram to the discard port.
pub fn trigger_resolution(ip: IpAddr) -> io::Result<()> {
    let socket = match ip {
        IpAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
        IpAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?,
    };
    socket.send_to(&[], (ip, DISCARD_PORT))?;
    Ok(())
}

/// Learns the MACs of `ips` from the neighbour table, asking the kernel once to resolve the
/// missing ones and re-reading every 20 ms until all are known, `wait` has passed, or `stop`
/// is set. Returns what it learned; the missing ones are left for a later try.
pub fn resolve(
    interface: &str,
    ips: &[IpAddr],
    wait: std::time::Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> HashMap<IpAddr, [u8; 6]> {
    let deadline = std::time::Instant::now() + wait;
    let mut missing: Vec<IpAddr> = ips.to_vec();
    missing.sort();
    missing.dedup();
    let mut learned = HashMap::new();
    let mut asked = false;
    while !missing.is_empty() {
        if let Ok(table) = neighbours(interface) {
            missing.retain(|ip| match table.get(ip) {
                Some(&mac) => {
                    learned.insert(*ip, mac);
                    false
                }
                None => true,
            });
        }
        let done = std::time::Instant::now() >= deadline
            || stop.load(std::sync::atomic::Ordering::Relaxed);
        if missing.is_empty() || done {
            break;
        }
        if !asked {
            for &ip in &missing {
                // A failed trigger only means waiting for the next one.
                let _ = trigger_resolution(ip);
            }
            asked = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    learned
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
IP address       HW type     Flags       HW address            Mask     Device
198.18.0.11      0x1         0x2         02:00:00:00:00:11     *        eth0
198.18.0.12      0x1         0x0         00:00:00:00:00:00     *        eth0
198.18.0.13      0x1         0x2         02:00:00:00:00:13     *        eth1
198.18.0.14      0x1         0x6         02:00:00:00:00:14     *        eth0
garbage line
";

    #[test]
    fn reads_complete_entries_of_one_interface() {
        let table = parse_neighbours(TABLE, "eth0");
        assert_eq!(table.len(), 2);
        assert_eq!(table[&Ipv4Addr::new(198, 18, 0, 11)], [2, 0, 0, 0, 0, 0x11]);
        assert_eq!(table[&Ipv4Addr::new(198, 18, 0, 14)], [2, 0, 0, 0, 0, 0x14]);
    }

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("02:ab:00:00:0f:11").expect("valid");
        assert_eq!(format_mac(mac), "02:ab:00:00:0f:11");
        assert_eq!(parse_mac("02:ab:00:00:0f"), None);
        assert_eq!(parse_mac("02:ab:00:00:0f:11:22"), None);
        assert_eq!(parse_mac("zz:ab:00:00:0f:11"), None);
    }

    #[test]
    fn the_host_knows_its_loopback_address_and_mtu() {
        let addresses = local_addresses().expect("getifaddrs");
        assert!(
            addresses
                .iter()
                .any(|(_, ip)| *ip == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addresses:?}"
        );
        assert!(interface_mtu("lo").expect("lo has an MTU") >= 1500);
    }

    #[test]
    fn loopback_is_found_and_missing_interfaces_are_not() {
        assert!(interface_exists("lo"));
        assert!(!interface_exists("lbd-no-such-if"));
        assert!(!interface_exists("../lo"));
    }
}
