"""Capabilities: their numbers and names (include/uapi/linux/capability.h), and the masks of
/proc/PID/status."""

from __future__ import annotations

from enum import IntEnum

from criu_livedump.linux.procfs import read_status

__all__ = ["CAP", "cap_names", "capabilities", "has_cap"]


class CAP(IntEnum):
    """Capability numbers used here (include/uapi/linux/capability.h)."""

    SETGID = 6
    SETUID = 7
    SETPCAP = 8
    SYS_PTRACE = 19
    SYS_ADMIN = 21
    SYS_NICE = 23
    SYS_RESOURCE = 24
    CHECKPOINT_RESTORE = 40


def capabilities(pid: int | str = "self", which: str = "CapEff") -> int:
    """A capability mask (``CapEff``, ``CapPrm``, ``CapBnd``...) from /proc/PID/status.

    :raises OSError: the process is gone or /proc is unreadable.
    """
    return int(read_status(f"/proc/{pid}/status").get(which, "0"), 16)


def has_cap(mask: int, cap: CAP) -> bool:
    """*cap* is set in capability *mask*."""
    return bool(mask >> cap & 1)


def cap_names(mask: int) -> list[str]:
    """Names (``cap_sys_ptrace``...) of the capabilities set in *mask*, as setpriv spells them."""
    return [_CAP_NAMES[bit] for bit in range(len(_CAP_NAMES)) if mask >> bit & 1]


# include/uapi/linux/capability.h, in bit order.
_CAP_NAMES = (
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
)
