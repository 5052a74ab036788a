//! `ublk`: create, list and remove ublk block devices.
fn main() -> std::process::ExitCode {
    ublk_tools::run(<ublk_tools::cli::Cli as clap::Parser>::parse())
}
