//! The benchmark suite (A3): fixed amounts of work timed with the monotonic clock.
//!
//! CPU (integer, floating point, SHA-256; one core and all cores), memory (STREAM copy,
//! scale, add, triad on arrays four times the last-level cache, at most 256 MiB each;
//! latency by pointer chasing over growing working sets, from which cache sizes are
//! derived; a usable memory check), storage (sequential and 4 KiB random I/O with `O_DIRECT` on a scratch
//! file, and free capacity). Each figure is repeated after a warm-up and reported with
//! its coefficient of variation and a score against a fixed reference.
//!
//! The suite runs on the calling thread (it spawns scoped threads for all-core
//! measurements), checks a cancellation flag between chunks of work, skips what would
//! start after its time budget, and reports progress through a callback.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use surplus_protocol::bench::{BenchPlan, BenchReport, BenchResult, composite, mean_cv, median};

/// Reference figures: a score of 1.0 means "as fast as the reference host", a 2-vCPU
/// AMD EPYC virtual machine with a virtio disk, release build, measured 2026-11-22 (the
/// figures and commands are in `docs/PERFORMANCE.md`). Fixed forever, so scores stay
/// comparable across hosts and over time.
pub mod reference {
    /// Integer mixing, one core, Mops/s.
    pub const CPU_INT_SINGLE: f64 = 460.0;
    /// Floating point, one core, MFLOP/s.
    pub const CPU_FLOAT_SINGLE: f64 = 8500.0;
    /// SHA-256, one core, MB/s.
    pub const CPU_SHA256_SINGLE: f64 = 1550.0;
    /// Multiplier of the single-core references for all-core figures (two cores).
    pub const CORES: f64 = 2.0;
    /// STREAM bandwidths, MB/s.
    pub const STREAM: f64 = 28_000.0;
    /// Main-memory load latency, ns (lower is better).
    pub const MEMORY_LATENCY_NS: f64 = 150.0;
    /// Sequential write, MB/s.
    pub const STORAGE_SEQ_WRITE: f64 = 750.0;
    /// Sequential read, MB/s.
    pub const STORAGE_SEQ_READ: f64 = 1450.0;
    /// Random 4 KiB reads, IOPS.
    pub const STORAGE_RANDREAD_IOPS: f64 = 40_000.0;
    /// Random 4 KiB writes, IOPS.
    pub const STORAGE_RANDWRITE_IOPS: f64 = 30_000.0;
}

/// The run was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

/// Progress of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Steps finished.
    pub done: u32,
    /// Steps in all.
    pub total: u32,
    /// The step starting now (empty when finished).
    pub step: String,
}

struct Run<'a> {
    plan: &'a BenchPlan,
    cancel: &'a AtomicBool,
    threads: usize,
}

impl Run<'_> {
    fn check(&self) -> Result<(), Cancelled> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    /// One warm-up, then `repetitions` timed runs of `measure` (which returns the figure).
    fn repeat(
        &self,
        mut measure: impl FnMut() -> Result<f64, Cancelled>,
    ) -> Result<Vec<f64>, Cancelled> {
        measure()?;
        (0..self.plan.repetitions.max(1))
            .map(|_| measure())
            .collect()
    }
}

fn result(
    id: &str,
    unit: &str,
    reps: Vec<f64>,
    best: bool,
    reference: f64,
    lower_is_better: bool,
    started: Instant,
) -> BenchResult {
    let value = if best {
        if lower_is_better {
            reps.iter().copied().fold(f64::INFINITY, f64::min)
        } else {
            reps.iter().copied().fold(0.0, f64::max)
        }
    } else {
        median(&reps)
    };
    let (_, cv) = mean_cv(&reps);
    let score = match (reference > 0.0, value > 0.0) {
        (false, _) | (_, false) => 0.0,
        (true, true) if lower_is_better => reference / value,
        (true, true) => value / reference,
    };
    BenchResult {
        id: id.into(),
        unit: unit.into(),
        value,
        repetitions: reps,
        cv,
        reference,
        score,
        duration_ms: started.elapsed().as_millis() as u64,
        note: None,
    }
}

// ------------------------------------------------------------------------ CPU

