//! Command-line arguments, accepting both ublksrv's and kublk's spellings
//! (kublk's meaning where they differ).

use std::path::PathBuf;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// What every command's help ends with: exit status and environment.
pub const AFTER_HELP: &str = "\
Exit status: 0 on success (also when stdout is closed early, as in `ublk list | head -1`), \
1 when the command failed (driver, kernel, files, devices), \
2 for bad usage (unknown or conflicting options, values out of range).

Environment: UBLK_CONTROL is the control device to open instead of /dev/ublk-control; \
UBLK_STATE_DIR the state directory (default /run/ublk for root, else \
$XDG_RUNTIME_DIR/ublk or /tmp/ublk-UID); RUST_LOG the log filter (default warn; \
--debug_mask overrides it).";

/// The unit rules of every size option.
pub fn sizes_help() -> String {
    format!("Sizes: {}.", ublk::size::SIZE_SYNTAX)
}

/// What the help of `add`, `recover` and the wrappers ends with.
pub fn add_after_help() -> String {
    format!("{}\n\n{AFTER_HELP}", sizes_help())
}

/// `ublk`: create, list and remove ublk block devices.
#[derive(Debug, Parser)]
#[command(
    name = "ublk",
    bin_name = "ublk",
    version,
    disable_version_flag = true,
    about = "Create, list and remove ublk userspace block devices",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Print the version (also -V).
    #[arg(short = 'v', long = "version", short_alias = 'V', action = ArgAction::Version)]
    pub version: Option<bool>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add a device served by a daemon (or this process with --foreground).
    #[command(mut_arg("target", |a| a.required(true)), after_help = add_after_help())]
    Add(AddArgs),
    /// Delete devices.
    Del(DelArgs),
    /// Stop a device (its daemon exits and deletes it).
    Stop(StopArgs),
    /// List devices (all of them unless -n is given).
    List(ListArgs),
    /// Print the kernel driver's features.
    Features,
    /// Start a new daemon for a device whose daemon died or was quiesced
    /// (the add options are read from its state file unless -t is given).
    #[command(after_help = add_after_help())]
    Recover(AddArgs),
    /// Quiesce a device for a daemon hand-over (needs -r 1).
    Quiesce(IdArg),
    /// Resize a live device.
    #[command(name = "update_size", alias = "update-size", after_help = sizes_help())]
    UpdateSize(UpdateSizeArgs),
    /// Print a shell completion script for ublk, ublk-loop or ublk-null.
    Completions(CompletionsArgs),
    /// Print the owner's uid and gid of a device, for udev rules (see
    /// README: unprivileged devices).
    #[command(name = "user_id", alias = "user-id")]
    UserId(UserIdArgs),
    /// Internal: the daemon `add` starts, `ublk __daemon [--recover] JSON`.
    /// Parsed before clap ([`DaemonCli`]), so it shows in no help, man page
    /// or completion.
    #[command(skip)]
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
    /// Spreads requests over several files in chunks (RAID 0).
    Stripe,
    /// Null, or loop over -f FILE, with injected delays and errors.
    #[value(name = "fault_inject", alias = "fault-inject")]
    #[serde(rename = "fault_inject")]
    FaultInject,
    /// Forwards requests to an NBD server's export.
    Nbd,
}

/// Options of `add` and `recover`: the target, the device options, and the
/// loop target's backing file.
#[derive(Debug, Clone, Args, Serialize, Deserialize, Default)]
pub struct AddArgs {
    /// Target type.
    #[arg(short = 't', long = "type")]
    pub target: Option<TargetKind>,
    /// Everything but the target and its file.
    #[command(flatten)]
    #[serde(flatten)]
    pub dev: DevOptions,
    /// The backing file.
    #[command(flatten)]
    #[serde(flatten)]
    pub backing: BackingArgs,
    /// Options of the stripe and fault_inject targets.
    #[command(flatten)]
    #[serde(flatten)]
    pub target_opts: TargetOptions,
    /// The nbd target's server.
    #[command(flatten)]
    #[serde(flatten)]
    pub nbd: crate::nbd::NbdArgs,
}

/// Options of the stripe and fault_inject targets (kublk's names).
#[derive(Debug, Clone, Args, Serialize, Deserialize, Default)]
#[command(next_help_heading = "Stripe and fault_inject options")]
pub struct TargetOptions {
    /// Stripe: bytes per chunk (a size), a power of two from 4 KiB to
    /// 512 KiB (default 64 KiB); chunk k goes to file k % FILES.
    #[arg(long = "chunk_size", alias = "chunk-size", value_name = "SIZE", value_parser = parse_chunk_size)]
    #[serde(default)]
    pub chunk_size: Option<u32>,
    /// Fault injection: complete each request this many microseconds after
    /// it is done (an io_uring timeout; the queue serves on meanwhile).
    #[arg(long = "delay_us", alias = "delay-us", value_name = "US")]
    #[serde(default)]
    pub delay_us: Option<u64>,
    /// Fault injection: 1 kills the server (SIGKILL) while it fetches its
    /// first requests, before tag 1 of a queue (for driver teardown tests).
    #[arg(long = "die_during_fetch", alias = "die-during-fetch", value_name = "0|1", value_parser = clap::value_parser!(u8).range(0..=1))]
    #[serde(default)]
    pub die_during_fetch: Option<u8>,
    /// Fault injection: fail this percentage of requests (0 to 100,
    /// fractions allowed) with EIO, picked at random but the same each run.
    #[arg(long = "error_rate", alias = "error-rate", value_name = "PERCENT", value_parser = parse_percent)]
    #[serde(default)]
    pub error_rate: Option<f64>,
    /// Fault injection: fail every request touching LENGTH bytes from
    /// START with EIO (sizes, multiples of 512), as a disk with bad
    /// sectors; e.g. --error_range 1M:64K.
    #[arg(long = "error_range", alias = "error-range", value_name = "START:LENGTH", value_parser = parse_byte_range)]
    #[serde(default)]
    pub error_range: Option<ByteRange>,
}

