//! Memory shared with the kernel: the mmapped descriptor array of a queue,
//! and the page-aligned I/O buffers.
#![allow(unsafe_code)]

use std::os::fd::AsFd;
use std::ptr::NonNull;

use rustix::mm::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use ublk_sys::ublksrv_io_desc;

use crate::{Error, Result};

/// Rounds `n` up to a multiple of the page size.
#[inline]
pub(crate) fn page_round_up(n: usize) -> usize {
    let page = rustix::param::page_size();
    n.div_ceil(page) * page
}

/// Queue `q_id`'s descriptor array: the kernel's read-only `ublksrv_io_desc`
/// per tag, mapped from `/dev/ublkcN`. Unmapped on drop.
#[derive(Debug)]
pub struct DescArray {
    ptr: NonNull<ublksrv_io_desc>,
    map_len: usize,
    depth: u16,
}

// SAFETY: the mapping is plain shared memory, valid in every thread of the
// process until `drop`; we only ever read it by volatile copies.
unsafe impl Send for DescArray {}

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
        // SAFETY: a fresh shared read-only mapping at an address the kernel
        // chooses; nothing else refers to that range.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                map_len,
                ProtFlags::READ,
                MapFlags::SHARED | MapFlags::POPULATE,
                cdev,
                offset,
            )
        }
        .map_err(|e| Error::io("mapping the descriptor array")(e.into()))?;
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| Error::config("mmap returned NULL"))?;
        Ok(Self {
            ptr,
            map_len,
            depth,
        })
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
        // SAFETY: `tag < depth`, and the mapping holds `depth` descriptors
        // (rounded up to pages), so the element is inside it and aligned
        // (the mapping is page-aligned, the stride is `size_of`).
        let p = self.ptr.as_ptr().wrapping_add(usize::from(tag));
        // SAFETY: (as above) `p` is in bounds, aligned and readable.
        Some(unsafe { p.read_volatile() })
    }

    /// The queue depth this array was mapped for.
    #[inline]
    pub fn depth(&self) -> u16 {
        self.depth
    }
}

impl Drop for DescArray {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and hand out no references into it.
        if let Err(e) = unsafe { munmap(self.ptr.as_ptr().cast(), self.map_len) } {
            log::warn!("munmap of the descriptor array failed: {e}");
        }
    }
}

/// One page-aligned buffer per tag, `buf_size` bytes each, in one anonymous
/// mapping (faulted in lazily). Unmapped on drop.
#[derive(Debug)]
pub struct IoBuffers {
    ptr: NonNull<u8>,
    buf_size: usize,
    count: usize,
    map_len: usize,
}

// SAFETY: plain private memory; access is mediated by `&mut self`.
unsafe impl Send for IoBuffers {}

