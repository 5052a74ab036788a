//! Command-line arguments, accepting both ublksrv's and kublk's spellings
//! (kublk's meaning where they differ).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// `ublk`: create, list and remove ublk block devices.
#[derive(Debug, Parser)]
#[command(
    name = "ublk",
    version,
    about = "Create, list and remove ublk userspace block devices"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add a device served by a daemon (or this process with --foreground).
    Add(AddArgs),
    /// Delete devices.
    Del(DelArgs),
    /// Stop a device (its daemon exits and deletes it).
    Stop(StopArgs),
    /// List devices.
    List(ListArgs),
    /// Print the kernel driver's features.
    Features,
    /// Start a new daemon for a device whose daemon died or was quiesced.
    Recover(AddArgs),
    /// Quiesce a device for a daemon hand-over (needs -r 1).
    Quiesce(IdArg),
    /// Resize a live device.
    #[command(name = "update_size", alias = "update-size")]
    UpdateSize(UpdateSizeArgs),
    /// Internal: the daemon `add` starts.
    #[command(name = "__daemon", hide = true)]
    Daemon(DaemonArgs),
}

/// Device targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// Completes every request at once.
    Null,
    /// Forwards requests to a file or block device.
    Loop,
}

/// Options of `add` and `recover`.
#[derive(Debug, Clone, Args, Serialize, Deserialize, Default)]
pub struct AddArgs {
    /// Target type.
    #[arg(short = 't', long = "type")]
    pub target: Option<TargetKind>,
    /// Device id (default: the next free one; required by recover).
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// Number of hardware queues.
    #[arg(short = 'q', long = "queues", default_value_t = 1)]
    pub queues: u16,
    /// Queue depth (1..=4096).
    #[arg(short = 'd', long = "depth", default_value_t = 128)]
    pub depth: u16,
    /// Serve in this process instead of a daemon.
    #[arg(long)]
    pub foreground: bool,
    /// Print nothing on success.
    #[arg(long)]
    pub quiet: bool,
    /// Zero copy (UBLK_F_SUPPORT_ZERO_COPY).
    #[arg(short = 'z', long = "zero_copy", alias = "zero-copy")]
    pub zero_copy: bool,
    /// Automatic buffer registration (UBLK_F_AUTO_BUF_REG).
    #[arg(long = "auto_zc", alias = "auto-zc")]
    pub auto_zc: bool,
    /// With --auto_zc: fall back to manual registration when automatic fails.
    #[arg(long = "auto_zc_fallback", alias = "auto-zc-fallback")]
    pub auto_zc_fallback: bool,
    /// User copy (UBLK_F_USER_COPY).
    #[arg(short = 'u', long = "user_copy", alias = "user-copy")]
    pub user_copy: bool,
    /// Writes arrive before their data (UBLK_F_NEED_GET_DATA).
    #[arg(short = 'g', long = "need_get_data", alias = "need-get-data")]
    pub need_get_data: bool,
    /// User recovery (UBLK_F_USER_RECOVERY).
    #[arg(short = 'r', long = "recovery", value_parser = clap::value_parser!(u8).range(0..=1), default_value_t = 0)]
    pub recovery: u8,
    /// With -r 1: fail I/O while no daemon is attached (UBLK_F_USER_RECOVERY_FAIL_IO).
    #[arg(short = 'e', long = "recovery_fail_io", value_parser = clap::value_parser!(u8).range(0..=1), default_value_t = 0)]
    pub recovery_fail_io: u8,
    /// With -r 1: reissue in-flight I/O after recovery (UBLK_F_USER_RECOVERY_REISSUE).
    #[arg(short = 'i', long = "recovery_reissue", value_parser = clap::value_parser!(u8).range(0..=1), default_value_t = 0)]
    pub recovery_reissue: u8,
    /// Batch I/O (UBLK_F_BATCH_IO).
    #[arg(short = 'b', long = "batch")]
    pub batch: bool,
    /// Number of I/O threads (default: one per queue).
    #[arg(long = "nthreads")]
    pub nthreads: Option<u16>,
    /// One task per I/O tag (UBLK_F_PER_IO_DAEMON).
    #[arg(long = "per_io_tasks", alias = "per-io-tasks")]
    pub per_io_tasks: bool,
    /// Don't scan partitions at start (UBLK_F_NO_AUTO_PART_SCAN).
    #[arg(long = "no_auto_part_scan", alias = "no-auto-part-scan")]
    pub no_auto_part_scan: bool,
    /// An unprivileged device (UBLK_F_UNPRIVILEGED_DEV).
    #[arg(long)]
    pub unprivileged: bool,
    /// The block device's I/O scheduler, set once it is live: `none` (the
    /// default, as kernel loop and null_blk), a scheduler the kernel
    /// offers (`mq-deadline`, `kyber`, `bfq`), or `default` to keep the
    /// kernel's choice (`mq-deadline` for one queue). Root only: an
    /// unprivileged device keeps the kernel's choice.
    #[arg(long = "io_scheduler", alias = "io-scheduler", default_value = "none", value_parser = parse_scheduler)]
    #[serde(default)]
    pub io_scheduler: String,
    /// Loop: don't use O_DIRECT on the backing file.
    #[arg(long = "buffered_io", alias = "buffered-io")]
    pub buffered_io: bool,
    /// Export the device read-only.
    #[arg(long = "read-only", alias = "read_only")]
    pub read_only: bool,
    /// Logical block size in bytes.
    #[arg(long = "logical-block-size", alias = "logical_block_size")]
    pub logical_block_size: Option<u32>,
    /// Largest request in bytes, a multiple of 4096 up to 32 MiB (default
    /// 512 KiB; 1 MiB with -z or --auto_zc, which need no buffers).
    #[arg(long = "max_io_buf_bytes", alias = "max-io-buf-bytes", value_parser = parse_size)]
    pub max_io_buf_bytes: Option<u64>,
    /// Device size in bytes (null: default 250 GiB; loop: default the file's).
    #[arg(long = "size", short = 's', value_parser = parse_size)]
    pub size: Option<u64>,
    /// Loop backing file (ublksrv style).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Loop backing file (kublk style, positional).
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Options of `del`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["id", "all"]))]
pub struct DelArgs {
    /// The device id.
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// All devices.
    #[arg(short = 'a', long = "all")]
    pub all: bool,
    /// Don't wait for the char device to be released (DEL_DEV_ASYNC).
    #[arg(long = "async")]
    pub async_del: bool,
}