/// A byte range of `--error_range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Bytes.
    pub len: u64,
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n)
        .map_err(|_| ())
        .and_then(|n| {
            ublk::targets::stripe::check_chunk_size(n)
                .map(|()| n)
                .map_err(|_| ())
        })
        .map_err(|()| {
            let r = ublk::targets::stripe::CHUNK_SIZES;
            format!(
                "chunk size {n} must be a power of two in {}..={}",
                r.start(),
                r.end()
            )
        })
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("error rate {s:?} is not a percentage in 0..=100")),
    }
}

fn parse_byte_range(s: &str) -> Result<ByteRange, String> {
    let (start, len) = s
        .split_once(':')
        .ok_or_else(|| format!("error range {s:?} is not START:LENGTH"))?;
    let (start, len) = (parse_size(start)?, parse_size(len)?);
    if start % 512 != 0 || len % 512 != 0 || len == 0 {
        return Err(format!(
            "error range {s:?}: START and LENGTH must be multiples of 512, LENGTH not 0"
        ));
    }
    Ok(ByteRange { start, len })
}

/// The device options `add`, `recover`, `ublk-loop` and `ublk-null` share.
/// Long names are kublk's (underscores); the hyphenated spellings and
/// ublksrv's names are accepted too.
#[derive(Debug, Clone, Args, Serialize, Deserialize, Default)]
pub struct DevOptions {
    /// Device id (default: the next free one; required by recover).
    #[arg(short = 'n', long = "number")]
    pub id: Option<u32>,
    /// Number of hardware queues (1..=4096).
    #[arg(short = 'q', long = "queues", default_value_t = 1, value_parser = parse_queues)]
    pub queues: u16,
    /// Queue depth (1..=4096).
    #[arg(short = 'd', long = "depth", default_value_t = 128, value_parser = parse_depth)]
    pub depth: u16,
    /// Serve in this process instead of a daemon.
    #[arg(long)]
    pub foreground: bool,
    /// Print nothing on success.
    #[arg(long)]
    pub quiet: bool,
    /// Zero copy (UBLK_F_SUPPORT_ZERO_COPY).
    #[arg(short = 'z', long = "zero_copy", aliases = ["zero-copy", "zerocopy"])]
    pub zero_copy: bool,
    /// Automatic buffer registration (UBLK_F_AUTO_BUF_REG).
    #[arg(long = "auto_zc", alias = "auto-zc")]
    pub auto_zc: bool,
    /// With --auto_zc: fall back to manual registration when automatic
    /// fails (kublk's `-z --auto_zc --auto_zc_fallback` is accepted too: the
    /// device then also has UBLK_F_SUPPORT_ZERO_COPY).
    #[arg(long = "auto_zc_fallback", alias = "auto-zc-fallback")]
    pub auto_zc_fallback: bool,
    /// User copy (UBLK_F_USER_COPY).
    #[arg(short = 'u', long = "user_copy", aliases = ["user-copy", "usercopy"])]
    pub user_copy: bool,
    /// Writes arrive before their data (UBLK_F_NEED_GET_DATA; also --get_data).
    #[arg(short = 'g', long = "need_get_data", aliases = ["need-get-data", "get_data", "get-data"])]
    pub need_get_data: bool,
    /// User recovery (UBLK_F_USER_RECOVERY; also --user_recovery).
    #[arg(short = 'r', long = "recovery", aliases = ["user_recovery", "user-recovery"], value_parser = clap::value_parser!(u8).range(0..=1), default_value_t = 0)]
    pub recovery: u8,
    /// Fail I/O while no daemon is attached (UBLK_F_USER_RECOVERY_FAIL_IO;
    /// implies -r 1, as in kublk; also --user_recovery_fail_io).
    #[arg(short = 'e', long = "recovery_fail_io", aliases = ["recovery-fail-io", "user_recovery_fail_io", "user-recovery-fail-io"], value_parser = clap::value_parser!(u8).range(0..=1), default_value_t = 0)]
    pub recovery_fail_io: u8,
    /// Reissue in-flight I/O after recovery (UBLK_F_USER_RECOVERY_REISSUE;
    /// implies -r 1, as in kublk; also --user_recovery_reissue).
    #[arg(short = 'i', long = "recovery_reissue", aliases = ["recovery-reissue", "user_recovery_reissue", "user-recovery-reissue"], value_parser = clap::value_parser!(u8).range(0..=1), default_value_t = 0)]
    pub recovery_reissue: u8,
    /// Batch I/O (UBLK_F_BATCH_IO).
    #[arg(short = 'b', long = "batch")]
    pub batch: bool,
    /// Number of I/O threads (default: one per queue). Other counts need
    /// --per_io_tasks (each thread serves every N-th tag of the device) or
    /// -b (each thread serves whole queues: fewer threads than queues
    /// share them out, more are one per queue, as in kublk).
    #[arg(long = "nthreads", value_parser = parse_threads)]
    pub nthreads: Option<u16>,
    /// One task per I/O tag (UBLK_F_PER_IO_DAEMON).
    #[arg(long = "per_io_tasks", alias = "per-io-tasks")]
    pub per_io_tasks: bool,
    /// Don't scan partitions at start (UBLK_F_NO_AUTO_PART_SCAN).
    #[arg(long = "no_auto_part_scan", alias = "no-auto-part-scan")]
    pub no_auto_part_scan: bool,
    /// Send the ublk commands to the char device's descriptor instead of
    /// registering it as a fixed file in each queue's io_uring.
    #[arg(long = "no_ublk_fixed_fd", alias = "no-ublk-fixed-fd")]
    #[serde(default)]
    pub no_ublk_fixed_fd: bool,
    /// Shared-memory zero copy (UBLK_F_SHMEM_ZC): requests whose pages lie
    /// in a buffer the server registered (--htlb) are served in place.
    #[arg(long = "shmem_zc", alias = "shmem-zc")]
    #[serde(default)]
    pub shmem_zc: bool,
    /// With --shmem_zc: map the file at PATH (on hugetlbfs, say) and
    /// register it; the program doing I/O maps the same file (fio
    /// --mem=mmaphuge:PATH).
    #[arg(long = "htlb", value_name = "PATH")]
    #[serde(default)]
    pub htlb: Option<PathBuf>,
    /// With --htlb: register the buffer read-only (UBLK_SHMEM_BUF_READ_ONLY).
    #[arg(long = "rdonly_shmem_buf", alias = "rdonly-shmem-buf")]
    #[serde(default)]
    pub rdonly_shmem_buf: bool,
    /// DMA alignment mask of the disk's buffers, 2^n - 1
    /// (UBLK_PARAM_TYPE_DMA_ALIGN; decimal or 0x hex; null: default 4095,
    /// as kublk).
    #[arg(long = "dma_alignment", alias = "dma-alignment", value_name = "MASK", value_parser = parse_u32_number)]
    #[serde(default)]
    pub dma_alignment: Option<u32>,
    /// Segment boundary mask, 2^n - 1 ≥ 4095 (UBLK_PARAM_TYPE_SEGMENT;
    /// decimal or 0x hex; null: default 4095, as kublk; others: the
    /// kernel's 0xffffffff where another segment limit is given).
    #[arg(long = "seg_boundary_mask", alias = "seg-boundary-mask", value_name = "MASK", value_parser = parse_u64_number)]
    #[serde(default)]
    pub seg_boundary_mask: Option<u64>,
    /// Largest segment, a size ≥ 4 KiB (UBLK_PARAM_TYPE_SEGMENT; null:
    /// default 32 KiB, as kublk; others: the kernel's 64 KiB where another
    /// segment limit is given).
    #[arg(long = "max_segment_size", alias = "max-segment-size", value_name = "SIZE", value_parser = parse_size)]
    #[serde(default)]
    pub max_segment_size: Option<u64>,
    /// Most segments in a request, 1..=65535 (UBLK_PARAM_TYPE_SEGMENT; null:
    /// default 32, as kublk; others: the kernel's 128 where another
    /// segment limit is given).
    #[arg(long = "max_segments", alias = "max-segments", value_parser = clap::value_parser!(u16).range(1..))]
    #[serde(default)]
    pub max_segments: Option<u16>,
    /// Integrity metadata: bytes of it per logical block, 1..=255
    /// (UBLK_F_INTEGRITY; needs -u). Null keeps none; loop keeps it in a
    /// second backing file after the data file (this many bytes per block
    /// of data), which add fills with 0xff ("no protection information").
    #[arg(long = "metadata_size", alias = "metadata-size", value_parser = clap::value_parser!(u8).range(1..), help_heading = "Integrity")]
    #[serde(default)]
    pub metadata_size: Option<u8>,
    /// Say the device can check protection information itself
    /// (LBMD_PI_CAP_INTEGRITY; sysfs device_is_integrity_capable 1): the
    /// block layer then skips what sysfs read_verify/write_generate turn
    /// off.
    #[arg(
        long = "integrity_capable",
        alias = "integrity-capable",
        help_heading = "Integrity"
    )]
    #[serde(default)]
    pub integrity_capable: bool,
    /// The reference tag (the block's sector) is checked too
    /// (LBMD_PI_CAP_REFTAG; needs --csum_type).
    #[arg(
        long = "integrity_reftag",
        alias = "integrity-reftag",
        help_heading = "Integrity"
    )]
    #[serde(default)]
    pub integrity_reftag: bool,
    /// Where the protection information starts in each block's metadata
    /// (default 0).
    #[arg(
        long = "pi_offset",
        alias = "pi-offset",
        value_name = "BYTES",
        help_heading = "Integrity"
    )]
    #[serde(default)]
    pub pi_offset: Option<u8>,
    /// The protection information's checksum (default: none, the metadata
    /// is opaque).
    #[arg(
        long = "csum_type",
        alias = "csum-type",
        value_enum,
        help_heading = "Integrity"
    )]
    #[serde(default)]
    pub csum_type: Option<CsumTypeArg>,
    /// Bytes of the application tag the device keeps (default 0).
    #[arg(
        long = "tag_size",
        alias = "tag-size",
        value_name = "BYTES",
        help_heading = "Integrity"
    )]
    #[serde(default)]
    pub tag_size: Option<u8>,
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
    /// Where each queue's thread runs: `first_cpu` (the default, as kublk
    /// and rublk: the first CPU the kernel maps to the queue), `queue_cpus`
    /// (any CPU the kernel maps to the queue) or `unpinned`.
    #[arg(long = "queue_affinity", value_enum, default_value_t = QueueAffinityArg::FirstCpu)]
    #[serde(default)]
    pub queue_affinity: QueueAffinityArg,
    /// Loop: don't use O_DIRECT on the backing file.
    #[arg(long = "buffered_io", alias = "buffered-io")]
    pub buffered_io: bool,
    /// Export the device read-only.
    #[arg(long = "read_only", alias = "read-only")]
    pub read_only: bool,
    /// Logical block size: 512, 1024, 2048 or 4096 (default: the backing
    /// file's, else 512).
    #[arg(long = "logical_block_size", alias = "logical-block-size", value_parser = parse_logical_block_size)]
    pub logical_block_size: Option<u32>,
    /// Largest request (a size): a multiple of 4096 up to 32 MiB (default
    /// 512 KiB; 1 MiB with -z or --auto_zc, which need no buffers).
    #[arg(long = "max_io_buf_bytes", alias = "max-io-buf-bytes", value_name = "SIZE", value_parser = parse_max_io_bytes)]
    pub max_io_buf_bytes: Option<u64>,
    /// Device size (a size; null: default 250 GiB; loop: default the file's).
    #[arg(long = "size", short = 's', value_parser = parse_size)]
    pub size: Option<u64>,
    /// Log detail, ublksrv's debug mask (decimal or 0x hex): 0 the default
    /// (warnings); bits 0x1 (device) and 0x10 (control commands) log at
    /// info level, 0x2 (queues) and 0x4 (I/O commands) at debug, 0x8 (every
    /// I/O) at trace.
    #[arg(long = "debug_mask", alias = "debug-mask", value_name = "MASK", value_parser = parse_debug_mask)]
    #[serde(default)]
    pub debug_mask: Option<u32>,
}

