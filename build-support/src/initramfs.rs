//! The guest's initramfs: a cached base archive per kernel (static busybox
//! and the decompressed modules needed before the host root is mounted),
//! plus a small per-run archive (the `/init` script and the command)
//! concatenated after it, which the kernel unpacks on top.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::kernel::Kernel;
use crate::util;

/// Bump when the base archive's contents change, so cached ones are rebuilt.
const BASE_FORMAT: u32 = 3;

/// Modules loaded by the initramfs, in this order (each after its
/// dependencies).  Those built into the kernel are skipped.  crc32c_generic
/// is a soft dependency of ext4 and libcrc32c on kernels where crc32c is not
/// a built-in library (6.12).
pub const MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "overlay",
    "ext4",
    "configfs",
    "loop",
    "ublk_drv",
];

/// Modules loaded in the background while the guest sets up (xfs takes
/// seconds to load under emulation); the command starts after they are.
pub const BACKGROUND_MODULES: &[&str] = &["xfs"];

/// Writes archives in the "newc" cpio format the kernel unpacks.
#[derive(Debug, Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// Appends one entry with the given mode (file type and permissions).
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Pads the archive to a multiple of four bytes.
    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    /// Terminates the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // Kernel archives are conventionally padded to 512 bytes.
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

/// The module name of a module file path: `kernel/fs/9p/9p.ko.xz` → `9p`,
/// `.../ublk-drv.ko` → `ublk_drv`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Parses `modules.dep` into module name → (file, dependency names).
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let (file, deps) = line.split_once(':')?;
            let deps = deps.split_whitespace().map(module_name).collect();
            Some((module_name(file), (file.to_owned(), deps)))
        })
        .collect()
}

/// The loadable modules among `wanted` and their dependencies, in load
/// order (dependencies first).  Names that are not in `dep` are assumed to be
/// built in and skipped.
pub fn load_order(dep: &BTreeMap<String, (String, Vec<String>)>, wanted: &[&str]) -> Vec<String> {
    fn visit(
        name: &str,
        dep: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        let Some((_, deps)) = dep.get(name) else {
            return;
        };
        if !seen.insert(name.to_owned()) {
            return;
        }
        for d in deps {
            visit(d, dep, seen, out);
        }
        out.push(name.to_owned());
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for name in wanted {
        visit(&module_name(name), dep, &mut seen, &mut out);
    }
    out
}

/// Reads a module file, decompressing `.xz`/`.zst`/`.gz` ones (busybox's
/// insmod wants them plain).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("cannot read {}", path.display())),
        Some(tool) => {
            let out = util::capture(Command::new(tool).arg("-dc").arg(path))?;
            if !out.status.success() {
                bail!(
                    "cannot decompress {}: {}",
                    path.display(),
                    util::last_lines(&String::from_utf8_lossy(&out.stderr), 2)
                );
            }
            Ok(out.stdout)
        }
    }
}

/// Whether the ELF file `data` is statically linked (has no PT_INTERP).
pub fn is_static_elf(data: &[u8]) -> bool {
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        u32_at(phoff + i * usize::from(phentsize)).is_some_and(|ty| ty != 3 /* PT_INTERP */)
    })
}

/// Finds a statically linked busybox on the host.
fn busybox() -> Result<Vec<u8>> {
    for path in ["/bin/busybox", "/usr/bin/busybox"] {
        if let Ok(data) = fs::read(path) {
            if is_static_elf(&data) {
                return Ok(data);
            }
            bail!("{path} is dynamically linked; install busybox-static");
        }
    }
    bail!("busybox not found; install busybox-static")
}

/// Returns the cached base archive of `kernel`, building it if needed.
pub fn base(kernel: &Kernel) -> Result<PathBuf> {
    let path = kernel
        .dir
        .join(format!("initramfs-base-v{BASE_FORMAT}.cpio"));
    if path.exists() {
        return Ok(path);
    }
    let dep_path = kernel.modules.join("modules.dep");
    let dep_text = fs::read_to_string(&dep_path)
        .with_context(|| format!("cannot read {}", dep_path.display()))?;
    let dep = parse_modules_dep(&dep_text);
    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "newroot",
        "rig",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.char_dev("dev/null", 1, 3);
    cpio.file("bin/busybox", 0o755, &busybox()?);
    let order = load_order(&dep, MODULES);
    let background: Vec<String> = load_order(&dep, BACKGROUND_MODULES)
        .into_iter()
        .filter(|m| !order.contains(m))
        .collect();
    for name in order.iter().chain(&background) {
        let (file, _) = &dep[name];
        let data = read_module(&kernel.modules.join(file))?;
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &data);
    }
    cpio.file("rig/modules", 0o644, (order.join("\n") + "\n").as_bytes());
    cpio.file(
        "rig/modules-bg",
        0o644,
        (background.join("\n") + "\n").as_bytes(),
    );
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, cpio.finish()).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    // Archives of older formats are never used again.
    for old in 1..BASE_FORMAT {
        let _ = fs::remove_file(kernel.dir.join(format!("initramfs-base-v{old}.cpio")));
    }
    Ok(path)
}

/// Writes `base` followed by a per-run archive holding `files` (name, mode,
/// contents) to `dest`.
pub fn with_files(base: &Path, files: &[(&str, u32, &[u8])], dest: &Path) -> Result<()> {
    let mut data = fs::read(base).with_context(|| format!("cannot read {}", base.display()))?;
    let mut cpio = Cpio::default();
    for (name, perm, contents) in files {
        cpio.file(name, *perm, contents);
    }
    data.extend(cpio.finish());
    fs::write(dest, data).with_context(|| format!("cannot write {}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(module_name("kernel/drivers/block/ublk_drv.ko"), "ublk_drv");
        assert_eq!(module_name("kernel/x/foo-bar.ko.zst"), "foo_bar");
    }

    #[test]
    fn order() {
        let dep = parse_modules_dep(
            "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n\
             kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz\n\
             kernel/net/9p/9pnet.ko.xz:\n\
             kernel/fs/netfs/netfs.ko.xz:\n",
        );
        assert_eq!(
            load_order(&dep, &["9pnet_virtio", "9p", "ext4"]),
            ["9pnet", "9pnet_virtio", "netfs", "9p"]
        );
    }

    #[test]
    fn cpio_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let data = c.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 512, 0);
        // 110-byte header + "init\0" padded to 116, data padded to 128.
        assert_eq!(&data[116..126], b"#!/bin/sh\n");
        assert_eq!(&data[128..134], b"070701");
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn elf_static_check() {
        assert!(!is_static_elf(b"not an elf"));
        if let Ok(sh) = fs::read("/bin/sh") {
            // Debian's /bin/sh (dash) is dynamically linked.
            assert!(!is_static_elf(&sh));
        }
    }
}
