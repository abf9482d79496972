//! The scaling decision, pure: load figures + clock + what was decided before →
//! desired replicas. No I/O; exhaustively table-tested below.

use std::time::Duration;

/// A function's scaling bounds (from its FalFunction spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Requests one replica runs at once (never 0).
    pub max_concurrency: u32,
    /// Idle time before scaling down (fal `keep_alive`).
    pub keep_alive: Duration,
}

/// What the store says right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub queued: u64,
    pub running: u64,
    /// Sync calls held or in flight in gateways.
    pub sync: u64,
    /// Last submit, claim, completion or sync call (unix ms).
    pub last_activity_ms: u64,
}

impl Demand {
    pub fn total(&self) -> u64 {
        self.queued + self.running + self.sync
    }
}

/// Memory of one function between decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    /// Since when (unix ms) the load has needed fewer replicas than are running.
    pub below_since_ms: Option<u64>,
}

/// Replicas the load needs: ceil(demand / maxConcurrency), clamped to the bounds.
pub fn needed(b: &Bounds, d: &Demand) -> u32 {
    let per = u64::from(b.max_concurrency.max(1));
    let raw = d.total().div_ceil(per);
    let raw = u32::try_from(raw).unwrap_or(u32::MAX);
    raw.clamp(b.min_replicas, b.max_replicas.max(b.min_replicas))
}

