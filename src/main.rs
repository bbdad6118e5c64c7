//! `lora-studio` with no arguments opens the GUI; with a subcommand it runs headless.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = lora_studio::cli::Cli::parse();
    match lora_studio::cli::run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
