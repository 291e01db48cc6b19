use std::process::ExitCode;

use clap::error::ErrorKind;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};
use vubd::config::{Command, capabilities_json, parse_args};
use vubd::daemon::{self, LogControl, error_chain};

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os()) {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            daemon::stdout::write(&e.to_string());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line naming the argument, as for every other configuration error.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("vubd: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    // The filter can be changed while vubd runs (`log_set_level`).
    let filter = EnvFilter::try_from_env("VUBD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, filter_handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let log = LogControl::new(move |level| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        filter_handle.reload(filter).map_err(|e| e.to_string())
    });
    match Command::try_from(args) {
        Err(e) => {
            eprintln!("vubd: {e}");
            ExitCode::from(2)
        }
        Ok(Command::PrintCapabilities) => {
            daemon::stdout::write(&format!("{}\n", capabilities_json()));
            ExitCode::SUCCESS
        }
        Ok(Command::Discover(d)) => match daemon::discover(&d) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vubd: {}", error_chain(&e));
                ExitCode::from(e.exit_code())
            }
        },
        Ok(Command::NvmeList(l)) => {
            if daemon::nvme_list(&l) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(Command::Ctl(c)) => match vubd::ctl::run(&c) {
            Ok(out) => {
                daemon::stdout::write(&out);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vubd ctl: {}: {}", c.method, error_chain(&e));
                ExitCode::FAILURE
            }
        },
        Ok(Command::Serve(cfg)) => match daemon::run(cfg, log) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vubd: {}", error_chain(&e));
                ExitCode::from(e.exit_code())
            }
        },
    }
}
