//! `ublk`: create, list and remove ublk block devices.
fn main() -> std::process::ExitCode {
    ublk_tools::main_ublk()
}