/// The backing files: loop's and fault_inject's one, stripe's several.
#[derive(Debug, Clone, Args, Serialize, Deserialize, Default)]
pub struct BackingArgs {
    /// Backing file (ublksrv style; repeat it for the stripe target).
    #[arg(short = 'f', long = "file", action = ArgAction::Append)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub file: Vec<PathBuf>,
    /// Backing file (kublk style, positional; several for stripe); nbd:
    /// the server's URI (`nbd://HOST[:PORT]/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH`).
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// `-f` as state files before the stripe target wrote it (one path or
/// none) and after (a list).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![p],
        Some(OneOrMany::Many(v)) => v,
    })
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
    #[arg(short = 'n', long = "number", conflicts_with = "all")]
    pub id: Option<u32>,
    /// All devices (the default, as in kublk).
    #[arg(short = 'a', long = "all")]
    pub all: bool,
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
    /// New size (a size: see below).
    #[arg(short = 's', long = "size", value_parser = parse_size)]
    pub size: u64,
}

/// The programs of this package, for `completions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Program {
    /// `ublk`.
    #[value(name = "ublk")]
    Ublk,
    /// `ublk-loop`.
    #[value(name = "ublk-loop")]
    UblkLoop,
    /// `ublk-null`.
    #[value(name = "ublk-null")]
    UblkNull,
}

