//! Device parameters (`struct ublk_params`), validated before the kernel
//! sees them.

use ublk_sys::{
    ublk_param_basic, ublk_param_discard, ublk_param_dma_align, ublk_param_integrity,
    ublk_param_segment, ublk_param_zoned, ublk_params,
};

use crate::{Error, Result};

bitflags::bitflags! {
    /// `UBLK_ATTR_*` attributes of the basic parameters.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Attrs: u32 {
        /// The disk is read-only.
        const READ_ONLY = ublk_sys::UBLK_ATTR_READ_ONLY;
        /// The disk is rotational.
        const ROTATIONAL = ublk_sys::UBLK_ATTR_ROTATIONAL;
        /// The disk has a volatile write cache (the kernel sends FLUSH).
        const VOLATILE_CACHE = ublk_sys::UBLK_ATTR_VOLATILE_CACHE;
        /// The disk honours FUA writes.
        const FUA = ublk_sys::UBLK_ATTR_FUA;
    }
}

/// The sector size the ublk UAPI counts in.
pub const SECTOR_SIZE: u64 = 512;

/// `UBLK_PARAM_TYPE_BASIC`: size and queue limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BasicParams {
    /// `UBLK_ATTR_*`.
    pub attrs: Attrs,
    /// Logical block size in bytes (a power of two, 512–4096).
    pub logical_block_size: u32,
    /// Physical block size in bytes (a power of two ≥ the logical one).
    pub physical_block_size: u32,
    /// Minimum I/O size in bytes (a power of two).
    pub io_min: u32,
    /// Optimal I/O size in bytes (a power of two).
    pub io_opt: u32,
    /// Largest request in 512-byte sectors.
    pub max_sectors: u32,
    /// Chunk size in sectors (0: none).
    pub chunk_sectors: u32,
    /// Capacity in 512-byte sectors.
    pub dev_sectors: u64,
    /// Virtual boundary mask (0: none).
    pub virt_boundary_mask: u64,
}

impl BasicParams {
    /// A device of `capacity_bytes` with 512-byte blocks and requests of at
    /// most `max_io_bytes`.
    pub fn new(capacity_bytes: u64, max_io_bytes: u32) -> Self {
        Self {
            attrs: Attrs::empty(),
            logical_block_size: 512,
            physical_block_size: 512,
            io_min: 512,
            io_opt: 512,
            max_sectors: max_io_bytes / SECTOR_SIZE as u32,
            chunk_sectors: 0,
            dev_sectors: capacity_bytes / SECTOR_SIZE,
            virt_boundary_mask: 0,
        }
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.dev_sectors * SECTOR_SIZE
    }
}

/// `UBLK_PARAM_TYPE_DISCARD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardParams {
    /// Discard alignment in bytes.
    pub alignment: u32,
    /// Discard granularity in bytes.
    pub granularity: u32,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in sectors (0: none).
    pub max_write_zeroes_sectors: u32,
    /// Most segments in one discard.
    pub max_discard_segments: u16,
}

/// `UBLK_PARAM_TYPE_DEVT` (read-only: filled by the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DevtParams {
    /// Char device major:minor.
    pub char_dev: (u32, u32),
    /// Disk major:minor (0:0 before START_DEV).
    pub disk_dev: (u32, u32),
}

/// `UBLK_PARAM_TYPE_SEGMENT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentParams {
    /// Segment boundary mask (mask + 1 a power of two ≥ 4096).
    pub seg_boundary_mask: u64,
    /// Largest segment in bytes (≥ 4096).
    pub max_segment_size: u32,
    /// Most segments in a request.
    pub max_segments: u16,
}

/// `UBLK_PARAM_TYPE_ZONED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZonedParams {
    /// Most open zones.
    pub max_open_zones: u32,
    /// Most active zones.
    pub max_active_zones: u32,
    /// Largest zone append in sectors.
    pub max_zone_append_sectors: u32,
}

bitflags::bitflags! {
    /// Protection-information capabilities of an integrity device
    /// (`LBMD_PI_CAP_*` of `linux/fs.h`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct PiCaps: u32 {
        /// The device can check protection information itself (sysfs
        /// `device_is_integrity_capable` 1): the block layer then skips
        /// what sysfs `read_verify`/`write_generate` turn off.
        const INTEGRITY = 1 << 0;
        /// The reference tag (the low bits of the sector) is checked too.
        const REFTAG = 1 << 1;
    }
}

