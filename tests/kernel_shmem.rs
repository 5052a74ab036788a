//! Shared-memory zero copy (`UBLK_F_SHMEM_ZC`): `Control::reg_buf` and
//! `Control::unreg_buf` against the real driver, and the data path of a
//! request whose pages lie in a registered buffer (run in a guest by
//! `cargo xtask test`; ignored on the host, skipped on kernels without
//! `UBLK_F_SHMEM_ZC`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use ublk::{
    Control, DeviceBuilder, Features, Handled, IoBuf, IoFlags, Op, Request, Submit, Target,
};
use ublk_e2e::{memfd, TestDevice};

const MIB: usize = 1 << 20;
/// The device's capacity.
const CAPACITY: usize = 4 * MIB;
/// The shared buffer's size.
const SHM_LEN: usize = MIB;

/// A `MAP_SHARED` mapping of a memfd, unmapped on drop.
#[derive(Debug)]
struct SharedMap {
    addr: *mut u8,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory; every access goes through raw
// pointers whose users coordinate (see `ShmemDisk`).
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    fn new(len: usize) -> Self {
        let fd = memfd("ublk-e2e-shmem", len as u64).expect("memfd");
        // SAFETY: a fresh mapping of `len` bytes of our memfd at an address
        // the kernel picks; nothing else refers to that range.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Self {
            addr: addr.cast(),
            len,
            _fd: fd,
        }
    }

    /// `len` bytes at `off`, as a raw slice pointer (checked against the size).
    fn range(&self, off: usize, len: usize) -> *mut u8 {
        assert!(off + len <= self.len, "{off}+{len} is past the mapping");
        self.addr.wrapping_add(off)
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is our mapping, no longer used (the
        // device and the registrations went first: see the tests).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// A RAM disk that serves requests flagged `UBLK_IO_F_SHMEM_ZC` through its
/// own mapping of the registered buffer, and others through the request
/// buffer, counting the former.
#[derive(Debug)]
struct ShmemDisk {
    data: Vec<u8>,
    shm: Arc<SharedMap>,
    /// The registered buffer's index (set once registered).
    index: Arc<AtomicU32>,
    /// Requests served through the shared buffer.
    shmem_requests: Arc<AtomicU64>,
}

impl Target for ShmemDisk {
    fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        let off = req.desc.offset() as usize;
        let len = req.desc.len();
        let Some(disk) = self.data.get_mut(off..off + len) else {
            return Handled::Done(-libc::EIO);
        };
        if req.desc.flags.contains(IoFlags::SHMEM_ZC) {
            // The library decodes the buffer for us.
            let IoBuf::Shmem { index, offset } = req.buf else {
                return Handled::Done(-libc::EPROTO);
            };
            let (index, buf_off) = (u32::from(index), offset as usize);
            if index != self.index.load(Ordering::SeqCst) || buf_off + len > self.shm.len {
                return Handled::Done(-libc::EIO);
            }
            let shared = self.shm.range(buf_off, len);
            match req.desc.op {
                // SAFETY: `shared..+len` is inside the mapping (checked
                // above) and the request's pages: the client does not touch
                // them until the request completes.
                Op::Read => unsafe { shared.copy_from_nonoverlapping(disk.as_ptr(), len) },
                // SAFETY: as above.
                Op::Write => unsafe { shared.copy_to_nonoverlapping(disk.as_mut_ptr(), len) },
                _ => return Handled::Done(-libc::EOPNOTSUPP),
            }
            self.shmem_requests.fetch_add(1, Ordering::SeqCst);
            return Handled::Done(len as i32);
        }
        match (req.desc.op, req.buf) {
            (Op::Read, IoBuf::Mem(buf)) => buf.copy_from_slice(disk),
            (Op::Write, IoBuf::Mem(buf)) => disk.copy_from_slice(buf),
            (Op::Flush, _) => {}
            _ => return Handled::Done(-libc::EOPNOTSUPP),
        }
        Handled::Done(len as i32)
    }
}

/// Opens the disk for direct I/O (so requests carry the caller's pages).
fn open_direct(path: &std::path::Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// `Control::open`, or `None` (with a note) if the kernel lacks SHMEM_ZC.
fn shmem_control() -> Option<Arc<Control>> {
    let ctrl = Arc::new(Control::open().expect("opening /dev/ublk-control"));
    match ctrl.require(Features::SHMEM_ZC) {
        Ok(()) => Some(ctrl),
        Err(e) => {
            eprintln!("SKIP: {e}");
            None
        }
    }
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn reg_buf_and_unreg_buf() {
    let Some(ctrl) = shmem_control() else { return };
    let shm = Arc::new(SharedMap::new(SHM_LEN));
    let dev = TestDevice::start_with(
        ctrl.clone(),
        DeviceBuilder::new().flags(Features::SHMEM_ZC),
        CAPACITY as u64,
        |_| ublk_e2e::mem_target(CAPACITY as u64),
    )
    .expect("starting a SHMEM_ZC device");
    let id = dev.info.dev_ref();
    assert!(dev.info.flags().contains(Features::SHMEM_ZC));
    // Two halves, the second read-only: two different indexes.
    let half = (SHM_LEN / 2) as u64;
    // SAFETY: both halves are page-aligned parts of a shared mapping that
    // outlives the registrations (unregistered below, before `shm` drops).
    let a = unsafe { ctrl.reg_buf(id, shm.range(0, SHM_LEN / 2), half, false) }.expect("REG_BUF");
    // SAFETY: as above.
    let b = unsafe { ctrl.reg_buf(id, shm.range(SHM_LEN / 2, SHM_LEN / 2), half, true) }
        .expect("REG_BUF, read-only");
    assert_ne!(a, b, "two registrations share an index");
    ctrl.unreg_buf(id, a).expect("UNREG_BUF");
    ctrl.unreg_buf(id, b).expect("UNREG_BUF, read-only");
    let again = ctrl.unreg_buf(id, a);
    assert!(again.is_err(), "a second UNREG_BUF of {a} succeeded");
    // Indexes are reused once free.
    // SAFETY: as above.
    let c = unsafe { ctrl.reg_buf(id, shm.range(0, SHM_LEN), SHM_LEN as u64, false) }
        .expect("REG_BUF again");
    ctrl.unreg_buf(id, c).expect("UNREG_BUF again");
    dev.stop().expect("serving");
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn direct_io_from_a_registered_buffer_is_zero_copy() {
    let Some(ctrl) = shmem_control() else { return };
    let shm = Arc::new(SharedMap::new(SHM_LEN));
    let index = Arc::new(AtomicU32::new(u32::MAX));
    let shmem_requests = Arc::new(AtomicU64::new(0));
    let dev = {
        let (shm, index, shmem_requests) = (shm.clone(), index.clone(), shmem_requests.clone());
        TestDevice::start_with(
            ctrl.clone(),
            DeviceBuilder::new().queues(1).flags(Features::SHMEM_ZC),
            CAPACITY as u64,
            move |_| {
                Ok(ShmemDisk {
                    data: vec![0; CAPACITY],
                    shm: shm.clone(),
                    index: index.clone(),
                    shmem_requests: shmem_requests.clone(),
                })
            },
        )
        .expect("starting a SHMEM_ZC device")
    };
    let id = dev.info.dev_ref();
    // SAFETY: a page-aligned shared mapping that outlives the device
    // (`shm` drops after `dev` is stopped and deleted below).
    let i =
        unsafe { ctrl.reg_buf(id, shm.range(0, SHM_LEN), SHM_LEN as u64, false) }.expect("REG_BUF");
    index.store(i, Ordering::SeqCst);
    let disk = open_direct(&dev.block_path());
    let len = 64 << 10;
    let data = pattern(len, 7);
    use std::os::unix::fs::FileExt;
    // Write from the registered buffer at offset 0…
    // SAFETY: `range` checked the bounds; nothing else uses these bytes now.
    let src = unsafe { std::slice::from_raw_parts_mut(shm.range(0, len), len) };
    src.copy_from_slice(&data);
    disk.write_all_at(src, 1 << 20)
        .expect("direct write from the buffer");
    let written = shmem_requests.load(Ordering::SeqCst);
    // …read it back into the registered buffer at offset 256 KiB…
    // SAFETY: as above, a different range.
    let dst = unsafe { std::slice::from_raw_parts_mut(shm.range(256 << 10, len), len) };
    dst.fill(0);
    disk.read_exact_at(dst, 1 << 20)
        .expect("direct read into the buffer");
    assert!(
        dst == data.as_slice(),
        "read through the shared buffer differs"
    );
    let read = shmem_requests.load(Ordering::SeqCst) - written;
    // …and through an ordinary (page-aligned, unregistered) buffer.
    let plain = SharedMap::new(len);
    // SAFETY: `plain` is ours alone.
    let other = unsafe { std::slice::from_raw_parts_mut(plain.range(0, len), len) };
    disk.read_exact_at(other, 1 << 20)
        .expect("direct read, plain buffer");
    assert!(other == data.as_slice(), "plain read differs");
    eprintln!(
        "buffer {i}: {written} write and {read} read requests zero-copy, {} in all",
        shmem_requests.load(Ordering::SeqCst)
    );
    assert!(
        written > 0,
        "no write request was flagged UBLK_IO_F_SHMEM_ZC"
    );
    assert!(read > 0, "no read request was flagged UBLK_IO_F_SHMEM_ZC");
    assert_eq!(
        shmem_requests.load(Ordering::SeqCst),
        written + read,
        "a read into an unregistered buffer was flagged UBLK_IO_F_SHMEM_ZC"
    );
    drop(disk);
    ctrl.unreg_buf(id, i).expect("UNREG_BUF");
    dev.stop().expect("serving");
}
