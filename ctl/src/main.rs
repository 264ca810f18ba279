//! `lbctl`: the operator's command-line client for `lbd`. It will speak the `lbd-proto` JSON
//! protocol over the daemon's unix socket; until the control socket lands it only documents
//! itself, and every command says it is not available yet.

use clap::Parser;

/// Control a running lbd over its unix socket.
#[derive(Debug, Parser)]
#[command(name = "lbctl", version, about)]
struct Cli {
    /// Path of lbd's control socket.
    #[arg(long, default_value = "/run/lbd/lbd.sock")]
    socket: std::path::PathBuf,
    /// The command to send (status, stats, add-vip, ...).
    command: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => {
            use clap::CommandFactory;
            // Printing usage to stdout cannot meaningfully fail; ignore a closed pipe.
            let _ = Cli::command().print_help();
            std::process::ExitCode::SUCCESS
        }
        Some(command) => {
            eprintln!(
                "lbctl: `{command}` is not available yet: lbd {} has no control socket (socket {})",
                env!("CARGO_PKG_VERSION"),
                cli.socket.display()
            );
            std::process::ExitCode::from(2)
        }
    }
}
