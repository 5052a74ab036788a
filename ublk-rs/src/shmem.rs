//! Shared-memory zero copy (`UBLK_F_SHMEM_ZC`) from the server's side: a
//! file (hugetlbfs, a memfd, tmpfs) mapped shared and registered with a
//! device, so that requests whose pages lie in it arrive as
//! [`crate::IoBuf::Shmem`] and are served in place, with no copy. The
//! application doing I/O on the disk maps the same file (fio's
//! `--mem=mmaphuge:FILE`), which is how the kernel matches the pages.
#![allow(unsafe_code)]

use std::os::fd::AsFd;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::mem::Mmap;
use crate::target::ShmemRegion;
use crate::{Control, Error, Result};

/// A file mapped shared and registered with a device (`REG_BUF`);
/// unregistered, then unmapped, when the last [`Arc`] goes (a device
/// already deleted has dropped the registration itself).
#[derive(Debug)]
pub struct ShmemBuffer {
    ctrl: Arc<Control>,
    dev_id: u32,
    index: u16,
    // Dropped after `drop` has unregistered it.
    map: Mmap,
}

// SAFETY: the mapping is only handed out as a raw pointer (in a
// `ShmemRegion`); nothing reads or writes it through `&self`.
unsafe impl Sync for ShmemBuffer {}

impl ShmemBuffer {
    /// Maps all of `file` (writable unless `read_only`) and registers it
    /// with device `dev_id`, pinned read-only with `read_only`
    /// (`UBLK_SHMEM_BUF_READ_ONLY`).
    pub fn register(
        ctrl: Arc<Control>,
        dev_id: u32,
        file: impl AsFd,
        read_only: bool,
    ) -> Result<Arc<Self>> {
        let len = rustix::fs::fstat(&file)
            .map_err(|e| Error::io("reading the shared buffer's size")(e.into()))?
            .st_size;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| Error::Config("the shared buffer's file is empty".into()))?;
        let map = Mmap::shared_file(&file, len, read_only)
            .map_err(Error::io("mapping the shared buffer"))?;
        // SAFETY: a shared mapping of this process, page aligned (mmap),
        // owned by the buffer returned, which unregisters it before it is
        // unmapped.
        let index = unsafe { ctrl.reg_buf(dev_id, map.as_ptr(), len as u64, read_only) }?;
        let index = u16::try_from(index)
            .map_err(|_| Error::Config(format!("shared buffer index {index} out of range")))?;
        Ok(Arc::new(Self {
            ctrl,
            dev_id,
            index,
            map,
        }))
    }

    /// The index the kernel gave the buffer.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it is empty (never: an empty file is refused).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The region for a [`crate::target::ShmemMap`], keeping the buffer
    /// mapped as long as the region lives.
    pub fn region(self: &Arc<Self>) -> ShmemRegion {
        let addr = NonNull::new(self.map.as_ptr()).unwrap_or(NonNull::dangling());
        // SAFETY: the mapping is `len` bytes, stays mapped while `self`
        // lives, and the region holds `self`.
        unsafe { ShmemRegion::new(self.index, addr, self.len(), Arc::clone(self) as _) }
    }
}

impl Drop for ShmemBuffer {
    fn drop(&mut self) {
        if let Err(e) = self.ctrl.unreg_buf(self.dev_id, u32::from(self.index)) {
            // A deleted device has let go of it already.
            log::debug!("unregistering shared buffer {}: {e}", self.index);
        }
    }
}
