//! The queue: its order and positions in O(log n). Entries sit in one ordered map (by
//! priority, then sequence number); one Fenwick tree per priority, indexed by sequence
//! number (offset by a base that moves forward as the queue drains), counts them.
//!
//! position(normal job s) = queued normal jobs with seq < s
//! position(low job s)    = all queued normal jobs + queued low jobs with seq < s

use std::collections::BTreeMap;

use crate::job::Priority;

/// Map key: the priority in the top bit, the sequence number below (so the map's order
/// is (priority, seq), in 8 bytes).
const LOW: u64 = 1 << 63;

fn key(priority: Priority, seq: u64) -> u64 {
    debug_assert!(seq < LOW);
    match priority {
        Priority::Normal => seq,
        Priority::Low => LOW | seq,
    }
}

fn unkey(k: u64) -> (Priority, u64) {
    if k & LOW == 0 {
        (Priority::Normal, k)
    } else {
        (Priority::Low, k & !LOW)
    }
}

#[derive(Debug, Default, Clone)]
struct Fenwick {
    base: u64,
    tree: Vec<i32>,
    count: u64,
}

impl Fenwick {
    fn add_raw(&mut self, seq: u64, delta: i32) {
        let mut i = (seq - self.base) as usize + 1;
        while i <= self.tree.len() {
            self.tree[i - 1] += delta;
            i += i & i.wrapping_neg();
        }
    }

    /// Number of present entries with seq < `seq`.
    fn prefix(&self, seq: u64) -> u64 {
        if seq <= self.base {
            return 0;
        }
        let mut i = ((seq - self.base) as usize).min(self.tree.len());
        let mut sum = 0i64;
        while i > 0 {
            sum += i64::from(self.tree[i - 1]);
            i -= i & i.wrapping_neg();
        }
        sum as u64
    }

    fn covers(&self, seq: u64) -> bool {
        seq >= self.base && ((seq - self.base) as usize) < self.tree.len()
    }

    /// Rebuilds so that the tree covers `present` (ascending) plus `seq`, with headroom.
    fn rebuild<I>(&mut self, seq: u64, present: I)
    where
        I: DoubleEndedIterator<Item = u64> + Clone,
    {
        let lo = present.clone().next().unwrap_or(seq).min(seq);
        let hi = present.clone().next_back().unwrap_or(seq).max(seq);
        let span = (hi - lo + 1) as usize;
        let len = (span * 2).max(1024).next_power_of_two();
        self.base = lo;
        self.tree = vec![0; len];
        // O(n) construction.
        for s in present {
            self.tree[(s - lo) as usize] += 1;
        }
        for i in 1..=len {
            let parent = i + (i & i.wrapping_neg());
            if parent <= len {
                let v = self.tree[i - 1];
                self.tree[parent - 1] += v;
            }
        }
    }
}

/// The queue over both priorities, holding one `V` per entry.
#[derive(Debug, Clone)]
pub struct Queue<V> {
    entries: BTreeMap<u64, V>,
    trees: [Fenwick; 2],
}

impl<V> Default for Queue<V> {
    fn default() -> Self {
        Queue {
            entries: BTreeMap::new(),
            trees: Default::default(),
        }
    }
}

