//! What each kind of thread may ask of the kernel once it runs, and the process-wide baseline
//! (everything any of them needs, plus startup). Written as tables of [`Allow`] entries; the
//! reasons for each group are in `docs/security.md`, "The sandbox and local users".

use super::rules::{Allow, any, arg_in, clear, eq, eq64, masked, when};

/// An ioctl request as the filters compare it.
#[allow(clippy::unnecessary_cast)] // `Ioctl` is u64 on some targets, u32 or i32 on others.
const fn ioctl(request: libc::Ioctl) -> u64 {
    request as u64
}

/// `_IO(';', 100 + n)`: the VFIO ioctls (linux/vfio.h) carry no size or direction.
const fn vfio(n: u64) -> u64 {
    ((b';' as u64) << 8) | (100 + n)
}
const VFIO_GET_API_VERSION: u64 = vfio(0);
const VFIO_CHECK_EXTENSION: u64 = vfio(1);
const VFIO_SET_IOMMU: u64 = vfio(2);
const VFIO_GROUP_GET_STATUS: u64 = vfio(3);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio(4);
const VFIO_GROUP_UNSET_CONTAINER: u64 = vfio(5);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio(6);
const VFIO_DEVICE_GET_INFO: u64 = vfio(7);
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio(8);
const VFIO_DEVICE_GET_IRQ_INFO: u64 = vfio(9);
const VFIO_DEVICE_SET_IRQS: u64 = vfio(10);
const VFIO_DEVICE_RESET: u64 = vfio(11);
const VFIO_IOMMU_GET_INFO: u64 = vfio(12);
/// Also VFIO_DEVICE_PCI_HOT_RESET's number (on a device fd): the kernel tells them apart by
/// the file, seccomp cannot.
const VFIO_IOMMU_MAP_DMA: u64 = vfio(13);
const VFIO_IOMMU_UNMAP_DMA: u64 = vfio(14);

/// io_uring_register opcodes (linux/io_uring.h) used before a ring is enabled; a restricted
/// ring refuses every opcode afterwards (`sandbox::uring`).
const IORING_REGISTER_FILES: u64 = 2;
const IORING_REGISTER_EVENTFD: u64 = 4;
const IORING_REGISTER_RESTRICTIONS: u64 = 11;
const IORING_REGISTER_ENABLE_RINGS: u64 = 12;

/// The flags glibc's pthread_create passes to clone: a thread, never a process.
pub(super) const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;
/// Opened for writing, created or truncated.
const OPEN_WRITES: u64 = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;

/// The signals a crash ends with.
const CRASH_SIGNALS: &[u64] = &[
    libc::SIGABRT as u64,
    libc::SIGBUS as u64,
    libc::SIGSEGV as u64,
];

/// Every thread: memory without execute permission, thread start and end, waiting, time,
/// reading and writing descriptors it has (eventfds, stderr), and crashing as it would
/// unfiltered.
const EVERY_THREAD: &[Allow] = &[
    when(libc::SYS_mmap, &[&[clear(2, PROT_EXEC)]]),
    when(libc::SYS_mprotect, &[&[clear(2, PROT_EXEC)]]),
    any(libc::SYS_munmap),
    any(libc::SYS_mremap),
    any(libc::SYS_brk),
    arg_in(
        libc::SYS_madvise,
        2,
        &[
            libc::MADV_DONTNEED as u64,
            libc::MADV_FREE as u64,
            libc::MADV_DONTDUMP as u64,
        ],
    ),
    any(libc::SYS_futex),
    any(libc::SYS_sched_yield),
    any(libc::SYS_nanosleep),
    any(libc::SYS_clock_nanosleep),
    any(libc::SYS_clock_gettime),
    any(libc::SYS_gettimeofday),
    any(libc::SYS_set_robust_list),
    any(libc::SYS_rseq),
    any(libc::SYS_sigaltstack),
    any(libc::SYS_sched_getaffinity),
    arg_in(
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64],
    ),
    any(libc::SYS_getpid),
    any(libc::SYS_gettid),
    any(libc::SYS_getrandom),
    any(libc::SYS_read),
    any(libc::SYS_write),
    any(libc::SYS_close),
    arg_in(
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_DUPFD_CLOEXEC as u64,
        ],
    ),
    any(libc::SYS_rt_sigreturn),
    any(libc::SYS_rt_sigprocmask),
    // A crash ends as it would without a filter: abort() raises SIGABRT on its thread (after
    // restoring the default action if a handler returned); the SIGSEGV and SIGBUS handlers
    // (std's stack-overflow one, vubd's for frontend memory) restore the default action for a
    // fault they do not handle, and raise one that was sent.
    arg_in(libc::SYS_rt_sigaction, 0, CRASH_SIGNALS),
    arg_in(libc::SYS_tgkill, 2, CRASH_SIGNALS),
    // Where a descriptor or a sysfs entry leads (vfio-ioctls reads a device's IOMMU group when
    // it closes the device; the session checks what a frontend sent).
    any(libc::SYS_readlinkat),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_readlink),
    any(libc::SYS_exit),
    any(libc::SYS_exit_group),
];

