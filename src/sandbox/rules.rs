//! The vocabulary of the allow-lists: a syscall and the arguments it may have, written as
//! constant tables, merged and compiled into seccompiler's rules in one place.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// One condition on one argument: `(arg & mask) == value`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Cond {
    arg: u8,
    /// Compare all 64 bits (pointer-sized arguments such as clone's flags) instead of the low
    /// 32, which is what the kernel reads of an `int` argument (an ioctl request, a socket
    /// family, mmap's protection): comparing only those leaves a caller nothing to hide in
    /// the high half.
    wide: bool,
    mask: u64,
    value: u64,
}

/// Argument `arg`, as a 32-bit value, is `value`.
pub(super) const fn eq(arg: u8, value: u64) -> Cond {
    Cond {
        arg,
        wide: false,
        mask: u32::MAX as u64,
        value,
    }
}

/// Argument `arg`, all 64 bits, is `value`.
pub(super) const fn eq64(arg: u8, value: u64) -> Cond {
    Cond {
        arg,
        wide: true,
        mask: u64::MAX,
        value,
    }
}

/// Argument `arg` has none of the bits of `mask`.
pub(super) const fn clear(arg: u8, mask: u64) -> Cond {
    Cond {
        arg,
        wide: false,
        mask,
        value: 0,
    }
}

/// The bits `mask` of argument `arg` are `value`.
pub(super) const fn masked(arg: u8, mask: u64, value: u64) -> Cond {
    Cond {
        arg,
        wide: false,
        mask,
        value,
    }
}

/// When a syscall is allowed.
#[derive(Clone, Copy, Debug)]
pub(super) enum When {
    /// Whatever its arguments.
    Always,
    /// Argument `.0` (32 bits) is one of `.1`: ioctl requests, fcntl commands, advice values.
    ArgIn(u8, &'static [u64]),
    /// Every condition of one of the lists holds.
    AnyOf(&'static [&'static [Cond]]),
}

/// One entry of an allow-list.
#[derive(Clone, Copy, Debug)]
pub(super) struct Allow {
    pub call: i64,
    pub when: When,
}

/// `call`, whatever its arguments.
pub(super) const fn any(call: i64) -> Allow {
    Allow {
        call,
        when: When::Always,
    }
}

/// `call` when argument `arg` is one of `values`.
pub(super) const fn arg_in(call: i64, arg: u8, values: &'static [u64]) -> Allow {
    Allow {
        call,
        when: When::ArgIn(arg, values),
    }
}

/// `call` when every condition of one of `rules` holds.
pub(super) const fn when(call: i64, rules: &'static [&'static [Cond]]) -> Allow {
    Allow {
        call,
        when: When::AnyOf(rules),
    }
}

/// seccompiler's rules for an allow-list made of `groups`. A syscall in several entries is
/// allowed when any of them allows it (an unconditional entry wins).
pub(super) fn compile(
    groups: &[&[Allow]],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    // `None`: allowed whatever the arguments.
    let mut merged: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for entry in groups.iter().flat_map(|g| g.iter()) {
        let rules = match entry.when {
            When::Always => None,
            When::ArgIn(arg, values) => Some(
                values
                    .iter()
                    .map(|&v| rule(&[eq(arg, v)]))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            When::AnyOf(lists) => Some(
                lists
                    .iter()
                    .map(|conds| rule(conds))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        match (merged.get_mut(&entry.call), rules) {
            (None, rules) => {
                merged.insert(entry.call, rules);
            }
            (Some(slot), None) => *slot = None,
            (Some(Some(existing)), Some(more)) => existing.extend(more),
            (Some(None), Some(_)) => {}
        }
    }
    Ok(merged
        .into_iter()
        .map(|(call, rules)| (call, rules.unwrap_or_default()))
        .collect())
}

fn rule(conds: &[Cond]) -> Result<SeccompRule, BackendError> {
    let conds = conds
        .iter()
        .map(|c| {
            let (len, value, mask) = if c.wide {
                (SeccompCmpArgLen::Qword, c.value, c.mask)
            } else {
                (
                    SeccompCmpArgLen::Dword,
                    c.value & u64::from(u32::MAX),
                    c.mask & u64::from(u32::MAX),
                )
            };
            let op = if mask == u64::MAX || (!c.wide && mask == u64::from(u32::MAX)) {
                SeccompCmpOp::Eq
            } else {
                SeccompCmpOp::MaskedEq(mask)
            };
            SeccompCondition::new(c.arg, len, op, value)
        })
        .collect::<Result<Vec<_>, _>>()?;
    SeccompRule::new(conds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[Allow] = &[arg_in(libc::SYS_ioctl, 1, &[1, 2]), any(libc::SYS_read)];
    const B: &[Allow] = &[arg_in(libc::SYS_ioctl, 1, &[3]), any(libc::SYS_read)];
    const C: &[Allow] = &[any(libc::SYS_ioctl)];

    #[test]
    fn conditional_entries_of_one_call_add_up_and_an_unconditional_one_wins() {
        let rules = compile(&[A, B]).expect("compile");
        assert_eq!(rules[&libc::SYS_ioctl].len(), 3);
        assert!(rules[&libc::SYS_read].is_empty());
        for order in [[A, C], [C, A]] {
            let rules = compile(&order).expect("compile");
            assert!(rules[&libc::SYS_ioctl].is_empty(), "allowed whatever");
        }
    }
}
