//! Every accepted shape and every rejection, with the field the error must name.

use super::*;
use proptest::prelude::*;

const EXAMPLE: &str = r#"
[engine]
interface = "eth0"
queues = [0]
cores = [1]
xdp_mode = "auto"
control_socket = "/run/lbd/lbd.sock"

[[service]]
label = "Wowza Streaming"
vip = "198.18.0.100"
ports = "1935"
protocol = "tcp"
persistence = "source-ip"
persistence_timeout_s = 300
table_size = 65537

[[service.real_server]]
label = "Wowza Srv 1"
ip = "198.18.0.11"
weight = 100
min_connections = 0
max_connections = 0
mac = "02:00:00:00:00:11"
"#;

const MINIMAL: &str = r#"
[engine]
interface = "eth0"
queues = [0]

[[service]]
label = "web"
vip = "198.18.0.100"
ports = 8088

[[service.real_server]]
label = "a"
ip = "198.18.0.11"

[[service.real_server]]
label = "b"
ip = "198.18.0.12"
"#;

fn error_of(text: &str) -> String {
    match Config::from_toml_str(text) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(error) => error.to_string(),
    }
}

fn assert_rejected(text: &str, field: &str, reason: &str) {
    let error = error_of(text);
    assert!(
        error.contains(field),
        "error {error:?} should name {field:?}"
    );
    assert!(
        error.contains(reason),
        "error {error:?} should say {reason:?}"
    );
}

#[test]
fn the_documented_example_parses_exactly() {
    let config = Config::from_toml_str(EXAMPLE).expect("valid");
    assert_eq!(
        config,
        Config {
            engine: Engine {
                interface: "eth0".into(),
                queues: vec![0],
                cores: vec![1],
                xdp_mode: XdpMode::Auto,
                polling: Polling::Adaptive,
                control_socket: "/run/lbd/lbd.sock".into(),
                hash_seed: DEFAULT_HASH_SEED,
                frame_size: 4096,
                frame_count: 16384,
                ring_size: 4096,
                batch_size: 64,
                tx_skb_budget: 64,
                gratuitous_arp_count: 3,
                control_group: None,
                flow_table_size: 262_144,
                persistence_table_size: 65_536,
                dr_check_interval_ms: 10_000,
                http_listen: None,
                http_actions: false,
                http_token_file: None,
                log_format: LogFormat::Text,
            },
            ha: None,
            services: vec![Arc::new(Service {
                label: "Wowza Streaming".into(),
                vip: Ipv4Addr::new(198, 18, 0, 100).into(),
                vip6: None,
                persistence_prefix_v6: 128,
                ports: "1935".parse().expect("port"),
                protocol: Protocol::Tcp,
                mode: ServiceMode::Dr,
                layer7_protocol: None,
                persistence: Persistence::SourceIp,
                persistence_timeout_s: 300,
                table_size: 65537,
                health_check: HealthCheck::default(),
                fallback: None,
                real_servers: vec![RealServer {
                    label: "Wowza Srv 1".into(),
                    ip: Ipv4Addr::new(198, 18, 0, 11).into(),
                    port: None,
                    weight: 100,
                    min_connections: 0,
                    max_connections: 0,
                    mac: Some(MacAddr([2, 0, 0, 0, 0, 0x11])),
                    health_check: None,
                }],
            })],
        }
    );
}

#[test]
fn defaults_fill_what_is_left_out() {
    let config = Config::from_toml_str(MINIMAL).expect("valid");
    let service = &config.services[0];
    assert_eq!(service.protocol, Protocol::Tcp);
    assert_eq!(service.persistence, Persistence::SourceIp);
    assert_eq!(service.table_size, 65537);
    assert_eq!(service.persistence_timeout_s, 300);
    assert_eq!(service.real_servers[0].weight, 100);
    assert_eq!(service.real_servers[0].mac, None);
    assert_eq!(config.engine.xdp_mode, XdpMode::Auto);
    assert_eq!(config.engine.polling, Polling::Adaptive);
    assert!(config.engine.cores.is_empty());
    let busy =
        Config::from_toml_str(&MINIMAL.replace("queues = [0]", "queues = [0]\npolling = \"busy\""))
            .expect("busy polling is accepted");
    assert_eq!(busy.engine.polling, Polling::Busy);
}

#[test]
fn no_services_is_a_valid_empty_balancer() {
    let config =
        Config::from_toml_str("[engine]\ninterface = \"eth0\"\nqueues = [0, 1]\n").expect("valid");
    assert!(config.services.is_empty());
}

#[test]
fn unknown_keys_are_rejected_at_every_level() {
    assert_rejected(
        &format!("{MINIMAL}\n[extra]\n"),
        "extra: unknown field `extra`",
        "",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0]\nqueue = 1"),
        "engine.queue: unknown field `queue`",
        "",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 8088\nport = 1"),
        "service[0] \"web\".port: unknown field `port`",
        "",
    );
    assert_rejected(
        &MINIMAL.replace("ip = \"198.18.0.12\"", "ip = \"198.18.0.12\"\nweigth = 5"),
        "service[0] \"web\".real_server[1].weigth: unknown field `weigth`",
        "",
    );
}