/// Eventfds, timerfds and epoll: how threads wait for and wake each other.
const EVENTS: &[Allow] = &[
    any(libc::SYS_eventfd2),
    any(libc::SYS_epoll_create1),
    any(libc::SYS_epoll_ctl),
    any(libc::SYS_epoll_pwait),
    any(libc::SYS_epoll_pwait2),
    any(libc::SYS_timerfd_create),
    any(libc::SYS_timerfd_settime),
    any(libc::SYS_timerfd_gettime),
    any(libc::SYS_ppoll),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_epoll_wait),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_poll),
];

/// Sockets made non-blocking (std does it with an ioctl).
const NONBLOCK: &[Allow] = &[arg_in(libc::SYS_ioctl, 1, &[ioctl(libc::FIONBIO)])];

/// Image locks (`bdev::lock`): taken and given up as frontends come and go, dropped at exit.
const IMAGE_LOCKS: &[Allow] = &[arg_in(
    libc::SYS_fcntl,
    1,
    &[libc::F_OFD_GETLK as u64, libc::F_OFD_SETLK as u64],
)];

/// Data on connected sockets (vhost-user messages with their descriptors, NVMe/TCP PDUs).
const SOCKET_IO: &[Allow] = &[
    any(libc::SYS_sendmsg),
    any(libc::SYS_recvmsg),
    any(libc::SYS_sendto),
    any(libc::SYS_recvfrom),
    any(libc::SYS_readv),
    any(libc::SYS_writev),
    any(libc::SYS_shutdown),
    any(libc::SYS_getsockopt),
    any(libc::SYS_getsockname),
    any(libc::SYS_getpeername),
];

/// An NVMe controller owned through VFIO, once running: DMA mappings of guest memory and
/// queues, interrupts, resets, config space and BAR0 through the device descriptor.
const VFIO_RUN: &[Allow] = &[
    arg_in(
        libc::SYS_ioctl,
        1,
        &[
            VFIO_IOMMU_MAP_DMA,
            VFIO_IOMMU_UNMAP_DMA,
            VFIO_DEVICE_SET_IRQS,
            VFIO_DEVICE_RESET,
            VFIO_DEVICE_GET_REGION_INFO,
            VFIO_GROUP_UNSET_CONTAINER,
        ],
    ),
    any(libc::SYS_pread64),
    any(libc::SYS_pwrite64),
];

/// New threads (vhost-user-backend's per session): clone with the flags of a thread only.
/// clone3, whose flags are out of a filter's reach, is answered ENOSYS by the baseline's
/// second filter so that glibc falls back to clone.
const SPAWN_THREADS: &[Allow] = &[
    when(libc::SYS_clone, &[&[eq64(0, THREAD_CLONE_FLAGS)]]),
    any(libc::SYS_clone3),
];

/// File metadata by descriptor or path (no open); `fstatfs` tells a hugetlbfs file (whose
/// page size the table of frontend memory needs, `mem::fault`) from others.
const METADATA: &[Allow] = &[
    any(libc::SYS_fstat),
    any(libc::SYS_fstatfs),
    any(libc::SYS_newfstatat),
    any(libc::SYS_statx),
    any(libc::SYS_lseek),
];

/// Opening files, for the roles that open none. A library may still try: glibc's malloc
/// reads /proc/sys/vm/overcommit_memory the first time a heap shrinks, in whichever thread
/// that is, and copes with failing. These roles allow the call in their list and have it
/// answered EACCES by a second filter ([`QUIET`]): the open never happens, and the process
/// is not killed for it.
const OPEN: &[Allow] = &[
    any(libc::SYS_openat),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_open),
];