/// The checksum of the protection information in each interval's metadata
/// (`LBMD_PI_CSUM_*` of `linux/fs.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checksum {
    /// No protection information: the metadata is opaque (format `nop`).
    #[default]
    None,
    /// IP checksum, 8-byte tuple (`T10-DIF-TYPE*-IP`).
    Ip,
    /// CRC16 T10-DIF, 8-byte tuple (`T10-DIF-TYPE*-CRC`).
    T10Dif,
    /// CRC64 NVMe, 16-byte tuple (`EXT-DIF-TYPE*-CRC64`).
    Nvme,
    /// A value this crate does not know (as the kernel reported it).
    Other(u8),
}

impl Checksum {
    /// The `LBMD_PI_CSUM_*` value.
    pub const fn to_raw(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Ip => 1,
            Self::T10Dif => 2,
            Self::Nvme => 4,
            Self::Other(v) => v,
        }
    }

    /// From the `LBMD_PI_CSUM_*` value.
    pub const fn from_raw(v: u8) -> Self {
        match v {
            0 => Self::None,
            1 => Self::Ip,
            2 => Self::T10Dif,
            4 => Self::Nvme,
            v => Self::Other(v),
        }
    }

    /// Bytes of the protection-information tuple (0 without one; `None`
    /// for a value the kernel would refuse).
    pub const fn tuple_size(self) -> Option<u8> {
        match self {
            Self::None => Some(0),
            Self::Ip | Self::T10Dif => Some(8),
            Self::Nvme => Some(16),
            Self::Other(_) => None,
        }
    }
}

/// `UBLK_PARAM_TYPE_INTEGRITY`: each interval of data (a logical block,
/// usually) carries `metadata_size` bytes of metadata, with a
/// protection-information tuple at `pi_offset` when `checksum` is not
/// [`Checksum::None`]. Needs `UBLK_F_INTEGRITY`, which needs user copy:
/// requests with metadata come with [`crate::target::Request::integrity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntegrityParams {
    /// Protection-information capabilities.
    pub caps: PiCaps,
    /// Most integrity segments in a request (0: no limit).
    pub max_integrity_segments: u16,
    /// Bytes of data each metadata entry covers (a power of two from 512
    /// to the logical block size).
    pub interval: u32,
    /// Metadata bytes per interval (1..=255).
    pub metadata_size: u8,
    /// Where the protection-information tuple starts in the metadata.
    pub pi_offset: u8,
    /// The protection-information checksum.
    pub checksum: Checksum,
    /// Bytes of the application tag the device stores (sysfs `tag_size`).
    pub tag_size: u8,
}

impl IntegrityParams {
    /// `metadata_size` opaque bytes per 512-byte interval: no protection
    /// information, no capabilities.
    pub const fn new(metadata_size: u8) -> Self {
        Self {
            caps: PiCaps::empty(),
            max_integrity_segments: 0,
            interval: SECTOR_SIZE as u32,
            metadata_size,
            pi_offset: 0,
            checksum: Checksum::None,
            tag_size: 0,
        }
    }

    /// The metadata bytes of `data_bytes` bytes of data (whole intervals;
    /// also the metadata offset of the data at byte `data_bytes`).
    #[inline]
    pub const fn metadata_len(&self, data_bytes: u64) -> u64 {
        (data_bytes >> self.interval.trailing_zeros()) * self.metadata_size as u64
    }

    /// The data bytes `metadata_bytes` of metadata cover (whole entries).
    #[inline]
    pub const fn data_len(&self, metadata_bytes: u64) -> u64 {
        if self.metadata_size == 0 {
            return 0;
        }
        (metadata_bytes / self.metadata_size as u64) << self.interval.trailing_zeros()
    }

    /// Checks what the kernel refuses (with logical block size `lbs`).
    fn validate(&self, lbs: u32) -> Result<()> {
        let bad = |what: String| Err(Error::config(what));
        if self.metadata_size == 0 {
            return bad("integrity needs a metadata size of at least 1 byte".into());
        }
        let Some(tuple) = self.checksum.tuple_size() else {
            return bad(format!(
                "unknown protection-information checksum type {}",
                self.checksum.to_raw()
            ));
        };
        if self.checksum == Checksum::None && self.caps.contains(PiCaps::REFTAG) {
            return bad("a reference tag needs a protection-information checksum".into());
        }
        if u32::from(self.pi_offset) + u32::from(tuple) > u32::from(self.metadata_size) {
            return bad(format!(
                "the {tuple}-byte protection information at offset {} does not fit in {} bytes of metadata",
                self.pi_offset, self.metadata_size
            ));
        }
        if !self.interval.is_power_of_two() || !(512..=lbs).contains(&self.interval) {
            return bad(format!(
                "integrity interval {} is not a power of two from 512 to the logical block size {lbs}",
                self.interval
            ));
        }
        Ok(())
    }

