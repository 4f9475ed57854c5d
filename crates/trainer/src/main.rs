use std::process::ExitCode;

use clap::Parser;
use trainer::args::{Cli, Command};

#[global_allocator]
static ALLOC: trainer::metrics::CountingAlloc = trainer::metrics::CountingAlloc;

fn main() -> ExitCode {
    trainer::metrics::keep_freed_memory();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let res = match &cli.command {
        Command::Infer(a) => trainer::infer::run(a),
        Command::Stage1(a) => trainer::cli::train(a, trainer::train::Stage::Stage1),
        Command::Stage2(a) => trainer::cli::train(a, trainer::train::Stage::Stage2),
        Command::Merge(a) => trainer::cli::merge(a),
        Command::Init(a) => trainer::cli::init(a),
        Command::Synth(a) => trainer::cli::synth(a),
        Command::Eval(a) => trainer::cli::eval(a),
        Command::Ablate(a) => trainer::cli::ablate(a),
        Command::Plan(a) => trainer::cli::plan(a),
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
