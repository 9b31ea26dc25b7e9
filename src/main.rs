//! The `quotebridge` binary: parse the command line, start logging, run.

use std::process::ExitCode;

use clap::Parser;
use quotebridge::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    quotebridge::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("quotebridge: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("quotebridge: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
