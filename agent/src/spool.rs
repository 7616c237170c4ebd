//! The durable usage spool: every usage record is written here, and synced, before it
//! is sent; it leaves only when the controller acknowledged it.
//!
//! On disk the spool is a directory of append-only segments named by the sequence
//! number of their first record (`00000000000000000042.seg`). A segment is a run of
//! frames:
//!
//! ```text
//! magic "SPL1" | payload length (u32 LE) | CRC-32 of the payload (u32 LE) | payload
//! ```
//!
//! where the payload is the record in the wire codec, its sequence number included.
//! Reading skips what does not check out: a torn final frame after a crash is cut off
//! (the file is truncated to the last whole frame), and a damaged frame in the middle
//! is stepped over by searching for the next magic whose frame checks out, so one bad
//! frame never costs the records after it. Both are counted and reported.
//!
//! `acked` holds the highest acknowledged sequence number; a segment is deleted once
//! every record in it is at or below it. When the spool grows past its size limit
//! (the controller was unreachable for long), the oldest segments are merged into
//! coarser records ([`surplus_protocol::usage::merge`]): counters are cumulative, so
//! merging loses no usage, only resolution. Merging writes `<first>-<last>.merging`
//! (named after the originals' range), then
//! deletes the originals, then renames it to `.seg`, so a crash at any point leaves
//! either the originals or the merged segment.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use surplus_protocol::codec::{decode_value, encode_value};
use surplus_protocol::usage::{SpoolState, UsageRecord, merge};

use crate::identity::write_atomic;

const MAGIC: &[u8; 4] = b"SPL1";
const HEADER: usize = 12;
/// Largest payload a frame may declare; anything larger is damage.
const MAX_PAYLOAD: usize = 1 << 20;

/// `[spool]` limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Bytes on disk above which the oldest records are merged.
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 30,
            segment_bytes: 4 << 20,
        }
    }
}

/// Damage found while reading a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment.
    pub segment: PathBuf,
    /// Byte offset where the damage starts.
    pub offset: u64,
    /// How many bytes were skipped.
    pub bytes: u64,
    /// A torn tail (cut off) or a damaged frame in the middle (stepped over).
    pub torn_tail: bool,
}

/// What opening the spool found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments found.
    pub segments: usize,
    /// Valid records not yet acknowledged.
    pub pending: u64,
    /// Damage, in file order.
    pub damage: Vec<Damage>,
}

#[derive(Debug, Clone)]
struct Segment {
    last: Option<u64>,
    path: PathBuf,
    bytes: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Acked {
    through: Option<u64>,
}

/// An open spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    segments: Vec<Segment>,
    writer: Option<File>,
    next_seq: u64,
    acked: Option<u64>,
    merged_records: u64,
    discarded_records: u64,
    /// Do not try to merge again before the spool reaches this size.
    next_merge_at: u64,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

/// One frame's bytes.
fn frame(record: &UsageRecord) -> std::io::Result<Vec<u8>> {
    let payload = encode_value(record).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes the frame at `at`, if one whole valid frame starts there.
fn frame_at(bytes: &[u8], at: usize) -> Option<(UsageRecord, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    if &header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[8..12].try_into().ok()?);
    if len > MAX_PAYLOAD {
        return None;
    }
    let payload = bytes.get(at + HEADER..at + HEADER + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let record = decode_value(payload).ok()?;
    Some((record, HEADER + len))
}

/// Every valid record of a segment's bytes, the damage, and where valid data ends.
fn scan(path: &Path, bytes: &[u8]) -> (Vec<UsageRecord>, Vec<Damage>, usize) {
    let mut records = Vec::new();
    let mut damage = Vec::new();
    let mut at = 0;
    let mut valid_end = 0;
    while at < bytes.len() {
        if let Some((record, len)) = frame_at(bytes, at) {
            records.push(record);
            at += len;
            valid_end = at;
            continue;
        }
        // Step over damage: the next magic whose frame checks out.
        let resume = (at + 1..bytes.len())
            .filter(|&i| bytes[i..].starts_with(MAGIC))
            .find(|&i| frame_at(bytes, i).is_some());
        let end = resume.unwrap_or(bytes.len());
        damage.push(Damage {
            segment: path.to_owned(),
            offset: at as u64,
            bytes: (end - at) as u64,
            torn_tail: resume.is_none(),
        });
        at = end;
    }
    (records, damage, valid_end)
}

fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (creating) the spool in `dir`, recovering from whatever a crash left.
    pub fn open(dir: &Path, limits: SpoolLimits) -> std::io::Result<(Self, Recovery)> {
        std::fs::create_dir_all(dir)?;
        let acked: Acked = match std::fs::read(dir.join("acked")) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Acked::default(),
            Err(e) => return Err(e),
        };
        // A finished merge whose originals may not all be gone yet.
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for path in &names {
            match path.extension().and_then(|e| e.to_str()) {
                Some("tmp") => std::fs::remove_file(path)?,
                Some("merging") => {
                    // Named `<first>-<last>.merging` after the originals' range.
                    let range = path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| s.split_once('-'))
                        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
                    let Some((lo, hi)) = range else {
                        std::fs::remove_file(path)?;
                        continue;
                    };
                    for other in &names {
                        if other.extension().is_some_and(|e| e == "seg") {
                            let (rs, _, _) = scan(other, &read_file(other)?);
                            if rs.iter().all(|r| r.seq >= lo && r.seq <= hi) {
                                std::fs::remove_file(other)?;
                            }
                        }
                    }
                    let (records, _, _) = scan(path, &read_file(path)?);
                    let first = records.first().map_or(lo, |r| r.seq);
                    std::fs::rename(path, dir.join(segment_name(first)))?;
                }
                _ => {}
            }
        }

