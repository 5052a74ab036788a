//! The smallest complete server: a null device (every request succeeds,
//! reads return zeroes) of 1 GiB over two queues, stopped by Ctrl-C,
//! `SIGTERM` or `ublk del -n N`, and deleted on the way out. The same code
//! as the crate's front-page example.
//!
//! ```text
//! cargo build -p ublk-rs --example null
//! sudo target/debug/examples/null      # prints /dev/ublkbN once live
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use ublk::signal::{SIGINT, SIGTERM};
use ublk::{
    BasicParams, Control, DeviceBuilder, Handled, Params, Request, StartKind, Submit, Target,
};

struct Null;

impl Target for Null {
    fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        Handled::Done(req.desc.len() as i32)
    }
}

fn serve() -> ublk::Result<()> {
    let ctrl = Arc::new(Control::open()?);
    // The guard: dropping `dev`, on success or error, deletes the device.
    let mut dev = DeviceBuilder::new().queues(2).depth(64).add(ctrl)?;
    // Stops the device on Ctrl-C or SIGTERM, even before it is live.
    dev.stop_on_signals(&[SIGINT, SIGTERM])?;
    let max_io = dev.info().max_io_buf_bytes();
    dev.set_params(&Params::basic(BasicParams::new(1 << 30, max_io)))?;
    let stats = dev.run(
        StartKind::Start,
        |_q| Ok(Null),
        |info, _| {
            println!("/dev/ublkb{} is live; stop it with Ctrl-C", info.id());
        },
    )?;
    let requests: u64 = stats.iter().map(|s| s.requests).sum();
    eprintln!("stopped after {requests} requests");
    Ok(())
}

// `fn main() -> ublk::Result<()>` prints `Error: ` and the same line; this
// says which program failed, as command-line tools do.
fn main() -> ExitCode {
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("null: {e}");
            ExitCode::FAILURE
        }
    }
}
