//! The `skykit-agent` binary: parse the command line, set up logging, run
//! the command, print any error once and exit with its documented code.

use std::process::ExitCode;

use clap::Parser;
use skykit_agent::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_tracing(&cli);
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("skykit-agent: error: {:#}", failure.error);
            ExitCode::from(failure.exit as u8)
        }
    }
}
