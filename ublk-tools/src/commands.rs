//! The subcommands.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use ublk::params::{Attrs, BasicParams, DiscardParams, Params, SegmentParams};
use ublk::{Control, CopyMode, DevInfo, Device, DeviceBuilder, Errno, Features, StartKind};

use crate::cli::{
    AddArgs, Command, CompletionsArgs, DaemonArgs, DelArgs, ListArgs, StopArgs, TargetKind,
    UpdateSizeArgs, UserIdArgs,
};
use crate::state::{self, DeviceState};
use crate::targets::{
    fault_inject, loop_target, stripe_target, AnyTarget, Backing, BackingOptions, NullTarget,
};
use crate::{emit, usage};

/// Default size of a null device: 250 GiB, like ublksrv and kublk.
pub const NULL_DEFAULT_SIZE: u64 = 250 << 30;

/// Runs one command.
pub fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Add(a) => add(a, false),
        Command::Recover(a) => add(a, true),
        Command::Del(a) => del(&a),
        Command::Stop(a) => stop(&a),
        Command::List(a) => list(&a),
        Command::Features => features(),
        Command::Quiesce(a) => {
            let ctrl = open_control()?;
            let info = existing(&ctrl, a.id)?;
            if !info.flags().contains(Features::QUIESCE) {
                bail!("device {} was not created with quiesce support (it needs -r 1 on a kernel with UBLK_F_QUIESCE)", a.id);
            }
            // For a batch device QUIESCE_DEV does not wait for idle I/O,
            // and cancelling its fetch commands (ublk_batch_cancel_queue)
            // sets the queue's force_abort, so requests arriving before
            // the recovered server fail with EIO (seen on 7.2.13) instead
            // of waiting for it. Refuse rather than fail I/O.
            if info.flags().contains(Features::BATCH_IO) {
                bail!("device {} uses batch I/O (-b): quiesce would fail its in-flight I/O; use `ublk stop` or `ublk del`", a.id);
            }
            ctrl.quiesce_dev(info.dev_ref(), 30_000)?;
            // The kernel has aborted the server's commands; the device is
            // QUIESCED (or FAIL_IO) once that server has let go of it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                match ctrl.dev_info(a.id).map(|i| i.state()) {
                    Ok(ublk::DevState::Live) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Ok(ublk::DevState::Live) => bail!(
                        "device {} was quiesced but its server (pid {}) has not let go of it",
                        a.id,
                        info.server_pid()
                    ),
                    Ok(_) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::UpdateSize(a) => update_size(&a),
        Command::Completions(a) => completions(&a),
        Command::UserId(a) => user_id(&a),
        Command::Daemon(d) => daemon(&d),
    }
}

/// The control device to open: `UBLK_CONTROL` if set (for tests and
/// unusual set-ups), else `/dev/ublk-control`.
pub fn control_path() -> PathBuf {
    std::env::var_os("UBLK_CONTROL")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(ublk::ctrl::CONTROL_PATH), PathBuf::from)
}

fn open_control() -> anyhow::Result<Control> {
    Ok(Control::open_path(control_path())?)
}

/// The info of device `id`, or "device N does not exist".
fn existing(ctrl: &Control, id: u32) -> anyhow::Result<DevInfo> {
    ctrl.dev_info(id).map_err(|e| match e.errno() {
        Some(Errno::NODEV | Errno::NOENT) => anyhow!("device {id} does not exist"),
        Some(Errno::PERM | Errno::ACCESS) => {
            anyhow!("permission denied for device {id}: it belongs to another user (or needs root)")
        }
        _ => e.into(),
    })
}

/// The copy mode and device flags `a` asks for.
fn plan(a: &AddArgs) -> anyhow::Result<(CopyMode, Features)> {
    let modes = [
        a.dev.zero_copy,
        a.dev.auto_zc,
        a.dev.user_copy,
        a.dev.need_get_data,
    ]
    .iter()
    .filter(|&&m| m)
    .count();
    // kublk's `-z --auto_zc --auto_zc_fallback`: auto registration whose
    // fallback registers by hand, which zero copy's flag allows.
    let fallback_zc = a.dev.zero_copy && a.dev.auto_zc && a.dev.auto_zc_fallback;
    if modes > 1 && !(fallback_zc && modes == 2) {
        return Err(usage("choose one of -z, --auto_zc, -u and -g"));
    }
    if a.dev.auto_zc_fallback && !a.dev.auto_zc {
        return Err(usage("--auto_zc_fallback needs --auto_zc"));
    }
    // Batch I/O (-b) threads serve whole queues, as in kublk: fewer
    // threads than queues share them out, more are one per queue.
    if a.dev.nthreads.is_some_and(|n| n != a.dev.queues) && !a.dev.per_io_tasks && !a.dev.batch {
        return Err(usage(
            "--nthreads other than the number of queues needs --per_io_tasks",
        ));
    }
    let mode = if a.dev.zero_copy && !fallback_zc {
        CopyMode::ZeroCopy
    } else if a.dev.auto_zc {
        CopyMode::AutoBufReg {
            fallback: a.dev.auto_zc_fallback,
        }
    } else if a.dev.user_copy {
        CopyMode::UserCopy
    } else if a.dev.need_get_data {
        CopyMode::NeedGetData
    } else {
        CopyMode::Copy
    };
    let mut flags = Features::empty();
    // As in kublk, -e 1 and -i 1 imply -r 1.
    let recovery =
        a.dev.recovery == 1 || a.dev.recovery_reissue == 1 || a.dev.recovery_fail_io == 1;
    for (on, f) in [
        (fallback_zc, Features::SUPPORT_ZERO_COPY),
        (recovery, Features::USER_RECOVERY),
        (a.dev.recovery_reissue == 1, Features::USER_RECOVERY_REISSUE),
        (a.dev.recovery_fail_io == 1, Features::USER_RECOVERY_FAIL_IO),
        (a.dev.unprivileged, Features::UNPRIVILEGED_DEV),
        (a.dev.no_auto_part_scan, Features::NO_AUTO_PART_SCAN),
        (a.dev.batch, Features::BATCH_IO),
        (a.dev.shmem_zc, Features::SHMEM_ZC),
        (a.dev.metadata_size.is_some(), Features::INTEGRITY),
    ] {
        if on {
            flags |= f;
        }
    }
    // Combinations the library refuses too, said here with the flags.
    if a.dev.recovery_reissue == 1 && a.dev.recovery_fail_io == 1 {
        return Err(usage(
            "recovery reissue (-i 1) and fail-I/O (-e 1) exclude each other",
        ));
    }
    if a.dev.batch && a.dev.need_get_data {
        return Err(usage(
            "batch I/O (-b) does not work with NEED_GET_DATA (-g)",
        ));
    }
    if a.dev.batch && a.dev.per_io_tasks && a.dev.nthreads.is_some_and(|n| n != a.dev.queues) {
        return Err(usage(
            "batch I/O (-b) serves whole queues, --per_io_tasks spreads them: choose one",
        ));
    }
    // As kublk: integrity needs user copy, and its options need a size.
    if a.dev.metadata_size.is_some() && mode != CopyMode::UserCopy {
        return Err(usage(
            "integrity metadata (--metadata_size) needs user copy (-u)",
        ));
    }
    if a.dev.metadata_size.is_none() && a.dev.integrity_options() {
        return Err(usage(
            "--integrity_capable, --integrity_reftag, --pi_offset, --csum_type and --tag_size need --metadata_size",
        ));
    }
    if a.dev.unprivileged && recovery {
        return Err(usage(
            "unprivileged devices cannot use user recovery (-r 1): the kernel forbids it",
        ));
    }
    Ok((mode, flags))
}