/// What the roles that open no file answer EACCES.
pub(super) const QUIET: &[&[Allow]] = &[OPEN];

/// The main thread once every device thread runs, and the signal thread: wait, end sessions
/// (shutdown of their sockets), stop the pollers and drop the devices (VFIO teardown, image
/// locks).
const CONTROL_OWN: &[Allow] = &[any(libc::SYS_rt_sigtimedwait), any(libc::SYS_shutdown)];

pub(super) const CONTROL: &[&[Allow]] = &[
    EVERY_THREAD,
    EVENTS,
    VFIO_RUN,
    IMAGE_LOCKS,
    OPEN,
    CONTROL_OWN,
];

/// A device's thread and the vhost-user threads it starts per session: accept a frontend,
/// the protocol (messages with descriptors, guest memory, the inflight region in a memfd, the
/// dirty log), the relay of kicks, image locks, VFIO mappings of guest memory, and the socket
/// file's removal. `openat` stays for reading /proc (the checks on descriptors a frontend
/// sends): seccomp cannot see a path, so it is limited to opens that neither write, create
/// nor truncate.
const SESSION_OWN: &[Allow] = &[
    any(libc::SYS_accept4),
    any(libc::SYS_memfd_create),
    any(libc::SYS_ftruncate),
    any(libc::SYS_unlinkat),
    when(libc::SYS_openat, &[&[clear(2, OPEN_WRITES)]]),
    arg_in(libc::SYS_fcntl, 1, &[libc::F_GET_SEALS as u64]),
    // The send and receive timeouts of the backend channel (`vhost_user::notice`).
    when(
        libc::SYS_setsockopt,
        &[
            &[
                eq(1, libc::SOL_SOCKET as u64),
                eq(2, libc::SO_RCVTIMEO as u64),
            ],
            &[
                eq(1, libc::SOL_SOCKET as u64),
                eq(2, libc::SO_SNDTIMEO as u64),
            ],
        ],
    ),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_unlink),
    // A thread that a session thread starts (the resize notice's, from a relay thread) enters
    // the session role itself: one more filter on the one it inherits, which can only narrow
    // what the thread may.
    arg_in(libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]),
    when(
        libc::SYS_seccomp,
        &[&[eq(0, libc::SECCOMP_SET_MODE_FILTER as u64), eq(1, 0)]],
    ),
];

pub(super) const SESSION: &[&[Allow]] = &[
    EVERY_THREAD,
    EVENTS,
    NONBLOCK,
    IMAGE_LOCKS,
    SOCKET_IO,
    VFIO_RUN,
    SPAWN_THREADS,
    METADATA,
    SESSION_OWN,
];

/// A poller: its io_uring rings (created when a queue of a file device is attached, then
/// restricted), eventfds and epoll, NVMe/TCP I/O queues (connections the supervisor made),
/// NVMe PCIe queue pairs (created and reset here).
const POLLER_OWN: &[Allow] = &[
    any(libc::SYS_io_uring_setup),
    any(libc::SYS_io_uring_enter),
    arg_in(
        libc::SYS_io_uring_register,
        1,
        &[
            IORING_REGISTER_FILES,
            IORING_REGISTER_EVENTFD,
            IORING_REGISTER_RESTRICTIONS,
            IORING_REGISTER_ENABLE_RINGS,
        ],
    ),
];

pub(super) const POLLER: &[&[Allow]] = &[
    EVERY_THREAD,
    EVENTS,
    NONBLOCK,
    SOCKET_IO,
    VFIO_RUN,
    OPEN,
    POLLER_OWN,
];

/// An NVMe/TCP supervisor: keep-alive on the admin queue, and new TCP connections (IPv4 or
/// IPv6 streams, to the address resolved at startup) when the controller is reconnected.
const SUPERVISOR_OWN: &[Allow] = &[
    when(
        libc::SYS_socket,
        &[
            &[
                eq(0, libc::AF_INET as u64),
                masked(1, 0xf, libc::SOCK_STREAM as u64),
            ],
            &[
                eq(0, libc::AF_INET6 as u64),
                masked(1, 0xf, libc::SOCK_STREAM as u64),
            ],
        ],
    ),
    any(libc::SYS_connect),
    any(libc::SYS_setsockopt),
];

