//! The `ublk` command and its `ublk-loop` / `ublk-null` variants: ublk
//! servers with null and loop targets built on the `ublk` crate.
//!
//! Exit status, the same for the three programs: 0 on success (also when
//! the reader of stdout went away early: the output was not wanted, the
//! command still did its work), 1 when the command failed, 2 for bad usage
//! (clap's parse errors, and every argument check made before the driver
//! is asked). Each error is one line on stderr, `PROGRAM: what went wrong`.
#![deny(unsafe_code, missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod commands;
pub mod nbd;
pub mod state;
pub mod targets;

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// Bad usage: an argument or a combination of them that no driver could
/// accept. Exit status 2, like clap's own usage errors.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// A [`UsageError`] as an `anyhow::Error`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

/// The reader of stdout has gone (`EPIPE`): the command ends quietly with
/// status 0 (see the crate docs).
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes `text` to stdout and flushes it. A closed pipe is
/// [`StdoutClosed`]; any other failure (`ENOSPC` on `/dev/full`) is an error
/// naming stdout. Never panics, unlike `print!`.
pub fn emit(text: &str) -> anyhow::Result<()> {
    emit_to(&mut std::io::stdout().lock(), text)
}

/// [`emit`] to any writer.
pub fn emit_to(w: &mut impl Write, text: &str) -> anyhow::Result<()> {
    match w.write_all(text.as_bytes()).and_then(|()| w.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// One line on stderr, ignoring a failure to write it.
pub fn say(prog: &str, msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{prog}: {msg}");
}

/// `ublk`'s `main`: parses the command line and runs it.
pub fn main_ublk() -> ExitCode {
    if let Some(code) = daemon_entry("ublk") {
        return code;
    }
    match cli::Cli::try_parse() {
        Ok(cli) => run(cli),
        Err(e) => clap_exit("ublk", &e),
    }
}

/// `PROGRAM __daemon [--recover] JSON`: the daemon `add` starts by running
/// its own executable again, which may be `ublk`, `ublk-loop` or
/// `ublk-null`. `None` for any other command line.
fn daemon_entry(prog: &str) -> Option<ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != "__daemon") {
        return None;
    }
    Some(match cli::DaemonCli::try_parse_from(&args[1..]) {
        Ok(d) => run_as(prog, cli::Command::Daemon(d.args)),
        Err(e) => clap_exit(prog, &e),
    })
}

/// `ublk-loop`'s and `ublk-null`'s `main`: `ublk add -t TARGET` with the
/// target fixed, under the program's own name: `Null` is `ublk-null`, any
/// other `ublk-loop` (stripe, fault_inject and nbd have no program of their
/// own).
pub fn main_fixed_target(target: cli::TargetKind) -> ExitCode {
    let prog = match target {
        cli::TargetKind::Null => "ublk-null",
        _ => "ublk-loop",
    };
    if let Some(code) = daemon_entry(prog) {
        return code;
    }
    let (prog, parsed) = match target {
        cli::TargetKind::Null => (
            "ublk-null",
            cli::NullCli::try_parse().map(cli::NullCli::into_add_args),
        ),
        _ => (
            "ublk-loop",
            cli::LoopCli::try_parse().map(cli::LoopCli::into_add_args),
        ),
    };
    match parsed {
        Ok(a) => run_as(prog, cli::Command::Add(a)),
        Err(e) => clap_exit(prog, &e),
    }
}

/// Runs a parsed `ublk` command line.
pub fn run(cli: cli::Cli) -> ExitCode {
    run_as("ublk", cli.command)
}

/// Runs `command`, naming `prog` in errors: each error is one line on
/// stderr, exit status 2 for a [`UsageError`], 1 for any other; a closed
/// stdout ends the command quietly with 0.
pub fn run_as(prog: &str, command: cli::Command) -> ExitCode {
    init_logging(log_level(&command));
    finish(prog, commands::dispatch(command))
}

/// The exit status of a command's result (see [`run_as`]).
pub fn finish(prog: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            say(prog, &one_line(&e));
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Help and version go to stdout with status 0, as clap does; every parse
/// error is one line, `PROGRAM: …`, with status 2 (a missing subcommand
/// too: the line names the subcommands).
pub fn clap_exit(prog: &str, e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let names: Vec<String> = <cli::Cli as clap::CommandFactory>::command()
                .get_subcommands()
                .map(|c| c.get_name().to_owned())
                .filter(|n| n != "help")
                .collect();
            say(
                prog,
                &format!(
                    "missing command: one of {} (see {prog} --help)",
                    names.join(", ")
                ),
            );
            ExitCode::from(2)
        }
        _ => {
            say(prog, &clap_one_line(e));
            ExitCode::from(2)
        }
    }
}

/// A clap error on one line: its message, the values it lists, and its
/// tips, without the usage and the "for more information" line.
pub fn clap_one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut msg = String::new();
    let mut tips = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if let Some(tip) = line.strip_prefix("tip: ") {
            tips.push(tip.to_owned());
        } else if !line.is_empty() {
            if !msg.is_empty() {
                msg.push(' ');
            }
            msg.push_str(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    for tip in tips {
        msg.push_str(&format!(" ({tip})"));
    }
    msg
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

/// The log level `--debug_mask` asks for, the daemon's included.
fn log_level(command: &cli::Command) -> Option<log::LevelFilter> {
    let mask = match command {
        cli::Command::Add(a) | cli::Command::Recover(a) => a.dev.debug_mask,
        cli::Command::Daemon(d) => serde_json::from_str::<cli::AddArgs>(&d.json)
            .ok()
            .and_then(|a| a.dev.debug_mask),
        _ => None,
    };
    mask.and_then(cli::debug_mask_level)
}

fn init_logging(level: Option<log::LevelFilter>) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    b.format_timestamp_millis();
    if let Some(level) = level {
        b.filter_level(level);
    }
    let _ = b.try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose reader is gone, or that is full.
    struct Failing(std::io::ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_stdout_ends_quietly_and_other_write_errors_say_so() {
        let e = emit_to(&mut Failing(std::io::ErrorKind::BrokenPipe), "x\n").unwrap_err();
        assert!(e.downcast_ref::<StdoutClosed>().is_some());
        assert_eq!(finish("ublk", Err(e)), ExitCode::SUCCESS);
        let e = emit_to(&mut Failing(std::io::ErrorKind::StorageFull), "x\n").unwrap_err();
        assert_eq!(one_line(&e), "cannot write to stdout: no storage space");
        assert_eq!(finish("ublk", Err(e)), ExitCode::FAILURE);
        assert_eq!(finish("ublk", Err(usage("bad"))), ExitCode::from(2));
        let mut v = Vec::new();
        emit_to(&mut v, "dev id 0\n").unwrap();
        assert_eq!(v, b"dev id 0\n");
    }

    #[test]
    fn clap_errors_fit_on_one_line() {
        let e = <cli::Cli as clap::Parser>::try_parse_from([
            "ublk", "add", "-t", "null", "--queue", "2",
        ])
        .unwrap_err();
        assert_eq!(
            clap_one_line(&e),
            "unexpected argument '--queue' found (a similar argument exists: '--queues')"
        );
        let e = <cli::Cli as clap::Parser>::try_parse_from(["ublk", "add"]).unwrap_err();
        assert_eq!(
            clap_one_line(&e),
            "the following required arguments were not provided: --type <TARGET>"
        );
    }
}