/// The device `a` describes on a kernel with `kernel` features, checked by
/// [`DeviceBuilder::validate`] (which needs no kernel: pass
/// `Features::empty()` to check the arguments before the driver is asked).
fn builder(a: &AddArgs, kernel: Features) -> anyhow::Result<(DeviceBuilder, CopyMode)> {
    let (mode, mut flags) = plan(a)?;
    // Quiesce comes with recovery where the kernel has it, as in kublk.
    if flags.contains(Features::USER_RECOVERY) && kernel.contains(Features::QUIESCE) {
        flags |= Features::QUIESCE;
    }
    let mut b = DeviceBuilder::new()
        .queues(a.dev.queues)
        .depth(a.dev.depth)
        .copy_mode(mode)
        .flags(flags);
    if let Some(id) = a.dev.id {
        b = b.id(id);
    }
    if a.dev.per_io_tasks || a.dev.batch {
        b = b.threads(a.dev.nthreads.unwrap_or(a.dev.queues));
    }
    if let Some(bytes) = a.dev.max_io_buf_bytes {
        let bytes = u32::try_from(bytes)
            .map_err(|_| usage(format!("--max_io_buf_bytes {bytes} is too large")))?;
        b = b.max_io_bytes(bytes);
    }
    b.validate().map_err(|e| match e {
        ublk::Error::Config(msg) => usage(msg),
        e => e.into(),
    })?;
    Ok((b, mode))
}

/// kublk's null target's DMA alignment and segment limits.
const NULL_DMA_ALIGNMENT: u32 = 4095;
const NULL_SEGMENTS: SegmentParams = SegmentParams {
    seg_boundary_mask: 4095,
    max_segment_size: 32 << 10,
    max_segments: 32,
};
/// The kernel's segment limits where none are set (BLK_SEG_BOUNDARY_MASK,
/// BLK_MAX_SEGMENT_SIZE, BLK_MAX_SEGMENTS): what a segment option left out
/// stays at.
const KERNEL_SEGMENTS: SegmentParams = SegmentParams {
    seg_boundary_mask: 0xffff_ffff,
    max_segment_size: 1 << 16,
    max_segments: 128,
};

/// The DMA alignment and segment parameters of `a` on a `kind` device:
/// the options, else kublk's values for null, else none; checked as
/// [`Params::validate`] does.
fn queue_limits(
    a: &AddArgs,
    kind: TargetKind,
) -> anyhow::Result<(Option<u32>, Option<SegmentParams>)> {
    let d = &a.dev;
    let null = kind == TargetKind::Null;
    let dma = d.dma_alignment.or(null.then_some(NULL_DMA_ALIGNMENT));
    let given =
        d.seg_boundary_mask.is_some() || d.max_segment_size.is_some() || d.max_segments.is_some();
    let segment = if null || given {
        let base = if null { NULL_SEGMENTS } else { KERNEL_SEGMENTS };
        let max_segment_size = match d.max_segment_size {
            None => base.max_segment_size,
            Some(size) => u32::try_from(size)
                .map_err(|_| usage(format!("--max_segment_size {size} is too large")))?,
        };
        Some(SegmentParams {
            seg_boundary_mask: d.seg_boundary_mask.unwrap_or(base.seg_boundary_mask),
            max_segment_size,
            max_segments: d.max_segments.unwrap_or(base.max_segments),
        })
    } else {
        None
    };
    let check = Params {
        dma_alignment: dma,
        segment,
        ..Params::basic(BasicParams::new(1 << 20, 1 << 20))
    };
    check.validate().map_err(|e| match e {
        ublk::Error::Config(msg) => usage(msg),
        e => e.into(),
    })?;
    Ok((dma, segment))
}

fn target_kind(a: &AddArgs) -> anyhow::Result<TargetKind> {
    a.target
        .ok_or_else(|| usage("missing target type: use -t null, loop, stripe, fault_inject or nbd"))
}

/// The checks of `a` that need neither the driver nor the backing file
/// (usage errors): the target and its file, the options and their
/// combinations, everything [`DeviceBuilder::validate`] checks.
fn check_arguments(a: &AddArgs) -> anyhow::Result<()> {
    let kind = target_kind(a)?;
    check_target_options(a, kind)?;
    check_shmem_options(a, kind)?;
    if kind == TargetKind::Nbd {
        crate::nbd::addr(a)?;
        if a.dev.size.is_some() {
            return Err(usage(
                "--size: the NBD export decides the size of an nbd device",
            ));
        }
        if a.dev.per_io_tasks || a.dev.nthreads.is_some() {
            return Err(usage(
                "--nthreads/--per_io_tasks: an nbd device serves each queue over its own connection from one thread",
            ));
        }
    } else if a.nbd.any() {
        return Err(usage(
            "--host, --port, --unix, --export_name and --reconnect_timeout are options of the nbd target (-t nbd)",
        ));
    }
    if a.dev.metadata_size.is_some() && !matches!(kind, TargetKind::Null | TargetKind::Loop) {
        return Err(usage("--metadata_size works with -t null and loop"));
    }
    if let Some(i) = a.dev.integrity(a.dev.logical_block_size.unwrap_or(512)) {
        let check = Params {
            integrity: Some(i),
            ..Params::basic(BasicParams::new(1 << 20, 1 << 20))
        };
        check.validate().map_err(|e| match e {
            ublk::Error::Config(msg) => usage(msg),
            e => e.into(),
        })?;
    }
    let files = a.backing.all();
    match kind {
        TargetKind::Stripe if files.is_empty() => {
            return Err(usage(
                "the stripe target needs backing files: -f FILE [-f FILE]... or FILE...",
            ))
        }
        TargetKind::Stripe if files.len() > ublk::targets::stripe::MAX_FILES => {
            return Err(usage(format!(
                "the stripe target takes at most {} backing files (got {})",
                ublk::targets::stripe::MAX_FILES,
                files.len()
            )))
        }
        TargetKind::Stripe if a.dev.size.is_some() => {
            return Err(usage(
                "--size is not for the stripe target: its size is its files'",
            ))
        }
        TargetKind::FaultInject if files.len() > 1 => {
            return Err(usage(
                "the fault_inject target takes at most one backing file",
            ))
        }
        _ => {}
    }
    let single = match kind {
        TargetKind::Stripe => None,
        _ => a.backing_file()?,
    };
    match (kind, single) {
        (TargetKind::Loop, None) => {
            return Err(usage(
                "the loop target needs a backing file: -f FILE or FILE",
            ))
        }
        (TargetKind::Null, Some(f)) => {
            return Err(usage(format!(
                "the null target takes no backing file (got {})",
                f.display()
            )))
        }
        _ => {}
    }
    if kind == TargetKind::Null || (kind == TargetKind::FaultInject && files.is_empty()) {
        let lbs = u64::from(a.dev.logical_block_size.unwrap_or(512));
        match a.dev.size {
            Some(0) => return Err(usage("--size 0: a device needs a non-zero size")),
            Some(size) if size % lbs != 0 => {
                return Err(usage(format!(
                    "--size {size} is not a multiple of the logical block size {lbs}"
                )))
            }
            _ => {}
        }
    }
    builder(a, Features::empty())?;
    queue_limits(a, kind)?;
    Ok(())
}

