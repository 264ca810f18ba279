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
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        required_unless_present = "generate_man"
    )]
    config: Option<PathBuf>,
    /// Validate the configuration file and exit: 0 when it is good.
    #[arg(long)]
    check: bool,
    /// Write lbd.8, the man page, into DIR and exit (for the package).
    #[arg(long, value_name = "DIR", hide = true)]
    generate_man: Option<PathBuf>,
}

/// Writes lbd.8 into `dir` from the clap definitions.
fn generate_man(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    let mut page = Vec::new();
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| {
            clap_mangen::Man::new(Args::command())
                .section("8")
                .render(&mut page)
        })
        .and_then(|()| std::fs::write(dir.join("lbd.8"), &page));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lbd: writing the man page: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        return generate_man(dir);
    }
    let Some(config_path) = args.config else {
        eprintln!("lbd: --config FILE is required");
        return ExitCode::from(2);
    };
    let config = match Config::load(&config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("lbd: {}: {error}", config_path.display());
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
            config_path.display(),
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
    let path = std::path::absolute(&config_path).unwrap_or(config_path);
    match lbd_engine::daemon::run(config, &path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lbd: {error}");
            ExitCode::FAILURE
        }
    }
}
