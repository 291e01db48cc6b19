//! Groups of devices that share limits: each group has rates of its own, and its members'
//! requests are charged to its buckets as well as to their own. The control plane keeps the
//! groups here and changes a device's limits through them, so that a device's plan always
//! holds its group's current buckets.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::bucket::Bucket;
use super::{DeviceQos, Rates};
use crate::clock::Clock;

/// A change of limits that cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QosError {
    #[error("qos-group: no group is named {0:?}")]
    NoGroup(String),
    #[error("qos-group: group {0:?} still has {1} device(s)")]
    GroupInUse(String, usize),
}

/// A group as the control plane lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub rates: Rates,
    pub devices: usize,
}

#[derive(Debug)]
struct Group {
    rates: Rates,
    buckets: Vec<Arc<Bucket>>,
    members: Vec<Weak<DeviceQos>>,
}

impl Group {
    /// Members still alive (a removed device's entry goes here).
    fn members(&mut self) -> Vec<Arc<DeviceQos>> {
        self.members.retain(|m| m.strong_count() > 0);
        self.members.iter().filter_map(Weak::upgrade).collect()
    }
}

/// Every group of the daemon, by name.
#[derive(Debug)]
pub struct Groups {
    clock: Clock,
    groups: Mutex<BTreeMap<String, Group>>,
}

impl Groups {
    /// No group yet; buckets count time in ticks of `clock`, the pollers' clock.
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            groups: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates group `name` with `rates`, or gives an existing one new rates (its members'
    /// debt starts anew).
    pub fn set_group(&self, name: &str, rates: Rates) {
        let mut groups = self.lock();
        let buckets = rates.buckets(&self.clock);
        let group = groups.entry(name.to_owned()).or_insert_with(|| Group {
            rates,
            buckets: Vec::new(),
            members: Vec::new(),
        });
        group.rates = rates;
        group.buckets = buckets;
        for m in group.members() {
            m.change(|s| s.shared = group.buckets.clone());
        }
    }

    /// Removes group `name`, which must have no device.
    pub fn remove_group(&self, name: &str) -> Result<(), QosError> {
        let mut groups = self.lock();
        let group = groups
            .get_mut(name)
            .ok_or_else(|| QosError::NoGroup(name.to_owned()))?;
        match group.members().len() {
            0 => {
                groups.remove(name);
                Ok(())
            }
            n => Err(QosError::GroupInUse(name.to_owned(), n)),
        }
    }

    /// Every group, by name.
    pub fn list(&self) -> Vec<GroupInfo> {
        self.lock()
            .iter_mut()
            .map(|(name, g)| GroupInfo {
                name: name.clone(),
                rates: g.rates,
                devices: g.members().len(),
            })
            .collect()
    }

    /// Gives `device` its own `rates` (new buckets: its debt starts anew) and puts it in
    /// `group` (which must exist), or in none. Nothing changes on an error.
    pub fn set_device(
        &self,
        device: &Arc<DeviceQos>,
        rates: Rates,
        group: Option<&str>,
    ) -> Result<(), QosError> {
        let mut groups = self.lock();
        if let Some(name) = group
            && !groups.contains_key(name)
        {
            return Err(QosError::NoGroup(name.to_owned()));
        }
        let (_, old) = device.settings();
        if let Some(old) = old.as_deref()
            && group != Some(old)
            && let Some(g) = groups.get_mut(old)
        {
            g.members
                .retain(|m| !std::ptr::eq(m.as_ptr(), Arc::as_ptr(device)));
        }
        let shared = match group.and_then(|name| groups.get_mut(name)) {
            Some(g) => {
                if !g
                    .members
                    .iter()
                    .any(|m| std::ptr::eq(m.as_ptr(), Arc::as_ptr(device)))
                {
                    g.members.push(Arc::downgrade(device));
                }
                g.buckets.clone()
            }
            None => Vec::new(),
        };
        let own = rates.buckets(&self.clock);
        device.change(|s| {
            s.rates = rates;
            s.own = own;
            s.group = group.map(str::to_owned);
            s.shared = shared;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::qos::Lease;

    fn iops(n: u64) -> Rates {
        Rates {
            iops: [n, 0, 0],
            burst: Duration::ZERO,
            ..Rates::default()
        }
    }

    #[test]
    fn members_of_a_group_are_charged_to_its_buckets() {
        let groups = Groups::new(Clock::monotonic());
        let (a, b) = (
            Arc::new(DeviceQos::default()),
            Arc::new(DeviceQos::default()),
        );
        assert_eq!(
            groups.set_device(&a, Rates::default(), Some("tier")),
            Err(QosError::NoGroup("tier".into()))
        );
        assert_eq!(a.generation(), 0, "nothing changed");
        groups.set_group("tier", iops(1000));
        groups
            .set_device(&a, Rates::default(), Some("tier"))
            .unwrap();
        groups.set_device(&b, iops(10), Some("tier")).unwrap();
        // a leases one operation of the group (1 ms of debt at 1000 a second, no burst): b
        // is held back 1 ms.
        let lease = |d: &Arc<DeviceQos>| Lease::new(d.plan().expect("a plan"));
        lease(&a).renew(0).unwrap();
        assert_eq!(lease(&b).renew(0), Err(1_000_000));
        assert_eq!(groups.list()[0].devices, 2);
        assert_eq!(
            groups.remove_group("tier"),
            Err(QosError::GroupInUse("tier".into(), 2))
        );
        // New group rates reach the members' plans.
        let before = b.generation();
        groups.set_group("tier", iops(1_000_000));
        assert!(b.generation() > before);
        // (b's own limit, 10 a second, granted it one operation at 0: 100 ms later.)
        assert_eq!(lease(&b).renew(100_000_000), Ok(()));
        // Leaving the group, and a device dropped, leave it empty.
        groups.set_device(&a, Rates::default(), None).unwrap();
        assert!(a.plan().is_none(), "no limit left");
        drop(b);
        assert_eq!(groups.list()[0].devices, 0);
        groups.remove_group("tier").unwrap();
        assert!(groups.list().is_empty());
    }
}
