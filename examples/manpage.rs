//! Writes vubd's man page, `vubd.1` in roff, to standard output: rendered by clap_mangen from
//! the clap definition the binary parses its command line with (`vubd::config::Args`), so the
//! page lists exactly the options and subcommands of the vubd it ships with.
//! `dist/debian/build-deb.sh` runs it for the Debian package:
//!
//! ```sh
//! cargo run --example manpage > vubd.1 && man ./vubd.1
//! ```

use std::io::Write;
use std::process::ExitCode;

use clap::CommandFactory;
use vubd::config::Args;

fn main() -> ExitCode {
    let mut page = Vec::new();
    if let Err(e) = clap_mangen::Man::new(Args::command()).render(&mut page) {
        eprintln!("manpage: rendering vubd.1: {e}");
        return ExitCode::FAILURE;
    }
    // Written out at once: a closed pipe is an error to report, not a panic.
    if let Err(e) = std::io::stdout().lock().write_all(&page) {
        eprintln!("manpage: writing vubd.1 to standard output: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