#[test]
fn type_errors_name_the_field() {
    assert_rejected(
        &MINIMAL.replace("198.18.0.12", "198.18.0"),
        "service[0] \"web\".real_server[1].ip",
        "invalid",
    );
    assert_rejected(
        &MINIMAL.replace("198.18.0.100", "not-an-ip"),
        "service[0] \"web\".vip",
        "invalid",
    );
    assert_rejected(
        &MINIMAL.replace(
            "ip = \"198.18.0.11\"",
            "ip = \"198.18.0.11\"\nweight = 70000",
        ),
        "service[0] \"web\".real_server[0].weight",
        "70000",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 70000"),
        "service[0] \"web\".ports",
        "70000",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 8088\nprotocol = \"sctp\""),
        "service[0] \"web\".protocol",
        "sctp",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 8088\npersistence = \"cookie\""),
        "service[0] \"web\".persistence",
        "cookie",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0]\nxdp_mode = \"fast\""),
        "engine.xdp_mode",
        "fast",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0]\npolling = \"spin\""),
        "engine.polling",
        "spin",
    );
    assert_rejected(
        &MINIMAL.replace(
            "ip = \"198.18.0.11\"",
            "ip = \"198.18.0.11\"\nmac = \"02:00:00:00:11\"",
        ),
        "service[0] \"web\".real_server[0].mac",
        "invalid MAC",
    );
    assert_rejected("[engine\n", "(file)", "");
}

#[test]
fn semantic_errors_name_the_field() {
    let web = "service[0] \"web\"";
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 8088\ntable_size = 65536"),
        &format!("{web}.table_size"),
        "prime",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 8088\ntable_size = 2"),
        &format!("{web}.table_size"),
        "prime",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 8088\ntable_size = 16777259"),
        &format!("{web}.table_size"),
        "prime",
    );
    let three =
        format!("{MINIMAL}\n[[service.real_server]]\nlabel = \"c\"\nip = \"198.18.0.13\"\n");
    assert_rejected(
        &three.replace("ports = 8088", "ports = 8088\ntable_size = 3"),
        &format!("{web}.table_size"),
        "larger",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = \"\""),
        "service[0] \"web\".ports",
        "empty",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = \"9010-9000\""),
        "service[0] \"web\".ports",
        "start is above end",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 0"),
        "service[0] \"web\".ports",
        "not a port",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = \"80,x\""),
        "service[0] \"web\".ports",
        "\"x\" is not a port",
    );
    assert_rejected(
        &MINIMAL.replace("198.18.0.100", "224.0.0.1"),
        &format!("{web}.vip"),
        "multicast",
    );
    assert_rejected(
        &MINIMAL.replace("198.18.0.100", "0.0.0.0"),
        &format!("{web}.vip"),
        "unspecified",
    );
    assert_rejected(
        &MINIMAL.replace("198.18.0.12", "127.0.0.1"),
        &format!("{web}.real_server[1].ip"),
        "loopback",
    );
    assert_rejected(
        &MINIMAL.replace("198.18.0.12", "198.18.0.100"),
        &format!("{web}.real_server[1].ip"),
        "VIP",
    );
    assert_rejected(
        &MINIMAL.replace("198.18.0.12", "198.18.0.11"),
        &format!("{web}.real_server[1].ip"),
        "already",
    );
    assert_rejected(
        &MINIMAL.replace("label = \"b\"", "label = \"a\""),
        &format!("{web}.real_server[1].label"),
        "duplicate",
    );
    assert_rejected(
        &MINIMAL.replace("label = \"b\"", "label = \"\""),
        &format!("{web}.real_server[1].label"),
        "empty",
    );
    assert_rejected(
        &MINIMAL.replace("label = \"web\"", "label = \" \""),
        "service[0] \" \".label",
        "empty",
    );
    assert_rejected(
        &MINIMAL.replace(
            "ip = \"198.18.0.11\"",
            "ip = \"198.18.0.11\"\nmin_connections = 10\nmax_connections = 5",
        ),
        &format!("{web}.real_server[0].min_connections"),
        "above max_connections",
    );
    assert_rejected(
        &MINIMAL.replace(
            "ip = \"198.18.0.11\"",
            "ip = \"198.18.0.11\"\nmac = \"01:00:5e:00:00:01\"",
        ),
        &format!("{web}.real_server[0].mac"),
        "unicast",
    );
}

#[test]
fn engine_errors_name_the_field() {
    assert_rejected(
        &MINIMAL.replace("interface = \"eth0\"", "interface = \"\""),
        "engine.interface",
        "interface name",
    );
    assert_rejected(
        &MINIMAL.replace(
            "interface = \"eth0\"",
            "interface = \"a-very-long-interface\"",
        ),
        "engine.interface",
        "1-15",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = []"),
        "engine.queues",
        "at least one",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0, 0]"),
        "engine.queues",
        "twice",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0, 1]\ncores = [1]"),
        "engine.cores",
        "one core per queue",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0]\nframe_size = 1000"),
        "engine.frame_size",
        "2048 or 4096",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0]\nring_size = 100"),
        "engine.ring_size",
        "power of two",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0]\nframe_count = 2048"),
        "engine.frame_count",
        "twice ring_size",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0]\nbatch_size = 0"),
        "engine.batch_size",
        "1..=ring_size",
    );
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0]\ngratuitous_arp_count = 11"),
        "engine.gratuitous_arp_count",
        "0..=10",
    );
}

#[test]
fn overlapping_services_are_rejected_naming_both() {
    let two = format!(
        "{MINIMAL}\n[[service]]\nlabel = \"other\"\nvip = \"198.18.0.100\"\nports = \"8000-8100\"\n"
    );
    assert_rejected(
        &two,
        "service[1] \"other\".ports",
        "198.18.0.100:8088/tcp is already served by service[0] \"web\"",
    );
    // Same port on another protocol, or on another VIP, is fine.
    Config::from_toml_str(&two.replace(
        "ports = \"8000-8100\"",
        "ports = \"8000-8100\"\nprotocol = \"udp\"",
    ))
    .expect("udp beside tcp");
    Config::from_toml_str(&two.replace(
        "vip = \"198.18.0.100\"\nports = \"8000",
        "vip = \"198.18.0.101\"\nports = \"8000",
    ))
    .expect("other vip");
    assert_rejected(
        &format!("{MINIMAL}\n[[service]]\nlabel = \"web\"\nvip = \"198.18.0.101\"\nports = 1\n"),
        "service[1] \"web\".label",
        "duplicate",
    );
}