impl Program {
    /// The program's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ublk => "ublk",
            Self::UblkLoop => "ublk-loop",
            Self::UblkNull => "ublk-null",
        }
    }

    /// The program's command-line definition.
    pub fn command(self) -> clap::Command {
        match self {
            Self::Ublk => Cli::command(),
            Self::UblkLoop => LoopCli::command(),
            Self::UblkNull => NullCli::command(),
        }
    }
}

/// Options of `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
    /// The program to complete.
    #[arg(value_enum, default_value = "ublk")]
    pub program: Program,
}

/// Options of `user_id`.
#[derive(Debug, Args)]
pub struct UserIdArgs {
    /// The device: its id, or a node name such as ublkc0, ublkb0,
    /// /dev/ublkb0p1 (udev's %k).
    #[arg(value_parser = parse_device_name)]
    pub device: u32,
}

/// `ublk __daemon [--recover] JSON`, the daemon `add` starts.
#[derive(Debug, Parser)]
#[command(name = "__daemon", bin_name = "ublk __daemon")]
pub struct DaemonCli {
    /// The daemon's arguments.
    #[command(flatten)]
    pub args: DaemonArgs,
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

/// `ublk-null [options]`: `ublk add -t null`.
#[derive(Debug, Parser)]
#[command(
    name = "ublk-null",
    bin_name = "ublk-null",
    version,
    disable_version_flag = true,
    about = "Add a ublk null device (ublk add -t null): every request completes at once, reads return zeroes",
    after_help = add_after_help()
)]
pub struct NullCli {
    /// Print the version (also -V).
    #[arg(short = 'v', long = "version", short_alias = 'V', action = ArgAction::Version)]
    pub version: Option<bool>,
    /// The device options.
    #[command(flatten)]
    pub dev: DevOptions,
}

