//! `ublk-loop [options] FILE`: `ublk add -t loop`.
fn main() -> std::process::ExitCode {
    ublk_tools::main_fixed_target(ublk_tools::cli::TargetKind::Loop)
}
