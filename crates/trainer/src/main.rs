use std::process::ExitCode;

use clap::Parser;
use trainer::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let res = match &cli.command {
        Command::Infer(a) => trainer::infer::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the problem: the whole context chain, colon-separated.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