/// Integer work: a dependent xorshift chain mixed into an accumulator.
pub fn int_work(iterations: u64, seed: u64) -> u64 {
    let (mut x, mut acc) = (seed | 1, 0u64);
    for _ in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = (acc ^ x.rotate_left(5)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    acc
}

/// Floating-point work: eight independent multiply-add chains (16 flops an iteration).
pub fn float_work(iterations: u64, seed: f64) -> f64 {
    let mut s = [seed; 8];
    let (a, b) = (0.999_999_9, 1e-7);
    for _ in 0..iterations {
        for v in &mut s {
            *v = *v * a + b;
        }
    }
    s.iter().sum()
}

/// Runs `work` once per thread on `threads` threads; returns the wall time.
fn on_threads(threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let work = &work;
            scope.spawn(move || work(t));
        }
    });
    started.elapsed()
}

fn cpu(run: &Run, out: &mut Vec<BenchResult>, single: bool, kind: &str) -> Result<(), Cancelled> {
    let threads = if single { 1 } else { run.threads };
    let scale = if run.plan.quick { 1 } else { 25 };
    let started = Instant::now();
    let (id, unit, per_item, items, reference): (String, &str, f64, u64, f64) = match kind {
        "int" => (
            format!("cpu.int.{}", if single { "single" } else { "multi" }),
            "Mops/s",
            1.0,
            2_000_000 * scale,
            reference::CPU_INT_SINGLE,
        ),
        "float" => (
            format!("cpu.float.{}", if single { "single" } else { "multi" }),
            "MFLOP/s",
            16.0,
            1_000_000 * scale,
            reference::CPU_FLOAT_SINGLE,
        ),
        _ => (
            format!("cpu.sha256.{}", if single { "single" } else { "multi" }),
            "MB/s",
            1.0,
            4 * scale,
            reference::CPU_SHA256_SINGLE,
        ),
    };
    let buffer = vec![0x5au8; 1 << 20];
    let reps = run.repeat(|| {
        run.check()?;
        let elapsed = on_threads(threads, |t| match kind {
            "int" => {
                black_box(int_work(black_box(items), t as u64 + 1));
            }
            "float" => {
                black_box(float_work(black_box(items), 1.0 + t as f64));
            }
            _ => {
                for _ in 0..items {
                    black_box(ring::digest::digest(
                        &ring::digest::SHA256,
                        black_box(&buffer),
                    ));
                }
            }
        });
        let work = items as f64 * per_item * threads as f64;
        let per_second = work / elapsed.as_secs_f64();
        Ok(if kind == "sha256" {
            per_second * (1 << 20) as f64 / 1e6
        } else {
            per_second / 1e6
        })
    })?;
    let reference = if single {
        reference
    } else {
        reference * reference::CORES
    };
    out.push(result(&id, unit, reps, false, reference, false, started));
    Ok(())
}

// ------------------------------------------------------------------------ memory

/// Splits `dst` into `threads` chunks and runs `kernel(chunk, offset)` on each in parallel.
fn par_chunks(threads: usize, dst: &mut [f64], kernel: impl Fn(&mut [f64], usize) + Sync) {
    let chunk = dst.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        for (i, part) in dst.chunks_mut(chunk).enumerate() {
            let kernel = &kernel;
            scope.spawn(move || kernel(part, i * chunk));
        }
    });
}

/// The largest STREAM array: three of them are allocated at once, so a validation run
/// never takes more than 768 MiB for them, whatever cache size the latency curve
/// suggests (a virtual CPU may show hundreds of MiB of "cache").
pub const STREAM_MAX_ARRAY_BYTES: u64 = 256 << 20;

/// The size of each STREAM array: four times the last-level cache (STREAM's rule), at
/// least 64 MiB, at most [`STREAM_MAX_ARRAY_BYTES`]; 8 MiB for a quick run.
pub fn stream_array_bytes(quick: bool, llc_bytes: u64) -> u64 {
    if quick {
        8 << 20
    } else {
        llc_bytes
            .saturating_mul(4)
            .clamp(64 << 20, STREAM_MAX_ARRAY_BYTES)
    }
}