    fn to_raw(self) -> ublk_param_integrity {
        ublk_param_integrity {
            flags: self.caps.bits(),
            max_integrity_segments: self.max_integrity_segments,
            interval_exp: self.interval.trailing_zeros() as u8,
            metadata_size: self.metadata_size,
            pi_offset: self.pi_offset,
            csum_type: self.checksum.to_raw(),
            tag_size: self.tag_size,
            ..Default::default()
        }
    }

    fn from_raw(p: &ublk_param_integrity) -> Self {
        Self {
            caps: PiCaps::from_bits_retain(p.flags),
            max_integrity_segments: p.max_integrity_segments,
            interval: 1 << p.interval_exp.min(31),
            metadata_size: p.metadata_size,
            pi_offset: p.pi_offset,
            checksum: Checksum::from_raw(p.csum_type),
            tag_size: p.tag_size,
        }
    }
}

/// All parameter groups; `None` groups are not sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    /// Basic parameters (required by START_DEV).
    pub basic: Option<BasicParams>,
    /// Discard support.
    pub discard: Option<DiscardParams>,
    /// Device numbers (only ever read back).
    pub devt: Option<DevtParams>,
    /// DMA alignment mask (`UBLK_PARAM_TYPE_DMA_ALIGN`).
    pub dma_alignment: Option<u32>,
    /// Segment limits.
    pub segment: Option<SegmentParams>,
    /// Zoned device limits.
    pub zoned: Option<ZonedParams>,
    /// Integrity metadata (`UBLK_PARAM_TYPE_INTEGRITY`, needs `UBLK_F_INTEGRITY`).
    pub integrity: Option<IntegrityParams>,
}

fn shift_of(what: &str, v: u32) -> Result<u8> {
    if v.is_power_of_two() {
        Ok(v.trailing_zeros() as u8)
    } else {
        Err(Error::config(format!("{what} {v} is not a power of two")))
    }
}

impl Params {
    /// Parameters with just the basic group.
    pub fn basic(basic: BasicParams) -> Self {
        Self {
            basic: Some(basic),
            ..Self::default()
        }
    }

    /// Checks what the kernel would refuse, or would accept and misbehave
    /// on, and says what is wrong.
    pub fn validate(&self) -> Result<()> {
        let Some(b) = &self.basic else {
            return Err(Error::config("basic parameters are required"));
        };
        shift_of("logical block size", b.logical_block_size)?;
        shift_of("physical block size", b.physical_block_size)?;
        shift_of("minimum I/O size", b.io_min)?;
        shift_of("optimal I/O size", b.io_opt)?;
        if !(512..=4096).contains(&b.logical_block_size) {
            return Err(Error::config(format!(
                "logical block size {} is outside 512..=4096",
                b.logical_block_size
            )));
        }
        if b.logical_block_size > b.physical_block_size {
            return Err(Error::config(format!(
                "logical block size {} is larger than the physical block size {}",
                b.logical_block_size, b.physical_block_size
            )));
        }
        let lbs_sectors = u64::from(b.logical_block_size) / SECTOR_SIZE;
        if b.dev_sectors % lbs_sectors != 0 {
            return Err(Error::config(format!(
                "capacity of {} bytes is not a multiple of the logical block size {}",
                b.capacity_bytes(),
                b.logical_block_size
            )));
        }
        if u64::from(b.max_sectors) < lbs_sectors {
            return Err(Error::config(format!(
                "largest request of {} sectors is smaller than one logical block",
                b.max_sectors
            )));
        }
        if let Some(d) = &self.discard {
            if d.granularity != 0 && !d.granularity.is_power_of_two() {
                return Err(Error::config(format!(
                    "discard granularity {} is not a power of two",
                    d.granularity
                )));
            }
            if d.max_discard_segments == 0 && d.max_discard_sectors != 0 {
                return Err(Error::config("discard needs at least one segment"));
            }
        }
        if let Some(s) = &self.segment {
            let min = ublk_sys::UBLK_MIN_SEGMENT_SIZE;
            if s.max_segment_size < min || s.max_segments == 0 {
                return Err(Error::config(format!(
                    "segment limits need max_segment_size >= {min} and max_segments > 0"
                )));
            }
            let span = s.seg_boundary_mask.wrapping_add(1);
            if !span.is_power_of_two() || span < u64::from(min) {
                return Err(Error::config(format!(
                    "segment boundary mask {:#x} + 1 is not a power of two >= {min}",
                    s.seg_boundary_mask
                )));
            }
        }
        if let Some(i) = &self.integrity {
            i.validate(b.logical_block_size)?;
        }
        if let Some(a) = self.dma_alignment {
            if !a.wrapping_add(1).is_power_of_two() {
                return Err(Error::config(format!(
                    "DMA alignment mask {a:#x} is not 2^n - 1"
                )));
            }
        }
        Ok(())
    }

