//! Memory shared with the kernel, all of it owned by one private `Mmap`
//! type (one mapping, unmapped on drop), on which are built
//! the mmapped descriptor array of a queue ([`DescArray`]), the
//! page-aligned I/O buffers ([`IoBuffers`]) and the provided-buffer ring of
//! batch I/O ([`BufRing`]).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use ublk_sys::ublksrv_io_desc;

use crate::{Error, Result};

/// Rounds `n` up to a multiple of the page size.
#[inline]
pub(crate) fn page_round_up(n: usize) -> usize {
    let page = rustix::param::page_size();
    n.div_ceil(page) * page
}

/// One memory mapping, unmapped on drop (as io-uring's `util::Mmap`): the
/// only owner of mapped memory in this crate. What may be done with the
/// memory is up to the type built on it.
#[derive(Debug)]
pub(crate) struct Mmap {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping is plain memory, valid in every thread of the process
// until `drop`; `Mmap` hands out only raw pointers, and the types built on
// it mediate access (`&mut self`, volatile reads, atomics).
unsafe impl Send for Mmap {}

impl Mmap {
    /// The first `len` bytes of `fd`, a shared mapping (writable unless
    /// `read_only`), faulted in at once: memory a server shares with other
    /// processes and registers for shared-memory zero copy.
    pub(crate) fn shared_file(fd: impl AsFd, len: usize, read_only: bool) -> io::Result<Self> {
        let prot = if read_only {
            ProtFlags::READ
        } else {
            ProtFlags::READ | ProtFlags::WRITE
        };
        // SAFETY: a fresh mapping at an address the kernel chooses; nothing
        // else refers to that range.
        let addr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED | MapFlags::POPULATE,
                fd,
                0,
            )
        }?;
        Self::owning(addr, len)
    }

    /// `len` bytes of `fd` from `offset`, shared with the kernel, read-only,
    /// faulted in at once.
    fn shared_read_only(fd: impl AsFd, offset: u64, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel chooses; nothing
        // else refers to that range.
        let addr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED | MapFlags::POPULATE,
                fd,
                offset,
            )
        }?;
        Self::owning(addr, len)
    }

    /// `len` bytes of private, zero-filled, read-write memory (faulted in
    /// lazily).
    fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let addr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }?;
        Self::owning(addr, len)
    }

    fn owning(addr: *mut std::ffi::c_void, len: usize) -> io::Result<Self> {
        // mmap without MAP_FIXED never returns address 0.
        let addr = NonNull::new(addr.cast()).ok_or(io::ErrorKind::AddrNotAvailable)?;
        Ok(Self { addr, len })
    }

    /// The first byte.
    #[inline]
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// The mapped length in bytes.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; the types built on it hand out no
        // borrow that outlives them, and so none that outlives this.
        if let Err(e) = unsafe { munmap(self.addr.as_ptr().cast(), self.len) } {
            log::warn!("munmap of {} bytes failed: {e}", self.len);
        }
    }
}

/// Queue `q_id`'s descriptor array: the kernel's read-only `ublksrv_io_desc`
/// per tag, mapped from `/dev/ublkcN`.
#[derive(Debug)]
pub struct DescArray {
    map: Mmap,
    depth: u16,
}

impl DescArray {
    /// Maps queue `q_id` of a device of queue depth `depth`.
    ///
    /// The kernel lays queues out at a stride of the largest possible array
    /// (`UBLK_MAX_QUEUE_DEPTH` descriptors, page-rounded) and wants exactly
    /// `depth` descriptors, page-rounded, mapped.
    pub fn map(cdev: impl AsFd, q_id: u16, depth: u16) -> Result<Self> {
        let desc = size_of::<ublksrv_io_desc>();
        let stride = page_round_up(ublk_sys::UBLK_MAX_QUEUE_DEPTH as usize * desc);
        let map_len = page_round_up(usize::from(depth) * desc);
        let offset = u64::from(ublk_sys::UBLKSRV_CMD_BUF_OFFSET) + u64::from(q_id) * stride as u64;
        let map = Mmap::shared_read_only(cdev, offset, map_len)
            .map_err(Error::io("mapping the descriptor array"))?;
        Ok(Self { map, depth })
    }

