//! io_uring rings restricted to what their owner submits. seccomp sees `io_uring_enter`, not
//! the operations it carries: an unrestricted ring could open, read or write any file, or
//! connect a socket, behind every filter. A restricted ring is created disabled
//! (IORING_SETUP_R_DISABLED), registers what it needs (files, an eventfd), is limited with
//! IORING_REGISTER_RESTRICTIONS, and only then enabled (IORING_REGISTER_ENABLE_RINGS), as
//! Firecracker does. From then on the kernel refuses, with -EACCES in the completion, any
//! operation outside the list or any submission without the required flags, and refuses every
//! `io_uring_register` opcode.

use std::io;

use io_uring::register::Restriction;
use io_uring::{IoUring, Submitter, squeue};

/// What a restricted ring accepts.
#[derive(Clone, Copy, Debug)]
pub struct RingRules<'a> {
    /// Opcodes (`opcode::X::CODE`).
    pub ops: &'a [u8],
    /// Submission flags allowed besides the required ones.
    pub flags_allowed: squeue::Flags,
    /// Flags every submission must carry: `FIXED_FILE` confines the ring to the files
    /// registered before it was enabled.
    pub flags_required: squeue::Flags,
}

/// A ring of `entries` entries that accepts only what `rules` allow, once `register` (files,
/// an eventfd) has run on it.
pub fn restricted_ring(
    entries: u32,
    rules: &RingRules<'_>,
    register: impl FnOnce(&Submitter<'_>) -> io::Result<()>,
) -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    register(&ring.submitter())?;
    let mut restrictions: Vec<Restriction> = rules
        .ops
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    restrictions.push(Restriction::sqe_flags_allowed(rules.flags_allowed.bits()));
    restrictions.push(Restriction::sqe_flags_required(rules.flags_required.bits()));
    ring.submitter().register_restrictions(&mut restrictions)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use io_uring::{opcode, types};

    use super::*;

    /// The completion of one submission.
    fn run(ring: &mut IoUring, sqe: squeue::Entry) -> i32 {
        // SAFETY: every buffer the entries point to lives on the caller's stack until this
        // function has reaped the completion.
        unsafe { ring.submission().push(&sqe) }.expect("room");
        ring.submit_and_wait(1).expect("submit");
        let cqe = ring.completion().next().expect("a completion");
        cqe.result()
    }

    #[test]
    fn a_restricted_ring_runs_its_operations_on_its_files_and_refuses_the_rest() {
        let mut file = tempfile::tempfile().expect("temp file");
        file.write_all(b"vubd").expect("write");
        let other = File::open("/proc/self/status").expect("open");
        let rules = RingRules {
            ops: &[opcode::Read::CODE],
            flags_allowed: squeue::Flags::empty(),
            flags_required: squeue::Flags::FIXED_FILE,
        };
        let mut ring = restricted_ring(4, &rules, |s| s.register_files(&[file.as_raw_fd()]))
            .expect("a restricted ring");
        let mut buf = [0u8; 4];
        let ptr = buf.as_mut_ptr();
        let read = |fd| opcode::Read::new(fd, ptr, 4).offset(0).build();
        assert_eq!(run(&mut ring, read(types::Fixed(0))), 4);
        assert_eq!(&buf, b"vubd");
        // Another file, by descriptor: the required FIXED_FILE flag is missing.
        let eacces = -libc::EACCES;
        let raw = opcode::Read::new(types::Fd(other.as_raw_fd()), ptr, 4).build();
        assert_eq!(run(&mut ring, raw), eacces);
        // An operation outside the list, even on the registered file.
        let path = c"/etc/passwd";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build();
        assert_eq!(
            run(&mut ring, open.flags(squeue::Flags::FIXED_FILE)),
            eacces
        );
        let nop = opcode::Nop::new().build();
        assert_eq!(run(&mut ring, nop.flags(squeue::Flags::FIXED_FILE)), eacces);
        // A flag outside the allowed ones.
        let linked = read(types::Fixed(0)).flags(squeue::Flags::IO_LINK);
        assert_eq!(run(&mut ring, linked), eacces);
        // And nothing can be registered any more.
        let again = ring
            .submitter()
            .register_files_update(0, &[other.as_raw_fd()]);
        assert_eq!(again.map_err(|e| e.raw_os_error()), Err(Some(libc::EACCES)));
    }
}