pub(super) const SUPERVISOR: &[&[Allow]] = &[
    EVERY_THREAD,
    EVENTS,
    NONBLOCK,
    SOCKET_IO,
    OPEN,
    SUPERVISOR_OWN,
];

/// The metrics endpoint: HTTP clients on its listening socket (bound at startup), served
/// with non-blocking reads and writes from one poll.
const METRICS_OWN: &[Allow] = &[any(libc::SYS_accept4)];

pub(super) const METRICS: &[&[Allow]] =
    &[EVERY_THREAD, EVENTS, NONBLOCK, SOCKET_IO, OPEN, METRICS_OWN];

/// Startup, on top of what the threads need: binding sockets (with their mode and group),
/// opening images (probing block devices and file systems), VFIO set-up, NVMe/TCP
/// connections, starting threads, pinning pollers, installing the threads' own filters; a
/// device in a Kata store: its directories and its block device node (`daemon::kata`; the
/// node of a block device only, never a character device).
const STARTUP: &[Allow] = &[
    any(libc::SYS_openat),
    when(
        libc::SYS_mknodat,
        &[&[masked(2, libc::S_IFMT as u64, libc::S_IFBLK as u64)]],
    ),
    any(libc::SYS_mkdirat),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_mkdir),
    when(
        libc::SYS_socket,
        &[
            &[eq(0, libc::AF_UNIX as u64)],
            &[eq(0, libc::AF_INET as u64)],
            &[eq(0, libc::AF_INET6 as u64)],
        ],
    ),
    any(libc::SYS_bind),
    any(libc::SYS_listen),
    any(libc::SYS_umask),
    any(libc::SYS_fchmodat),
    any(libc::SYS_fchownat),
    any(libc::SYS_renameat),
    any(libc::SYS_renameat2),
    any(libc::SYS_getdents64),
    any(libc::SYS_faccessat),
    any(libc::SYS_faccessat2),
    any(libc::SYS_getcwd),
    any(libc::SYS_fallocate),
    any(libc::SYS_fsync),
    any(libc::SYS_fdatasync),
    any(libc::SYS_dup),
    any(libc::SYS_dup3),
    any(libc::SYS_sched_setaffinity),
    any(libc::SYS_rt_sigaction),
    arg_in(
        libc::SYS_ioctl,
        1,
        &[
            VFIO_GET_API_VERSION,
            VFIO_CHECK_EXTENSION,
            VFIO_SET_IOMMU,
            VFIO_GROUP_GET_STATUS,
            VFIO_GROUP_SET_CONTAINER,
            VFIO_GROUP_GET_DEVICE_FD,
            VFIO_DEVICE_GET_INFO,
            VFIO_DEVICE_GET_IRQ_INFO,
            VFIO_IOMMU_GET_INFO,
            ioctl(libc::BLKSSZGET),
            ioctl(libc::BLKPBSZGET),
            ioctl(libc::TCGETS),
        ],
    ),
    arg_in(
        libc::SYS_fcntl,
        1,
        &[libc::F_OFD_SETLKW as u64, libc::F_ADD_SEALS as u64],
    ),
    // What installing each thread's own filter takes.
    arg_in(libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]),
    arg_in(
        libc::SYS_seccomp,
        0,
        &[libc::SECCOMP_SET_MODE_FILTER as u64],
    ),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_open),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_stat),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_lstat),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_access),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_rename),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_chmod),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_chown),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_lchown),
    #[cfg(target_arch = "x86_64")]
    any(libc::SYS_dup2),
];

/// The process-wide baseline: what any thread may ever do, startup included. Every thread
/// vubd starts narrows it with its role's list; a thread a crate starts inherits its
/// starter's.
pub(super) const BASELINE: &[&[Allow]] = &[
    EVERY_THREAD,
    EVENTS,
    NONBLOCK,
    IMAGE_LOCKS,
    SOCKET_IO,
    VFIO_RUN,
    SPAWN_THREADS,
    METADATA,
    CONTROL_OWN,
    SESSION_OWN,
    POLLER_OWN,
    SUPERVISOR_OWN,
    STARTUP,
];