/// Desired replicas given `current`. Scale up at once; scale down only after
/// `keepAlive` of needing fewer (to zero: `keepAlive` with nothing queued, running or
/// arriving since the last activity), never below `minReplicas`.
pub fn decide(b: &Bounds, d: &Demand, current: u32, now_ms: u64, w: &mut Window) -> u32 {
    let need = needed(b, d);
    if need >= current {
        w.below_since_ms = None;
        return need;
    }
    let keep = b.keep_alive.as_millis() as u64;
    let since = *w.below_since_ms.get_or_insert(now_ms);
    // Idle: the clock starts at the last activity (a completion ends the busy time),
    // not when this process first looked.
    let idle = d.total() == 0 && now_ms.saturating_sub(d.last_activity_ms) >= keep;
    if idle || now_ms.saturating_sub(since) >= keep {
        w.below_since_ms = None;
        return need;
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(min: u32, max: u32, conc: u32, keep_s: u64) -> Bounds {
        Bounds {
            min_replicas: min,
            max_replicas: max,
            max_concurrency: conc,
            keep_alive: Duration::from_secs(keep_s),
        }
    }
    fn d(q: u64, r: u64, s: u64, last: u64) -> Demand {
        Demand {
            queued: q,
            running: r,
            sync: s,
            last_activity_ms: last,
        }
    }

    #[test]
    fn needed_divides_by_concurrency_and_clamps() {
        let cases = [
            // (bounds, demand, needed)
            (b(0, 3, 1, 10), d(0, 0, 0, 0), 0),
            (b(0, 3, 1, 10), d(1, 0, 0, 0), 1),
            (b(0, 3, 1, 10), d(2, 1, 0, 0), 3),
            (b(0, 3, 1, 10), d(9, 0, 0, 0), 3),
            (b(0, 3, 4, 10), d(4, 0, 0, 0), 1),
            (b(0, 3, 4, 10), d(4, 1, 0, 0), 2),
            (b(0, 3, 4, 10), d(0, 0, 5, 0), 2),
            (b(1, 3, 1, 10), d(0, 0, 0, 0), 1),
            (b(2, 2, 1, 10), d(9, 9, 9, 0), 2),
            (b(0, 1, 0, 10), d(3, 0, 0, 0), 1), // concurrency 0 treated as 1
            (b(0, 5, 1, 10), d(u64::MAX / 4, 0, 0, 0), 5),
        ];
        for (bounds, demand, want) in cases {
            assert_eq!(needed(&bounds, &demand), want, "{bounds:?} {demand:?}");
        }
    }

    #[test]
    fn decisions_over_time() {
        // (current, demand, now_ms) → desired, in sequence on one window.
        struct Step(u32, Demand, u64, u32);
        let scenarios: Vec<(Bounds, Vec<Step>)> = vec![
            // Scale from zero at once on a submit; back to zero after keepAlive idle.
            (
                b(0, 3, 1, 10),
                vec![
                    Step(0, d(0, 0, 0, 0), 1_000, 0),
                    Step(0, d(1, 0, 0, 1_000), 1_001, 1),
                    Step(1, d(0, 1, 0, 1_100), 2_000, 1),
                    Step(1, d(0, 0, 0, 5_000), 6_000, 1), // completed at 5 s: idle 1 s
                    Step(1, d(0, 0, 0, 5_000), 14_999, 1),
                    Step(1, d(0, 0, 0, 5_000), 15_000, 0), // idle 10 s
                    Step(0, d(0, 0, 0, 5_000), 20_000, 0),
                ],
            ),
            // A new arrival during keepAlive resets the idle clock.
            (
                b(0, 3, 1, 10),
                vec![
                    Step(1, d(0, 0, 0, 0), 9_000, 1),
                    Step(1, d(0, 0, 1, 9_500), 9_500, 1),
                    Step(1, d(0, 0, 0, 9_600), 12_000, 1),
                    Step(1, d(0, 0, 0, 9_600), 19_599, 1),
                    Step(1, d(0, 0, 0, 9_600), 19_600, 0),
                ],
            ),
            // Partial scale-down (3 → 1) waits keepAlive of needing fewer.
            (
                b(0, 3, 1, 10),
                vec![
                    Step(0, d(9, 0, 0, 0), 0, 3),
                    Step(3, d(0, 1, 0, 1_000), 1_000, 3),
                    Step(3, d(0, 1, 0, 5_000), 10_999, 3),
                    Step(3, d(0, 1, 0, 5_000), 11_000, 1),
                    Step(1, d(0, 1, 0, 5_000), 12_000, 1),
                ],
            ),
            // Load that comes back above current cancels a pending scale-down.
            (
                b(0, 4, 1, 10),
                vec![
                    Step(3, d(0, 1, 0, 0), 0, 3),
                    Step(3, d(2, 2, 0, 5_000), 5_000, 4),
                    Step(4, d(0, 1, 0, 6_000), 6_000, 4),
                    Step(4, d(0, 1, 0, 6_000), 15_999, 4),
                    Step(4, d(0, 1, 0, 6_000), 16_000, 1),
                ],
            ),
            // minReplicas 1 never goes to zero.
            (
                b(1, 2, 1, 1),
                vec![
                    Step(1, d(0, 0, 0, 0), 1_000_000, 1),
                    Step(2, d(0, 0, 0, 0), 1_000_000, 1),
                    Step(1, d(0, 0, 0, 0), 9_000_000, 1),
                ],
            ),
            // keepAlive 0: down as soon as nothing is left.
            (
                b(0, 2, 1, 0),
                vec![
                    Step(0, d(1, 0, 0, 10), 10, 1),
                    Step(1, d(0, 1, 0, 11), 11, 1),
                    Step(1, d(0, 0, 0, 12), 12, 0),
                ],
            ),
            // Never above maxReplicas, whatever the backlog.
            (
                b(0, 3, 2, 5),
                vec![
                    Step(0, d(100, 0, 0, 0), 0, 3),
                    Step(3, d(94, 6, 0, 0), 1, 3),
                ],
            ),
            // Replicas running above max (max was lowered): brought down after keepAlive.
            (
                b(0, 1, 1, 5),
                vec![
                    Step(3, d(5, 0, 0, 0), 0, 3),
                    Step(3, d(5, 0, 0, 0), 5_000, 1),
                ],
            ),
        ];
        for (n, (bounds, steps)) in scenarios.iter().enumerate() {
            let mut w = Window::default();
            for (i, Step(current, demand, now, want)) in steps.iter().enumerate() {
                let got = decide(bounds, demand, *current, *now, &mut w);
                assert_eq!(
                    got, *want,
                    "scenario {n} step {i}: {bounds:?} {demand:?} current {current} at {now}"
                );
            }
        }
    }
}
