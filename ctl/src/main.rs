//! `lbctl`: the operator's command-line client for `lbd`. It sends one request over the
//! daemon's unix socket (the `lbd-proto` JSON lines) and prints the reply: tables for people,
//! `--json` for scripts. Exit status: 0 done, 1 refused or unreachable, 2 usage. One command,
//! `dr-setup`, talks to no lbd: it sets up the host it runs on as a real server.

mod cli;
mod dr_setup;
mod render;

use clap::Parser;
use lbd_proto::{Command, Outcome, Reply, Request, VERSION, decode_response, encode_line};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// How long lbctl waits for lbd. The daemon's slowest reply is a change that adds real
/// servers: up to 1 s to resolve their MACs, then up to 2 s for every worker to take the new
/// snapshot (engine/src/control.rs), so 10 s leaves a wide margin.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one command and returns lbd's reply, or the one-line reason it failed.
fn exchange(socket: &Path, command: Command) -> Result<Reply, String> {
    let unreachable = |e: std::io::Error| {
        format!(
            "cannot connect to lbd at {}: {e} (is lbd running? is --socket right?)",
            socket.display()
        )
    };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    let io = |e: std::io::Error| format!("talking to lbd at {}: {e}", socket.display());
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let request = Request {
        version: VERSION,
        command,
    };
    let sent = stream.write_all(encode_line(&request).as_bytes());
    // lbd may refuse a connection (not authorized, too many clients) before it reads the
    // request: its reason is then the reply, even though the request could not be written.
    let mut line = String::new();
    let received = BufReader::new(&stream).read_line(&mut line);
    if line.is_empty() {
        sent.map_err(io)?;
        received.map_err(io)?;
        return Err(format!("lbd at {} closed the connection", socket.display()));
    }
    match decode_response(&line)?.outcome {
        Outcome::Ok(reply) => Ok(reply),
        Outcome::Error(message) => Err(message),
    }
}

/// Writes lbctl.1 into `man_dir` and lbctl's bash, zsh and fish completions into
/// `completions_dir`, from the clap definitions.
fn generate(man_dir: &Path, completions_dir: &Path) -> ExitCode {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let written = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(man_dir)?;
        std::fs::create_dir_all(completions_dir)?;
        let mut page = Vec::new();
        clap_mangen::Man::new(cli::Cli::command()).render(&mut page)?;
        std::fs::write(man_dir.join("lbctl.1"), page)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            clap_complete::generate_to(shell, &mut cli::Cli::command(), "lbctl", completions_dir)?;
        }
        Ok(())
    })();
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lbctl: generating the man page and completions: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let command = match cli.command {
        cli::Verb::DrSetup(args) => return dr_setup::run(args, cli.json),
        cli::Verb::Generate {
            man_dir,
            completions_dir,
        } => return generate(&man_dir, &completions_dir),
        verb => verb.into_command(),
    };
    let command = match command {
        Ok(command) => command,
        Err(usage) => {
            eprintln!("lbctl: {usage}");
            return ExitCode::from(2);
        }
    };
    match exchange(&cli.socket, command) {
        Ok(reply) => {
            let text = if cli.json {
                serde_json::to_string_pretty(&reply).map(|mut s| {
                    s.push('\n');
                    s
                })
            } else {
                Ok(render::human(&reply))
            };
            match text {
                Ok(text) => {
                    // A closed stdout (lbctl status | head) is not an error worth reporting.
                    let _ = std::io::stdout().write_all(text.as_bytes());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("lbctl: cannot print the reply: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(message) => {
            eprintln!("lbctl: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lbd_proto::Response;
    use std::os::unix::net::UnixListener;

    /// A private temp directory, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A one-shot fake lbd that answers any request with `response`; its socket lives in the
    /// returned directory.
    fn fake_lbd(
        response: Response,
    ) -> (TempDir, std::path::PathBuf, std::thread::JoinHandle<String>) {
        let dir = TempDir(std::env::temp_dir().join(format!(
            "lbctl-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )));
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let path = dir.0.join("lbd.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut request = String::new();
            BufReader::new(&stream)
                .read_line(&mut request)
                .expect("read");
            (&stream)
                .write_all(encode_line(&response).as_bytes())
                .expect("write");
            request
        });
        (dir, path, thread)
    }

    #[test]
    fn a_reply_comes_back_and_the_request_is_one_versioned_line() {
        let (_dir, path, lbd) = fake_lbd(Response::ok(Reply::Done {
            message: "ok".into(),
        }));
        let reply = exchange(&path, Command::Status).expect("reply");
        assert_eq!(
            reply,
            Reply::Done {
                message: "ok".into()
            }
        );
        let request = lbd.join().expect("fake lbd");
        assert_eq!(
            request,
            "{\"version\":1,\"command\":{\"name\":\"status\"}}\n"
        );
    }

    #[test]
    fn a_refusal_is_the_error() {
        let (_dir, path, lbd) = fake_lbd(Response::error("no service named \"x\""));
        let error = exchange(&path, Command::Reload).expect_err("refused");
        assert_eq!(error, "no service named \"x\"");
        lbd.join().expect("fake lbd");
    }

    #[test]
    fn no_daemon_says_how_to_find_one() {
        let error = exchange(Path::new("/nonexistent/lbd.sock"), Command::Status)
            .expect_err("nothing there");
        assert!(
            error.contains("cannot connect to lbd at /nonexistent/lbd.sock"),
            "{error}"
        );
        assert!(error.contains("is lbd running?"));
    }
}