/// `ublk-loop [options] FILE`: `ublk add -t loop`.
#[derive(Debug, Parser)]
#[command(
    name = "ublk-loop",
    bin_name = "ublk-loop",
    version,
    disable_version_flag = true,
    about = "Add a ublk loop device (ublk add -t loop) over a file or block device",
    after_help = add_after_help()
)]
pub struct LoopCli {
    /// Print the version (also -V).
    #[arg(short = 'v', long = "version", short_alias = 'V', action = ArgAction::Version)]
    pub version: Option<bool>,
    /// The device options.
    #[command(flatten)]
    pub dev: DevOptions,
    /// The backing file.
    #[command(flatten)]
    pub backing: BackingArgs,
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

/// Parses a size: [`ublk::parse_size`], the syntax of [`sizes_help`].
pub fn parse_size(s: &str) -> Result<u64, String> {
    ublk::parse_size(s).map_err(|e| e.to_string())
}

/// A count of `what` in `1..=max`, said in the library's words.
fn parse_count(s: &str, what: &str, max: u32) -> Result<u16, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{what} {s:?} is not a number"))?;
    match u16::try_from(n) {
        Ok(n) if n >= 1 && u32::from(n) <= max => Ok(n),
        _ => Err(format!("{what} {n} is outside 1..={max}")),
    }
}

fn parse_queues(s: &str) -> Result<u16, String> {
    parse_count(s, "number of queues", ublk::sys::UBLK_MAX_NR_QUEUES)
}

fn parse_depth(s: &str) -> Result<u16, String> {
    parse_count(s, "queue depth", ublk::sys::UBLK_MAX_QUEUE_DEPTH)
}

fn parse_threads(s: &str) -> Result<u16, String> {
    parse_count(s, "number of threads", u32::from(u16::MAX))
}

fn parse_logical_block_size(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    match u32::try_from(n) {
        Ok(n) if n.is_power_of_two() && (512..=4096).contains(&n) => Ok(n),
        _ => Err(format!(
            "logical block size {n} must be a power of two in 512..=4096"
        )),
    }
}

fn parse_max_io_bytes(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    let max = ublk::device::MAX_IO_BYTES;
    if (4096..=u64::from(max)).contains(&n) && n % 4096 == 0 {
        Ok(n)
    } else {
        Err(format!(
            "largest request {n} bytes must be a multiple of 4096 in 4096..={max}"
        ))
    }
}

/// ublksrv's `--debug_mask`: decimal, or hexadecimal with `0x`.
/// A decimal or `0x` hex number.
fn number(s: &str) -> Option<u64> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// A 32-bit decimal or `0x` hex number.
fn number32(s: &str) -> Option<u32> {
    number(s).and_then(|n| u32::try_from(n).ok())
}

fn parse_debug_mask(s: &str) -> Result<u32, String> {
    number32(s)
        .ok_or_else(|| format!("debug mask {s:?} is not a 32-bit number (decimal or 0x hex)"))
}

fn parse_u32_number(s: &str) -> Result<u32, String> {
    number32(s).ok_or_else(|| format!("{s:?} is not a 32-bit number (decimal or 0x hex)"))
}

fn parse_u64_number(s: &str) -> Result<u64, String> {
    number(s).ok_or_else(|| format!("{s:?} is not a 64-bit number (decimal or 0x hex)"))
}

/// The log level a ublksrv debug mask asks for (`None`: the default).
pub fn debug_mask_level(mask: u32) -> Option<log::LevelFilter> {
    const DEV: u32 = 0x1;
    const QUEUE: u32 = 0x2;
    const IO_CMD: u32 = 0x4;
    const IO: u32 = 0x8;
    const CTRL_CMD: u32 = 0x10;
    Some(if mask & IO != 0 {
        log::LevelFilter::Trace
    } else if mask & (QUEUE | IO_CMD) != 0 {
        log::LevelFilter::Debug
    } else if mask & (DEV | CTRL_CMD) != 0 || mask != 0 {
        log::LevelFilter::Info
    } else {
        return None;
    })
}

/// A device id from `7`, `ublkc7`, `ublkb7`, `ublkb7p1` or `/dev/ublkb7`.
fn parse_device_name(s: &str) -> Result<u32, String> {
    let name = s.strip_prefix("/dev/").unwrap_or(s);
    let digits = name
        .strip_prefix("ublkc")
        .or_else(|| name.strip_prefix("ublkb"))
        .unwrap_or(name);
    let digits = digits.split_once('p').map_or(digits, |(d, _)| d);
    match digits.parse() {
        Ok(id) if !digits.starts_with('+') => Ok(id),
        _ => Err(format!(
            "{s:?} is not a ublk device (a number, ublkcN, ublkbN or /dev/ublkbN)"
        )),
    }
}

