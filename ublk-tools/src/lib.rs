//! The `ublk` command and its `ublk-loop` / `ublk-null` variants: ublk
//! servers with null and loop targets built on the `ublk` crate.
#![deny(unsafe_code, missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod commands;
pub mod state;
pub mod targets;

use std::process::ExitCode;

/// Runs a parsed command line and turns errors into one line on stderr and
/// a non-zero exit status.
pub fn run(cli: cli::Cli) -> ExitCode {
    init_logging();
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ublk: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line (`a: b: c`), without repeats.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !out.contains(&s) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&s);
        }
    }
    out
}

fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .try_init();
}

/// `ublk-loop FILE [options]` and `ublk-null [options]`: `ublk add` with the
/// target fixed, inserted before the user's arguments.
pub fn run_fixed_target(target: &str) -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv0 = args
        .first()
        .cloned()
        .unwrap_or_else(|| format!("ublk-{target}").into());
    args.splice(
        0..1.min(args.len()),
        [argv0, "add".into(), "-t".into(), target.into()],
    );
    match <cli::Cli as clap::Parser>::try_parse_from(args) {
        Ok(cli) => run(cli),
        Err(e) => {
            let _ = e.print();
            ExitCode::from(2)
        }
    }
}