impl<V> Queue<V> {
    /// Sequence numbers of one priority's entries, ascending.
    fn seqs(
        entries: &BTreeMap<u64, V>,
        priority: Priority,
    ) -> impl DoubleEndedIterator<Item = u64> + Clone + '_ {
        entries
            .range(key(priority, 0)..=key(priority, LOW - 1))
            .map(|(k, _)| unkey(*k).1)
    }

    /// Adds an entry (replaces the value of one already there).
    pub fn insert(&mut self, priority: Priority, seq: u64, value: V) {
        if self.entries.insert(key(priority, seq), value).is_some() {
            return;
        }
        let tree = &mut self.trees[priority.index()];
        tree.count += 1;
        if tree.covers(seq) {
            tree.add_raw(seq, 1);
        } else {
            tree.rebuild(seq, Self::seqs(&self.entries, priority));
        }
    }

    pub fn remove(&mut self, priority: Priority, seq: u64) -> Option<V> {
        let value = self.entries.remove(&key(priority, seq))?;
        let tree = &mut self.trees[priority.index()];
        tree.count -= 1;
        tree.add_raw(seq, -1);
        // Keep memory proportional to the queue, not to every id ever seen.
        if tree.tree.len() > 4096 && tree.tree.len() > 4 * (tree.count as usize + 1) {
            let mut present = Self::seqs(&self.entries, priority);
            let first = present.next().unwrap_or(tree.base);
            tree.rebuild(first, Self::seqs(&self.entries, priority));
        }
        Some(value)
    }

    /// 0-indexed number of entries ahead of (priority, seq).
    pub fn position(&self, priority: Priority, seq: u64) -> u64 {
        match priority {
            Priority::Normal => self.trees[0].prefix(seq),
            Priority::Low => self.trees[0].count + self.trees[1].prefix(seq),
        }
    }

    /// The entry that runs next.
    pub fn first(&self) -> Option<(Priority, u64, &V)> {
        self.entries.iter().next().map(|(k, v)| {
            let (p, s) = unkey(*k);
            (p, s, v)
        })
    }

    /// The oldest entry of one priority.
    pub fn first_of(&self, priority: Priority) -> Option<(u64, &V)> {
        self.entries
            .range(key(priority, 0)..=key(priority, LOW - 1))
            .next()
            .map(|(k, v)| (unkey(*k).1, v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: positions by scanning.
    fn naive(entries: &[(Priority, u64)], p: Priority, s: u64) -> u64 {
        entries.iter().filter(|&&(q, t)| (q, t) < (p, s)).count() as u64
    }

    #[test]
    fn matches_a_scan_under_random_churn() {
        let mut idx = Queue::default();
        let mut live: Vec<(Priority, u64)> = Vec::new();
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut seq = 1u64;
        for round in 0..20_000 {
            if live.is_empty() || rnd() % 3 != 0 {
                let p = if rnd() % 4 == 0 {
                    Priority::Low
                } else {
                    Priority::Normal
                };
                idx.insert(p, seq, seq * 10);
                live.push((p, seq));
                seq += 1;
            } else {
                // Mostly remove from the front (a draining queue), sometimes anywhere.
                let i = if rnd() % 5 == 0 {
                    (rnd() as usize) % live.len()
                } else {
                    0
                };
                let (p, s) = live.remove(i);
                assert_eq!(idx.remove(p, s), Some(s * 10));
                assert_eq!(idx.remove(p, s), None);
            }
            if round % 97 == 0 {
                for &(p, s) in live.iter().take(50) {
                    assert_eq!(idx.position(p, s), naive(&live, p, s), "round {round}");
                }
                let mut sorted = live.clone();
                sorted.sort();
                assert_eq!(
                    idx.first().map(|(p, s, v)| (p, s, *v)),
                    sorted.first().map(|&(p, s)| (p, s, s * 10))
                );
            }
            assert_eq!(idx.len(), live.len());
        }
    }

    #[test]
    fn normal_before_low_then_fifo() {
        let mut idx = Queue::default();
        idx.insert(Priority::Low, 1, "a");
        idx.insert(Priority::Normal, 2, "b");
        idx.insert(Priority::Normal, 3, "c");
        idx.insert(Priority::Normal, 3, "c2"); // replaces, counted once
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.position(Priority::Normal, 2), 0);
        assert_eq!(idx.position(Priority::Normal, 3), 1);
        assert_eq!(idx.position(Priority::Low, 1), 2);
        assert_eq!(idx.first(), Some((Priority::Normal, 2, &"b")));
        assert_eq!(idx.first_of(Priority::Low), Some((1, &"a")));
        idx.remove(Priority::Normal, 2);
        assert_eq!(idx.position(Priority::Low, 1), 1);
        // A job given back goes to its old place, before the tree's base.
        idx.insert(Priority::Normal, 2, "b");
        assert_eq!(idx.position(Priority::Normal, 3), 1);
        assert_eq!(idx.position(Priority::Low, 1), 2);
    }
}