impl BackingArgs {
    /// The backing file, from `-f` or the positional argument.
    pub fn file(&self) -> anyhow::Result<Option<&PathBuf>> {
        match (self.file.as_slice(), self.files.as_slice()) {
            ([f], []) | ([], [f]) => Ok(Some(f)),
            ([], []) => Ok(None),
            ([_, ..], [_, ..]) => Err(crate::usage(
                "give the backing file either with -f or as an argument, not both",
            )),
            _ => Err(crate::usage(
                "the loop target takes exactly one backing file",
            )),
        }
    }

    /// Every backing file, from `-f` (repeated) then the arguments.
    pub fn all(&self) -> Vec<&PathBuf> {
        self.file.iter().chain(&self.files).collect()
    }
}

impl AddArgs {
    /// The backing file, from `-f` or the positional argument (the loop
    /// target with --metadata_size: the first of its two).
    pub fn backing_file(&self) -> anyhow::Result<Option<&PathBuf>> {
        match self.loop_metadata_file()? {
            Some(_) => Ok(self.backing.all().first().copied()),
            None => self.backing.file(),
        }
    }

    /// The loop target's metadata file with --metadata_size: the second
    /// of its two files.
    pub fn loop_metadata_file(&self) -> anyhow::Result<Option<&PathBuf>> {
        if self.target != Some(TargetKind::Loop) || self.dev.metadata_size.is_none() {
            return Ok(None);
        }
        match self.backing.all().as_slice() {
            [_, meta] => Ok(Some(meta)),
            files => Err(crate::usage(format!(
                "the loop target with --metadata_size takes two files, the data and the metadata file (got {})",
                files.len()
            ))),
        }
    }
}

impl NullCli {
    /// The `ublk add -t null` arguments this command line means.
    pub fn into_add_args(self) -> AddArgs {
        AddArgs {
            target: Some(TargetKind::Null),
            dev: self.dev,
            backing: BackingArgs::default(),
            target_opts: TargetOptions::default(),
            nbd: Default::default(),
        }
    }
}

impl LoopCli {
    /// The `ublk add -t loop` arguments this command line means.
    pub fn into_add_args(self) -> AddArgs {
        AddArgs {
            target: Some(TargetKind::Loop),
            dev: self.dev,
            backing: self.backing,
            target_opts: TargetOptions::default(),
            nbd: Default::default(),
        }
    }
}

/// `--queue_affinity`: [`ublk::QueueAffinity`] on the command line.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum QueueAffinityArg {
    /// The first CPU of the queue's set.
    #[default]
    FirstCpu,
    /// Any CPU of the queue's set.
    QueueCpus,
    /// Not pinned.
    Unpinned,
}

/// `--csum_type`: kublk's names of the protection-information checksums.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CsumTypeArg {
    /// IP checksum (T10-DIF-TYPE*-IP, 8-byte tuple).
    Ip,
    /// CRC16 T10-DIF (T10-DIF-TYPE*-CRC, 8-byte tuple).
    T10dif,
    /// CRC64 NVMe (EXT-DIF-TYPE*-CRC64, 16-byte tuple).
    Nvme,
}

impl From<CsumTypeArg> for ublk::Checksum {
    fn from(c: CsumTypeArg) -> Self {
        match c {
            CsumTypeArg::Ip => Self::Ip,
            CsumTypeArg::T10dif => Self::T10Dif,
            CsumTypeArg::Nvme => Self::Nvme,
        }
    }
}

impl DevOptions {
    /// Whether any integrity option other than --metadata_size is given.
    pub fn integrity_options(&self) -> bool {
        self.integrity_capable
            || self.integrity_reftag
            || self.pi_offset.is_some()
            || self.csum_type.is_some()
            || self.tag_size.is_some()
    }

    /// The integrity parameters these options ask for, with intervals of
    /// `lbs` bytes (`None` without --metadata_size).
    pub fn integrity(&self, lbs: u32) -> Option<ublk::IntegrityParams> {
        let metadata_size = self.metadata_size?;
        let mut caps = ublk::PiCaps::empty();
        caps.set(ublk::PiCaps::INTEGRITY, self.integrity_capable);
        caps.set(ublk::PiCaps::REFTAG, self.integrity_reftag);
        Some(ublk::IntegrityParams {
            caps,
            interval: lbs,
            pi_offset: self.pi_offset.unwrap_or(0),
            checksum: self.csum_type.map_or(ublk::Checksum::None, Into::into),
            tag_size: self.tag_size.unwrap_or(0),
            ..ublk::IntegrityParams::new(metadata_size)
        })
    }
}

