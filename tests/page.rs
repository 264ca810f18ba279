//! The System Overview page in headless Chromium (Debian's `chromium`), driven through the
//! DevTools protocol (tests/clients/cdp.py): the rendered DOM shows every real server and its
//! state, follows a drain within 2 s without a reload, and its Halt button halts a server with
//! the token; without it the action is refused. A screenshot goes to target/ for a person.

mod common;

use common::{Lab, Lbd, lab_allowed, lbctl_ok, status};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

const LISTEN: &str = "127.0.0.1:9180";
const DEVTOOLS_PORT: &str = "9222";

/// Headless Chromium showing the page, in the balancer's namespace; stopped on drop.
struct Browser(Child);

impl Browser {
    fn open(lab: &Lab) -> Browser {
        let profile = std::path::Path::new(lab.fact("STATE_DIR")).join("chromium");
        let child = Command::new("ip")
            .args(["netns", "exec", lab.fact("NS_LB"), "chromium", "--headless"])
            .args(["--no-sandbox", "--disable-gpu", "--no-first-run"])
            .arg("--window-size=1400,600")
            .arg(format!("--remote-debugging-port={DEVTOOLS_PORT}"))
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("http://{LISTEN}/"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        Browser(child)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tests/clients/cdp.py` on the open page: its output, and whether it succeeded.
fn cdp(lab: &Lab, args: &[&str]) -> (bool, String) {
    let script = common::repo_root().join("tests/clients/cdp.py");
    let output = lab.exec(
        "NS_LB",
        &[
            &[
                "/usr/bin/python3",
                &script.to_string_lossy(),
                "--port",
                DEVTOOLS_PORT,
            ][..],
            args,
        ]
        .concat(),
    );
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The state badge of a real server's row, as the page shows it.
fn state_of(label: &str) -> String {
    format!("document.querySelector('tr[data-real-server=\"{label}\"] .state').textContent")
}

/// An action posted to the page's API with `token`: the HTTP status.
fn post_action(lab: &Lab, token: &str) -> String {
    let output = lab.exec(
        "NS_LB",
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-d",
            r#"{"service":"Wowza GUI","real_server":"Wowza Srv 1","action":"online"}"#,
            &format!("http://{LISTEN}/api/action"),
        ],
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_page_shows_every_server_follows_a_drain_and_halts_with_the_token() {
    if !lab_allowed() {
        return;
    }
    let lab = Lab::up(2);
    let token_file = std::path::Path::new(lab.fact("STATE_DIR")).join("page.token");
    let token = "page-token-0123456789abcdef";
    std::fs::write(&token_file, token).expect("token file");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config = lab.config(2).replacen(
        "[engine]\n",
        &format!(
            "[engine]\nhttp_listen = \"{LISTEN}\"\nhttp_actions = true\nhttp_token_file = \"{}\"\n",
            token_file.display()
        ),
        1,
    );
    let _lbd = Lbd::start(&lab, &config);
    let _browser = Browser::open(&lab);

    // The rendered page: every real server of both services, with its state.
    let rows = "document.querySelectorAll('tr.real-server').length == 4";
    let (ok, text) = cdp(&lab, &["wait", rows, "15"]);
    assert!(ok, "the page never showed the servers: {text}");
    let (_, shown) = cdp(
        &lab,
        &[
            "eval",
            "JSON.stringify([...document.querySelectorAll('tr.real-server')].map(r => \
             [r.dataset.service, r.dataset.realServer, r.querySelector('.state').textContent]))",
        ],
    );
    for service in ["Wowza GUI", "Wowza Streaming"] {
        for server in ["Wowza Srv 1", "Wowza Srv 2"] {
            assert!(
                shown.contains(&format!(r#"[\"{service}\",\"{server}\",\"up\"]"#)),
                "{service}/{server} up: {shown}"
            );
        }
    }

    // A drain made with lbctl shows within 2 s, without a reload.
    lbctl_ok(&lab, &["drain", "Wowza GUI", "Wowza Srv 1"]);
    let drained = format!("{} == 'drain'", state_of("Wowza Srv 1"));
    let (ok, text) = cdp(&lab, &["wait", &drained, "2"]);
    assert!(ok, "the page did not show the drain within 2 s: {text}");

    // Without the token (or with a wrong one) an action is refused, and changes nothing.
    assert_eq!(post_action(&lab, ""), "403");
    assert_eq!(post_action(&lab, "not-the-token-0123456789ab"), "403");
    assert_eq!(status(&lab).services[0].real_servers[0].state, "drain");

    // With the token, the page's Halt button halts the server.
    let click = format!(
        "document.getElementById('token').value = '{token}'; \
         document.querySelector('tr[data-real-server=\"Wowza Srv 2\"] button[data-action=\"halt\"]').click(); true"
    );
    let (ok, text) = cdp(&lab, &["eval", &click]);
    assert!(ok, "{text}");
    // The GUI service's row comes first.
    let halted = format!("{} == 'halt'", state_of("Wowza Srv 2"));
    let (ok, text) = cdp(&lab, &["wait", &halted, "3"]);
    assert!(ok, "the page did not show the halt: {text}");
    assert_eq!(status(&lab).services[0].real_servers[1].state, "halt");

    // A screenshot for a person to look at, from the open page: a second Chromium asked for
    // one with a virtual-time budget once took 300 s on a CI machine.
    let shot = common::repo_root().join("target/lbd-status-page.png");
    let (ok, text) = cdp(&lab, &["screenshot", &shot.to_string_lossy()]);
    assert!(ok, "screenshot: {text}");
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000));
}
