//! The shard's allocation table: a slab (index + generation) and a keyed hash from 5-tuple to slot.
//! 5-tuples are chosen by the remote, so the map uses std's randomly keyed SipHash.

use crate::allocation::{Allocation, FiveTuple};
use std::collections::HashMap;

/// Identifies an allocation slot; the generation rejects stale references to a reused slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct AllocId {
    /// Slot index (also the relay socket's index in the shard).
    pub idx: u32,
    /// Generation of the slot when this id was issued.
    pub generation: u32,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    alloc: Option<Allocation>,
}

/// Allocation table of one shard.
#[derive(Debug, Default)]
pub(crate) struct AllocTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_tuple: HashMap<FiveTuple, AllocId>,
}

impl AllocTable {
    /// Number of live allocations.
    pub(crate) fn len(&self) -> usize {
        self.by_tuple.len()
    }

    /// The slot index the next [`AllocTable::insert`] will use (the shard binds the relay socket there first).
    pub(crate) fn next_index(&self) -> u32 {
        self.free.last().copied().unwrap_or(self.slots.len() as u32)
    }

    /// Inserts an allocation at [`AllocTable::next_index`].
    pub(crate) fn insert(&mut self, alloc: Allocation) -> AllocId {
        let tuple = alloc.five_tuple;
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[idx as usize];
        slot.alloc = Some(alloc);
        let id = AllocId { idx, generation: slot.generation };
        self.by_tuple.insert(tuple, id);
        id
    }

    /// Removes an allocation, returning it.
    pub(crate) fn remove(&mut self, id: AllocId) -> Option<Allocation> {
        let slot = self.slots.get_mut(id.idx as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let alloc = slot.alloc.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.idx);
        self.by_tuple.remove(&alloc.five_tuple);
        Some(alloc)
    }

    /// The id of the allocation of a 5-tuple.
    pub(crate) fn find(&self, tuple: &FiveTuple) -> Option<AllocId> {
        self.by_tuple.get(tuple).copied()
    }

    /// The allocation with this id, if it is still live.
    pub(crate) fn get(&self, id: AllocId) -> Option<&Allocation> {
        let slot = self.slots.get(id.idx as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.alloc.as_ref()
    }

    /// Mutable access by id.
    pub(crate) fn get_mut(&mut self, id: AllocId) -> Option<&mut Allocation> {
        let slot = self.slots.get_mut(id.idx as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.alloc.as_mut()
    }

    /// The live allocation in slot `idx`.
    pub(crate) fn by_index(&self, idx: u32) -> Option<&Allocation> {
        self.slots.get(idx as usize)?.alloc.as_ref()
    }

    /// Mutable access to the live allocation in slot `idx`.
    pub(crate) fn by_index_mut(&mut self, idx: u32) -> Option<&mut Allocation> {
        self.slots.get_mut(idx as usize)?.alloc.as_mut()
    }

    /// Iterates mutably over live allocations (reload).
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Allocation> {
        self.slots.iter_mut().filter_map(|s| s.alloc.as_mut())
    }

    /// Iterates over live allocations.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (AllocId, &Allocation)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.alloc.as_ref().map(|a| (AllocId { idx: i as u32, generation: s.generation }, a)))
    }
}