/// Shared-memory zero copy: `--htlb` needs `--shmem_zc`,
/// `--rdonly_shmem_buf` needs `--htlb`, and the targets that serve it are
/// null and loop (fault_inject over either).
fn check_shmem_options(a: &AddArgs, kind: TargetKind) -> anyhow::Result<()> {
    if a.dev.htlb.is_some() && !a.dev.shmem_zc {
        return Err(usage("--htlb needs --shmem_zc"));
    }
    if a.dev.rdonly_shmem_buf && a.dev.htlb.is_none() {
        return Err(usage("--rdonly_shmem_buf needs --htlb PATH"));
    }
    if a.dev.shmem_zc && matches!(kind, TargetKind::Stripe | TargetKind::Nbd) {
        return Err(usage(
            "--shmem_zc works with -t null, loop and fault_inject",
        ));
    }
    Ok(())
}

/// Opens the `--htlb` file (as `--rdonly_shmem_buf` asks), refusing an
/// empty one.
fn open_htlb(a: &AddArgs) -> anyhow::Result<Option<File>> {
    let Some(path) = &a.dev.htlb else {
        return Ok(None);
    };
    let f = File::options()
        .read(true)
        .write(!a.dev.rdonly_shmem_buf)
        .open(path)
        .with_context(|| format!("--htlb {}", path.display()))?;
    if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        bail!(
            "--htlb {}: the file is empty (give it a size, e.g. fallocate -l 4M)",
            path.display()
        );
    }
    Ok(Some(f))
}

/// Refuses the options of one target given to another.
fn check_target_options(a: &AddArgs, kind: TargetKind) -> anyhow::Result<()> {
    let t = &a.target_opts;
    if kind != TargetKind::Stripe && t.chunk_size.is_some() {
        return Err(usage("--chunk_size is an option of -t stripe"));
    }
    if t.die_during_fetch == Some(1) && a.dev.batch {
        return Err(usage(
            "--die_during_fetch does not work with batch I/O (-b): one command fetches every tag",
        ));
    }
    if kind != TargetKind::FaultInject {
        let given = [
            ("--delay_us", t.delay_us.is_some()),
            ("--die_during_fetch", t.die_during_fetch.is_some()),
            ("--error_rate", t.error_rate.is_some()),
            ("--error_range", t.error_range.is_some()),
        ];
        if let Some((name, _)) = given.iter().find(|(_, on)| *on) {
            return Err(usage(format!("{name} is an option of -t fault_inject")));
        }
    }
    Ok(())
}

/// Opens the backing files of the target `kind` (none for null), each
/// checked by [`Backing::open`]; a stripe's must be of one size.
fn open_backings(a: &AddArgs, kind: TargetKind) -> anyhow::Result<Vec<Backing>> {
    let files = match kind {
        TargetKind::Null | TargetKind::Nbd => Vec::new(),
        TargetKind::Stripe => a.backing.all(),
        TargetKind::Loop | TargetKind::FaultInject => a.backing_file()?.into_iter().collect(),
    };
    let backings = files
        .into_iter()
        .map(|f| Backing::open(f, backing_options(a)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if kind == TargetKind::Stripe {
        stripe_size(a, &backings)?;
    }
    Ok(backings)
}

/// The loop target's metadata file (--metadata_size with a second file),
/// opened without O_DIRECT (its accesses are a few bytes per block), and
/// its size; refused if it holds no block's metadata.
fn open_metadata(a: &AddArgs) -> anyhow::Result<Option<(File, PathBuf, u64)>> {
    let (Some(path), Some(entry)) = (a.loop_metadata_file()?, a.dev.metadata_size) else {
        return Ok(None);
    };
    let shown = path.display();
    let f = File::options()
        .read(true)
        .write(!a.dev.read_only)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow!("metadata file {shown} does not exist"),
            _ => anyhow!("cannot open metadata file {shown}: {e}"),
        })?;
    let size = rustix::fs::seek(&f, rustix::fs::SeekFrom::End(0))
        .with_context(|| format!("cannot read the size of metadata file {shown}"))?;
    if size < u64::from(entry) {
        bail!(
            "metadata file {shown} ({size} bytes) is smaller than one block's {entry} bytes of metadata: make it 1/{} of the data file's size, e.g. truncate -s SIZE {shown}",
            512 / u32::from(entry).min(512)
        );
    }
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    Ok(Some((f, path, size)))
}

/// Fills the first `len` bytes of the metadata file `f` with 0xff: an
/// application tag of 0xffff tells the block layer to check nothing, so
/// blocks never written read back without errors (what kublk does).
fn clear_metadata(f: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let chunk = vec![0xffu8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(chunk.len() as u64) as usize;
        f.write_all_at(&chunk[..n], off)?;
        off += n as u64;
    }
    f.sync_data()
}

/// The size of a stripe over `backings`: [`ublk::targets::stripe::stripe_capacity`],
/// its refusal said with the files' names.
fn stripe_size(a: &AddArgs, backings: &[Backing]) -> anyhow::Result<u64> {
    use ublk::targets::stripe::{stripe_capacity, DEFAULT_CHUNK_SIZE};
    let chunk = a.target_opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    let sizes: Vec<u64> = backings.iter().map(|b| b.size).collect();
    stripe_capacity(&sizes, chunk).map_err(|_| {
        let whole = |b: &Backing| b.size & !(u64::from(chunk) - 1);
        match backings.iter().find(|b| whole(b) != whole(&backings[0])) {
            Some(b) => anyhow!(
                "stripe files must be the same size in whole {chunk}-byte chunks: {} has {}, {} has {}",
                backings[0].path.display(),
                whole(&backings[0]),
                b.path.display(),
                whole(b)
            ),
            None => anyhow!(
                "stripe file {} ({} bytes) is smaller than one {chunk}-byte chunk",
                backings[0].path.display(),
                backings[0].size
            ),
        }
    })
}

