//! The control socket against users who are not root, in the namespace lab: a member of the
//! control group operates the balancer and gains nothing else (no command run, no file written
//! as root), nobody can lock root out, and lbd refuses what would cut it off or destroy a file.

mod common;

use common::{
    Lab, Lbd, VIP, as_unprivileged, lab_allowed, lbctl, lbctl_for_anyone, lbctl_ok, repo_root,
    start_error,
};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Debian's python3, which any user may run (the one on root's PATH may be root's own).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// lbd with "Wowza GUI" on real server 1 and the control group `nogroup` (gid 65534).
fn start_with_group(lab: &Lab) -> Lbd {
    let config = format!(
        "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\
         control_group = \"nogroup\"\n\n\
         [[service]]\nlabel = \"Wowza GUI\"\nvip = \"{VIP}\"\nports = 8088\n\n\
         [[service.real_server]]\nlabel = \"Wowza Srv 1\"\nip = \"{}\"\n",
        lab.socket().display(),
        lab.fact("RS1_IP")
    );
    Lbd::start(lab, &config)
}

/// `lbctl --socket <lab socket> ARGS` as a member of the control group (`in_group`) or as
/// nobody at all.
fn lbctl_as(lab: &Lab, in_group: bool, args: &[&str]) -> (i32, String, String) {
    let socket = lab.socket().to_string_lossy().into_owned();
    let mut all = vec!["--socket", socket.as_str()];
    all.extend_from_slice(args);
    as_unprivileged(in_group, &lbctl_for_anyone(lab), &all)
}

/// One raw request line to the control socket as a group member; the reply line.
fn raw_request_as_member(lab: &Lab, request: &str) -> String {
    let script = "import socket, sys\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  s.connect(sys.argv[1])\n\
                  s.sendall(sys.argv[2].encode() + b'\\n')\n\
                  print(s.makefile().readline())";
    let socket = lab.socket().to_string_lossy().into_owned();
    let (code, stdout, stderr) = as_unprivileged(
        true,
        Path::new(SYSTEM_PYTHON),
        &["-c", script, &socket, request],
    );
    assert_eq!(code, 0, "{stderr}");
    stdout
}