impl From<QueueAffinityArg> for ublk::QueueAffinity {
    fn from(a: QueueAffinityArg) -> Self {
        match a {
            QueueAffinityArg::FirstCpu => Self::FirstCpu,
            QueueAffinityArg::QueueCpus => Self::QueueCpus,
            QueueAffinityArg::Unpinned => Self::Unpinned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ublk").chain(args.iter().copied()))
    }

    fn add(args: &[&str]) -> AddArgs {
        match parse(args).unwrap().command {
            Command::Add(a) => a,
            c => panic!("not add: {c:?}"),
        }
    }

    /// The one-line message of a refused command line.
    fn refused(args: &[&str]) -> String {
        crate::clap_one_line(&parse(args).unwrap_err())
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        NullCli::command().debug_assert();
        LoopCli::command().debug_assert();
    }

    #[test]
    fn queue_affinity_defaults_to_the_first_cpu() {
        assert_eq!(
            add(&["add", "-t", "null"]).dev.queue_affinity,
            QueueAffinityArg::FirstCpu
        );
        let a = add(&["add", "-t", "null", "--queue_affinity", "queue_cpus"]);
        assert_eq!(a.dev.queue_affinity, QueueAffinityArg::QueueCpus);
        assert!(parse(&["add", "-t", "null", "--queue_affinity", "all"]).is_err());
    }

    #[test]
    fn io_scheduler_defaults_to_none() {
        assert_eq!(add(&["add", "-t", "null"]).dev.io_scheduler, "none");
        let a = add(&["add", "-t", "null", "--io_scheduler", "mq-deadline"]);
        assert_eq!(a.dev.io_scheduler, "mq-deadline");
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
            (a.dev.queues, a.backing_file().unwrap().unwrap().to_str()),
            (2, Some("disk.img"))
        );
        assert!(add(&["add", "-t", "loop", "-f", "a", "b"])
            .backing_file()
            .is_err());
    }

    #[test]
    fn defaults_and_flags() {
        let a = add(&["add", "-t", "null"]);
        assert_eq!(
            (a.dev.queues, a.dev.depth, a.dev.recovery, a.dev.size),
            (1, 128, 0, None)
        );
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
        let d = &a.dev;
        assert!(d.zero_copy && d.auto_zc && d.user_copy && d.need_get_data);
        assert_eq!(
            (d.recovery, d.recovery_reissue, d.size, d.id),
            (1, 1, Some(1 << 30), Some(3))
        );
    }

    #[test]
    fn ublksrv_and_kublk_spellings_and_the_hyphenated_ones() {
        let a = add(&[
            "add",
            "-t",
            "null",
            "--zerocopy",
            "--usercopy",
            "--get_data",
            "--user_recovery",
            "1",
            "--user_recovery_reissue",
            "1",
            "--user_recovery_fail_io",
            "0",
            "--read-only",
            "--logical-block-size",
            "4096",
            "--max-io-buf-bytes",
            "1M",
            "--debug_mask",
            "0x1f",
        ]);
        let d = &a.dev;
        assert!(d.zero_copy && d.user_copy && d.need_get_data && d.read_only);
        assert_eq!(
            (d.recovery, d.recovery_reissue, d.recovery_fail_io),
            (1, 1, 0)
        );
        assert_eq!(
            (d.logical_block_size, d.max_io_buf_bytes, d.debug_mask),
            (Some(4096), Some(1 << 20), Some(0x1f))
        );
        let a = add(&[
            "add",
            "-t",
            "null",
            "--read_only",
            "--logical_block_size",
            "1K",
        ]);
        assert_eq!(
            (a.dev.read_only, a.dev.logical_block_size),
            (true, Some(1024))
        );
        assert!(
            add(&["add", "-t", "null", "--need-get-data"])
                .dev
                .need_get_data
        );
        assert!(add(&["add", "-t", "null", "--zero-copy"]).dev.zero_copy);
        match parse(&["list", "-a"]).unwrap().command {
            Command::List(l) => assert!(l.all && l.id.is_none()),
            c => panic!("not list: {c:?}"),
        }
        assert!(parse(&["list", "-a", "-n", "1"]).is_err());
    }