    /// The UAPI struct (call [`Params::validate`] first).
    pub fn to_raw(&self) -> ublk_params {
        let mut p = ublk_params {
            len: size_of::<ublk_params>() as u32,
            ..Default::default()
        };
        if let Some(b) = &self.basic {
            p.types |= ublk_sys::UBLK_PARAM_TYPE_BASIC;
            p.basic = ublk_param_basic {
                attrs: b.attrs.bits(),
                logical_bs_shift: b.logical_block_size.trailing_zeros() as u8,
                physical_bs_shift: b.physical_block_size.trailing_zeros() as u8,
                io_opt_shift: b.io_opt.trailing_zeros() as u8,
                io_min_shift: b.io_min.trailing_zeros() as u8,
                max_sectors: b.max_sectors,
                chunk_sectors: b.chunk_sectors,
                dev_sectors: b.dev_sectors,
                virt_boundary_mask: b.virt_boundary_mask,
            };
        }
        if let Some(d) = &self.discard {
            p.types |= ublk_sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard = ublk_param_discard {
                discard_alignment: d.alignment,
                discard_granularity: d.granularity,
                max_discard_sectors: d.max_discard_sectors,
                max_write_zeroes_sectors: d.max_write_zeroes_sectors,
                max_discard_segments: d.max_discard_segments,
                reserved0: 0,
            };
        }
        if let Some(a) = self.dma_alignment {
            p.types |= ublk_sys::UBLK_PARAM_TYPE_DMA_ALIGN;
            p.dma = ublk_param_dma_align {
                alignment: a,
                ..Default::default()
            };
        }
        if let Some(s) = &self.segment {
            p.types |= ublk_sys::UBLK_PARAM_TYPE_SEGMENT;
            p.seg = ublk_param_segment {
                seg_boundary_mask: s.seg_boundary_mask,
                max_segment_size: s.max_segment_size,
                max_segments: s.max_segments,
                ..Default::default()
            };
        }
        if let Some(z) = &self.zoned {
            p.types |= ublk_sys::UBLK_PARAM_TYPE_ZONED;
            p.zoned = ublk_param_zoned {
                max_open_zones: z.max_open_zones,
                max_active_zones: z.max_active_zones,
                max_zone_append_sectors: z.max_zone_append_sectors,
                ..Default::default()
            };
        }
        if let Some(i) = self.integrity {
            p.types |= ublk_sys::UBLK_PARAM_TYPE_INTEGRITY;
            p.integrity = i.to_raw();
        }
        p
    }