        let mut segment_paths: Vec<PathBuf> = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segment_paths.sort();
        let mut recovery = Recovery {
            segments: segment_paths.len(),
            ..Default::default()
        };
        let mut segments = Vec::new();
        let mut max_seq = None;
        let count = segment_paths.len();
        for (i, path) in segment_paths.into_iter().enumerate() {
            let bytes = read_file(&path)?;
            let (records, damage, valid_end) = scan(&path, &bytes);
            let is_last = i + 1 == count;
            let mut size = bytes.len() as u64;
            if is_last && valid_end < bytes.len() && damage.last().is_some_and(|d| d.torn_tail) {
                // Cut the torn tail so that appends continue after the last whole frame.
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid_end as u64)?;
                f.sync_all()?;
                size = valid_end as u64;
            }
            recovery.damage.extend(damage);
            let last = records.iter().map(|r| r.seq).max();
            recovery.pending += records
                .iter()
                .filter(|r| acked.through.is_none_or(|a| r.seq > a))
                .count() as u64;
            max_seq = max_seq.max(last);
            segments.push(Segment {
                last,
                path,
                bytes: size,
            });
        }
        let next_seq = [max_seq, acked.through]
            .into_iter()
            .flatten()
            .max()
            .map_or(0, |s| s + 1);
        for d in &recovery.damage {
            tracing::warn!(segment = %d.segment.display(), offset = d.offset, bytes = d.bytes, torn_tail = d.torn_tail,
                "usage spool: damaged bytes skipped");
        }
        let mut spool = Self {
            dir: dir.to_owned(),
            limits,
            segments,
            writer: None,
            next_seq,
            acked: acked.through,
            merged_records: 0,
            discarded_records: recovery.damage.len() as u64,
            next_merge_at: limits.max_bytes,
        };
        spool.delete_acked_segments()?;
        Ok((spool, recovery))
    }

    /// A new epoch for this agent process: the current time, or one more than the last
    /// epoch if the clock went backwards, so that keys never repeat.
    pub fn new_epoch(&self, now_ms: i64) -> std::io::Result<u64> {
        let path = self.dir.join("epoch");
        let last = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok());
        let epoch = u64::try_from(now_ms)
            .unwrap_or(0)
            .max(last.map_or(0, |l| l + 1));
        write_atomic(&path, epoch.to_string().as_bytes(), 0o600)?;
        Ok(epoch)
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The spool's figures for the controller.
    pub fn state(&self) -> SpoolState {
        SpoolState {
            pending_records: self.pending_count(),
            bytes: self.bytes(),
            merged_records: self.merged_records,
            discarded_records: self.discarded_records,
        }
    }

    fn pending_count(&self) -> u64 {
        match (self.acked, self.next_seq) {
            (_, 0) => 0,
            (None, next) => next,
            (Some(a), next) => next.saturating_sub(a + 1),
        }
    }

    /// Appends `records`, numbering them (their `seq` is overwritten), and syncs them to
    /// disk before returning. Returns the records as numbered. On an error nothing is
    /// numbered (the caller keeps the records and tries again), and bytes a failed
    /// write may have left are skipped as damage when read.
    pub fn append(&mut self, mut records: Vec<UsageRecord>) -> std::io::Result<Vec<UsageRecord>> {
        if records.is_empty() {
            return Ok(records);
        }
        let (first_seq, segments) = (self.next_seq, self.segments.len());
        if let Err(e) = self.write(&mut records) {
            self.next_seq = first_seq;
            self.segments.truncate(segments);
            self.writer = None;
            return Err(e);
        }
        if self.bytes() > self.next_merge_at
            && let Err(e) = self.shrink()
        {
            // The records are on disk: merging is retried on a later append.
            tracing::error!(error = %e, "usage spool could not merge old records");
        }
        Ok(records)
    }

    fn write(&mut self, records: &mut [UsageRecord]) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        for r in records.iter_mut() {
            r.seq = self.next_seq;
            self.next_seq += 1;
            bytes.extend(frame(r)?);
        }
        let full = self
            .segments
            .last()
            .is_none_or(|s| s.bytes >= self.limits.segment_bytes);
        if full || self.writer.is_none() {
            self.writer = None;
            if full {
                self.segments.push(Segment {
                    last: None,
                    path: self.dir.join(segment_name(records[0].seq)),
                    bytes: 0,
                });
            }
            let seg = self.segments.last().expect("just ensured");
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&seg.path)?;
            if full {
                sync_dir(&self.dir)?;
            }
            self.writer = Some(file);
        }
        let file = self.writer.as_mut().expect("opened above");
        file.write_all(&bytes)?;
        file.sync_data()?;
        let seg = self.segments.last_mut().expect("a segment is open");
        seg.bytes += bytes.len() as u64;
        seg.last = records.last().map(|r| r.seq);
        Ok(())
    }

    /// Up to `max` unacknowledged records, oldest first.
    pub fn pending(&self, max: usize) -> std::io::Result<Vec<UsageRecord>> {
        let mut out = Vec::new();
        for seg in &self.segments {
            if out.len() >= max {
                break;
            }
            if seg.last.is_none_or(|l| self.acked.is_some_and(|a| l <= a)) {
                continue;
            }
            let bytes = match read_file(&seg.path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let (records, _, _) = scan(&seg.path, &bytes);
            out.extend(
                records
                    .into_iter()
                    .filter(|r| self.acked.is_none_or(|a| r.seq > a))
                    .take(max - out.len()),
            );
        }
        Ok(out)
    }

    /// Records that every record up to `through` is committed by the controller; deletes
    /// the segments that hold nothing else.
    pub fn ack(&mut self, through: u64) -> std::io::Result<()> {
        if self.acked.is_some_and(|a| a >= through) {
            return Ok(());
        }
        self.acked = Some(through);
        let body = serde_json::to_vec(&Acked {
            through: self.acked,
        })
        .map_err(std::io::Error::other)?;
        write_atomic(&self.dir.join("acked"), &body, 0o600)?;
        self.delete_acked_segments()
    }

    fn delete_acked_segments(&mut self) -> std::io::Result<()> {
        let Some(acked) = self.acked else {
            return Ok(());
        };
        let mut kept = Vec::with_capacity(self.segments.len());
        let count = self.segments.len();
        for (i, seg) in std::mem::take(&mut self.segments).into_iter().enumerate() {
            let done = seg.last.is_none_or(|l| l <= acked) && (seg.last.is_some() || i + 1 < count);
            if done {
                if i + 1 == count {
                    self.writer = None;
                }
                match std::fs::remove_file(&seg.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            } else {
                kept.push(seg);
            }
        }
        self.segments = kept;
        Ok(())
    }

    /// Merges every closed segment's pending records into one coarser segment.
    fn shrink(&mut self) -> std::io::Result<()> {
        let before = self.bytes();
        // Close the open segment so that everything written so far can be merged.
        self.writer = None;
        let olds: Vec<Segment> = std::mem::take(&mut self.segments);
        let mut records = Vec::new();
        for seg in &olds {
            let (rs, _, _) = scan(&seg.path, &read_file(&seg.path)?);
            records.extend(
                rs.into_iter()
                    .filter(|r| self.acked.is_none_or(|a| r.seq > a)),
            );
        }
        let count = records.len() as u64;
        let range = (
            records.first().map_or(0, |r| r.seq),
            records.last().map_or(0, |r| r.seq),
        );
        let merged = merge(records);
        let Some(first) = merged.first().map(|r| r.seq) else {
            self.segments = olds;
            return Ok(());
        };
        let last = merged.last().map(|r| r.seq);
        let mut bytes = Vec::new();
        for r in &merged {
            bytes.extend(frame(r)?);
        }
        let tmp = self.dir.join(format!("{first:020}.tmp"));
        let merging = self
            .dir
            .join(format!("{:020}-{:020}.merging", range.0, range.1));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &merging)?;
        sync_dir(&self.dir)?;
        for seg in &olds {
            std::fs::remove_file(&seg.path)?;
        }
        let path = self.dir.join(segment_name(first));
        std::fs::rename(&merging, &path)?;
        sync_dir(&self.dir)?;
        self.segments = vec![Segment {
            last,
            path,
            bytes: bytes.len() as u64,
        }];
        let folded = count - merged.len() as u64;
        self.merged_records += folded;
        let after = self.bytes();
        // Merging again before the spool grew by a quarter of its limit would only
        // spend disk writes: what is left cannot be merged further yet.
        self.next_merge_at = after + self.limits.max_bytes / 4;
        if after > self.limits.max_bytes {
            tracing::error!(
                bytes = after,
                limit = self.limits.max_bytes,
                "usage spool is over its limit even after merging; it keeps growing rather than dropping usage"
            );
        }
        tracing::warn!(
            records = count,
            merged_into = merged.len(),
            bytes_before = before,
            bytes_after = after,
            "usage spool reached its size limit; the oldest records were merged into coarser ones"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use surplus_protocol::usage::{Reading, Subject, meters};

    fn record(total: u64) -> UsageRecord {
        UsageRecord {
            epoch: 9,
            seq: 0,
            subject: Subject::Instance("i-00000000000000aa".into()),
            meter: meters::CPU_NS.into(),
            start_ms: 0,
            end_ms: 1000,
            reading: Reading::Counter {
                generation: 1,
                total,
            },
            samples: 1,
        }
    }

    fn open(dir: &Path) -> (Spool, Recovery) {
        Spool::open(dir, SpoolLimits::default()).unwrap()
    }

    fn totals(records: &[UsageRecord]) -> Vec<u64> {
        records
            .iter()
            .map(|r| match r.reading {
                Reading::Counter { total, .. } => total,
                Reading::Gauge { last, .. } => last,
            })
            .collect()
    }

    #[test]
    fn records_survive_a_reopen_and_leave_only_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = open(dir.path());
        let written = spool.append((0..5).map(record).collect()).unwrap();
        assert_eq!(
            written.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        spool.ack(2).unwrap();
        drop(spool);
        let (mut spool, recovery) = open(dir.path());
        assert_eq!(recovery.pending, 2);
        assert!(recovery.damage.is_empty());
        assert_eq!(totals(&spool.pending(10).unwrap()), [3, 4]);
        assert_eq!(spool.next_seq(), 5, "numbering continues after a restart");
        spool.ack(4).unwrap();
        assert!(spool.pending(10).unwrap().is_empty());
        let segs = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count();
        assert_eq!(segs, 0, "fully acknowledged segments are deleted");
        let again = spool.append(vec![record(9)]).unwrap();
        assert_eq!(again[0].seq, 5);
    }

    #[test]
    fn segments_rotate_and_are_deleted_only_when_every_record_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SpoolLimits {
            segment_bytes: 200,
            ..Default::default()
        };
        let (mut spool, _) = Spool::open(dir.path(), limits).unwrap();
        for i in 0..20 {
            spool.append(vec![record(i)]).unwrap();
        }
        assert!(
            spool.segments.len() > 3,
            "{} segments",
            spool.segments.len()
        );
        let first_seg_last = spool.segments[0].last.unwrap();
        spool.ack(first_seg_last - 1).unwrap();
        assert!(spool.segments[0].path.exists(), "one record still pending");
        spool.ack(first_seg_last).unwrap();
        assert_ne!(spool.segments[0].last, Some(first_seg_last));
        assert_eq!(
            spool.pending(100).unwrap().len() as u64,
            19 - first_seg_last
        );
    }

    #[test]
    fn a_torn_final_record_is_cut_off_and_every_earlier_record_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = open(dir.path());
        spool.append((0..4).map(record).collect()).unwrap();
        let seg = spool.segments[0].path.clone();
        drop(spool);
        // A crash halfway through writing the fifth frame.
        let half = &frame(&record(99)).unwrap()[..10];
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(half)
            .unwrap();
        let (mut spool, recovery) = open(dir.path());
        assert_eq!(recovery.pending, 4);
        assert_eq!(recovery.damage.len(), 1);
        assert!(recovery.damage[0].torn_tail);
        assert_eq!(recovery.damage[0].bytes, 10);
        assert_eq!(totals(&spool.pending(10).unwrap()), [0, 1, 2, 3]);
        // Appends continue after the last whole frame.
        spool.append(vec![record(4)]).unwrap();
        drop(spool);
        let (spool, recovery) = open(dir.path());
        assert!(recovery.damage.is_empty(), "{:?}", recovery.damage);
        assert_eq!(totals(&spool.pending(10).unwrap()), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_corrupted_middle_record_is_stepped_over_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = open(dir.path());
        spool.append((0..5).map(record).collect()).unwrap();
        let seg = spool.segments[0].path.clone();
        drop(spool);
        let mut bytes = std::fs::read(&seg).unwrap();
        let frame_len = frame(&record(0)).unwrap().len();
        // Flip a payload byte of the third record, and the magic of none.
        bytes[2 * frame_len + HEADER + 3] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let (spool, recovery) = open(dir.path());
        assert_eq!(recovery.damage.len(), 1);
        let d = &recovery.damage[0];
        assert!(!d.torn_tail);
        assert_eq!(d.offset, 2 * frame_len as u64);
        assert_eq!(d.bytes, frame_len as u64);
        assert_eq!(totals(&spool.pending(10).unwrap()), [0, 1, 3, 4]);
        assert_eq!(spool.state().discarded_records, 1);
        // A damaged length field too: the scan resynchronises on the next frame.
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[frame_len + 4] = 0xff;
        bytes[frame_len + 7] = 0x7f;
        std::fs::write(&seg, &bytes).unwrap();
        let (spool, recovery) = open(dir.path());
        assert_eq!(recovery.damage.len(), 1, "{:?}", recovery.damage);
        assert_eq!(totals(&spool.pending(10).unwrap()), [0, 3, 4]);
    }

    #[test]
    fn a_full_spool_merges_old_records_instead_of_dropping_them() {
        let dir = tempfile::tempdir().unwrap();
        let limits = SpoolLimits {
            max_bytes: 2_000,
            segment_bytes: 500,
        };
        let (mut spool, _) = Spool::open(dir.path(), limits).unwrap();
        for i in 0..200u64 {
            let mut gauge = record(i);
            gauge.meter = meters::MEMORY_BYTES.into();
            gauge.reading = Reading::Gauge {
                last: i,
                peak: i,
                mean: i,
            };
            spool.append(vec![record(i * 10), gauge]).unwrap();
        }
        assert!(spool.bytes() <= 2_000 + 500, "{} bytes", spool.bytes());
        let state = spool.state();
        assert!(state.merged_records > 300, "{state:?}");
        let pending = spool.pending(1000).unwrap();
        let last_counter = pending.iter().rfind(|r| r.meter == meters::CPU_NS).unwrap();
        assert_eq!(
            last_counter.reading,
            Reading::Counter {
                generation: 1,
                total: 1990
            },
            "the cumulative total survives"
        );
        let peak = pending
            .iter()
            .filter_map(|r| match r.reading {
                Reading::Gauge { peak, .. } => Some(peak),
                _ => None,
            })
            .max();
        assert_eq!(peak, Some(199));
        let samples: u32 = pending
            .iter()
            .filter(|r| r.meter == meters::CPU_NS)
            .map(|r| r.samples)
            .sum();
        assert_eq!(samples, 200, "every period is accounted for");
        // Sequence numbers stay unique and ascending across the merge, and a reopen
        // sees the merged segment.
        assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq));
        drop(spool);
        let (spool, recovery) = Spool::open(dir.path(), limits).unwrap();
        assert!(recovery.damage.is_empty());
        assert_eq!(spool.pending(1000).unwrap(), pending);
        assert_eq!(spool.next_seq(), 400);
    }

    #[test]
    fn an_interrupted_merge_is_finished_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = open(dir.path());
        spool.append((0..3).map(record).collect()).unwrap();
        let original = spool.segments[0].path.clone();
        drop(spool);
        // The merged copy was renamed into place but the original not yet deleted.
        let merged = merge(
            (0..3)
                .map(|i| UsageRecord {
                    seq: i,
                    ..record(i)
                })
                .collect(),
        );
        let mut bytes = Vec::new();
        for r in &merged {
            bytes.extend(frame(r).unwrap());
        }
        std::fs::write(
            dir.path().join(format!("{:020}-{:020}.merging", 0, 2)),
            bytes,
        )
        .unwrap();
        let (spool, _) = open(dir.path());
        assert!(!original.exists());
        assert_eq!(totals(&spool.pending(10).unwrap()), [2]);
    }
}