fn stream(run: &Run, out: &mut Vec<BenchResult>, llc_bytes: u64) -> Result<(), Cancelled> {
    let array_bytes = stream_array_bytes(run.plan.quick, llc_bytes);
    let capped = !run.plan.quick && llc_bytes.saturating_mul(4) > STREAM_MAX_ARRAY_BYTES;
    let n = (array_bytes / 8) as usize;
    let (mut a, mut b, mut c) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    let t = run.threads;
    par_chunks(t, &mut a, |p, _| p.fill(1.0));
    par_chunks(t, &mut b, |p, _| p.fill(2.0));
    par_chunks(t, &mut c, |p, _| p.fill(0.0));
    let s = 3.0;
    // Each timed repetition runs the kernel PASSES times inside the same threads, so
    // thread start-up (noticeable on virtual machines) is amortised as in an OpenMP pool.
    const PASSES: usize = 4;
    let mb = |bytes: usize, d: Duration| (PASSES * bytes) as f64 / d.as_secs_f64() / 1e6;
    type Kernel = fn(&mut [f64], &mut [f64], &mut [f64], f64, usize) -> (Duration, usize);
    let kernels: [(&str, Kernel); 4] = [
        ("memory.copy", |a, _b, c, _s, t| {
            let started = Instant::now();
            par_chunks(t, c, |dst, off| {
                for _ in 0..PASSES {
                    dst.copy_from_slice(&a[off..off + dst.len()]);
                    black_box(&dst);
                }
            });
            (started.elapsed(), 2 * 8 * a.len())
        }),
        ("memory.scale", |_a, b, c, s, t| {
            let started = Instant::now();
            par_chunks(t, b, |dst, off| {
                for _ in 0..PASSES {
                    dst.iter_mut().zip(&c[off..]).for_each(|(x, y)| *x = s * y);
                    black_box(&dst);
                }
            });
            (started.elapsed(), 2 * 8 * b.len())
        }),
        ("memory.add", |a, b, c, _s, t| {
            let started = Instant::now();
            par_chunks(t, c, |dst, off| {
                for _ in 0..PASSES {
                    dst.iter_mut()
                        .zip(a[off..].iter().zip(&b[off..]))
                        .for_each(|(x, (y, z))| *x = y + z);
                    black_box(&dst);
                }
            });
            (started.elapsed(), 3 * 8 * c.len())
        }),
        ("memory.triad", |a, b, c, s, t| {
            let started = Instant::now();
            par_chunks(t, a, |dst, off| {
                for _ in 0..PASSES {
                    dst.iter_mut()
                        .zip(b[off..].iter().zip(&c[off..]))
                        .for_each(|(x, (y, z))| *x = y + s * z);
                    black_box(&dst);
                }
            });
            (started.elapsed(), 3 * 8 * a.len())
        }),
    ];
    for (id, kernel) in kernels {
        let started = Instant::now();
        let reps = run.repeat(|| {
            run.check()?;
            let (d, bytes) = kernel(&mut a, &mut b, &mut c, s, t);
            Ok(mb(bytes, d))
        })?;
        let mut r = result(id, "MB/s", reps, true, reference::STREAM, false, started);
        r.note = Some(format!(
            "3 arrays of {} MiB, {t} threads, {PASSES} passes a repetition, best of the repetitions{}",
            array_bytes >> 20,
            if capped {
                format!(
                    "; capped: the last-level cache measured {} MiB, so part of the arrays may be cached",
                    llc_bytes >> 20
                )
            } else {
                String::new()
            }
        ));
        out.push(r);
    }
    black_box((&a, &b, &c));
    Ok(())
}

/// A random cyclic permutation of `nodes` (Sattolo's algorithm), one node per 64-byte
/// cache line (stride 8 `usize`s), as successor indices.
fn chase_ring(nodes: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..nodes).collect();
    let mut x = seed | 1;
    for i in (1..nodes).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = (x % i as u64) as usize;
        order.swap(i, j);
    }
    let mut ring = vec![0usize; nodes * 8];
    for w in 0..nodes {
        ring[order[w] * 8] = order[(w + 1) % nodes] * 8;
    }
    ring
}

/// Cache sizes from a latency curve `(working set bytes, ns)`, sizes doubling: a level
/// ends where the latency of the next working set jumps by more than 40%. Two jumps in
/// a row (a level whose end straddles two sizes) count as one, at the larger size.
pub fn cache_levels(curve: &[(u64, f64)]) -> Vec<u64> {
    let mut levels: Vec<u64> = Vec::new();
    for w in curve.windows(2) {
        if w[0].1 > 0.0 && w[1].1 / w[0].1 > 1.4 {
            match levels.last_mut() {
                Some(last) if *last * 2 == w[0].0 => *last = w[0].0,
                _ => levels.push(w[0].0),
            }
        }
    }
    levels
}