    /// A copy of tag `tag`'s descriptor, or `None` past the queue depth.
    ///
    /// The kernel writes descriptors concurrently with other tags' I/O, so
    /// this is a volatile copy and no reference into the mapping escapes.
    #[inline]
    pub fn get(&self, tag: u16) -> Option<ublksrv_io_desc> {
        if tag >= self.depth {
            return None;
        }
        // `tag < depth`, and the mapping holds `depth` descriptors (rounded
        // up to pages), so the element is inside it and aligned (the
        // mapping is page-aligned, the stride is `size_of`).
        let p = self
            .map
            .as_ptr()
            .cast::<ublksrv_io_desc>()
            .wrapping_add(usize::from(tag));
        // SAFETY: (as above) `p` is in bounds, aligned and readable.
        Some(unsafe { p.read_volatile() })
    }

    /// The queue depth this array was mapped for.
    #[inline]
    pub fn depth(&self) -> u16 {
        self.depth
    }
}

/// One page-aligned buffer per tag, `buf_size` bytes each, in one anonymous
/// mapping (faulted in lazily).
#[derive(Debug)]
pub struct IoBuffers {
    map: Mmap,
    buf_size: usize,
    count: usize,
}

impl IoBuffers {
    /// `count` buffers of `buf_size` bytes (rounded up to pages).
    pub fn new(count: usize, buf_size: usize) -> Result<Self> {
        let buf_size = page_round_up(buf_size.max(1));
        let map_len = buf_size.checked_mul(count.max(1)).ok_or_else(|| {
            Error::config(format!(
                "{count} I/O buffers of {buf_size} bytes do not fit in memory"
            ))
        })?;
        let map = Mmap::anonymous(map_len).map_err(Error::io("allocating I/O buffers"))?;
        Ok(Self {
            map,
            buf_size,
            count,
        })
    }

    /// The address of buffer `i` (what the kernel is told), or `None`.
    #[inline]
    pub fn addr(&self, i: usize) -> Option<*mut u8> {
        // `i < count`, so the offset stays inside the mapping.
        (i < self.count).then(|| self.map.as_ptr().wrapping_add(i * self.buf_size))
    }

    /// The first `len` bytes of buffer `i` (`None` if out of range).
    #[inline]
    pub fn slice_mut(&mut self, i: usize, len: usize) -> Option<&mut [u8]> {
        let p = self.addr(i)?;
        // SAFETY: `p` starts buffer `i` of `buf_size` initialised bytes
        // (anonymous memory is zero-filled) and `len <= buf_size`; `&mut
        // self` makes this the only reference into the mapping.
        (len <= self.buf_size).then(|| unsafe { std::slice::from_raw_parts_mut(p, len) })
    }

