//! `cargo xtask demo`: the kernel documentation's ublk example, end to end,
//! in a guest — image, `ublk add -t loop -f`, mkfs.xfs, mount, copy a tree,
//! checksum, unmount, remount, checksum again, `ublk list`, `ublk del -a`.

use anyhow::Result;

use crate::util::{self, Workspace};

/// The guest script; `$UBLK` is the built `ublk` binary, `$SRC` a tree to copy.
const SCRIPT: &str = r#"
set -eu
step() { printf '\n### %s\n' "$*"; }
run() { printf '+ %s\n' "$*"; "$@"; }
cd /tmp
step "create a 1 GiB backing image"
run truncate -s 1G ublk-loop.img
step "add a loop device backed by it"
run "$UBLK" add -t loop -f ublk-loop.img
step "format it with xfs and mount it"
run mkfs.xfs -q /dev/ublkb0
mkdir -p /tmp/mnt
run mount /dev/ublkb0 /tmp/mnt
step "copy a tree of files ($SRC) and checksum it"
run cp -a "$SRC" /tmp/mnt/tree
(cd /tmp/mnt && find tree -type f -print0 | sort -z | xargs -0 sha256sum) > /tmp/sums
echo "$(wc -l < /tmp/sums) files, $(du -sh /tmp/mnt/tree | cut -f1)"
step "unmount, remount and check every checksum"
run umount /tmp/mnt
run mount /dev/ublkb0 /tmp/mnt
(cd /tmp/mnt && sha256sum -c --quiet /tmp/sums) && echo "all $(wc -l < /tmp/sums) checksums match"
run umount /tmp/mnt
xfs_repair -n /dev/ublkb0 > /dev/null 2>&1 && echo "+ xfs_repair -n /dev/ublkb0: clean"
step "list the devices"
run "$UBLK" list
step "delete all devices"
run "$UBLK" del -a
ls /dev/ublkb* 2>/dev/null && { echo "a device is left behind"; exit 1; }
echo "no ublk block device left"
"#;

/// Builds `ublk` and runs the demo in a guest on `kernel`.
pub fn run(kernel: crate::kernel::Suite, mem_mb: u32, timeout: std::time::Duration) -> Result<u8> {
    let ws = Workspace::locate()?;
    util::run(
        util::cargo()
            .args(["build", "--release", "-p", "ublk-tools", "--bins"])
            .current_dir(&ws.root),
    )?;
    let kernel = crate::kernel::fetch(kernel)?;
    eprintln!(
        "booting {} kernel {} ({})...",
        kernel.suite, kernel.release, kernel.package_version
    );
    let opts = crate::vm::VmOptions::new(&kernel, &ws, mem_mb, timeout)?;
    let ublk = ws.target_dir.join("release/ublk");
    let src = ws.root.join("ublk-rs");
    let body = format!(
        "export UBLK={} SRC={}\n{SCRIPT}",
        util::shell_join(&[ublk.display().to_string()]),
        util::shell_join(&[src.display().to_string()])
    );
    let outcome = crate::vm::run(&kernel, &opts, &body)?;
    Ok(u8::try_from(outcome.status).unwrap_or(1))
}