/// Overlaps are found against every earlier service on the VIP, at the first shared port,
/// whichever range of either side it falls in.
#[test]
fn the_first_shared_port_is_named_with_its_service() {
    let services = |ports: &[&str]| {
        let mut text = String::from("[engine]\ninterface = \"eth0\"\nqueues = [0]\n");
        for (i, ports) in ports.iter().enumerate() {
            text += &format!(
                "[[service]]\nlabel = \"s{i}\"\nvip = \"198.18.0.100\"\nports = \"{ports}\"\n"
            );
        }
        text
    };
    // Neighbours that touch but do not overlap are fine.
    Config::from_toml_str(&services(&["1000-1010", "1011", "990-999,1012-2000", "80"]))
        .expect("disjoint");
    for (ports, port, owner) in [
        ("1005", 1005, "s0"),
        ("900-1000", 990, "s2"),
        ("1001-1002", 1001, "s0"),
        ("1011-1011", 1011, "s1"),
        ("2000-3000", 2000, "s2"),
        ("1-79,995", 995, "s2"),
        ("81-90,1500,1010", 1010, "s0"),
    ] {
        assert_rejected(
            &services(&["1000-1010", "1011", "990-999,1012-2000", ports]),
            "service[3] \"s3\".ports",
            &format!(
                "198.18.0.100:{port}/tcp is already served by service[{}] \"{owner}\"",
                &owner[1..]
            ),
        );
    }
}

#[test]
fn a_change_checks_what_it_changed_and_everything_against_everything() {
    let running = Config::from_toml_str(MINIMAL).expect("valid");
    // The edited service is checked on its own again.
    let mut edited = running.clone();
    Arc::make_mut(&mut edited.services[0]).table_size = 4;
    assert_eq!(
        field_of(edited.validate_after(Some(&running))),
        "service[0] \"web\".table_size"
    );
    // A service the change did not touch is still checked against the others.
    let mut added = running.clone();
    let mut twin = (*added.services[0]).clone();
    twin.ports = "8080".parse().expect("ports");
    added.services.insert(0, Arc::new(twin));
    assert_eq!(
        field_of(added.validate_after(Some(&running))),
        "service[1] \"web\".label"
    );
    // One shared with the running config (the same Arc) passed its own checks there and is
    // not checked on its own again; a copy of it is.
    let mut unchecked = running.clone();
    Arc::make_mut(&mut unchecked.services[0]).table_size = 4;
    let mut shared = unchecked.clone();
    shared.engine.hash_seed += 1;
    assert_eq!(shared.validate_after(Some(&unchecked)), Ok(()));
    shared.services[0] = Arc::new((*shared.services[0]).clone());
    assert_eq!(
        field_of(shared.validate_after(Some(&unchecked))),
        "service[0] \"web\".table_size"
    );
}

fn field_of(result: Result<(), ConfigError>) -> String {
    result.expect_err("rejected").field
}

#[test]
fn port_sets_parse_merge_and_print() {
    let parse = |s: &str| s.parse::<PortSet>().expect("valid");
    assert_eq!(parse("1935").to_string(), "1935");
    assert_eq!(parse("1935,8088").to_string(), "1935,8088");
    assert_eq!(parse("8088, 1935").to_string(), "1935,8088");
    assert_eq!(parse("9000-9010").len(), 11);
    assert_eq!(parse("80,79-81").to_string(), "79-81");
    assert_eq!(parse("1-3,4-6").to_string(), "1-6");
    assert!(parse("9000-9010").contains(9005));
    assert!(!parse("9000-9010").contains(9011));
    assert_eq!(parse("443,80").first(), 80);
    for bad in ["", "0", "1,,2", "a", "5-1", "1-", "65536", "-5"] {
        assert!(bad.parse::<PortSet>().is_err(), "{bad:?} accepted");
    }
}

#[test]
fn mac_addresses_parse_both_separators() {
    assert_eq!(
        "02:AB:00:00:00:11".parse::<MacAddr>(),
        Ok(MacAddr([2, 0xab, 0, 0, 0, 0x11]))
    );
    assert_eq!(
        "02-ab-00-00-00-11".parse::<MacAddr>(),
        Ok(MacAddr([2, 0xab, 0, 0, 0, 0x11]))
    );
    assert_eq!(
        MacAddr([2, 0xab, 0, 0, 0, 0x11]).to_string(),
        "02:ab:00:00:00:11"
    );
    assert!("02:ab:00:00:00".parse::<MacAddr>().is_err());
    assert!("02:ab:00:00:00:11:22".parse::<MacAddr>().is_err());
    assert!("2:ab:0:0:0:11".parse::<MacAddr>().is_err());
}

#[test]
fn serialized_config_reads_back_equal() {
    let text = format!(
        "{EXAMPLE}\n[[service]]\nlabel = \"Wowza GUI\"\nvip = \"198.18.0.100\"\nports = \"8088,9000-9010\"\n\
         persistence = \"none\"\nprotocol = \"udp\"\ntable_size = 251\n\n[[service.real_server]]\n\
         label = \"x\"\nip = \"198.18.0.20\"\nweight = 0\nmax_connections = 10\n"
    );
    let config = Config::from_toml_str(&text).expect("valid");
    let again = Config::from_toml_str(&config.to_toml_string()).expect("serialized form is valid");
    assert_eq!(config, again);
}

proptest! {
    #[test]
    fn port_set_display_round_trips(ranges in prop::collection::vec((1u16..=65535, 0u16..50), 1..20)) {
        let text: Vec<String> = ranges
            .iter()
            .map(|&(start, width)| {
                let end = start.saturating_add(width);
                if width == 0 { start.to_string() } else { format!("{start}-{end}") }
            })
            .collect();
        let set: PortSet = text.join(",").parse().expect("generated sets are valid");
        let again: PortSet = set.to_string().parse().expect("display is valid");
        prop_assert_eq!(&set, &again);
        for &(start, width) in &ranges {
            prop_assert!(set.contains(start) && set.contains(start.saturating_add(width)));
        }
    }
}

