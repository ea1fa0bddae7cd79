//! `hybridge-ca` binary: parses arguments and hands them to [`hybridge_ca::cli`].
//!
//! Every failure ends as one `error: ...` line on stderr and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use hybridge_ca::cli::{self, Cli};

fn main() -> ExitCode {
    let parsed = match Cli::try_parse() {
        Ok(parsed) => parsed,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let _ = e.print();
            return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Err(e) => {
            let args: Vec<_> = std::env::args_os().collect();
            let command = <Cli as clap::CommandFactory>::command();
            let line = hybridge_ca::command_line::env_error_line(&e, &command, &args)
                .unwrap_or_else(|| cli::clap_error_line(&e.render().to_string()));
            eprintln!("{line}");
            return ExitCode::from(2);
        }
    };
    match cli::run(parsed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
