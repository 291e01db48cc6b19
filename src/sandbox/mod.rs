//! The sandbox: seccomp filters per thread role and a process-wide baseline
//! ([`install_baseline`], [`enter`]), and restricted io_uring rings ([`uring`]). A leaf
//! module: it uses no other module of vubd but the leaf `error_chain`, so every layer may call
//! it.
//!
//! Filters stack: the baseline, installed before vubd starts any thread (with TSYNC, so that
//! a thread started earlier would be covered too), holds everything any thread may ever do,
//! startup included; every thread vubd starts then adds the list of its role, and a thread a
//! crate starts inherits the filters of the thread that started it. A syscall is allowed only
//! when every filter of the thread allows it. What is not allowed kills the process
//! (`SECCOMP_RET_KILL_PROCESS`), or only shows in the kernel log with `--seccomp log`; why
//! kill and not EPERM is in `docs/security.md`, "The sandbox and local users".

mod roles;
mod rules;
pub mod uring;

#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use seccompiler::{BackendError, BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use thiserror::Error;

use self::rules::{Allow, compile};

/// `--seccomp`: what a syscall outside a thread's allow-list does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter is installed (valgrind, debugging).
    Off,
    /// The syscall goes through and the kernel logs it (`SECCOMP_RET_LOG`): for finding what a
    /// list misses on a new system.
    Log,
    /// The process is killed (`SECCOMP_RET_KILL_PROCESS`).
    #[default]
    Enforce,
}

/// The kinds of threads vubd starts, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The main thread once the devices serve, and the signal thread.
    Control,
    /// A device's thread, and the vhost-user protocol and relay threads of its sessions.
    Session,
    /// A poller: the data plane.
    Poller,
    /// An NVMe/TCP controller's supervisor: keep-alive and reconnection.
    Supervisor,
    /// The metrics endpoint (`--metrics-listen`): HTTP clients from the network.
    Metrics,
}

/// Why the sandbox could not be set up.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error("this machine's architecture has no seccomp filters here")]
    Arch(#[source] BackendError),
    #[error("cannot build the seccomp filter of {0}")]
    Build(&'static str, #[source] BackendError),
    #[error("cannot install the seccomp filter of {0}")]
    Install(&'static str, #[source] seccompiler::Error),
}

/// The mode every later [`enter`] uses: set once, by [`install_baseline`].
static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Installs the process-wide baseline (unless `mode` is off) and makes `mode` the one of every
/// later [`enter`]. Call it once, before vubd starts any thread.
pub fn install_baseline(mode: SeccompMode) -> Result<(), SandboxError> {
    if MODE.set(mode).is_err() || mode == SeccompMode::Off {
        return Ok(());
    }
    let [errno, allow] = baseline_programs(mode)?;
    // TSYNC: every thread of the process gets it, should a crate have started one already
    // (it fails, naming the thread, if one had a filter of its own).
    for (program, what) in [(&errno, "the baseline (clone3)"), (&allow, "the baseline")] {
        seccompiler::apply_filter_all_threads(program)
            .map_err(|e| SandboxError::Install(what, e))?;
    }
    Ok(())
}

/// Narrows the calling thread to `role`'s allow-list, once its setup is done. Nothing happens
/// before [`install_baseline`] or with `--seccomp off`. A filter that cannot be installed
/// stops the process: a thread must not serve without its sandbox.
pub fn enter(role: Role) {
    let mode = match MODE.get() {
        None | Some(SeccompMode::Off) => return,
        Some(&m) => m,
    };
    let result = role_programs(role, mode).and_then(|programs| {
        programs.iter().try_for_each(|p| {
            seccompiler::apply_filter(p).map_err(|e| SandboxError::Install(role.name(), e))
        })
    });
    if let Err(e) = result {
        tracing::error!(role = role.name(), error = %crate::error_chain::error_chain(&e), "sandbox: stopping");
        std::process::exit(1);
    }
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Control => "the control threads",
            Role::Session => "the session threads",
            Role::Poller => "the pollers",
            Role::Supervisor => "the NVMe/TCP supervisors",
            Role::Metrics => "the metrics endpoint",
        }
    }

    fn allow_list(self) -> &'static [&'static [Allow]] {
        match self {
            Role::Control => roles::CONTROL,
            Role::Session => roles::SESSION,
            Role::Poller => roles::POLLER,
            Role::Supervisor => roles::SUPERVISOR,
            Role::Metrics => roles::METRICS,
        }
    }

    /// Calls of the allow-list answered EACCES instead of being made: those a library makes
    /// on its own and copes with failing, in a role that has no use for them.
    fn quiet_list(self) -> Option<&'static [&'static [Allow]]> {
        match self {
            Role::Session => None,
            Role::Control | Role::Poller | Role::Supervisor | Role::Metrics => Some(roles::QUIET),
        }
    }
}

fn arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(SandboxError::Arch)
}

/// What a syscall outside the list does in `mode`.
fn refusal(mode: SeccompMode) -> SeccompAction {
    match mode {
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off | SeccompMode::Enforce => SeccompAction::KillProcess,
    }
}

/// The BPF program of an allow-list: allowed calls go through, the rest get `mode`'s refusal.
fn allow_program(
    what: &'static str,
    list: &[&[Allow]],
    mode: SeccompMode,
) -> Result<BpfProgram, SandboxError> {
    let build = |e| SandboxError::Build(what, e);
    let filter = SeccompFilter::new(
        compile(list).map_err(build)?,
        refusal(mode),
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// The baseline's two programs: clone3 answered ENOSYS (so that glibc starts threads with
/// clone, whose flags a filter can check), and the allow-list.
fn baseline_programs(mode: SeccompMode) -> Result<[BpfProgram; 2], SandboxError> {
    let what = "the baseline";
    let build = |e| SandboxError::Build(what, e);
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(build)?;
    Ok([
        BpfProgram::try_from(clone3).map_err(build)?,
        allow_program(what, roles::BASELINE, mode)?,
    ])
}

/// A role's programs in the order they are installed: its quiet refusals if it has any, then
/// its allow-list, which leaves no way to install another.
fn role_programs(role: Role, mode: SeccompMode) -> Result<Vec<BpfProgram>, SandboxError> {
    let what = role.name();
    let mut programs = Vec::with_capacity(2);
    if let Some(quiet) = role.quiet_list() {
        let build = |e| SandboxError::Build(what, e);
        let filter = SeccompFilter::new(
            compile(quiet).map_err(build)?,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch()?,
        )
        .map_err(build)?;
        programs.push(BpfProgram::try_from(filter).map_err(build)?);
    }
    programs.push(allow_program(what, role.allow_list(), mode)?);
    Ok(programs)
}
