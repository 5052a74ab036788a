//! `ublk-loop FILE [options]`: `ublk add -t loop`.
fn main() -> std::process::ExitCode {
    ublk_tools::run_fixed_target("loop")
}
