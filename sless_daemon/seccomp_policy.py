"""The seccomp filter every sandbox loads: system calls a function never needs are refused.

Built once per worker with libseccomp (through `pyseccomp`), exported as classic BPF
and handed to bubblewrap with `--seccomp FD`. Denied calls fail with EPERM (the
program sees an ordinary error and can report it); a call made through another
ABI (32-bit `int 0x80`, x32) kills the process, since no honest Python program
makes one.
"""

from __future__ import annotations

import errno
import os
import tempfile

# name -> why a sandboxed function must not have it
DENIED_SYSCALLS = {
    "ptrace": "inspecting or steering other processes (the worker, other jobs)",
    "process_vm_readv": "reading another process's memory",
    "process_vm_writev": "writing another process's memory",
    "kcmp": "probing other processes' kernel objects",
    "pidfd_getfd": "stealing another process's file descriptors",
    "mount": "changing the filesystem view",
    "umount2": "changing the filesystem view",
    "pivot_root": "changing the filesystem view",
    "chroot": "changing the filesystem view",
    "move_mount": "new mount API",
    "open_tree": "new mount API",
    "fsopen": "new mount API",
    "fsconfig": "new mount API",
    "fsmount": "new mount API",
    "fspick": "new mount API",
    "mount_setattr": "new mount API",
    "unshare": "new namespaces: the main way into kernel attack surface",
    "setns": "joining other namespaces",
    "kexec_load": "replacing the running kernel",
    "kexec_file_load": "replacing the running kernel",
    "init_module": "loading kernel modules",
    "finit_module": "loading kernel modules",
    "delete_module": "unloading kernel modules",
    "reboot": "rebooting the machine",
    "swapon": "changing swap",
    "swapoff": "changing swap",
    "keyctl": "the kernel keyring (shared, often exploited)",
    "add_key": "the kernel keyring",
    "request_key": "the kernel keyring",
    "bpf": "loading eBPF programs",
    "perf_event_open": "performance counters: side channels and kernel bugs",
    "userfaultfd": "a classic helper of kernel exploits (race widening)",
    "io_uring_setup": "io_uring: large attack surface, bypasses seccomp for its operations",
    "io_uring_enter": "io_uring",
    "io_uring_register": "io_uring",
    "personality": "changing the execution domain (e.g. disabling ASLR)",
    "acct": "process accounting",
    "quotactl": "disk quotas",
    "syslog": "reading the kernel log",
    "settimeofday": "changing the clock",
    "clock_settime": "changing the clock",
    "clock_adjtime": "changing the clock",
    "adjtimex": "changing the clock",
    "sethostname": "changing the host name",
    "setdomainname": "changing the domain name",
    "open_by_handle_at": "opening files by handle: the Shocker container escape",
    "name_to_handle_at": "file handles, see open_by_handle_at",
    "lookup_dcookie": "kernel profiling interface",
    "iopl": "raw I/O port access",
    "ioperm": "raw I/O port access",
    "vhangup": "hanging up terminals",
    "fanotify_init": "watching the whole filesystem",
    "uselib": "obsolete, historically exploited",
    "ustat": "obsolete",
    "sysfs": "obsolete",
    "nfsservctl": "obsolete",
    "vm86": "obsolete",
    "vm86old": "obsolete",
    "modify_ldt": "segment tricks used by exploits",
    "migrate_pages": "moving other processes' memory",
    "move_pages": "moving other processes' memory",
    "mbind": "NUMA policy games",
    "set_mempolicy": "NUMA policy games",
    "shmget": "SysV shared memory: pages outside RLIMIT_AS that outlive their process",
    "memfd_create": "anonymous files: memory outside RLIMIT_AS",
    "memfd_secret": "secret memory areas",
}

AF_VSOCK = 40

# clone() flags that create namespaces: refused, as unshare() is.
CLONE_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080
# NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME


# What the fork server needs beyond a job: making each attempt's namespaces and mounts.
# Its own filter (loaded by bubblewrap) lets these through; the attempt then stacks the
# full filter on top before any user code runs, and filters can only ever narrow.
SERVER_ALLOWED = frozenset({"unshare", "mount", "setns"})


def build_filter_bpf(allowed: frozenset[str] = frozenset()) -> bytes:
    """Compile the policy, minus `allowed` (the server's), to classic BPF bytes."""
    import pyseccomp as seccomp

    policy = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    policy.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)  # 32-bit and x32 ABIs
    for name in DENIED_SYSCALLS.keys() - allowed:
        try:
            policy.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):
            pass  # not a system call on this architecture (vm86 on x86_64, say)
    # clone3 passes its flags in memory, where a filter cannot look: make callers
    # fall back to clone(), whose flags it can check.
    policy.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    # vsock reaches the hypervisor host (Firecracker, Kata): network namespaces do not isolate it.
    policy.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, AF_VSOCK))
    for flag in _bits(CLONE_NAMESPACE_FLAGS):
        policy.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    with tempfile.TemporaryFile() as out:
        policy.export_bpf(out)
        out.seek(0)
        return out.read()


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]


def bpf_fd(bpf: bytes) -> int:
    """A readable descriptor holding the BPF program, for one bubblewrap start."""
    read_end, write_end = os.pipe()
    os.write(write_end, bpf)  # a few hundred bytes: far below the pipe buffer
    os.close(write_end)
    return read_end
