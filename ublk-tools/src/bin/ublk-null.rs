//! `ublk-null [options]`: `ublk add -t null`.
fn main() -> std::process::ExitCode {
    ublk_tools::main_fixed_target(ublk_tools::cli::TargetKind::Null)
}