#[test]
fn type_errors_name_the_service_by_label() {
    // The brief's own example, word for word.
    let text = format!(
        "{MINIMAL}\n[[service]]\nlabel = \"Wowza GUI\"\nvip = \"198.18.0.101\"\nports = 8088\n\n\
         [[service.real_server]]\nlabel = \"x\"\nip = \"1.2.3\"\n"
    );
    let error = error_of(&text);
    assert!(
        error.starts_with(
            "service[1] \"Wowza GUI\".real_server[0].ip: invalid IPv4 address \"1.2.3\""
        ),
        "{error}"
    );
    assert!(error.contains("(line "), "{error} should give the line");
    // A service without a label is still named by index.
    assert_rejected(
        &MINIMAL.replace("label = \"web\"\n", ""),
        "service[0]: missing field `label`",
        "",
    );
    assert_rejected(
        &MINIMAL.replace("ports = 8088", "ports = 1.5"),
        "service[0] \"web\".ports",
        "expected a port number",
    );
}

#[test]
fn every_non_unicast_address_is_rejected_for_vips_and_servers() {
    for (ip, kind) in [
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("239.1.2.3", "multicast"),
        ("127.0.0.2", "loopback"),
        ("169.254.1.1", "link-local"),
    ] {
        assert_rejected(
            &MINIMAL.replace("198.18.0.100", ip),
            "service[0] \"web\".vip",
            kind,
        );
        assert_rejected(
            &MINIMAL.replace("198.18.0.11", ip),
            "service[0] \"web\".real_server[0].ip",
            kind,
        );
    }
}

#[test]
fn the_all_zero_mac_is_rejected() {
    assert_rejected(
        &MINIMAL.replace(
            "ip = \"198.18.0.11\"",
            "ip = \"198.18.0.11\"\nmac = \"00:00:00:00:00:00\"",
        ),
        "service[0] \"web\".real_server[0].mac",
        "unicast",
    );
}

#[test]
fn ring_and_frame_bounds_are_enforced() {
    let engine = |extra: &str| MINIMAL.replace("queues = [0]", &format!("queues = [0]\n{extra}"));
    for (extra, field) in [
        ("ring_size = 32", "engine.ring_size"),
        ("ring_size = 32768\nframe_count = 65536", "engine.ring_size"),
        ("frame_count = 6000", "engine.frame_count"),
        ("batch_size = 4097", "engine.batch_size"),
        ("tx_skb_budget = 31", "engine.tx_skb_budget"),
        ("tx_skb_budget = 8192", "engine.tx_skb_budget"),
        ("interface = \"eth 0\"", "engine.interface"),
        ("interface = \"eth0:1\"", "engine.interface"),
        ("interface = \"..\"", "engine.interface"),
    ] {
        let text = if let Some(name) = extra.strip_prefix("interface = ") {
            MINIMAL.replace("\"eth0\"", name)
        } else {
            engine(extra)
        };
        assert_rejected(&text, field, "");
    }
    // The edges themselves are fine.
    let config = Config::from_toml_str(&engine(
        "ring_size = 64\nframe_count = 128\nbatch_size = 64\ntx_skb_budget = 64",
    ))
    .expect("smallest rings");
    assert_eq!(config.engine.ring_size, 64);
    Config::from_toml_str(&engine(
        "ring_size = 16384\nframe_count = 32768\nbatch_size = 1\nframe_size = 2048\n\
         tx_skb_budget = 32\n\
         gratuitous_arp_count = 0\nhash_seed = 7",
    ))
    .expect("largest rings");
}

#[test]
fn signs_are_not_digits() {
    for bad in ["+80", "80,+81", "1-+5"] {
        assert!(bad.parse::<PortSet>().is_err(), "{bad:?} accepted");
    }
    assert!("+2:00:00:00:00:11".parse::<MacAddr>().is_err());
    assert!("02:00:00:00:00:1g".parse::<MacAddr>().is_err());
    assert!("02:00-00:00:00:11".parse::<MacAddr>().is_err());
}

#[test]
fn table_sizes_are_prime_within_bounds() {
    let naive = |n: u32| n >= 2 && (2..n).all(|d| !n.is_multiple_of(d));
    for n in 0..2000 {
        assert_eq!(is_prime(n), naive(n), "{n}");
    }
    assert!(is_prime(65537));
    assert!(is_prime(MAX_TABLE_SIZE));
    assert!(!is_prime(u32::MAX));
    let config = Config::from_toml_str(&MINIMAL.replace(
        "ports = 8088",
        &format!("ports = 8088\ntable_size = {MAX_TABLE_SIZE}"),
    ))
    .expect("the largest table is accepted");
    assert_eq!(config.services[0].table_size, MAX_TABLE_SIZE);
}

#[test]
fn load_reads_a_file_and_names_it_when_it_cannot() {
    let path = std::env::temp_dir().join(format!("lbd-config-test-{}.toml", std::process::id()));
    std::fs::write(&path, MINIMAL).expect("write temp file");
    let loaded = Config::load(&path);
    std::fs::remove_file(&path).expect("remove temp file");
    assert_eq!(
        loaded.expect("valid"),
        Config::from_toml_str(MINIMAL).expect("valid")
    );
    let missing = std::path::Path::new("/nonexistent/lbd.toml");
    let error = Config::load(missing).expect_err("no such file").to_string();
    assert!(error.contains("/nonexistent/lbd.toml"), "{error}");
}