    #[test]
    fn the_help_shows_one_style_of_long_names() {
        let help = Cli::command()
            .find_subcommand_mut("add")
            .unwrap()
            .render_long_help()
            .to_string();
        for long in [
            "--read_only",
            "--logical_block_size",
            "--max_io_buf_bytes",
            "--debug_mask",
        ] {
            assert!(help.contains(long), "{long} missing from {help}");
        }
        assert!(!help.contains("--read-only"), "{help}");
        assert!(help.contains("K, M, G, T"), "the size units: {help}");
        assert!(help.contains("Exit status"), "{help}");
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&["add", "-t", "raid"]).is_err());
        assert!(parse(&["add", "-t", "null", "-r", "2"]).is_err());
        assert!(parse(&["add", "-t", "null", "--bogus"]).is_err());
        assert!(parse(&["del"]).is_err());
        assert!(parse(&["del", "-n", "1", "-a"]).is_err());
        assert!(parse(&["add", "-t", "null", "-d", "x"]).is_err());
        let cases: [(&[&str], &str); 7] = [
            (
                &["add", "-t", "null", "-d", "100000"],
                "invalid value '100000' for '--depth <DEPTH>': queue depth 100000 is outside 1..=4096",
            ),
            (
                &["add", "-t", "null", "-q", "0"],
                "invalid value '0' for '--queues <QUEUES>': number of queues 0 is outside 1..=4096",
            ),
            (
                &["add", "-t", "null", "--nthreads", "0"],
                "invalid value '0' for '--nthreads <NTHREADS>': number of threads 0 is outside 1..=65535",
            ),
            (
                &["add", "-t", "null", "--max_io_buf_bytes", "1000"],
                "invalid value '1000' for '--max_io_buf_bytes <SIZE>': largest request 1000 bytes must be a multiple of 4096 in 4096..=33554432",
            ),
            (
                &["add", "-t", "null", "--size", "garbage"],
                "invalid value 'garbage' for '--size <SIZE>': invalid size \"garbage\": not a number with an optional unit (K, M, G, T: powers of 1024)",
            ),
            (
                &["add", "-t", "null", "--logical_block_size", "1000"],
                "invalid value '1000' for '--logical_block_size <LOGICAL_BLOCK_SIZE>': logical block size 1000 must be a power of two in 512..=4096",
            ),
            (
                &["add", "-t", "null", "--debug_mask", "lots"],
                "invalid value 'lots' for '--debug_mask <MASK>': debug mask \"lots\" is not a 32-bit number (decimal or 0x hex)",
            ),
        ];
        for (args, message) in cases {
            assert_eq!(refused(args), message, "{args:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("250G"), Ok(250 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("0.1K").is_err());
        assert_eq!(
            add(&["add", "-t", "null", "-s", "1GiB"]).dev.size,
            Some(1 << 30)
        );
        assert_eq!(
            add(&["add", "-t", "null", "-s", "1.5G"]).dev.size,
            Some(3 << 29)
        );
        assert_eq!(parse_scheduler("mq-deadline").as_deref(), Ok("mq-deadline"));
        assert!(parse_scheduler("").is_err());
        assert!(parse_scheduler("none\n").is_err());
        assert!(parse_scheduler("../x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn debug_mask_levels() {
        use log::LevelFilter::*;
        assert_eq!(debug_mask_level(0), None);
        assert_eq!(debug_mask_level(0x1), Some(Info));
        assert_eq!(debug_mask_level(0x10), Some(Info));
        assert_eq!(debug_mask_level(0x100), Some(Info));
        assert_eq!(debug_mask_level(0x2), Some(Debug));
        assert_eq!(debug_mask_level(0x14), Some(Debug));
        assert_eq!(debug_mask_level(0x1f), Some(Trace));
        assert_eq!(parse_debug_mask("0x1F"), Ok(0x1f));
        assert_eq!(parse_debug_mask("31"), Ok(31));
    }

    #[test]
    fn device_names_for_udev() {
        for s in ["7", "ublkc7", "ublkb7", "ublkb7p1", "/dev/ublkb7"] {
            assert_eq!(parse_device_name(s), Ok(7), "{s}");
        }
        for s in ["", "sda", "ublkb", "/dev/ublkbx", "+7"] {
            assert!(parse_device_name(s).is_err(), "{s}");
        }
    }

    #[test]
    fn the_wrappers_fix_the_target() {
        let a = NullCli::try_parse_from(["ublk-null", "-q", "2"])
            .unwrap()
            .into_add_args();
        assert_eq!((a.target, a.dev.queues), (Some(TargetKind::Null), 2));
        let a = LoopCli::try_parse_from(["ublk-loop", "disk.img"])
            .unwrap()
            .into_add_args();
        assert_eq!(a.target, Some(TargetKind::Loop));
        assert_eq!(
            a.backing_file().unwrap().unwrap().to_str(),
            Some("disk.img")
        );
        for (e, want) in [
            (
                NullCli::try_parse_from(["ublk-null", "-t", "loop"]).unwrap_err(),
                "unexpected argument '-t' found",
            ),
            (
                NullCli::try_parse_from(["ublk-null", "disk.img"]).unwrap_err(),
                "unexpected argument 'disk.img' found",
            ),
            (
                LoopCli::try_parse_from(["ublk-loop", "--type", "null", "x"]).unwrap_err(),
                "unexpected argument '--type' found (to pass '--type' as a value, use '-- --type')",
            ),
        ] {
            assert_eq!(crate::clap_one_line(&e), want);
        }
        let help = NullCli::command().render_help().to_string();
        assert!(help.starts_with("Add a ublk null device"), "{help}");
        assert!(help.contains("Usage: ublk-null [OPTIONS]\n"), "{help}");
        assert!(!help.contains("--type") && !help.contains("FILE"), "{help}");
        let help = LoopCli::command().render_help().to_string();
        assert!(help.contains("Usage: ublk-loop [OPTIONS] [FILE]"), "{help}");
    }

    #[test]
    fn state_files_keep_their_flat_layout() {
        let a = add(&["add", "-t", "loop", "-q", "2", "--size", "1M", "x.img"]);
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["target"], "loop");
        assert_eq!(v["queues"], 2);
        assert_eq!(v["files"][0], "x.img");
        // A state file written before --debug_mask existed still loads.
        let mut old = v.as_object().unwrap().clone();
        old.remove("debug_mask");
        let back: AddArgs = serde_json::from_value(old.into()).unwrap();
        assert_eq!((back.dev.queues, back.dev.size), (2, Some(1 << 20)));
    }
}
