//! `lbd`: the load balancer daemon. `lbd --config FILE` runs it; `lbd --check --config FILE`
//! validates the file and exits.

use clap::Parser;
use lbd_config::{Config, LogFormat};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Layer-4 Direct Routing load balancer on AF_XDP sockets.
#[derive(Debug, Parser)]
#[command(name = "lbd", version, about)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration file and exit: 0 when it is good.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("lbd: {}: {error}", args.config.display());
            return ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a file or journal.
        .with_ansi(std::io::stderr().is_terminal());
    match config.engine.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    if args.check {
        println!(
            "{}: configuration is valid ({} service(s), {} real server(s))",
            args.config.display(),
            config.services.len(),
            config
                .services
                .iter()
                .map(|s| s.real_servers.len())
                .sum::<usize>()
        );
        return ExitCode::SUCCESS;
    }
    // `lbctl reload` and `config save` use this path later, whatever lbd's directory is then.
    let path = std::path::absolute(&args.config).unwrap_or(args.config);
    match lbd_engine::daemon::run(config, &path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lbd: {error}");
            ExitCode::FAILURE
        }
    }
}