#[test]
fn several_services_round_trip_through_toml() {
    let text = format!(
        "{EXAMPLE}\
         \n[[service]]\nlabel = \"Wowza GUI\"\nvip = \"198.18.0.100\"\nports = \"8088,9000-9010,80,79-81\"\n\
         \n[[service.real_server]]\nlabel = \"g1\"\nip = \"198.18.0.21\"\nmac = \"02-AA-BB-CC-DD-EE\"\n\
         \n[[service.real_server]]\nlabel = \"g2\"\nip = \"198.18.0.22\"\nweight = 65535\nmin_connections = 5\nmax_connections = 50\n\
         \n[[service]]\nlabel = \"dns\"\nvip = \"198.18.0.53\"\nports = 53\nprotocol = \"udp\"\npersistence = \"none\"\n\
         persistence_timeout_s = 0\ntable_size = 7\n\
         \n[[service]]\nlabel = \"empty\"\nvip = \"198.18.0.54\"\nports = \"1-65535\"\n"
    );
    let config = Config::from_toml_str(&text).expect("valid");
    assert_eq!(config.services.len(), 4);
    assert_eq!(config.services[1].ports.to_string(), "79-81,8088,9000-9010");
    let written = config.to_toml_string();
    assert_eq!(
        Config::from_toml_str(&written).expect("serialized form is valid"),
        config,
        "{written}"
    );
    // An empty balancer round-trips too.
    let empty =
        Config::from_toml_str("[engine]\ninterface = \"eth0\"\nqueues = [3]\n").expect("valid");
    assert_eq!(
        Config::from_toml_str(&empty.to_toml_string()).expect("valid"),
        empty
    );
}

#[test]
fn protocols_know_their_numbers_and_names() {
    assert_eq!(Protocol::Tcp.ip_protocol_number(), 6);
    assert_eq!(Protocol::Udp.ip_protocol_number(), 17);
    assert_eq!(Protocol::Tcp.to_string(), "tcp");
    assert_eq!(Protocol::Udp.to_string(), "udp");
    // The words the file uses are the words the command line takes.
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        assert_eq!(protocol.to_string().parse(), Ok(protocol));
    }
    assert_eq!("source-ip".parse(), Ok(Persistence::SourceIp));
    assert_eq!("none".parse(), Ok(Persistence::None));
    assert!("sctp".parse::<Protocol>().is_err());
    assert!("source".parse::<Persistence>().is_err());
}

#[test]
fn health_checks_parse_with_defaults_and_overrides() {
    let text = format!(
        "{MINIMAL}\n[service.health_check]\nkind = \"http\"\npath = \"/health\"\nexpect_body = \"ok\"\n"
    )
    .replace(
        "ip = \"198.18.0.12\"\n",
        "ip = \"198.18.0.12\"\n[service.real_server.health_check]\nkind = \"external\"\ncommand = \"true\"\n",
    );
    let config = Config::from_toml_str(&text).expect("valid");
    let service = &config.services[0];
    assert_eq!(service.health_check.kind, HealthKind::Http);
    assert_eq!(service.health_check.interval_ms, 1000);
    assert_eq!(service.health_check.fall, 2);
    let own = service.real_servers[1]
        .health_check
        .as_ref()
        .expect("override");
    assert_eq!(own.kind, HealthKind::External);
    assert_eq!(Config::from_toml_str(&config.to_toml_string()), Ok(config));
    // A dead server is found within 3 s with the defaults.
    let d = HealthCheck::default();
    assert!(d.fall * d.interval_ms + d.timeout_ms <= 3000);
}

#[test]
fn health_check_errors_name_the_field() {
    let with = |extra: &str| format!("{MINIMAL}\n[service.health_check]\n{extra}\n");
    assert_rejected(
        &with("kind = \"external\""),
        "service[0] \"web\".health_check.command",
        "needs a command",
    );
    assert_rejected(
        &with("interval_ms = 10"),
        "health_check.interval_ms",
        "100..=3600000",
    );
    assert_rejected(
        &with("timeout_ms = 5000"),
        "health_check.timeout_ms",
        "at most interval_ms",
    );
    assert_rejected(&with("rise = 0"), "health_check.rise", "1..=100");
    assert_rejected(
        &with("kind = \"http\"\npath = \"health\""),
        "health_check.path",
        "start with /",
    );
    assert_rejected(&with("kind = \"icmp\""), "health_check.kind", "icmp");
}

#[test]
fn fallback_must_be_a_unicast_address_other_than_the_vip() {
    let with = |ip: &str| {
        MINIMAL.replace(
            "ports = 8088",
            &format!("ports = 8088\nfallback = \"{ip}\""),
        )
    };
    assert_eq!(
        Config::from_toml_str(&with("198.18.0.50"))
            .expect("valid")
            .services[0]
            .fallback,
        Some(Ipv4Addr::new(198, 18, 0, 50).into())
    );
    assert_rejected(&with("198.18.0.100"), "service[0] \"web\".fallback", "VIP");
    assert_rejected(
        &with("224.0.0.9"),
        "service[0] \"web\".fallback",
        "multicast",
    );
}

#[test]
fn http_check_text_cannot_write_its_own_request() {
    let with =
        |extra: &str| format!("{MINIMAL}\n[service.health_check]\nkind = \"http\"\n{extra}\n");
    assert_rejected(
        &with("path = \"/health\\r\\nX-Injected: 1\""),
        "service[0] \"web\".health_check.path",
        "no spaces or control characters",
    );
    assert_rejected(
        &with("path = \"/a b\""),
        "health_check.path",
        "no spaces or control characters",
    );
    assert_rejected(
        &with("host = \"example.com\\r\\n\\r\\nGET /x HTTP/1.0\""),
        "service[0] \"web\".health_check.host",
        "not a host name",
    );
    assert_rejected(&with("host = \"\""), "health_check.host", "not a host name");
    let good = Config::from_toml_str(&with("path = \"/health?full=1\"\nhost = \"wowza.example\""))
        .expect("valid");
    assert_eq!(good.services[0].health_check.path, "/health?full=1");
}