/// Options of `stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The device id.
    #[arg(short = 'n', long = "number")]
    pub id: u32,
    /// Stop only if nobody has the device open (TRY_STOP_DEV).
    #[arg(long)]
    pub safe: bool,
}

/// Options of `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this device.
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// A device id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The device id.
    #[arg(short = 'n', long = "number")]
    pub id: u32,
}

/// Options of `update_size`.
#[derive(Debug, Args)]
pub struct UpdateSizeArgs {
    /// The device id.
    #[arg(short = 'n', long = "number")]
    pub id: u32,
    /// New size in bytes (suffixes K, M, G, T allowed).
    #[arg(short = 's', long = "size", value_parser = parse_size)]
    pub size: u64,
}

/// The daemon's arguments (JSON of the add arguments).
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// `add` or `recover`.
    #[arg(long)]
    pub recover: bool,
    /// The add arguments as JSON.
    pub json: String,
}

/// Checks an I/O scheduler name: lowercase letters, digits, `-` and `_`.
fn parse_scheduler(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not an I/O scheduler name (none, mq-deadline, kyber, bfq or default)"
        ))
    }
}

/// Parses `4096`, `512K`, `1M`, `250G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("invalid size {s:?}: unknown unit {c:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

impl AddArgs {
    /// The backing file, from `-f` or the positional argument.
    pub fn backing_file(&self) -> anyhow::Result<Option<&PathBuf>> {
        match (&self.file, self.files.as_slice()) {
            (Some(f), []) => Ok(Some(f)),
            (None, [f]) => Ok(Some(f)),
            (None, []) => Ok(None),
            (Some(_), [_, ..]) => {
                anyhow::bail!("give the backing file either with -f or as an argument, not both")
            }
            (None, [_, _, ..]) => anyhow::bail!("the loop target takes exactly one backing file"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ublk").chain(args.iter().copied()))
    }

    fn add(args: &[&str]) -> AddArgs {
        match parse(args).unwrap().command {
            Command::Add(a) => a,
            c => panic!("not add: {c:?}"),
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn io_scheduler_defaults_to_none() {
        assert_eq!(add(&["add", "-t", "null"]).io_scheduler, "none");
        let a = add(&["add", "-t", "null", "--io_scheduler", "mq-deadline"]);
        assert_eq!(a.io_scheduler, "mq-deadline");
        assert!(parse(&["add", "-t", "null", "--io_scheduler", "a b"]).is_err());
    }

    #[test]
    fn both_spellings_of_the_backing_file() {
        let a = add(&["add", "-t", "loop", "-f", "ublk-loop.img"]);
        assert_eq!(
            a.backing_file().unwrap().unwrap(),
            &PathBuf::from("ublk-loop.img")
        );
        let a = add(&["add", "-t", "loop", "-q", "2", "disk.img"]);
        assert_eq!(
            (a.queues, a.backing_file().unwrap().unwrap().to_str()),
            (2, Some("disk.img"))
        );
        assert!(add(&["add", "-t", "loop", "-f", "a", "b"])
            .backing_file()
            .is_err());
    }

    #[test]
    fn defaults_and_flags() {
        let a = add(&["add", "-t", "null"]);
        assert_eq!((a.queues, a.depth, a.recovery, a.size), (1, 128, 0, None));
        let a = add(&[
            "add",
            "-t",
            "null",
            "-z",
            "--auto_zc",
            "-u",
            "-g",
            "-r",
            "1",
            "-i",
            "1",
            "-e",
            "0",
            "--size",
            "1G",
            "-n",
            "3",
        ]);
        assert!(a.zero_copy && a.auto_zc && a.user_copy && a.need_get_data);
        assert_eq!(
            (a.recovery, a.recovery_reissue, a.size, a.id),
            (1, 1, Some(1 << 30), Some(3))
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&["add", "-t", "raid"]).is_err());
        assert!(parse(&["add", "-t", "null", "-r", "2"]).is_err());
        assert!(parse(&["add", "-t", "null", "--bogus"]).is_err());
        assert!(parse(&["del"]).is_err());
        assert!(parse(&["del", "-n", "1", "-a"]).is_err());
        assert!(parse(&["add", "-t", "null", "-d", "x"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("250G"), Ok(250 << 30));
        assert!(parse_size("1Q").is_err());
        assert_eq!(parse_scheduler("mq-deadline").as_deref(), Ok("mq-deadline"));
        assert!(parse_scheduler("").is_err());
        assert!(parse_scheduler("none\n").is_err());
        assert!(parse_scheduler("../x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
