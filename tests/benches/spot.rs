//! `cargo bench -p surplus-tests --bench spot`: the spot market's clearing
//! (`surplus_market::spot::clear`) for 100,000 bids over 10,000 resource classes, side
//! by side with the naive reference of the same rule (`spot::reference::clear_naive`,
//! the best remaining bid picked again and again), which must give the same answer.
//! Bids come from a fixed-seed generator (the seed is printed): maxima in a narrow
//! range so ties are common, a fifth all-or-nothing, capacities around the demand so
//! that some classes clear at the minimum and others at a losing bid. Numbers go to
//! docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use surplus_market::spot::{Bid, Supply, clear, reference::clear_naive};
use uuid::Uuid;

const CLASSES: u32 = 10_000;
const BIDS: u32 = 100_000;
const RUNS: usize = 30;
const SEED: u64 = 0x5eed_2026_1207;

/// SplitMix64: a fixed sequence, no dependency on a random number generator.
struct Numbers(u64);

impl Numbers {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn market() -> (Vec<Supply>, Vec<Bid>) {
    let mut n = Numbers(SEED);
    let supplies: Vec<Supply> = (0..CLASSES)
        .map(|c| Supply {
            class: format!("compute.medium/zone-{}/{c}", c % 16),
            capacity: 5 + n.below(20) as u32,
            minimum: 10 + n.below(10),
        })
        .collect();
    let bids = (0..BIDS)
        .map(|i| {
            let s = &supplies[n.below(u64::from(CLASSES)) as usize];
            Bid {
                id: Uuid::from_u64_pair(0, u64::from(i) * 7919 % u64::from(BIDS)),
                class: s.class.clone(),
                client: format!("client-{}", n.below(500)),
                max_price: s.minimum + n.below(40),
                quantity: 1 + n.below(4) as u32,
                all_or_nothing: n.below(5) == 0,
                placed_at_ms: n.below(10_000) as i64,
            }
        })
        .collect();
    (supplies, bids)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn measure(name: &str, f: impl Fn() -> usize) {
    let mut times = Vec::with_capacity(RUNS);
    let mut allocated = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        allocated = f();
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "{name:<12} median {:>8.2} ms  p99 {:>8.2} ms  ({allocated} allocations, {RUNS} runs)",
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
    );
}

fn main() {
    let (supplies, bids) = market();
    println!(
        "spot clearing: {BIDS} bids over {CLASSES} classes, seed {SEED:#x}, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let fast = clear(&supplies, &bids);
    let naive = clear_naive(&supplies, &bids);
    assert_eq!(fast, naive, "the clearing and its reference disagree");
    let count = |c: &surplus_market::spot::Clearing| {
        c.classes.iter().map(|k| k.allocations.len()).sum::<usize>()
    };
    measure("clear", || count(&clear(&supplies, &bids)));
    measure("clear_naive", || count(&clear_naive(&supplies, &bids)));
}