/// `count` services on distinct VIPs (198.18.x.y), one real server each.
fn services_on_distinct_vips(count: usize) -> String {
    let mut text = String::from("[engine]\ninterface = \"eth0\"\nqueues = [0]\n");
    for i in 0..count {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + i as u32);
        text += &format!(
            "[[service]]\nlabel = \"s{i}\"\nvip = \"{vip}\"\nports = 80\ntable_size = 3\n\
             [[service.real_server]]\nlabel = \"a\"\nip = \"198.18.0.11\"\n"
        );
    }
    text
}

#[test]
fn every_limit_of_the_packet_path_is_checked_with_the_config() {
    // The XDP VIP map holds MAX_VIPS entries: one more is refused at the service that adds it.
    let config = Config::from_toml_str(&services_on_distinct_vips(MAX_VIPS)).expect("at the limit");
    assert_eq!(config.services.len(), MAX_VIPS);
    assert_rejected(
        &services_on_distinct_vips(MAX_VIPS + 5),
        "service[4096] \"s4096\".vip",
        "at most 4096 distinct VIPs",
    );
    // Services that share a VIP do not count twice.
    let mut shared = services_on_distinct_vips(MAX_VIPS);
    shared += "[[service]]\nlabel = \"extra\"\nvip = \"198.19.0.1\"\nports = 81\ntable_size = 3\n";
    assert!(Config::from_toml_str(&shared).is_ok());
    // The socket map holds MAX_QUEUES queues.
    assert_rejected(
        &MINIMAL.replace("queues = [0]", "queues = [0, 256]"),
        "engine.queues",
        "queue 256 is above 255",
    );
    assert!(Config::from_toml_str(&MINIMAL.replace("queues = [0]", "queues = [255]")).is_ok());
}

const HA: &str = r#"
[ha]
role = "primary"
local_address = "198.18.0.2"
peer_address = "198.18.0.3"
key_file = "/etc/lbd/ha.key"
"#;

#[test]
fn an_ha_pair_parses_with_defaults_and_a_list_of_peers() {
    let config = Config::from_toml_str(&format!("{MINIMAL}{HA}")).expect("valid");
    let ha = config.ha.expect("[ha]");
    assert_eq!(ha.role, HaRole::Primary);
    assert_eq!(ha.mode, HaMode::Heartbeat);
    assert_eq!(ha.peer_address.0, [Ipv4Addr::new(198, 18, 0, 3)]);
    assert_eq!((ha.heartbeat_port, ha.sync_port), (6694, 8848));
    assert_eq!((ha.interval_ms, ha.dead_interval_ms), (100, 500));
    assert!(!ha.preempt);
    let two = HA.replace(
        "peer_address = \"198.18.0.3\"",
        "peer_address = [\"198.18.0.3\", \"198.19.0.3\"]\nmode = \"external\"\nrole = \"secondary\"",
    )
    .replace("role = \"primary\"\n", "");
    let config = Config::from_toml_str(&format!("{MINIMAL}{two}")).expect("valid");
    let ha = config.ha.clone().expect("[ha]");
    assert_eq!(ha.peer_address.0.len(), 2);
    assert_eq!((ha.role, ha.mode), (HaRole::Secondary, HaMode::External));
    // Written back, read back the same.
    assert_eq!(
        Config::from_toml_str(&config.to_toml_string()).expect("round trip"),
        config
    );
    assert!(Config::from_toml_str(MINIMAL).expect("valid").ha.is_none());
}

#[test]
fn ha_errors_name_the_field() {
    let with = |from: &str, to: &str| format!("{MINIMAL}{}", HA.replace(from, to));
    assert_rejected(
        &with("198.18.0.3", "198.18.0.2"),
        "ha.peer_address",
        "this node's own local_address",
    );
    assert_rejected(
        &with("198.18.0.3", "198.18.0"),
        "ha.peer_address",
        "198.18.0",
    );
    assert_rejected(
        &with("key_file", "interval_ms = 200\nkey_file"),
        "ha.dead_interval_ms",
        "at least 3 x interval_ms (600)",
    );
    assert_rejected(
        &with("role = \"primary\"", "role = \"leader\""),
        "ha.role",
        "leader",
    );
    assert_rejected(
        &with("key_file", "sync_port = 6694\nkey_file"),
        "ha.sync_port",
        "must differ from heartbeat_port",
    );
    assert_rejected(
        &with("key_file", "colour = 1\nkey_file"),
        "ha",
        "unknown field `colour`",
    );
    // A real server at the peer's address would take its traffic.
    let rs_at_peer = format!("{}{HA}", MINIMAL.replace("198.18.0.12", "198.18.0.3"));
    assert_rejected(
        &rs_at_peer,
        "service[0] \"web\".real_server[1].ip",
        "an address of a node of the HA pair",
    );
}

const SNAT: &str = r#"
[engine]
interface = "eth0"
queues = [0]

[[service]]
label = "Wowza GUI"
vip = "198.18.0.101"
ports = 8088
mode = "snat"
layer7_protocol = "http"

[[service.real_server]]
label = "Wowza Srv 1"
ip = "10.1.0.11"
port = 8080
"#;

#[test]
fn a_snat_service_round_trips_with_its_keys() {
    let config = Config::from_toml_str(SNAT).expect("valid");
    let service = &config.services[0];
    assert_eq!(service.mode, ServiceMode::Snat);
    assert_eq!(service.layer7_protocol, Some(Layer7Protocol::Http));
    assert_eq!(service.real_servers[0].port, Some(8080));
    let saved = config.to_toml_string();
    assert_eq!(Config::from_toml_str(&saved).expect("saved"), config);
    // A DR file saves as it was written: no mode, no layer 7 keys.
    let dr = Config::from_toml_str(MINIMAL)
        .expect("valid")
        .to_toml_string();
    assert!(
        !dr.contains("\nmode =") && !dr.contains("layer7") && !dr.contains("\nport ="),
        "{dr}"
    );
}

