//! Command identifiers and the in-flight command table of one queue (shared by the
//! transports): a preallocated slot per possible command, a free list, and a generation in the
//! CID's upper bits so that a completion for a command that already finished (a confused or
//! malicious controller, a retry racing a late answer) is recognised as unknown instead of
//! completing whichever command reused the slot.

/// The in-flight commands of one queue, by command identifier.
#[derive(Debug)]
pub struct CmdTable<T> {
    slots: Box<[Slot<T>]>,
    free: Vec<u16>,
    /// Bits of the CID that index `slots`; the rest is the generation.
    index_bits: u32,
}

#[derive(Debug)]
struct Slot<T> {
    /// Generation of the slot's current (or next) command.
    generation: u16,
    value: Option<T>,
}

impl<T> CmdTable<T> {
    /// A table for `depth` commands at once (1..=4096).
    pub fn new(depth: u16) -> Self {
        let depth = depth.clamp(1, 4096);
        let index_bits = u32::from(depth).next_power_of_two().trailing_zeros();
        Self {
            slots: (0..depth)
                .map(|_| Slot {
                    generation: 0,
                    value: None,
                })
                .collect(),
            // Popped from the end: the lowest indices go first.
            free: (0..depth).rev().collect(),
            index_bits,
        }
    }

    /// How many commands the table holds at most.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.free.len() == self.slots.len()
    }

    fn split(&self, cid: u16) -> (usize, u16) {
        let index = usize::from(cid) & ((1usize << self.index_bits) - 1);
        let generation = (u32::from(cid) >> self.index_bits) as u16;
        (index, generation)
    }

    fn cid(&self, index: usize, generation: u16) -> u16 {
        // Both fit: index < 2^index_bits, generation < 2^(16 - index_bits).
        (index as u16) | (generation << self.index_bits)
    }

    /// Stores `value` under a fresh command identifier; `None` when the table is full.
    pub fn insert(&mut self, value: T) -> Option<u16> {
        let index = usize::from(self.free.pop()?);
        let slot = &mut self.slots[index];
        slot.value = Some(value);
        let generation = slot.generation;
        Some(self.cid(index, generation))
    }

    /// The command with identifier `cid`, if it is in flight.
    pub fn get(&self, cid: u16) -> Option<&T> {
        let (index, generation) = self.split(cid);
        let slot = self.slots.get(index)?;
        (slot.generation == generation).then_some(slot.value.as_ref()?)
    }

    pub fn get_mut(&mut self, cid: u16) -> Option<&mut T> {
        let (index, generation) = self.split(cid);
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// Ends command `cid` and returns it; its identifier is not handed out again until the
    /// generation wraps.
    pub fn remove(&mut self, cid: u16) -> Option<T> {
        let (index, generation) = self.split(cid);
        let limit = 1u32 << (16 - self.index_bits);
        let slot = self.slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = ((u32::from(slot.generation) + 1) % limit) as u16;
        self.free.push(index as u16);
        Some(value)
    }

    /// The identifiers of every command in flight, in slot order.
    pub fn cids(&self) -> impl Iterator<Item = u16> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.is_some())
            .map(|(i, s)| self.cid(i, s.generation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_to_depth_and_refuses_more() {
        let mut t = CmdTable::new(3);
        let cids: Vec<u16> = (0..3).map(|i| t.insert(i).expect("room")).collect();
        assert_eq!(cids, [0, 1, 2]);
        assert!(t.is_full());
        assert_eq!(t.insert(9), None);
        assert_eq!(t.in_flight(), 3);
        assert_eq!(t.cids().collect::<Vec<_>>(), cids);
    }

    #[test]
    fn a_reused_slot_gets_a_new_identifier_and_the_old_one_is_unknown() {
        let mut t = CmdTable::new(4);
        let a = t.insert("a").expect("room");
        assert_eq!(t.remove(a), Some("a"));
        let b = t.insert("b").expect("room");
        assert_ne!(a, b, "same slot, new generation");
        assert_eq!(t.get(a), None, "a late answer for the finished command");
        assert_eq!(t.remove(a), None);
        assert_eq!(t.get(b), Some(&"b"));
        assert_eq!(t.remove(b), Some("b"));
        assert!(t.is_empty());
    }

    #[test]
    fn identifiers_outside_the_table_are_unknown() {
        let mut t = CmdTable::new(5);
        t.insert(()).expect("room");
        // Index 5..7 exist in the CID space (8 slots) but not in the table.
        for cid in [5u16, 6, 7, u16::MAX] {
            assert_eq!(t.get(cid), None);
            assert_eq!(t.get_mut(cid), None);
            assert_eq!(t.remove(cid), None);
        }
    }

    #[test]
    fn generations_wrap_without_colliding_with_live_commands() {
        let mut t = CmdTable::new(1024);
        let keep = t.insert(0u32).expect("room");
        let mut seen = std::collections::HashSet::new();
        // 64 generations of 10 index bits: the CID of slot 1 cycles through 64 values.
        for i in 0..200u32 {
            let cid = t.insert(i).expect("room");
            assert_ne!(cid, keep);
            seen.insert(cid);
            assert_eq!(t.remove(cid), Some(i));
        }
        assert_eq!(seen.len(), 64);
        assert_eq!(t.get(keep), Some(&0));
    }
}
