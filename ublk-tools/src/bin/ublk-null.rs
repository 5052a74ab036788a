//! `ublk-null [options]`: `ublk add -t null`.
fn main() -> std::process::ExitCode {
    ublk_tools::run_fixed_target("null")
}