#[test]
fn each_mode_refuses_what_belongs_to_the_other_and_names_the_field() {
    let refused = |text: &str| {
        Config::from_toml_str(text)
            .expect_err("refused")
            .to_string()
    };
    let error =
        refused(&MINIMAL.replace("ip = \"198.18.0.11\"", "ip = \"198.18.0.11\"\nport = 8080"));
    assert!(
        error.starts_with(
            "service[0] \"web\".real_server[0].port: port translation needs mode = \"snat\""
        ),
        "{error}"
    );
    let error =
        refused(&MINIMAL.replace("ports = 8088", "ports = 8088\nlayer7_protocol = \"tcp\""));
    assert!(
        error.starts_with("service[0] \"web\".layer7_protocol"),
        "{error}"
    );
    let error = refused(&SNAT.replace("ports = 8088", "ports = 8088\nprotocol = \"udp\""));
    assert!(
        error.starts_with("service[0] \"Wowza GUI\".protocol"),
        "{error}"
    );
    let error = refused(&format!(
        "{SNAT}\n[service.health_check]\nkind = \"external\"\ncommand = \"true\"\n"
    ));
    assert!(
        error.starts_with("service[0] \"Wowza GUI\".health_check.kind"),
        "{error}"
    );
    // A DR service and a SNAT service on one VIP: the error names both.
    let mixed = format!(
        "{SNAT}\n[[service]]\nlabel = \"Wowza Streaming\"\nvip = \"198.18.0.101\"\nports = 1935\n"
    );
    let error = refused(&mixed);
    assert!(
        error.starts_with("service[1] \"Wowza Streaming\".mode: 198.18.0.101 is the VIP of service[0] \"Wowza GUI\" in mode snat"),
        "{error}"
    );
    // On their own VIPs they live side by side.
    Config::from_toml_str(&mixed.replace(
        "vip = \"198.18.0.101\"\nports = 1935",
        "vip = \"198.18.0.100\"\nports = 1935",
    ))
    .expect("a DR VIP and a SNAT VIP");
}

#[test]
fn an_expected_body_has_no_line_breaks() {
    // It is written into HAProxy's configuration for a SNAT service.
    let text = format!(
        "{SNAT}\n[service.health_check]\nkind = \"http\"\nexpect_body = \"ok\\n    external-check command /bin/sh\"\n"
    );
    let error = Config::from_toml_str(&text)
        .expect_err("refused")
        .to_string();
    assert!(
        error.starts_with("service[0] \"Wowza GUI\".health_check.expect_body"),
        "{error}"
    );
}

#[test]
fn ipv6_vips_and_real_servers_are_checked_like_ipv4_ones() {
    let v6 = MINIMAL
        .replace("vip = \"198.18.0.100\"", "vip = \"2001:2::100\"")
        .replace("ip = \"198.18.0.11\"", "ip = \"2001:2::11\"");
    let config = Config::from_toml_str(&v6).expect("an IPv6 service is valid");
    assert_eq!(
        config.services[0].vip,
        "2001:2::100".parse::<IpAddr>().expect("address")
    );
    assert_eq!(config.services[0].persistence_prefix_v6, 128);
    assert_eq!(config.services[0].client_mask_v6(), u128::MAX);
    // Both families on one service; the prefix keeps a /64 together.
    let both = MINIMAL.replace(
        "vip = \"198.18.0.100\"",
        "vip = \"198.18.0.100\"\nvip6 = \"2001:2::100\"\npersistence_prefix_v6 = 64",
    );
    let config = Config::from_toml_str(&both).expect("a dual-stack service is valid");
    assert_eq!(
        config.services[0].vips().collect::<Vec<_>>(),
        [
            "198.18.0.100".parse::<IpAddr>().expect("address"),
            "2001:2::100".parse().expect("address")
        ]
    );
    assert_eq!(config.services[0].client_mask_v6(), u128::MAX << 64);
    // Round trip.
    assert_eq!(
        Config::from_toml_str(&config.to_toml_string()).expect("reads back"),
        config
    );

    let service = "service[0] \"web\"";
    assert_rejected(
        &MINIMAL.replace("\"198.18.0.100\"", "\"2001:2::1::2\""),
        &format!("{service}.vip"),
        "invalid IPv6 address \"2001:2::1::2\"",
    );
    assert_rejected(
        &v6.replace(
            "vip = \"2001:2::100\"",
            "vip = \"2001:2::100\"\nvip6 = \"2001:2::101\"",
        ),
        &format!("{service}.vip6"),
        "this one is IPv6 already",
    );
    assert_rejected(
        &MINIMAL.replace("\"198.18.0.100\"", "\"fe80::1\""),
        &format!("{service}.vip"),
        "fe80::1 is a link-local address",
    );
    assert_rejected(
        &MINIMAL.replace("\"198.18.0.100\"", "\"::ffff:198.18.0.100\""),
        &format!("{service}.vip"),
        "IPv4-mapped",
    );
    for prefix in [0, 129] {
        assert_rejected(
            &both.replace(
                "persistence_prefix_v6 = 64",
                &format!("persistence_prefix_v6 = {prefix}"),
            ),
            &format!("{service}.persistence_prefix_v6"),
            "prefix length in 1..=128",
        );
    }
    // The second VIP counts when services share a VIP:port.
    let clash =
        format!("{both}\n[[service]]\nlabel = \"other\"\nvip = \"2001:2::100\"\nports = 8088\n");
    assert_rejected(
        &clash,
        "service[1] \"other\".ports",
        "[2001:2::100]:8088/tcp is already served by service[0]",
    );
    // Layer 7 is IPv4 only so far.
    let snat = both.replace(
        "ports = 8088",
        "ports = 8088\nmode = \"snat\"\nlayer7_protocol = \"http\"",
    );
    assert_rejected(&snat, &format!("{service}.vip6"), "IPv4 VIP only");
}