#[test]
fn a_control_group_member_operates_the_balancer_and_gains_nothing_else() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let _lbd = start_with_group(&lab);
    let socket = fs::metadata(lab.socket()).expect("socket");
    assert_eq!(socket.permissions().mode() & 0o777, 0o660);
    assert_eq!(
        socket.gid(),
        65534,
        "the socket belongs to the control group"
    );
    let gui = "Wowza GUI";
    let state = PathBuf::from(lab.fact("STATE_DIR"));
    // A root-only config file, which an operator's save must leave root-only.
    fs::set_permissions(state.join("lbd.toml"), fs::Permissions::from_mode(0o600)).expect("chmod");

    // What an operator does: a member by a supplementary group only (SO_PEERGROUPS).
    for args in [
        &["status"][..],
        &["stats"],
        &["drain", gui, "Wowza Srv 1"],
        &["online", gui, "Wowza Srv 1"],
        &["set-weight", gui, "Wowza Srv 1", "50"],
        &["add-rip", gui, "Wowza Srv 2", "--ip", lab.fact("RS2_IP")],
        &[
            "add-vip",
            "Streaming",
            "--vip",
            "198.18.0.101",
            "--ports",
            "1935",
        ],
        &["del-vip", "Streaming"],
        &["config", "save"],
        &["reload"],
    ] {
        let (code, stdout, stderr) = lbctl_as(&lab, true, args);
        assert_eq!(code, 0, "operator: lbctl {args:?}: {stderr}{stdout}");
    }
    // Nobody outside the group gets in at all.
    let (code, _, stderr) = lbctl_as(&lab, false, &["status"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("Permission denied"), "{stderr}");

    // No command runs as root: an external check is root's to set.
    let owned = state.join("owned");
    let reply = raw_request_as_member(
        &lab,
        &format!(
            r#"{{"version":1,"command":{{"name":"add-rip","service":"{gui}","real_server":{{"label":"X","ip":"198.18.0.13","health_check":{{"kind":"external","command":"id > {}"}}}}}}}}"#,
            owned.display()
        ),
    );
    assert!(
        reply.contains("permission denied: external health checks"),
        "{reply}"
    );
    // No file is written where the operator chooses.
    let elsewhere = state.join("elsewhere.toml");
    let (code, _, stderr) = lbctl_as(
        &lab,
        true,
        &["config", "save", elsewhere.to_str().expect("utf-8")],
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("only root may save the configuration elsewhere"),
        "{stderr}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!owned.exists(), "the external command ran");
    assert!(!elsewhere.exists(), "the operator wrote a file");
    // The started file, saved by the operator, kept its owner and mode.
    let saved = fs::metadata(state.join("lbd.toml")).expect("config");
    assert_eq!(
        (saved.uid(), saved.permissions().mode() & 0o777),
        (0, 0o600)
    );
    // Root may save elsewhere; a relative path is lbctl's directory's, not lbd's.
    let output = Command::new(common::lbctl_path())
        .current_dir(&state)
        .args(["--socket", lab.socket().to_str().expect("utf-8")])
        .args(["config", "save", "relative.toml"])
        .output()
        .expect("lbctl");
    assert!(output.status.success(), "{output:?}");
    assert!(state.join("relative.toml").exists());

    // Were the socket opened to everybody, lbd itself still turns a non-member away.
    fs::set_permissions(lab.socket(), fs::Permissions::from_mode(0o666)).expect("chmod");
    let (code, _, stderr) = lbctl_as(&lab, false, &["status"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("permission denied: uid 65534 is not root and not in the control group"),
        "{stderr}"
    );
}

#[test]
fn nobody_can_use_the_balancers_own_address_as_a_vip() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(1);
    let lbd = start_with_group(&lab);
    let own = lab.fact("LB_IP");
    let (code, _, stderr) = lbctl(&lab, &["add-vip", "Own", "--vip", own, "--ports", "80"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("{own} is an address of this host (eth0)")),
        "{stderr}"
    );
    // The health checks (whose replies come to that address) still see the server up.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(lbctl_ok(&lab, &["status"]).contains(" up "));
    drop(lbd);
    // Nor does lbd start with such a VIP.
    let stderr = start_error(
        &lab,
        "own-vip.toml",
        &format!(
            "[engine]\ninterface = \"eth0\"\nqueues = [0]\ncontrol_socket = \"{}\"\n\
             [[service]]\nlabel = \"Own\"\nvip = \"{own}\"\nports = 80\n",
            lab.socket().display()
        ),
    );
    assert!(
        stderr.contains("service[0] \"Own\".vip: 198.18.0.2 is an address of this host"),
        "{stderr}"
    );
}

#[test]
fn clients_that_never_read_their_replies_cannot_lock_root_out() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(1);
    let _lbd = start_with_group(&lab);
    let script = repo_root().join("tests/clients/nonreaders.py");
    let socket = lab.socket().to_string_lossy().into_owned();
    let hostile = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65533",
            "--groups=65534",
            SYSTEM_PYTHON,
        ])
        .arg(&script)
        .args(["--socket", &socket, "--clients", "32", "--hold", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hostile clients");
    std::thread::sleep(Duration::from_millis(2000));
    // Root gets in at once, the hostile user no more.
    lbctl_ok(&lab, &["status"]);
    let (code, _, stderr) = lbctl_as(&lab, true, &["status"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("too many control connections from this user"),
        "{stderr}"
    );
    let output = hostile.wait_with_output().expect("hostile clients end");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "hostile clients said: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(summary["admitted"], 8, "{summary}");
    assert_eq!(summary["refused"], 24, "{summary}");
    assert_eq!(
        summary["closed"], 8,
        "clients that do not read are dropped: {summary}"
    );
    // Their slots are free again.
    let (code, _, stderr) = lbctl_as(&lab, true, &["status"]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_control_socket_path_that_is_not_a_socket_is_left_alone() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(1);
    let path = lab.socket();
    fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    fs::write(&path, "precious").expect("write");
    let stderr = start_error(&lab, "lbd.toml", &lab.config(1));
    assert!(
        stderr.contains("exists and is not a socket; lbd removes only a socket"),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(&path).expect("still there"), "precious");
}
