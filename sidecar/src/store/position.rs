//! Queue positions in O(log n): one Fenwick tree per priority, indexed by sequence
//! number (offset by a base that moves forward as the queue drains).
//!
//! position(normal job s) = queued normal jobs with seq < s
//! position(low job s)    = all queued normal jobs + queued low jobs with seq < s

use crate::job::Priority;

#[derive(Debug, Default, Clone)]
struct Fenwick {
    base: u64,
    tree: Vec<i64>,
    count: u64,
    /// Sequence numbers present (only needed when rebuilding).
    present: std::collections::BTreeSet<u64>,
}

impl Fenwick {
    fn add_raw(&mut self, seq: u64, delta: i64) {
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
            sum += self.tree[i - 1];
            i -= i & i.wrapping_neg();
        }
        sum as u64
    }

    fn insert(&mut self, seq: u64) {
        if !self.present.insert(seq) {
            return;
        }
        self.count += 1;
        if seq < self.base || (seq - self.base) as usize >= self.tree.len() {
            self.rebuild(seq);
        } else {
            self.add_raw(seq, 1);
        }
    }

    fn remove(&mut self, seq: u64) {
        if !self.present.remove(&seq) {
            return;
        }
        self.count -= 1;
        self.add_raw(seq, -1);
        // Keep memory proportional to the queue, not to every id ever seen.
        if self.tree.len() > 4096 && self.tree.len() > 4 * (self.count as usize + 1) {
            self.rebuild(self.present.iter().next().copied().unwrap_or(self.base));
        }
    }

    /// Rebuilds so that the tree covers the present entries plus `seq`, with headroom.
    fn rebuild(&mut self, seq: u64) {
        let lo = self.present.iter().next().copied().unwrap_or(seq).min(seq);
        let hi = self
            .present
            .iter()
            .next_back()
            .copied()
            .unwrap_or(seq)
            .max(seq);
        let span = (hi - lo + 1) as usize;
        let len = (span * 2).max(1024).next_power_of_two();
        self.base = lo;
        self.tree = vec![0; len];
        // O(n) construction.
        for &s in &self.present {
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

/// Queue-position index over both priorities.
#[derive(Debug, Default, Clone)]
pub struct PositionIndex {
    trees: [Fenwick; 2],
}

impl PositionIndex {
    pub fn insert(&mut self, priority: Priority, seq: u64) {
        self.trees[priority.index()].insert(seq);
    }
    pub fn remove(&mut self, priority: Priority, seq: u64) {
        self.trees[priority.index()].remove(seq);
    }
    pub fn position(&self, priority: Priority, seq: u64) -> u64 {
        match priority {
            Priority::Normal => self.trees[0].prefix(seq),
            Priority::Low => self.trees[0].count + self.trees[1].prefix(seq),
        }
    }
    pub fn len(&self) -> u64 {
        self.trees[0].count + self.trees[1].count
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let mut idx = PositionIndex::default();
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
                idx.insert(p, seq);
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
                idx.remove(p, s);
            }
            if round % 97 == 0 {
                for &(p, s) in live.iter().take(50) {
                    assert_eq!(idx.position(p, s), naive(&live, p, s), "round {round}");
                }
            }
            assert_eq!(idx.len(), live.len() as u64);
        }
    }

    #[test]
    fn normal_before_low_then_fifo() {
        let mut idx = PositionIndex::default();
        idx.insert(Priority::Low, 1);
        idx.insert(Priority::Normal, 2);
        idx.insert(Priority::Normal, 3);
        assert_eq!(idx.position(Priority::Normal, 2), 0);
        assert_eq!(idx.position(Priority::Normal, 3), 1);
        assert_eq!(idx.position(Priority::Low, 1), 2);
        idx.remove(Priority::Normal, 2);
        assert_eq!(idx.position(Priority::Low, 1), 1);
    }
}