#[test]
fn the_status_pages_actions_need_the_listener_and_a_token() {
    let with = |engine_lines: &str| {
        MINIMAL.replacen(
            "queues = [0]\n",
            &format!("queues = [0]\n{engine_lines}"),
            1,
        )
    };
    assert_rejected(
        &with("http_actions = true\nhttp_token_file = \"/etc/lbd/token\"\n"),
        "engine.http_actions",
        "needs engine.http_listen",
    );
    assert_rejected(
        &with("http_listen = \"127.0.0.1:9180\"\nhttp_actions = true\n"),
        "engine.http_token_file",
        "required with http_actions",
    );
    assert_rejected(
        &with("http_listen = \"127.0.0.1\"\n"),
        "engine.http_listen",
        "",
    );
    assert_rejected(&with("log_format = \"xml\"\n"), "engine.log_format", "");
    let config = Config::from_toml_str(&with(
        "http_listen = \"127.0.0.1:9180\"\nhttp_actions = true\nhttp_token_file = \"/etc/lbd/token\"\nlog_format = \"json\"\n",
    ))
    .expect("valid");
    assert_eq!(config.engine.log_format, LogFormat::Json);
    assert_eq!(
        Config::from_toml_str(&config.to_toml_string()).expect("reads back"),
        config
    );
}

mod small_changes {
    //! A change checked by what it touched gives what the whole check gives.
    use super::*;

    #[derive(Debug, Clone)]
    struct Spec {
        label: u8,
        vip: u8,
        ports: (u16, u16),
        udp: bool,
        snat: bool,
        vip6: bool,
        table_size: u32,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            0..5u8,
            0..3u8,
            (1..30u16, 0..6u16),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_flat_map(|(label, vip, (start, len), udp, snat)| {
                (
                    Just((label, vip, (start, start + len), udp, snat)),
                    any::<bool>(),
                    0..8u8,
                )
            })
            .prop_map(|((label, vip, ports, udp, snat), vip6, size)| Spec {
                label,
                vip,
                ports,
                udp,
                snat,
                vip6: vip6 && size == 0,
                // Now and then a size that is no prime.
                table_size: if size == 1 { 250 } else { 251 },
            })
    }

    fn text(spec: &Spec) -> String {
        let mut text = format!(
            "[[service]]\nlabel = \"s{}\"\nvip = \"198.18.0.{}\"\nports = \"{}-{}\"\n\
             protocol = \"{}\"\nmode = \"{}\"\ntable_size = {}\n",
            spec.label,
            100 + spec.vip,
            spec.ports.0,
            spec.ports.1,
            if spec.udp { "udp" } else { "tcp" },
            if spec.snat { "snat" } else { "dr" },
            spec.table_size,
        );
        if spec.vip6 {
            text += &format!("vip6 = \"2001:db8::{}\"\n", spec.vip);
        }
        text + "[[service.real_server]]\nlabel = \"a\"\nip = \"198.18.0.11\"\n"
    }

    /// The config of `specs`, parsed without its checks.
    fn config(specs: &[Spec]) -> Config {
        let mut all = String::from("[engine]\ninterface = \"eth0\"\nqueues = [0]\n");
        for spec in specs {
            all += &text(spec);
        }
        toml::from_str(&all).expect("well-formed")
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Replace(usize, Spec),
        Add(Spec),
        Remove(usize),
        Seed,
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            3 => (0..6usize, spec()).prop_map(|(i, s)| Edit::Replace(i, s)),
            2 => spec().prop_map(Edit::Add),
            1 => (0..6usize).prop_map(Edit::Remove),
            1 => Just(Edit::Seed),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn a_small_change_is_judged_as_the_whole_config(
            specs in prop::collection::vec(spec(), 1..6),
            edits in prop::collection::vec(edit(), 1..4),
        ) {
            // The valid config the specs make, each kept if it fits with those before.
            let mut running = config(&[]);
            for spec in &specs {
                let mut with = running.clone();
                with.services.push(config(std::slice::from_ref(spec)).services.remove(0));
                if with.validate().is_ok() {
                    running = with;
                }
            }
            let mut changed = running.clone();
            for edit in edits {
                let len = changed.services.len();
                match edit {
                    Edit::Replace(i, spec) if len > 0 => {
                        let service = config(&[spec]).services.remove(0);
                        changed.services[i % len] = service;
                    }
                    Edit::Add(spec) => changed.services.push(config(&[spec]).services.remove(0)),
                    Edit::Remove(i) if len > 0 => {
                        changed.services.remove(i % len);
                    }
                    Edit::Seed => changed.engine.hash_seed += 1,
                    _ => {}
                }
            }
            prop_assert_eq!(changed.validate_after(Some(&running)), changed.validate());
        }
    }

    #[test]
    fn port_sets_overlap_where_they_share_a_port() {
        let set = |s: &str| s.parse::<PortSet>().expect("valid");
        for (a, b, overlap) in [
            ("1-10", "10-20", true),
            ("1-9", "10-20", false),
            ("1-3,7-9", "4-6", false),
            ("1-3,7-9", "4-7", true),
            ("5", "1-4,6-10", false),
            ("100,200,300", "300", true),
        ] {
            assert_eq!(set(a).overlaps(&set(b)), overlap, "{a} {b}");
            assert_eq!(set(b).overlaps(&set(a)), overlap, "{b} {a}");
        }
    }
}