impl IoBuffers {
    /// `count` buffers of `buf_size` bytes (rounded up to pages).
    pub fn new(count: usize, buf_size: usize) -> Result<Self> {
        let buf_size = page_round_up(buf_size.max(1));
        let map_len = buf_size
            .checked_mul(count.max(1))
            .ok_or_else(|| Error::config("I/O buffers too large"))?;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                map_len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::io("allocating I/O buffers")(e.into()))?;
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| Error::config("mmap returned NULL"))?;
        Ok(Self {
            ptr,
            buf_size,
            count,
            map_len,
        })
    }

    /// The address of buffer `i` (what the kernel is told), or `None`.
    #[inline]
    pub fn addr(&self, i: usize) -> Option<*mut u8> {
        // SAFETY: `i < count`, so the offset stays inside the mapping.
        (i < self.count).then(|| unsafe { self.ptr.as_ptr().add(i * self.buf_size) })
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

impl Drop for IoBuffers {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; borrows of it end with `&mut self`.
        if let Err(e) = unsafe { munmap(self.ptr.as_ptr().cast(), self.map_len) } {
            log::warn!("munmap of I/O buffers failed: {e}");
        }
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
    fn descriptor_stride_comes_from_the_type() {
        assert_eq!(size_of::<ublksrv_io_desc>(), 24);
        // 4096 descriptors of 24 bytes are exactly 24 pages of 4 KiB.
        assert_eq!(page_round_up(4096 * size_of::<ublksrv_io_desc>()), 98304);
        assert_eq!(page_round_up(1), rustix::param::page_size());
    }
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`) with its buffers:
/// `entries` slots of `struct io_uring_buf` (16 bytes), the tail in the
/// first slot's last two bytes, and one buffer of `buf_size` bytes per slot.
/// Used by batch I/O's multishot `FETCH_IO_CMDS`, which fills a buffer with
/// the tags of new requests.
#[derive(Debug)]
pub struct BufRing {
    ring: NonNull<u8>,
    ring_len: usize,
    bufs: IoBuffers,
    entries: u16,
    tail: u16,
}

// SAFETY: plain memory shared with the kernel; all access is through
// `&mut self` (ours) or atomics/volatile (the tail, and the kernel's reads).
unsafe impl Send for BufRing {}

impl BufRing {
    /// A ring of `entries` (a power of two) buffers of `buf_size` bytes, all
    /// provided (the ring starts full).
    pub fn new(entries: u16, buf_size: usize) -> Result<Self> {
        if !entries.is_power_of_two() {
            return Err(Error::config(format!(
                "buffer ring size {entries} is not a power of two"
            )));
        }
        let ring_len = page_round_up(usize::from(entries) * 16);
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                ring_len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::io("allocating a buffer ring")(e.into()))?;
        let ring = NonNull::new(ptr.cast()).ok_or_else(|| Error::config("mmap returned NULL"))?;
        let bufs = IoBuffers::new(usize::from(entries), buf_size)?;
        let mut r = Self {
            ring,
            ring_len,
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

    /// Puts buffer `bid` back at the tail (visible after [`BufRing::publish`]).
    #[inline]
    pub fn provide(&mut self, bid: u16) {
        let Some(addr) = self.bufs.addr(usize::from(bid)) else {
            return;
        };
        let slot = usize::from(self.tail & (self.entries - 1)) * 16;
        let mut entry = [0u8; 14];
        entry[..8].copy_from_slice(&(addr as u64).to_ne_bytes());
        entry[8..12].copy_from_slice(&(self.bufs.buf_size() as u32).to_ne_bytes());
        entry[12..14].copy_from_slice(&bid.to_ne_bytes());
        // `slot + 14 <= entries * 16 <= ring_len`; bytes 14..16 of slot 0
        // are the tail, which this write does not touch.
        let dst = self.ring.as_ptr().wrapping_add(slot);
        // SAFETY: `dst..dst + 14` is inside the ring mapping (see above),
        // which only this `&mut self` writes from userspace.
        unsafe { std::ptr::copy_nonoverlapping(entry.as_ptr(), dst, 14) };
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes provided buffers visible to the kernel (store-release of the tail).
    #[inline]
    pub fn publish(&self) {
        let p = self
            .ring
            .as_ptr()
            .wrapping_add(14)
            .cast::<std::sync::atomic::AtomicU16>();
        // SAFETY: offset 14 of the page-aligned ring is 2-aligned and in
        // bounds; the kernel reads the tail with acquire semantics, so it is
        // accessed only atomically here.
        let tail = unsafe { &*p };
        tail.store(self.tail, std::sync::atomic::Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid` (what the kernel wrote).
    #[inline]
    pub fn buf(&mut self, bid: u16, len: usize) -> Option<&mut [u8]> {
        self.bufs.slice_mut(usize::from(bid), len)
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; the ring that used it is dropped first
        // (it is declared before us in `Queue`).
        if let Err(e) = unsafe { munmap(self.ring.as_ptr().cast(), self.ring_len) } {
            log::warn!("munmap of a buffer ring failed: {e}");
        }
    }
}
