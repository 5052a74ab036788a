//! Feature flags (`UBLK_F_*`): what a kernel supports and what a device uses.

use core::fmt;

bitflags::bitflags! {
    /// A set of `UBLK_F_*` feature bits.
    ///
    /// The same type describes what the kernel supports (from
    /// `UBLK_U_CMD_GET_FEATURES`) and what a device was created with
    /// (`ublksrv_ctrl_dev_info::flags`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    #[repr(transparent)]
    pub struct Features: u64 {
        /// `UBLK_F_SUPPORT_ZERO_COPY`: request buffers registered into io_uring.
        const SUPPORT_ZERO_COPY = ublk_sys::UBLK_F_SUPPORT_ZERO_COPY;
        /// `UBLK_F_URING_CMD_COMP_IN_TASK`: complete io commands in task work.
        const URING_CMD_COMP_IN_TASK = ublk_sys::UBLK_F_URING_CMD_COMP_IN_TASK;
        /// `UBLK_F_NEED_GET_DATA`: writes are delivered before their data.
        const NEED_GET_DATA = ublk_sys::UBLK_F_NEED_GET_DATA;
        /// `UBLK_F_USER_RECOVERY`: the device survives its server.
        const USER_RECOVERY = ublk_sys::UBLK_F_USER_RECOVERY;
        /// `UBLK_F_USER_RECOVERY_REISSUE`: in-flight I/O is reissued after recovery.
        const USER_RECOVERY_REISSUE = ublk_sys::UBLK_F_USER_RECOVERY_REISSUE;
        /// `UBLK_F_UNPRIVILEGED_DEV`: devices owned by an unprivileged user.
        const UNPRIVILEGED_DEV = ublk_sys::UBLK_F_UNPRIVILEGED_DEV;
        /// `UBLK_F_CMD_IOCTL_ENCODE`: opcodes use the ioctl encoding.
        const CMD_IOCTL_ENCODE = ublk_sys::UBLK_F_CMD_IOCTL_ENCODE;
        /// `UBLK_F_USER_COPY`: data is copied with pread/pwrite on the char device.
        const USER_COPY = ublk_sys::UBLK_F_USER_COPY;
        /// `UBLK_F_ZONED`: zoned block device.
        const ZONED = ublk_sys::UBLK_F_ZONED;
        /// `UBLK_F_USER_RECOVERY_FAIL_IO`: I/O fails while no server is attached.
        const USER_RECOVERY_FAIL_IO = ublk_sys::UBLK_F_USER_RECOVERY_FAIL_IO;
        /// `UBLK_F_UPDATE_SIZE`: `UBLK_U_CMD_UPDATE_SIZE` is supported.
        const UPDATE_SIZE = ublk_sys::UBLK_F_UPDATE_SIZE;
        /// `UBLK_F_AUTO_BUF_REG`: request buffers registered automatically.
        const AUTO_BUF_REG = ublk_sys::UBLK_F_AUTO_BUF_REG;
        /// `UBLK_F_QUIESCE`: `UBLK_U_CMD_QUIESCE_DEV` is supported.
        const QUIESCE = ublk_sys::UBLK_F_QUIESCE;
        /// `UBLK_F_PER_IO_DAEMON`: each tag may be served by its own task.
        const PER_IO_DAEMON = ublk_sys::UBLK_F_PER_IO_DAEMON;
        /// `UBLK_F_BUF_REG_OFF_DAEMON`: buffers may be registered from any task.
        const BUF_REG_OFF_DAEMON = ublk_sys::UBLK_F_BUF_REG_OFF_DAEMON;
        /// `UBLK_F_BATCH_IO`: batched fetch and commit commands.
        const BATCH_IO = ublk_sys::UBLK_F_BATCH_IO;
        /// `UBLK_F_INTEGRITY`: requests carry integrity metadata.
        const INTEGRITY = ublk_sys::UBLK_F_INTEGRITY;
        /// `UBLK_F_SAFE_STOP_DEV`: `UBLK_U_CMD_TRY_STOP_DEV` is supported.
        const SAFE_STOP_DEV = ublk_sys::UBLK_F_SAFE_STOP_DEV;
        /// `UBLK_F_NO_AUTO_PART_SCAN`: no partition scan at start.
        const NO_AUTO_PART_SCAN = ublk_sys::UBLK_F_NO_AUTO_PART_SCAN;
        /// `UBLK_F_SHMEM_ZC`: shared-memory zero copy.
        const SHMEM_ZC = ublk_sys::UBLK_F_SHMEM_ZC;
    }
}

impl Features {
    /// What a kernel without `UBLK_U_CMD_GET_FEATURES` (before 6.5) is
    /// assumed to support: the Linux 6.1 set.
    pub const LINUX_6_1: Self = Self::URING_CMD_COMP_IN_TASK
        .union(Self::NEED_GET_DATA)
        .union(Self::USER_RECOVERY)
        .union(Self::USER_RECOVERY_REISSUE);

    /// The full kernel name (`UBLK_F_…`) of every set bit this crate knows,
    /// in bit order, followed by `unknown bit N` for any bit it does not.
    pub fn kernel_names(self) -> impl Iterator<Item = String> {
        (0..64u32).filter_map(move |bit| {
            let b = 1u64 << bit;
            (self.bits() & b != 0).then(|| {
                match Self::from_bits(b).and_then(|f| f.iter_names().next()) {
                    Some((name, _)) => format!("UBLK_F_{name}"),
                    None => format!("unknown bit {bit}"),
                }
            })
        })
    }
}

impl fmt::Display for Features {
    /// `UBLK_F_A|UBLK_F_B` (or `0` for the empty set).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("0");
        }
        let names: Vec<String> = self.kernel_names().collect();
        f.write_str(&names.join("|"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bit_of_the_7_2_header_has_a_name() {
        let all = Features::from_bits_retain(0xfffff);
        assert_eq!(all, Features::all());
        assert!(all.kernel_names().all(|n| n.starts_with("UBLK_F_")));
        assert_eq!(all.kernel_names().count(), 20);
    }

    #[test]
    fn names_follow_bit_order_and_unknown_bits_are_said() {
        let f = Features::from_bits_retain(0b101 | 1 << 40);
        let names: Vec<_> = f.kernel_names().collect();
        assert_eq!(
            names,
            [
                "UBLK_F_SUPPORT_ZERO_COPY",
                "UBLK_F_NEED_GET_DATA",
                "unknown bit 40"
            ]
        );
        assert_eq!(
            Features::CMD_IOCTL_ENCODE.to_string(),
            "UBLK_F_CMD_IOCTL_ENCODE"
        );
        assert_eq!(Features::LINUX_6_1.bits(), 0x1e);
    }
}