fn latency(run: &Run, out: &mut Vec<BenchResult>, llc_bytes: u64) -> Result<Vec<u64>, Cancelled> {
    let max = if run.plan.quick {
        4 << 20
    } else {
        (2 * llc_bytes).max(64 << 20)
    };
    let loads: usize = if run.plan.quick { 200_000 } else { 2_000_000 };
    let started = Instant::now();
    let mut curve = Vec::new();
    let mut size = 16u64 << 10;
    while size <= max {
        run.check()?;
        let ring = chase_ring((size / 64) as usize, size);
        let mut p = 0usize;
        for _ in 0..loads / 4 {
            p = ring[p]; // warm-up
        }
        let t = Instant::now();
        for _ in 0..loads {
            p = ring[p];
        }
        black_box(p);
        curve.push((size, t.elapsed().as_nanos() as f64 / loads as f64));
        size *= 2;
    }
    let levels = cache_levels(&curve);
    // Main-memory latency: repeat the largest working set.
    let ring = chase_ring((max / 64) as usize, 7);
    let reps = run.repeat(|| {
        run.check()?;
        let mut p = 0usize;
        let t = Instant::now();
        for _ in 0..loads {
            p = ring[p];
        }
        black_box(p);
        Ok(t.elapsed().as_nanos() as f64 / loads as f64)
    })?;
    let mut r = result(
        "memory.latency",
        "ns",
        reps,
        false,
        reference::MEMORY_LATENCY_NS,
        true,
        started,
    );
    r.note = Some(format!(
        "random pointer chase over {} MiB; curve: {}",
        max >> 20,
        curve
            .iter()
            .map(|(s, ns)| format!("{}K={ns:.1}", s >> 10))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    out.push(r);
    Ok(levels)
}

fn usable_memory(run: &Run, out: &mut Vec<BenchResult>) -> Result<(), Cancelled> {
    let available = crate::inventory::meminfo_kb(
        &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
        "MemAvailable",
    )
    .unwrap_or(0)
        * 1024;
    let target = if run.plan.quick {
        32 << 20
    } else {
        (available / 4).min(1 << 30)
    };
    let started = Instant::now();
    run.check()?;
    let mut block = vec![0u8; target as usize];
    let mut verified = 0u64;
    for (i, page) in block.chunks_mut(4096).enumerate() {
        page[0] = (i % 251) as u8;
        page[page.len() - 1] = (i % 241) as u8;
    }
    for (i, page) in block.chunks(4096).enumerate() {
        if page[0] == (i % 251) as u8 && page[page.len() - 1] == (i % 241) as u8 {
            verified += page.len() as u64;
        }
    }
    black_box(&block);
    let mut r = result(
        "memory.usable",
        "bytes",
        vec![verified as f64],
        false,
        0.0,
        false,
        started,
    );
    r.note = Some(format!(
        "allocated, touched and read back {} MiB; MemAvailable {} MiB",
        target >> 20,
        available >> 20
    ));
    out.push(r);
    Ok(())
}

// ------------------------------------------------------------------------ storage

/// A heap buffer aligned for direct I/O.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: the layout has a non-zero size; the pointer is checked below.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating an I/O buffer");
        Self { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Removes the scratch file however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open_scratch(path: &Path) -> std::io::Result<(File, bool)> {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?,
            false,
        )),
        Err(e) => Err(e),
    }
}

/// Free and total bytes of the file system holding `dir`.
pub fn capacity(dir: &Path) -> std::io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other("path holds a NUL byte"))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and s a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((
        s.f_bavail as u64 * s.f_frsize as u64,
        s.f_blocks as u64 * s.f_frsize as u64,
    ))
}

