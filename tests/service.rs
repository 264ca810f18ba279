//! lbd installed and run as a service: the Debian package's files and unit
//! (`systemd-analyze verify`), READY=1 to systemd once the VIPs are steered, and SIGHUP
//! reloading the configuration file as `lbctl reload` does.

mod common;

use common::{LBD, Lab, Lbd, lab_allowed, lbctl_path, repo_root, run, status};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory under target/, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = repo_root().join("target").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

#[test]
fn the_package_holds_the_service_and_its_unit_verifies() {
    let binaries = Path::new(LBD).parent().expect("target dir");
    let out = scratch("package-test");
    let built = run(Command::new(repo_root().join("scripts/package"))
        .arg("--binaries")
        .arg(binaries)
        .arg("--out")
        .arg(&out));
    assert!(built.status.success(), "scripts/package: {built:?}");
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    let listing = run(Command::new("dpkg-deb").args(["-c", &deb]));
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for file in [
        "./usr/sbin/lbd",
        "./usr/bin/lbctl",
        "./etc/lbd/lbd.toml",
        "./lib/systemd/system/lbd.service",
        "./usr/share/man/man8/lbd.8.gz",
        "./usr/share/man/man1/lbctl.1.gz",
        "./usr/share/bash-completion/completions/lbctl",
        "./usr/share/zsh/vendor-completions/_lbctl",
        "./usr/share/fish/vendor_completions.d/lbctl.fish",
    ] {
        assert!(
            listing.contains(file),
            "{file} missing from the package:\n{listing}"
        );
    }
    let info = run(Command::new("dpkg-deb").args(["-I", &deb]));
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(
        info.contains("conffiles") && info.contains("postinst"),
        "{info}"
    );

    // Unpacked into a scratch root beside the host's own units, the unit verifies, and the
    // example configuration is valid.
    let root = scratch("package-root");
    let unpacked = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    assert!(unpacked.status.success(), "{unpacked:?}");
    let units = root.join("lib/systemd/system");
    for entry in std::fs::read_dir("/lib/systemd/system")
        .expect("the host's units")
        .flatten()
    {
        let target = units.join(entry.file_name());
        if !target.exists() && entry.path().is_file() {
            let _ = std::fs::copy(entry.path(), target);
        }
    }
    let verified = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg("lbd.service"));
    assert!(
        verified.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    let checked = run(Command::new(root.join("usr/sbin/lbd"))
        .args(["--check", "--config"])
        .arg(root.join("etc/lbd/lbd.toml")));
    assert!(checked.status.success(), "{checked:?}");
    // And the versions.
    for program in [LBD.into(), lbctl_path()] {
        let version = run(Command::new(program).arg("--version"));
        assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn lbd_tells_systemd_it_is_ready_and_sighup_reloads_the_file() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    // systemd's notification socket, played by the test.
    let dir = PathBuf::from(lab.fact("STATE_DIR"));
    let socket = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&socket).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let config_path = dir.join("lbd.toml");
    let one_server = lab.config(2).replacen(
        &format!(
            "\n[[service.real_server]]\nlabel = \"Wowza Srv 2\"\nip = \"{}\"\n",
            lab.fact("RS2_IP")
        ),
        "",
        1,
    );
    std::fs::write(&config_path, &one_server).expect("config");
    let log = dir.join("lbd-notify.log");
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", lab.fact("NS_LB"), "env"])
        .arg(format!("NOTIFY_SOCKET={}", socket.display()))
        .arg(LBD)
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start lbd");
    let mut message = [0u8; 256];
    let received = notify.recv(&mut message);
    let text = received.map(|n| String::from_utf8_lossy(&message[..n]).into_owned());
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.as_deref().is_ok_and(|t| t.contains("READY=1")),
        "no READY=1 after {:?}: {text:?}\n{log_text}",
        started.elapsed()
    );
    assert!(
        log_text.contains("lbd running"),
        "ready before running:\n{log_text}"
    );
    let _ = child.kill();
    let _ = child.wait();

    // SIGHUP: the file's new server is in force, as after `lbctl reload`.
    let lbd = Lbd::start(&lab, &one_server);
    assert_eq!(status(&lab).services[0].real_servers.len(), 1);
    std::fs::write(&config_path, lab.config(2)).expect("config");
    lbd.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&lab).services[0].real_servers.len() != 2 {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            lbd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lbd.log_text().contains("SIGHUP: configuration reloaded"));
}