/// Checks everything that can be checked before a daemon starts: the
/// arguments first ([`check_arguments`]), then the backing file, then the
/// driver and what it supports.
fn precheck(a: &AddArgs, recover: bool) -> anyhow::Result<()> {
    check_arguments(a)?;
    drop(open_backings(a, target_kind(a)?)?);
    drop(open_metadata(a)?);
    drop(open_htlb(a)?);
    let ctrl = open_control()?;
    let (b, _) = builder(a, ctrl.features())?;
    ctrl.require(b.requested_flags(ctrl.features()))?;
    match (recover, a.dev.id) {
        (false, Some(id)) if ctrl.dev_info(id).is_ok() => bail!("device id {id} is already in use"),
        (true, None) => return Err(usage("recover needs the device id: -n ID")),
        (true, Some(id)) => {
            let info = existing(&ctrl, id)?;
            if !info.flags().contains(Features::USER_RECOVERY) {
                bail!(
                    "device {id} was not created with user recovery (-r 1) and cannot be recovered"
                );
            }
            let pid = info.server_pid();
            if info.state() == ublk::DevState::Live && pid > 0 && process_running(pid) {
                bail!("device {id} is live, served by pid {pid}: nothing to recover (stop, kill or quiesce that server first)");
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether `pid` is a process that has not exited (a zombie has).
fn process_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|st| {
        // The state follows the parenthesised command name.
        !matches!(
            st.rsplit(')')
                .next()
                .map(str::trim_start)
                .and_then(|r| r.chars().next()),
            Some('Z' | 'X') | None
        )
    })
}

fn backing_options(a: &AddArgs) -> BackingOptions {
    BackingOptions {
        read_only: a.dev.read_only,
        buffered: a.dev.buffered_io,
        size: a.dev.size,
        logical_block_size: a.dev.logical_block_size,
    }
}

/// What the daemon tells `add` on its stdout, JSON lines: `created` once
/// the device exists (so `add` can delete it should the daemon die before
/// it is live), then `id` once it is live, or `error`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    id: Option<u32>,
    error: Option<String>,
    #[serde(default)]
    created: Option<u32>,
    /// Something the user should know (nbd: one queue where more were asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

fn add(mut a: AddArgs, recover: bool) -> anyhow::Result<ExitCode> {
    if recover {
        let id = a
            .dev
            .id
            .ok_or_else(|| usage("recover needs the device id: -n ID"))?;
        if a.target.is_some() {
            check_arguments(&a)?;
        }
        // Another user's device: say so before looking for our state file.
        existing(&open_control()?, id)?;
        if a.target.is_none() {
            let st = DeviceState::load(id).ok_or_else(|| {
                anyhow!(
                    "no state file {} for device {id}: give the target options again",
                    state::path(id).display()
                )
            })?;
            let (foreground, quiet) = (a.dev.foreground, a.dev.quiet);
            a = st.options;
            a.dev.id = Some(id);
            a.dev.foreground = foreground;
            a.dev.quiet = quiet;
        }
    }
    if a.dev.foreground && !recover && a.target_opts.die_during_fetch == Some(1) {
        return Err(usage(
            "--die_during_fetch 1 with add --foreground would leave the new device behind: use it with recover, or without --foreground",
        ));
    }
    precheck(&a, recover)?;
    if a.dev.foreground {
        return serve(&a, recover, None).map(|()| ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let dir = state::ensure_dir()?;
    let log_path = dir.join("daemon.log");
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__daemon");
    if recover {
        cmd.arg("--recover");
    }
    cmd.arg(serde_json::to_string(&a)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    own_session(&mut cmd);
    let mut child = cmd.spawn().context("cannot start the daemon")?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("daemon has no stdout"))?;
    let mut out = BufReader::new(out);
    let mut created = None;
    let report = loop {
        let mut line = String::new();
        out.read_line(&mut line)
            .context("reading the daemon's report")?;
        match serde_json::from_str::<Report>(line.trim()).ok() {
            Some(Report {
                created: Some(id), ..
            }) => created = Some(id),
            r => break r,
        }
    };
    match report {
        Some(Report {
            id: Some(id), note, ..
        }) => {
            if let Some(note) = note {
                eprintln!("ublk: note: {note}");
            }
            // The device is made and served: a closed stdout only ends
            // this report (quietly, status 0).
            if !a.dev.quiet {
                let ctrl = open_control()?;
                emit(&show_devices(&ctrl, &[id], false)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Report { error: Some(e), .. }) => {
            let _ = child.wait();
            Err(anyhow!(e))
        }
        _ => {
            let status = child.wait()?;
            // Killed before the device was live: it was never started, and
            // nobody else will delete it.
            if let Some(id) = created.filter(|_| !recover) {
                if let Ok(ctrl) = open_control() {
                    if let Ok(info) = ctrl.dev_info(id) {
                        if info.state() != ublk::DevState::Live {
                            let _ = ctrl.stop_dev(info.dev_ref());
                            let _ = ctrl.del_dev(info.dev_ref());
                            DeviceState::remove(id);
                        }
                    }
                }
            }
            Err(anyhow!(
                "the daemon exited ({status}) before the device was live; see {}",
                log_path.display()
            ))
        }
    }
}

/// Starts the daemon in a session of its own (`setsid`, as kublk's and
/// rublk's daemons do): no terminal's Ctrl-C or hang-up reaches it, and the
/// scheduler's autogroup gives it a group of its own, so its queue threads
/// do not preempt the caller's I/O load at every wake-up (README,
/// Benchmarks: this is what made two queues as fast as the peers').
#[allow(unsafe_code)] // a pre-exec hook: the one unsafe call of the tools
fn own_session(cmd: &mut std::process::Command) {
    // SAFETY: the hook runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: setsid(2) is a bare system call
    // (rustix calls it directly), and `Errno` becomes an `io::Error`
    // without allocating.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        })
    };
}

fn daemon(d: &DaemonArgs) -> anyhow::Result<ExitCode> {
    let a: AddArgs = serde_json::from_str(&d.json).context("bad daemon arguments")?;
    let mut stdout = std::io::stdout();
    match serve(&a, d.recover, Some(&mut stdout)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            let msg = crate::one_line(&e);
            // The parent may be gone already (the device was live before).
            let _ = writeln!(
                stdout,
                "{}",
                serde_json::to_string(&Report {
                    error: Some(msg.clone()),
                    ..Default::default()
                })?
            );
            log::error!("{msg}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Creates (or recovers) the device and serves it until it stops.
/// `report` is the pipe to `add` (daemon mode), answered once.
fn serve(
    a: &AddArgs,
    recover: bool,
    mut report: Option<&mut std::io::Stdout>,
) -> anyhow::Result<()> {
    let kind = target_kind(a)?;
    let ctrl = Arc::new(open_control()?);
    // Nbd: the server is asked first, so a bad one leaves no device; it
    // may allow only one queue.
    let nbd = match kind {
        TargetKind::Nbd => Some(Arc::new(crate::nbd::NbdServe::open(a)?)),
        _ => None,
    };
    let nbd_args;
    let a = match &nbd {
        Some(n) if n.queues != a.dev.queues => {
            log::warn!("{}", n.note.as_deref().unwrap_or_default());
            let mut one = a.clone();
            one.dev.queues = n.queues;
            nbd_args = one;
            &nbd_args
        }
        _ => a,
    };
    let (builder, mode) = builder(a, ctrl.features())?;
    let backings = open_backings(a, kind)?;
    let htlb = open_htlb(a)?;
    let size = match (kind, backings.first()) {
        (TargetKind::Stripe, _) => stripe_size(a, &backings)?,
        (_, Some(b)) => b.size,
        (_, None) => match &nbd {
            Some(n) => n.info.size,
            None => a.dev.size.unwrap_or(NULL_DEFAULT_SIZE),
        },
    };
    if let Some(r) = a.target_opts.error_range {
        if r.start >= size {
            return Err(usage(format!(
                "--error_range starts at byte {}, past the end of the device ({size} bytes)",
                r.start
            )));
        }
    }
    let lbs = backings
        .iter()
        .map(|b| b.logical_block_size)
        .max()
        .unwrap_or(a.dev.logical_block_size.unwrap_or(512));
    let integrity = a.dev.integrity(lbs);
    let metadata = open_metadata(a)?;
    // The device ends where the data or the metadata file does.
    let size = match (&metadata, integrity) {
        (Some((_, path, len)), Some(i)) => {
            let covered = i.data_len(*len) / u64::from(lbs) * u64::from(lbs);
            if covered < size {
                log::warn!(
                    "metadata file {} covers {covered} bytes of data: the device has {covered} of {size}",
                    path.display()
                );
            }
            size.min(covered)
        }
        _ => size,
    };
    if size == 0 {
        bail!("the device would have no whole logical block of {lbs} bytes");
    }
    // One file's traits (loop, fault_inject over a file); a stripe has
    // several and offers no discard.
    let backing = backings.first().filter(|_| kind != TargetKind::Stripe);
    let mut dev = if recover {
        let id = a.dev.id.unwrap_or_default();
        let mut dev = Device::recover(Arc::clone(&ctrl), id, mode).map_err(|e| match e.errno() {
            Some(Errno::BUSY) => {
                let pid = ctrl.dev_info(id).map_or(-1, |i| i.server_pid());
                anyhow!("device {id} is busy: its server (pid {pid}) is still attached; stop it or wait for it to exit")
            }
            _ => e.into(),
        })?;
        // The threads it was served with (its state file's options).
        if let (true, Some(n)) = (a.dev.per_io_tasks || a.dev.batch, a.dev.nthreads) {
            dev.set_threads(n)?;
        }
        dev
    } else {
        let dev = builder
            .add(Arc::clone(&ctrl))
            .map_err(|e| match e.errno() {
                Some(Errno::EXIST) => {
                    anyhow!(
                        "device id {} is already in use",
                        a.dev.id.unwrap_or_default()
                    )
                }
                _ => e.into(),
            })?;
        dev
    };
    if let (false, Some(out)) = (recover, report.as_mut()) {
        let created = Report {
            created: Some(dev.id()),
            ..Default::default()
        };
        let _ = writeln!(out, "{}", serde_json::to_string(&created)?);
        let _ = out.flush();
    }
    if !recover {
        let mut basic = BasicParams::new(size, dev.info().max_io_buf_bytes());
        basic.logical_block_size = lbs;
        basic.physical_block_size = lbs.max(basic.physical_block_size).max(
            backings
                .iter()
                .map(|b| b.physical_block_size)
                .max()
                .unwrap_or(0),
        );
        basic.io_min = lbs;
        basic.io_opt = lbs;
        if !backings.is_empty() {
            basic.attrs |= Attrs::VOLATILE_CACHE | Attrs::FUA;
        }
        if a.dev.read_only {
            basic.attrs |= Attrs::READ_ONLY;
        }
        let mut params = Params::basic(basic);
        (params.dma_alignment, params.segment) = queue_limits(a, kind)?;
        // A discarded range would keep its old metadata: no discard with it.
        params.discard = backing
            .filter(|_| integrity.is_none())
            .and_then(|b| discard_params(b.discard, b.write_zeroes, lbs));
        params.integrity = integrity;
        if let (Some((f, path, _)), Some(i), false) = (&metadata, integrity, a.dev.read_only) {
            clear_metadata(f, i.metadata_len(size))
                .with_context(|| format!("cannot initialise metadata file {}", path.display()))?;
        }
        if let Some(n) = &nbd {
            // The export decides sizes, caching and what it takes.
            params = ublk::targets::nbd::params_for(&n.info, dev.info().max_io_buf_bytes());
            if a.dev.read_only {
                if let Some(b) = params.basic.as_mut() {
                    b.attrs |= Attrs::READ_ONLY;
                }
            }
        }
        dev.set_params(&params)?;
    }
    let id = dev.id();
    let recovery = dev.info().flags().contains(Features::USER_RECOVERY);
    if recovery {
        leave_for_recovery_on_signals(id)?;
    } else {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        dev.stop_on_signals(&[SIGTERM, SIGINT, SIGHUP])
            .context("cannot stop the device on signals")?;
    }

    let backing_file = backing.map(|b| b.path.clone());
    let backing_files: Vec<PathBuf> = match kind {
        TargetKind::Stripe => backings.iter().map(|b| b.path.clone()).collect(),
        _ => Vec::new(),
    };
    let direct_io = backings.first().map(|b| b.direct_io);
    let shared: Vec<Arc<File>> = backings.into_iter().map(|b| Arc::new(b.file)).collect();
    let read_only = a.dev.read_only;
    let unprivileged = dev.info().flags().contains(Features::UNPRIVILEGED_DEV);
    // Shared-memory zero copy: the --htlb buffer, registered once the
    // device is live (as kublk does), where the loop target finds it.
    let shmem = Arc::new(ublk::ShmemMap::default());
    let shmem_failed = std::sync::Mutex::new(None::<String>);
    let stop = dev.stop_handle();
    let on_live = |info: &DevInfo, queues: &[ublk::QueueInfo]| {
        if let (Some(f), Some(path)) = (&htlb, &a.dev.htlb) {
            match ublk::shmem::ShmemBuffer::register(
                Arc::clone(&ctrl),
                info.id(),
                f,
                a.dev.rdonly_shmem_buf,
            ) {
                Ok(b) => shmem.insert(b.region()),
                Err(e) => {
                    if let Ok(mut m) = shmem_failed.lock() {
                        *m = Some(format!("--htlb {}: {e}", path.display()));
                    }
                    if let Err(e) = stop.stop() {
                        log::warn!("device {}: {e}", info.id());
                    }
                    return;
                }
            }
        }
        // Before anyone is told the device is live, so that its first I/O
        // already goes through the chosen scheduler. A recovered device
        // keeps the one it had.
        // A privileged device's requests time out after DEAD_SERVER_NOTICE:
        // harmless while its server lives (the driver re-arms the timer),
        // and how Linux 6.12 notices a killed server that held every tag.
        if !recover && !unprivileged {
            if let Err(e) = ublk::set_io_timeout(info.id(), DEAD_SERVER_NOTICE) {
                log::warn!("device {}: {e}", info.id());
            }
        }
        let keep = matches!(a.dev.io_scheduler.as_str(), "" | "default");
        if !recover && !unprivileged && !keep {
            if let Err(e) = ublk::set_io_scheduler(info.id(), &a.dev.io_scheduler) {
                log::warn!(
                    "device {}: cannot select the I/O scheduler {:?}: {e}; keeping the kernel's",
                    info.id(),
                    a.dev.io_scheduler
                );
            }
        }
        let st = DeviceState {
            dev_id: info.id(),
            target: kind,
            size,
            backing_file: backing_file.clone(),
            backing_files: backing_files.clone(),
            direct_io,
            pid: std::process::id() as i32,
            queue_tids: queues.iter().map(|q| q.tid).collect(),
            queue_affinity: queues.iter().map(|q| q.affinity.clone()).collect(),
            options: a.clone(),
            nbd: nbd.as_ref().map(|n| n.state()),
        };
        if let Err(e) = st.save() {
            log::warn!("{e:#}");
        }
        if let Some(n) = &nbd {
            n.watch(st.clone());
        }
        match report.take() {
            Some(out) => {
                let line = serde_json::to_string(&Report {
                    id: Some(info.id()),
                    note: nbd.as_ref().and_then(|n| n.note.clone()),
                    ..Default::default()
                })
                .unwrap_or_default();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
                // Let go of the caller's pipe so `ublk add | …` returns.
                if let Ok(null) = File::options().write(true).open("/dev/null") {
                    let _ = rustix::stdio::dup2_stdout(&null);
                }
            }
            // Serving in the foreground: a closed stdout must not stop
            // the server, so what cannot be printed is dropped.
            None if !a.dev.quiet => {
                if let Ok(c) = open_control() {
                    if let Ok(text) = show_devices(&c, &[info.id()], false) {
                        let _ = emit(&text);
                    }
                }
            }
            None => {}
        }
    };
    dev.set_queue_affinity(a.dev.queue_affinity.into());
    dev.set_fixed_cdev(!a.dev.no_ublk_fixed_fd);
    let depth = dev.info().queue_depth();
    let start = if recover {
        StartKind::Recover
    } else {
        StartKind::Start
    };
    let faults = &a.target_opts;
    let metadata_file = metadata.map(|(f, _, _)| Arc::new(f));
    let loop_over = |file: &Arc<File>| {
        let mut t = loop_target(Arc::clone(file), read_only);
        if let (Some(f), Some(i)) = (&metadata_file, integrity) {
            t = t.metadata(Arc::clone(f), i);
        }
        if a.dev.shmem_zc {
            t.shmem(Arc::clone(&shmem))
        } else {
            t
        }
    };
    let make_target = |q| -> std::io::Result<AnyTarget> {
        if let Some(n) = &nbd {
            return Ok(AnyTarget::Nbd(n.target(depth)?));
        }
        Ok(match (kind, shared.first()) {
            (TargetKind::Stripe, _) => {
                AnyTarget::Stripe(stripe_target(&shared, &a.target_opts, depth)?)
            }
            (TargetKind::FaultInject, Some(file)) => {
                AnyTarget::FaultLoop(fault_inject(loop_over(file), faults, q)?)
            }
            (TargetKind::FaultInject, None) => {
                AnyTarget::FaultNull(fault_inject(NullTarget, faults, q)?)
            }
            (_, Some(file)) => AnyTarget::Loop(loop_over(file)),
            (_, None) => AnyTarget::Null(NullTarget),
        })
    };
    let result = dev.run(start, make_target, on_live);
    if let Some(msg) = shmem_failed.lock().ok().and_then(|mut m| m.take()) {
        return Err(anyhow!(msg));
    }
    if let Ok(stats) = &result {
        for (q, st) in stats.iter().enumerate() {
            let per_enter = |n: u64| n as f64 / st.enters.max(1) as f64;
            log::info!(
                "queue {q}: {} requests ({} failed, {} in shared memory), {} io_uring_enter calls, {:.2} SQEs and {:.2} CQEs per call",
                st.requests,
                st.errors,
                st.shmem_zc,
                st.enters,
                per_enter(st.submitted),
                per_enter(st.completions)
            );
        }
    }
    // A recoverable device outlives its daemon unless it was stopped.
    let state_now = ctrl.dev_info(id).map(|i| i.state());
    if recovery && matches!(state_now, Ok(s) if s != ublk::DevState::Dead) {
        dev.keep();
    } else {
        drop(dev);
        DeviceState::remove(id);
    }
    result.map(drop).map_err(Into::into)
}

/// The discard parameters of a loop device whose backing file can punch
/// holes (`discard`) and zero ranges (`write_zeroes`): each request type is
/// offered only where the file can do it (the kernel then emulates
/// WRITE_ZEROES with writes of zeroes); `None` for neither.
pub fn discard_params(discard: bool, write_zeroes: bool, lbs: u32) -> Option<DiscardParams> {
    let sectors = |on: bool| if on { u32::MAX >> 9 } else { 0 };
    (discard || write_zeroes).then(|| DiscardParams {
        alignment: 0,
        granularity: 4096.max(lbs),
        max_discard_sectors: sectors(discard),
        max_write_zeroes_sectors: sectors(write_zeroes),
        max_discard_segments: 1,
    })
}

/// SIGTERM/SIGINT/SIGHUP of a device with user recovery: leave it for
/// `ublk recover` and exit (the kernel quiesces it once the server is
/// gone). Other devices are stopped and deleted on these signals by the
/// library ([`Device::stop_on_signals`]).
fn leave_for_recovery_on_signals(id: u32) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("ublk-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                crate::say(
                    "ublk",
                    &format!(
                        "signal {sig}: leaving device {id} for `ublk recover -n {id}` (it has user recovery)"
                    ),
                );
                std::process::exit(0);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// Ids of all ublk devices, from sysfs (falling back to /dev).
pub fn device_ids() -> Vec<u32> {
    let parse = |dir: &str| -> Vec<u32> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| {
                    e.ok()?
                        .file_name()
                        .to_str()?
                        .strip_prefix("ublkc")?
                        .parse()
                        .ok()
                })
                .collect()
            })
            .unwrap_or_default()
    };
    let mut ids = parse("/sys/class/ublk-char");
    if ids.is_empty() {
        ids = parse("/dev");
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The request timeout `add` gives privileged devices (see
/// [`ublk::set_io_timeout`]). While the server lives the driver only
/// re-arms the timer, so a short one costs nothing; on Linux 6.12 it is
/// how long a request held by a killed server waits (kublk's generic_06
/// wants its writer failed within 5 s).
const DEAD_SERVER_NOTICE: std::time::Duration = std::time::Duration::from_secs(1);

/// A device still LIVE whose server has exited: waits (up to 15 s) for the
/// kernel to notice. Linux 6.12 notices late, and a STOP_DEV in between can
/// wait forever for the dead server's requests (REISSUE requeues them).
fn wait_for_dead_server(ctrl: &Control, info: &DevInfo) {
    let pid = info.server_pid();
    if info.state() != ublk::DevState::Live || pid <= 0 || process_running(pid) {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        match ctrl.dev_info(info.id()).map(|i| i.state()) {
            Ok(ublk::DevState::Live) => std::thread::sleep(std::time::Duration::from_millis(50)),
            _ => return,
        }
    }
    log::warn!(
        "device {}: still LIVE 15 s after its server {pid} exited; stopping it anyway",
        info.id()
    );
}

fn del(a: &DelArgs) -> anyhow::Result<ExitCode> {
    let ctrl = open_control()?;
    let ids = if a.all {
        device_ids()
    } else {
        a.id.into_iter().collect()
    };
    let mut failed = false;
    for id in ids {
        let info = match existing(&ctrl, id) {
            Ok(i) => i,
            Err(e) if a.all && e.to_string().contains("does not exist") => continue,
            Err(e) => return Err(e),
        };
        let dev = info.dev_ref();
        wait_for_dead_server(&ctrl, &info);
        let r = ctrl.stop_dev(dev).and_then(|()| {
            if a.async_del {
                ctrl.del_dev_async(dev)
            } else {
                ctrl.del_dev(dev)
            }
        });
        match r {
            // The daemon deleted it first after our stop: that is success.
            Err(e) if e.errno() == Some(Errno::NODEV) => {}
            Err(e) => {
                crate::say("ublk", &format!("deleting device {id}: {e}"));
                failed = true;
                continue;
            }
            Ok(()) => {}
        }
        DeviceState::remove(id);
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn stop(a: &StopArgs) -> anyhow::Result<ExitCode> {
    let ctrl = open_control()?;
    let dev = existing(&ctrl, a.id)?.dev_ref();
    let r = if a.safe {
        ctrl.try_stop_dev(dev)
    } else {
        ctrl.stop_dev(dev)
    };
    match r {
        Err(e) if a.safe && e.errno() == Some(Errno::BUSY) => {
            bail!("device {} is open; not stopped (--safe)", a.id)
        }
        r => r?,
    }
    Ok(ExitCode::SUCCESS)
}

fn update_size(a: &UpdateSizeArgs) -> anyhow::Result<ExitCode> {
    let ctrl = open_control()?;
    let dev = existing(&ctrl, a.id)?.dev_ref();
    let lbs = ctrl
        .get_params(dev)
        .ok()
        .and_then(|p| p.basic)
        .map_or(512, |b| u64::from(b.logical_block_size));
    if a.size == 0 || a.size % lbs != 0 {
        bail!(
            "size {} must be a non-zero multiple of the logical block size {lbs}",
            a.size
        );
    }
    ctrl.update_size(dev, a.size >> 9)?;
    if let Some(mut st) = DeviceState::load(a.id) {
        st.size = a.size;
        let _ = st.save();
    }
    Ok(ExitCode::SUCCESS)
}

/// `completions SHELL [PROGRAM]`: the script clap_complete makes from the
/// program's definition (built in memory, so a closed stdout is no panic).
fn completions(a: &CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = a.program.command();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, a.program.name(), &mut script);
    emit(&String::from_utf8_lossy(&script))?;
    Ok(ExitCode::SUCCESS)
}

/// `user_id DEVICE`: `UID GID` of the device's owner, for udev's
/// `OWNER="%c{1}", GROUP="%c{2}"`.
fn user_id(a: &UserIdArgs) -> anyhow::Result<ExitCode> {
    let ctrl = open_control()?;
    let (uid, gid) = existing(&ctrl, a.device)?.owner();
    emit(&format!("{uid} {gid}\n"))?;
    Ok(ExitCode::SUCCESS)
}

fn features() -> anyhow::Result<ExitCode> {
    let ctrl = open_control()?;
    let mask = ctrl.kernel_mask();
    let mut text = format!("ublk_drv features: {mask:#x}\n");
    for name in Features::from_bits_retain(mask).kernel_names() {
        text.push_str(&format!("\t{name}\n"));
    }
    emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// One device as `list` shows it.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// Device id.
    pub dev_id: u32,
    /// Queues.
    pub nr_hw_queues: u16,
    /// Depth.
    pub queue_depth: u16,
    /// Logical block size.
    pub block_size: u32,
    /// Capacity in sectors.
    pub dev_capacity: u64,
    /// Largest request.
    pub max_rq_size: u32,
    /// Server pid.
    pub daemon_pid: i32,
    /// Flags.
    pub flags: u64,
    /// State.
    pub state: String,
    /// Queues: tid and affinity.
    pub queues: Vec<QueueListing>,
    /// Target type.
    pub target: Option<TargetKind>,
    /// Loop backing file.
    pub backing_file: Option<PathBuf>,
    /// Stripe backing files.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backing_files: Vec<PathBuf>,
    /// Stripe chunk size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u32>,
    /// Loop: O_DIRECT.
    pub direct_io: Option<bool>,
    /// Target size in bytes.
    pub size: Option<u64>,
    /// Nbd: the server and the connection's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<crate::nbd::NbdState>,
    /// Integrity: metadata bytes per logical block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_size: Option<u8>,
    /// Loop with integrity: where the metadata is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_file: Option<PathBuf>,
}

/// One queue as `list` shows it.
#[derive(Debug, Serialize)]
pub struct QueueListing {
    /// Queue id.
    pub q_id: u16,
    /// Serving thread (0: unknown).
    pub tid: i32,
    /// CPUs.
    pub affinity: Vec<usize>,
}

fn listing(ctrl: &Control, id: u32) -> anyhow::Result<Listing> {
    let info = existing(ctrl, id)?;
    let basic = ctrl.get_params(info.dev_ref()).ok().and_then(|p| p.basic);
    let st = DeviceState::load(id).filter(|s| s.pid == info.server_pid() || info.server_pid() <= 0);
    let queues = (0..info.nr_queues())
        .map(|q| QueueListing {
            q_id: q,
            tid: st
                .as_ref()
                .and_then(|s| s.queue_tids.get(usize::from(q)).copied())
                .unwrap_or(0),
            affinity: ctrl.queue_affinity(info.dev_ref(), q).unwrap_or_default(),
        })
        .collect();
    Ok(Listing {
        dev_id: id,
        nr_hw_queues: info.nr_queues(),
        queue_depth: info.queue_depth(),
        block_size: basic.map_or(512, |b| b.logical_block_size),
        dev_capacity: basic.map_or(0, |b| b.dev_sectors),
        max_rq_size: info.max_io_buf_bytes(),
        daemon_pid: info.server_pid(),
        flags: info.flags().bits(),
        state: info.state().to_string(),
        queues,
        target: st.as_ref().map(|s| s.target),
        backing_file: st.as_ref().and_then(|s| s.backing_file.clone()),
        backing_files: st
            .as_ref()
            .map(|s| s.backing_files.clone())
            .unwrap_or_default(),
        chunk_size: st
            .as_ref()
            .filter(|s| s.target == TargetKind::Stripe)
            .map(|s| {
                s.options
                    .target_opts
                    .chunk_size
                    .unwrap_or(ublk::targets::stripe::DEFAULT_CHUNK_SIZE)
            }),
        direct_io: st.as_ref().and_then(|s| s.direct_io),
        size: st.as_ref().map(|s| s.size),
        nbd: st.as_ref().and_then(|s| s.nbd.clone()),
        metadata_size: st.as_ref().and_then(|s| s.options.dev.metadata_size),
        metadata_file: st.as_ref().and_then(|s| {
            let f = s.options.loop_metadata_file().ok().flatten()?;
            Some(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()))
        }),
    })
}

/// The text format of ublksrv's and kublk's `list`.
pub fn format_listing(l: &Listing) -> String {
    let mut s = format!(
        "dev id {}: nr_hw_queues {} queue_depth {} block size {} dev_capacity {}\n\tmax rq size {} daemon pid {} flags {:#x} state {}\n",
        l.dev_id, l.nr_hw_queues, l.queue_depth, l.block_size, l.dev_capacity, l.max_rq_size, l.daemon_pid, l.flags, l.state
    );
    for q in &l.queues {
        let cpus: Vec<String> = q.affinity.iter().map(ToString::to_string).collect();
        s.push_str(&format!(
            "\tqueue {}: tid {} affinity({})\n",
            q.q_id,
            q.tid,
            cpus.join(" ")
        ));
    }
    match (l.target, &l.backing_file) {
        (Some(TargetKind::Nbd), _) if l.nbd.is_some() => {
            if let Some(n) = &l.nbd {
                s.push_str(&format!(
                    "\ttarget nbd server {} size {} state {} disconnects {} reconnects {}\n",
                    n.server,
                    l.size.unwrap_or(0),
                    n.state,
                    n.disconnects,
                    n.reconnects
                ));
            }
        }
        (Some(t @ (TargetKind::Loop | TargetKind::FaultInject)), Some(f)) => s.push_str(&format!(
            "\ttarget {} backing_file {} size {} direct_io {}{}\n",
            target_name(t),
            f.display(),
            l.size.unwrap_or(0),
            u8::from(l.direct_io.unwrap_or(false)),
            match &l.metadata_file {
                Some(m) => format!(" metadata_file {}", m.display()),
                None => String::new(),
            }
        )),
        (Some(TargetKind::Stripe), _) => {
            let files: Vec<String> = l
                .backing_files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            s.push_str(&format!(
                "\ttarget stripe backing_files {} chunk_size {} size {} direct_io {}\n",
                files.join(" "),
                l.chunk_size.unwrap_or(0),
                l.size.unwrap_or(0),
                u8::from(l.direct_io.unwrap_or(false))
            ))
        }
        (Some(t), _) => s.push_str(&format!(
            "\ttarget {} size {}\n",
            target_name(t),
            l.size.unwrap_or(0)
        )),
        (None, _) => s.push_str("\ttarget unknown (no state file)\n"),
    }
    if let Some(m) = l.metadata_size {
        s.push_str(&format!("\tintegrity metadata_size {m}\n"));
    }
    s
}

/// A target's name as `-t` takes it.
fn target_name(t: TargetKind) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// What `list` prints for `ids`.
fn show_devices(ctrl: &Control, ids: &[u32], json: bool) -> anyhow::Result<String> {
    let mut all = Vec::with_capacity(ids.len());
    for &id in ids {
        all.push(listing(ctrl, id)?);
    }
    Ok(if json {
        format!("{}\n", serde_json::to_string_pretty(&all)?)
    } else {
        all.iter().map(format_listing).collect()
    })
}

fn list(a: &ListArgs) -> anyhow::Result<ExitCode> {
    let ctrl = open_control()?;
    let ids = match a.id {
        Some(id) => vec![id],
        None => device_ids(),
    };
    // Devices other users own are skipped in a full listing.
    let ids: Vec<u32> = if a.id.is_some() {
        ids
    } else {
        ids.into_iter()
            .filter(|&id| ctrl.dev_info(id).is_ok())
            .collect()
    };
    emit(&show_devices(&ctrl, &ids, a.json)?)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_text_format_matches_the_other_tools() {
        let l = Listing {
            dev_id: 0,
            nr_hw_queues: 1,
            queue_depth: 128,
            block_size: 512,
            dev_capacity: 524_288_000,
            max_rq_size: 524_288,
            daemon_pid: 178,
            flags: 0x42,
            state: "LIVE".into(),
            queues: vec![QueueListing {
                q_id: 0,
                tid: 179,
                affinity: vec![0, 1],
            }],
            target: Some(TargetKind::Null),
            backing_file: None,
            backing_files: Vec::new(),
            chunk_size: None,
            direct_io: None,
            size: Some(250 << 30),
            nbd: None,
            metadata_size: None,
            metadata_file: None,
        };
        let text = format_listing(&l);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "dev id 0: nr_hw_queues 1 queue_depth 128 block size 512 dev_capacity 524288000"
        );
        assert_eq!(
            lines[1],
            "\tmax rq size 524288 daemon pid 178 flags 0x42 state LIVE"
        );
        assert_eq!(lines[2], "\tqueue 0: tid 179 affinity(0 1)");
        assert_eq!(lines[3], "\ttarget null size 268435456000");
        let stripe = Listing {
            target: Some(TargetKind::Stripe),
            backing_files: vec!["/a.img".into(), "/b.img".into()],
            chunk_size: Some(8192),
            direct_io: Some(true),
            size: Some(2 << 20),
            ..l
        };
        assert_eq!(
            format_listing(&stripe).lines().nth(3),
            Some("\ttarget stripe backing_files /a.img /b.img chunk_size 8192 size 2097152 direct_io 1")
        );
        let faulty = Listing {
            target: Some(TargetKind::FaultInject),
            backing_files: Vec::new(),
            chunk_size: None,
            ..stripe
        };
        assert_eq!(
            format_listing(&faulty).lines().nth(3),
            Some("\ttarget fault_inject size 2097152")
        );
    }

    #[test]
    fn write_zeroes_is_offered_only_where_the_file_zeroes_ranges() {
        assert!(discard_params(false, false, 512).is_none());
        let tmpfs = discard_params(true, false, 512).unwrap();
        assert_eq!(
            (tmpfs.max_discard_sectors, tmpfs.max_write_zeroes_sectors),
            (u32::MAX >> 9, 0)
        );
        let ext4 = discard_params(true, true, 4096).unwrap();
        assert_eq!(
            (ext4.max_write_zeroes_sectors, ext4.granularity),
            (u32::MAX >> 9, 4096)
        );
    }

    fn with(dev: crate::cli::DevOptions) -> AddArgs {
        AddArgs {
            dev,
            ..Default::default()
        }
    }

    #[test]
    fn copy_modes_exclude_each_other() {
        use crate::cli::DevOptions;
        let a = with(DevOptions {
            zero_copy: true,
            user_copy: true,
            ..Default::default()
        });
        assert!(plan(&a).unwrap_err().to_string().contains("choose one"));
        // As in kublk, -i 1 and -e 1 imply -r 1.
        for (reissue, fail_io, extra) in [
            (1, 0, Features::USER_RECOVERY_REISSUE),
            (0, 1, Features::USER_RECOVERY_FAIL_IO),
        ] {
            let a = with(DevOptions {
                recovery_reissue: reissue,
                recovery_fail_io: fail_io,
                ..Default::default()
            });
            assert_eq!(plan(&a).unwrap().1, Features::USER_RECOVERY | extra);
        }
        // kublk's -z --auto_zc --auto_zc_fallback.
        let a = with(DevOptions {
            zero_copy: true,
            auto_zc: true,
            auto_zc_fallback: true,
            ..Default::default()
        });
        let (m, f) = plan(&a).unwrap();
        assert_eq!(m, CopyMode::AutoBufReg { fallback: true });
        assert_eq!(f, Features::SUPPORT_ZERO_COPY);
        let a = with(DevOptions {
            zero_copy: true,
            auto_zc: true,
            ..Default::default()
        });
        assert!(plan(&a).unwrap_err().to_string().contains("choose one"));
        let a = with(DevOptions {
            auto_zc: true,
            auto_zc_fallback: true,
            recovery: 1,
            ..Default::default()
        });
        let (m, f) = plan(&a).unwrap();
        assert_eq!(m, CopyMode::AutoBufReg { fallback: true });
        assert_eq!(f, Features::USER_RECOVERY);
    }

    /// What `check_arguments` says about `ublk ARGS`, and whether it is a
    /// usage error.
    fn checked(args: &[&str]) -> Option<(String, bool)> {
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(
            std::iter::once("ublk").chain(args.iter().copied()),
        )
        .unwrap();
        let Command::Add(a) = cli.command else {
            panic!("not add")
        };
        check_arguments(&a).err().map(|e| {
            (
                crate::one_line(&e),
                e.downcast_ref::<crate::UsageError>().is_some(),
            )
        })
    }

    #[test]
    fn the_arguments_are_checked_without_a_kernel() {
        let usage = |s: &str| Some((s.to_owned(), true));
        assert_eq!(
            checked(&["add", "-t", "null", "-z", "-u"]),
            usage("choose one of -z, --auto_zc, -u and -g")
        );
        assert_eq!(
            checked(&["add", "-t", "null", "-b", "-g"]),
            usage("batch I/O (-b) does not work with NEED_GET_DATA (-g)")
        );
        assert_eq!(
            checked(&["add", "-t", "null", "--nthreads", "2"]),
            usage("--nthreads other than the number of queues needs --per_io_tasks")
        );
        // kublk's batch_02/03: batch threads serve whole queues.
        assert_eq!(
            checked(&["add", "-t", "null", "-q", "1", "--nthreads", "4", "-b"]),
            None
        );
        assert_eq!(
            checked(&["add", "-t", "null", "-q", "4", "--nthreads", "1", "-b"]),
            None
        );
        assert_eq!(
            checked(&[
                "add",
                "-t",
                "null",
                "-q",
                "2",
                "--nthreads",
                "1",
                "-b",
                "--per_io_tasks"
            ]),
            usage("batch I/O (-b) serves whole queues, --per_io_tasks spreads them: choose one")
        );
        assert_eq!(
            checked(&["add", "-t", "null", "--unprivileged", "-z"]),
            usage("unprivileged devices cannot use zero copy, auto buffer registration or user copy (the kernel forbids it)")
        );
        assert_eq!(
            checked(&["add", "-t", "null", "-r", "1", "-i", "1", "-e", "1"]),
            usage("recovery reissue (-i 1) and fail-I/O (-e 1) exclude each other")
        );
        assert_eq!(
            checked(&["add", "-t", "null", "-s", "1000"]),
            usage("--size 1000 is not a multiple of the logical block size 512")
        );
        assert_eq!(
            checked(&["add", "-t", "null", "-s", "0"]),
            usage("--size 0: a device needs a non-zero size")
        );
        assert_eq!(
            checked(&["add", "-t", "loop"]),
            usage("the loop target needs a backing file: -f FILE or FILE")
        );
        assert_eq!(
            checked(&["add", "-t", "null", "x.img"]),
            usage("the null target takes no backing file (got x.img)")
        );
        assert_eq!(
            checked(&["add", "-t", "loop", "-f", "a", "b"]),
            usage("give the backing file either with -f or as an argument, not both")
        );
        assert_eq!(
            checked(&["add", "-t", "null", "-q", "4", "-d", "4096"]),
            None
        );
        assert_eq!(checked(&["add", "-t", "loop", "missing.img"]), None);
    }
}