fn storage(
    run: &Run,
    out: &mut Vec<BenchResult>,
    skipped: &mut Vec<String>,
) -> Result<(), Cancelled> {
    let dir = Path::new(&run.plan.scratch_dir);
    let started = Instant::now();
    let (free, total) = match capacity(dir) {
        Ok(c) => c,
        Err(e) => {
            skipped.push(format!("storage: cannot use {}: {e}", dir.display()));
            return Ok(());
        }
    };
    let mut r = result(
        "storage.free",
        "bytes",
        vec![free as f64],
        false,
        0.0,
        false,
        started,
    );
    r.note = Some(format!(
        "{} of {} GiB free in {}",
        free >> 30,
        total >> 30,
        dir.display()
    ));
    out.push(r);
    let size = if run.plan.quick {
        16 << 20
    } else {
        run.plan.storage_bytes.max(16 << 20)
    };
    if free < size * 2 {
        skipped.push(format!(
            "storage: only {} MiB free in {}, {} MiB needed",
            free >> 20,
            dir.display(),
            (size * 2) >> 20
        ));
        return Ok(());
    }
    let path = dir.join(format!("surplus-bench-{}.tmp", std::process::id()));
    let _guard = Scratch(path.clone());
    let (file, direct) = match open_scratch(&path) {
        Ok(f) => f,
        Err(e) => {
            skipped.push(format!("storage: cannot create {}: {e}", path.display()));
            return Ok(());
        }
    };
    let note = if direct {
        "O_DIRECT".to_owned()
    } else {
        "direct I/O unsupported on this file system: buffered, the page cache may inflate figures"
            .to_owned()
    };
    let block = 1 << 20;
    let mut buf = Aligned::new(block);
    buf.as_mut()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i * 31) as u8);
    let blocks = size / block as u64;
    let io = |e: std::io::Error| {
        tracing::warn!(error = %e, "storage benchmark I/O failed");
        Cancelled
    };
    let mb = |d: Duration| (blocks * block as u64) as f64 / d.as_secs_f64() / 1e6;

    let t = Instant::now();
    let reps = run.repeat(|| {
        let t = Instant::now();
        for i in 0..blocks {
            run.check()?;
            file.write_all_at(buf.as_mut(), i * block as u64)
                .map_err(io)?;
        }
        file.sync_data().map_err(io)?;
        Ok(mb(t.elapsed()))
    })?;
    let mut r = result(
        "storage.seqwrite",
        "MB/s",
        reps,
        false,
        reference::STORAGE_SEQ_WRITE,
        false,
        t,
    );
    r.note = Some(format!(
        "{note}; {} MiB in 1 MiB blocks, then fdatasync",
        size >> 20
    ));
    out.push(r);

    let t = Instant::now();
    let reps = run.repeat(|| {
        let t = Instant::now();
        for i in 0..blocks {
            run.check()?;
            file.read_exact_at(buf.as_mut(), i * block as u64)
                .map_err(io)?;
        }
        Ok(mb(t.elapsed()))
    })?;
    let mut r = result(
        "storage.seqread",
        "MB/s",
        reps,
        false,
        reference::STORAGE_SEQ_READ,
        false,
        t,
    );
    r.note = Some(format!("{note}; 1 MiB blocks"));
    out.push(r);

    let ops: u64 = if run.plan.quick { 1_000 } else { 10_000 };
    let pages = size / 4096;
    let mut small = Aligned::new(4096);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next_page = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % pages) * 4096
    };
    for (id, write, reference) in [
        ("storage.randread", false, reference::STORAGE_RANDREAD_IOPS),
        ("storage.randwrite", true, reference::STORAGE_RANDWRITE_IOPS),
    ] {
        let t = Instant::now();
        let reps = run.repeat(|| {
            let t = Instant::now();
            for i in 0..ops {
                if i % 256 == 0 {
                    run.check()?;
                }
                let at = next_page();
                if write {
                    file.write_all_at(small.as_mut(), at)
                } else {
                    file.read_exact_at(small.as_mut(), at)
                }
                .map_err(io)?;
            }
            if write {
                file.sync_data().map_err(io)?;
            }
            Ok(ops as f64 / t.elapsed().as_secs_f64())
        })?;
        let mut r = result(id, "IOPS", reps, false, reference, false, t);
        r.note = Some(format!(
            "{note}; {ops} random 4 KiB operations, queue depth 1"
        ));
        out.push(r);
    }
    Ok(())
}

// ------------------------------------------------------------------------ the suite

const STEPS: &[&str] = &[
    "cpu.int.single",
    "cpu.int.multi",
    "cpu.float.single",
    "cpu.float.multi",
    "cpu.sha256.single",
    "cpu.sha256.multi",
    "memory.stream",
    "memory.latency",
    "memory.usable",
    "storage",
];