    /// From the UAPI struct (as `GET_PARAMS` returns it).
    pub fn from_raw(p: &ublk_params) -> Self {
        let has = |t: u32| p.types & t != 0;
        Self {
            basic: has(ublk_sys::UBLK_PARAM_TYPE_BASIC).then(|| BasicParams {
                attrs: Attrs::from_bits_retain(p.basic.attrs),
                logical_block_size: 1 << p.basic.logical_bs_shift.min(31),
                physical_block_size: 1 << p.basic.physical_bs_shift.min(31),
                io_min: 1 << p.basic.io_min_shift.min(31),
                io_opt: 1 << p.basic.io_opt_shift.min(31),
                max_sectors: p.basic.max_sectors,
                chunk_sectors: p.basic.chunk_sectors,
                dev_sectors: p.basic.dev_sectors,
                virt_boundary_mask: p.basic.virt_boundary_mask,
            }),
            discard: has(ublk_sys::UBLK_PARAM_TYPE_DISCARD).then_some(DiscardParams {
                alignment: p.discard.discard_alignment,
                granularity: p.discard.discard_granularity,
                max_discard_sectors: p.discard.max_discard_sectors,
                max_write_zeroes_sectors: p.discard.max_write_zeroes_sectors,
                max_discard_segments: p.discard.max_discard_segments,
            }),
            devt: has(ublk_sys::UBLK_PARAM_TYPE_DEVT).then_some(DevtParams {
                char_dev: (p.devt.char_major, p.devt.char_minor),
                disk_dev: (p.devt.disk_major, p.devt.disk_minor),
            }),
            dma_alignment: has(ublk_sys::UBLK_PARAM_TYPE_DMA_ALIGN).then_some(p.dma.alignment),
            segment: has(ublk_sys::UBLK_PARAM_TYPE_SEGMENT).then_some(SegmentParams {
                seg_boundary_mask: p.seg.seg_boundary_mask,
                max_segment_size: p.seg.max_segment_size,
                max_segments: p.seg.max_segments,
            }),
            zoned: has(ublk_sys::UBLK_PARAM_TYPE_ZONED).then_some(ZonedParams {
                max_open_zones: p.zoned.max_open_zones,
                max_active_zones: p.zoned.max_active_zones,
                max_zone_append_sectors: p.zoned.max_zone_append_sectors,
            }),
            integrity: has(ublk_sys::UBLK_PARAM_TYPE_INTEGRITY)
                .then(|| IntegrityParams::from_raw(&p.integrity)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_the_uapi_struct() {
        let mut b = BasicParams::new(1 << 30, 512 << 10);
        b.logical_block_size = 4096;
        b.physical_block_size = 4096;
        b.attrs = Attrs::VOLATILE_CACHE | Attrs::FUA;
        let p = Params {
            discard: Some(DiscardParams {
                granularity: 4096,
                max_discard_sectors: 1 << 20,
                max_discard_segments: 1,
                ..Default::default()
            }),
            ..Params::basic(b)
        };
        p.validate().unwrap();
        let raw = p.to_raw();
        assert_eq!(
            raw.types,
            ublk_sys::UBLK_PARAM_TYPE_BASIC | ublk_sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(raw.basic.logical_bs_shift, 12);
        assert_eq!(raw.basic.max_sectors, 1024);
        assert_eq!(raw.basic.dev_sectors, 1 << 21);
        assert_eq!(raw.len as usize, size_of::<ublk_params>());
        let back = Params::from_raw(&raw);
        assert_eq!(back.basic, Some(b));
        assert_eq!(back.discard, p.discard);
    }

    #[test]
    fn integrity_round_trips_and_is_checked_as_the_kernel_does() {
        let b = BasicParams::new(1 << 20, 1 << 19);
        let nvme = IntegrityParams {
            caps: PiCaps::INTEGRITY | PiCaps::REFTAG,
            pi_offset: 48,
            checksum: Checksum::Nvme,
            ..IntegrityParams::new(64)
        };
        let p = Params {
            integrity: Some(nvme),
            ..Params::basic(b)
        };
        p.validate().unwrap();
        let raw = p.to_raw();
        assert_ne!(raw.types & ublk_sys::UBLK_PARAM_TYPE_INTEGRITY, 0);
        assert_eq!(
            (
                raw.integrity.flags,
                raw.integrity.interval_exp,
                raw.integrity.csum_type
            ),
            (3, 9, 4)
        );
        assert_eq!(Params::from_raw(&raw).integrity, Some(nvme));
        // 64 bytes per 512: a 4 KiB request has 512 bytes of metadata.
        assert_eq!(nvme.metadata_len(4096), 512);
        assert_eq!(nvme.data_len(512), 4096);
        let check = |i: IntegrityParams, needle: &str| {
            let p = Params {
                integrity: Some(i),
                ..Params::basic(b)
            };
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} does not mention {needle:?}");
        };
        check(IntegrityParams::new(0), "at least 1 byte");
        check(
            IntegrityParams {
                pi_offset: 56,
                checksum: Checksum::Nvme,
                ..IntegrityParams::new(64)
            },
            "does not fit in 64 bytes",
        );
        check(
            IntegrityParams {
                caps: PiCaps::REFTAG,
                ..IntegrityParams::new(8)
            },
            "needs a protection-information checksum",
        );
        check(
            IntegrityParams {
                interval: 4096,
                ..IntegrityParams::new(8)
            },
            "logical block size 512",
        );
        check(
            IntegrityParams {
                checksum: Checksum::Other(3),
                ..IntegrityParams::new(8)
            },
            "unknown protection-information checksum type 3",
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        let check = |f: fn(&mut BasicParams), needle: &str| {
            let mut b = BasicParams::new(1 << 20, 1 << 19);
            f(&mut b);
            let e = Params::basic(b).validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} does not mention {needle:?}");
        };
        check(
            |b| b.logical_block_size = 1000,
            "logical block size 1000 is not a power of two",
        );
        check(|b| b.logical_block_size = 8192, "outside 512..=4096");
        check(
            |b| {
                b.logical_block_size = 4096;
            },
            "larger than the physical block size",
        );
        check(
            |b| {
                b.logical_block_size = 4096;
                b.physical_block_size = 4096;
                b.dev_sectors = 9;
            },
            "not a multiple of the logical block size",
        );
        check(|b| b.max_sectors = 0, "smaller than one logical block");
        assert!(Params::default().validate().is_err());
    }
}