    /// The size of each buffer.
    #[inline]
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`) with its buffers:
/// `entries` slots of `struct io_uring_buf` ([`BufRingEntry`]), the tail
/// in the first slot's `resv` field, and one buffer of `buf_size` bytes per
/// slot. Used by batch I/O's multishot `FETCH_IO_CMDS`, which fills a
/// buffer with the tags of new requests.
///
/// The io_uring it is registered with must be closed before it is dropped.
#[derive(Debug)]
pub struct BufRing {
    ring: Mmap,
    bufs: IoBuffers,
    entries: u16,
    /// Our copy of the tail: entries below it are provided.
    tail: u16,
}

impl BufRing {
    /// A ring of `entries` (a power of two) buffers of `buf_size` bytes, all
    /// provided (the ring starts full).
    pub fn new(entries: u16, buf_size: usize) -> Result<Self> {
        if !entries.is_power_of_two() {
            return Err(Error::config(format!(
                "buffer ring size {entries} is not a power of two"
            )));
        }
        let ring_len = page_round_up(usize::from(entries) * size_of::<BufRingEntry>());
        let ring = Mmap::anonymous(ring_len).map_err(Error::io("allocating a buffer ring"))?;
        let bufs = IoBuffers::new(usize::from(entries), buf_size)?;
        let mut r = Self {
            ring,
            bufs,
            entries,
            tail: 0,
        };
        for bid in 0..entries {
            r.provide(bid);
        }
        r.publish();
        Ok(r)
    }

    /// The ring's address, for registration.
    #[inline]
    pub fn ring_addr(&self) -> u64 {
        self.ring.as_ptr() as u64
    }

    /// Number of slots.
    #[inline]
    pub fn entries(&self) -> u16 {
        self.entries
    }

    #[inline]
    fn base(&self) -> *mut BufRingEntry {
        self.ring.as_ptr().cast()
    }

    /// Puts buffer `bid` back at the tail (visible after [`BufRing::publish`]).
    #[inline]
    pub fn provide(&mut self, bid: u16) {
        let Some(addr) = self.bufs.addr(usize::from(bid)) else {
            return;
        };
        debug_assert!(usize::from(self.entries) * size_of::<BufRingEntry>() <= self.ring.len());
        let slot = self
            .base()
            .wrapping_add(usize::from(self.tail & (self.entries - 1)));
        // SAFETY: `slot` is one of the `entries` slots inside the ring
        // mapping, aligned (page-aligned base, stride `size_of`). It is past
        // the published tail, so the kernel does not read it until the next
        // `publish`, and only this `&mut self` writes the ring. The setters
        // leave `resv` (slot 0's is the tail) alone.
        let entry = unsafe { &mut *slot };
        entry.set_addr(addr as u64);
        entry.set_len(self.bufs.buf_size() as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes provided buffers visible to the kernel (store-release of the tail).
    #[inline]
    pub fn publish(&self) {
        // SAFETY: `base` is the page-aligned first entry of the live ring.
        let tail = unsafe { BufRingEntry::tail(self.base()) };
        // SAFETY: the tail is a 2-aligned `u16` inside the mapping; the
        // kernel reads it with acquire semantics and never writes it, so
        // it is accessed only atomically here.
        let tail = unsafe { AtomicU16::from_ptr(tail.cast_mut()) };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid` (what the kernel wrote).
    #[inline]
    pub fn buf(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        self.bufs.slice_mut(usize::from(bid), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_disjoint() {
        let mut b = IoBuffers::new(4, 5000).unwrap();
        let page = rustix::param::page_size();
        assert_eq!(b.buf_size(), 2 * page);
        for i in 0..4 {
            assert_eq!(b.addr(i).unwrap() as usize % page, 0);
        }
        assert!(b.addr(4).is_none());
        b.slice_mut(1, 8).unwrap().copy_from_slice(b"abcdefgh");
        assert_eq!(b.slice_mut(0, 8).unwrap(), &[0u8; 8]);
        assert!(b.slice_mut(1, 2 * page + 1).is_none());
    }

    #[test]
    fn a_buffer_ring_starts_full_and_recycles_at_the_tail() {
        assert!(matches!(BufRing::new(6, 64), Err(Error::Config(_))));
        let mut r = BufRing::new(4, 64).unwrap();
        let base = r.base().cast_const();
        // SAFETY: the ring's four entries are initialised by `new`; no
        // `&mut` to them is alive.
        let entry = |i: usize| unsafe { &*base.wrapping_add(i) };
        for i in 0..4 {
            let e = entry(i);
            assert_eq!(e.bid(), i as u16);
            assert_eq!(e.len(), r.bufs.buf_size() as u32);
            assert_eq!(e.addr(), r.bufs.addr(i).unwrap() as u64);
        }
        let tail = || {
            // SAFETY: `base` is the ring's first entry.
            let p = unsafe { BufRingEntry::tail(base) };
            // SAFETY: `p` is the tail inside the ring; nothing writes it now.
            unsafe { p.read() }
        };
        assert_eq!(tail(), 4);
        r.provide(2);
        assert_eq!(tail(), 4, "not visible before publish");
        r.publish();
        assert_eq!(tail(), 5);
        // Slot 4 & 3 = 0 now holds buffer 2.
        assert_eq!(entry(0).bid(), 2);
        assert_eq!(r.buf(2, 64).unwrap().len(), 64);
    }

    #[test]
    fn descriptor_stride_comes_from_the_type() {
        assert_eq!(size_of::<ublksrv_io_desc>(), 24);
        // 4096 descriptors of 24 bytes are exactly 24 pages of 4 KiB.
        assert_eq!(page_round_up(4096 * size_of::<ublksrv_io_desc>()), 98304);
        assert_eq!(page_round_up(1), rustix::param::page_size());
    }
}