/// Runs the suite. `llc_bytes` sizes the memory tests (from the inventory; 32 MiB when
/// unknown). Returns whatever was measured, marked cancelled if `cancel` was raised.
pub fn run(
    plan: &BenchPlan,
    llc_bytes: Option<u64>,
    cancel: &AtomicBool,
    mut progress: impl FnMut(Progress),
) -> BenchReport {
    let started = Instant::now();
    let budget = Duration::from_millis(plan.budget_ms);
    let run = Run {
        plan,
        cancel,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let llc = llc_bytes.filter(|b| *b > 0).unwrap_or(32 << 20);
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    let mut levels = Vec::new();
    let mut cancelled = false;
    let total = STEPS.len() as u32;
    for (i, step) in STEPS.iter().enumerate() {
        progress(Progress {
            done: i as u32,
            total,
            step: (*step).into(),
        });
        if started.elapsed() >= budget {
            skipped.push(format!(
                "{step}: time budget of {} s exhausted",
                budget.as_secs()
            ));
            continue;
        }
        let outcome = match *step {
            "cpu.int.single" => cpu(&run, &mut results, true, "int"),
            "cpu.int.multi" => cpu(&run, &mut results, false, "int"),
            "cpu.float.single" => cpu(&run, &mut results, true, "float"),
            "cpu.float.multi" => cpu(&run, &mut results, false, "float"),
            "cpu.sha256.single" => cpu(&run, &mut results, true, "sha256"),
            "cpu.sha256.multi" => cpu(&run, &mut results, false, "sha256"),
            "memory.stream" => stream(&run, &mut results, llc),
            "memory.latency" => latency(&run, &mut results, llc).map(|l| levels = l),
            "memory.usable" => usable_memory(&run, &mut results),
            _ => storage(&run, &mut results, &mut skipped),
        };
        if outcome.is_err() {
            cancelled = true;
            break;
        }
    }
    progress(Progress {
        done: total,
        total,
        step: String::new(),
    });
    BenchReport {
        plan: plan.clone(),
        composite_score: composite(results.iter().map(|r| r.score)),
        results,
        cache_levels_bytes: levels,
        skipped,
        cancelled,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chase_ring_is_one_cycle_through_every_line() {
        let ring = chase_ring(1000, 42);
        let (mut p, mut seen) = (0usize, std::collections::HashSet::new());
        for _ in 0..1000 {
            assert!(seen.insert(p), "revisited {p} early");
            p = ring[p];
        }
        assert_eq!(p, 0);
    }

    #[test]
    fn stream_arrays_follow_the_cache_within_bounds() {
        const MIB: u64 = 1 << 20;
        assert_eq!(stream_array_bytes(true, 480 * MIB), 8 * MIB);
        assert_eq!(stream_array_bytes(false, 8 * MIB), 64 * MIB);
        assert_eq!(stream_array_bytes(false, 32 * MIB), 128 * MIB);
        // A virtual CPU that looks like it has 480 MiB of cache does not get three
        // arrays of 1,920 MiB.
        assert_eq!(stream_array_bytes(false, 480 * MIB), STREAM_MAX_ARRAY_BYTES);
        assert_eq!(stream_array_bytes(false, u64::MAX), STREAM_MAX_ARRAY_BYTES);
    }

    #[test]
    fn cache_levels_are_read_from_latency_jumps() {
        let k = |n: u64| n << 10;
        let clean = [
            (k(16), 1.0),
            (k(32), 1.0),
            (k(64), 3.0),
            (k(128), 3.0),
            (k(256), 3.1),
            (k(512), 10.0),
            (k(1024), 10.5),
            (k(2048), 60.0),
        ];
        assert_eq!(cache_levels(&clean), vec![k(32), k(256), k(1024)]);
        // Measured on the reference host (sysfs: L1d 32K, L2 512K, L3 32M shared, of
        // which about 8M is close): jumps straddling two sizes merge.
        let measured = [
            (k(16), 1.7),
            (k(32), 3.2),
            (k(64), 4.4),
            (k(128), 5.0),
            (k(256), 6.3),
            (k(512), 9.7),
            (k(1024), 14.7),
            (k(2048), 16.4),
            (k(4096), 17.8),
            (k(8192), 100.0),
            (k(16384), 145.2),
            (k(32768), 162.0),
            (k(65536), 161.2),
        ];
        assert_eq!(cache_levels(&measured), vec![k(16), k(512), k(8192)]);
    }

    #[test]
    fn results_score_against_the_reference_both_ways() {
        let r = result(
            "x",
            "MB/s",
            vec![10.0, 20.0, 30.0],
            false,
            10.0,
            false,
            Instant::now(),
        );
        assert_eq!((r.value, r.score), (20.0, 2.0));
        let r = result(
            "y",
            "ns",
            vec![50.0, 200.0],
            true,
            100.0,
            true,
            Instant::now(),
        );
        assert_eq!((r.value, r.score), (50.0, 2.0));
        let r = result("z", "bytes", vec![5.0], false, 0.0, false, Instant::now());
        assert_eq!(r.score, 0.0);
    }
}
