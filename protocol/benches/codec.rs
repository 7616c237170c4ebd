//! `cargo bench -p surplus-protocol --bench codec`: encode plus decode of the two
//! messages every agent sends most, a heartbeat and a 1,000-record usage batch, through
//! the real frame codec (bincode 2, header, length check) and, for comparison, through
//! serde_json on the same envelope. Numbers go to docs/PERFORMANCE.md.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use surplus_protocol::codec::{HEADER_LEN, decode_payload, encode_frame};
use surplus_protocol::messages::{Envelope, Heartbeat, Message};
use surplus_protocol::usage::{Reading, SpoolState, Subject, UsageBatch, UsageRecord, meters};
use surplus_protocol::{DEFAULT_MAX_FRAME, PROTOCOL_VERSION};

fn heartbeat() -> Message {
    Message::Heartbeat(Heartbeat {
        seq: 8_640,
        sent_at_ms: 1_795_000_000_000,
        uptime_secs: 86_400 * 12,
        load_avg_1m: 0.42,
        memory_used_bytes: 7 << 30,
        inventory_digest: [0xa5; 32],
    })
}

/// A realistic batch: per-instance counters and gauges of ten instances, the host's
/// meters, a minute apart.
fn usage_batch(records: usize) -> Message {
    let instance_meters = [
        (meters::CPU_NS, true),
        (meters::MEMORY_BYTES, false),
        (meters::MEMORY_BYTE_MS, true),
        (meters::DISK_READ_BYTES, true),
        (meters::DISK_WRITE_BYTES, true),
        (meters::NET_RX_BYTES, true),
        (meters::NET_TX_BYTES, true),
        (meters::STATE_MS_RUNNING, true),
    ];
    let records = (0..records)
        .map(|i| {
            let (meter, counter) = instance_meters[i % instance_meters.len()];
            let start_ms = 1_795_000_000_000 + (i as i64 / 80) * 60_000;
            UsageRecord {
                epoch: 0x1234_5678_9abc,
                seq: 1_000_000 + i as u64,
                subject: Subject::Instance(format!("i-0198a1b2c3d4e5f6{:04x}", i / 8 % 10)),
                meter: meter.to_owned(),
                start_ms,
                end_ms: start_ms + 60_000,
                reading: if counter {
                    Reading::Counter {
                        generation: 4_026_531_840 + (i as u64 % 10),
                        total: 123_456_789_012 + i as u64 * 1_000_003,
                    }
                } else {
                    Reading::Gauge {
                        last: 512 << 20,
                        peak: 700 << 20,
                        mean: 600 << 20,
                    }
                },
                samples: 1,
            }
        })
        .collect();
    Message::UsageBatch(UsageBatch {
        records,
        spool: SpoolState {
            pending_records: 4_000,
            bytes: 1 << 20,
            ..SpoolState::default()
        },
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for (name, message) in [
        ("heartbeat", heartbeat()),
        ("usage_batch_1000", usage_batch(1000)),
    ] {
        let envelope = Envelope {
            version: PROTOCOL_VERSION,
            message: message.clone(),
        };
        let frame = encode_frame(&message, DEFAULT_MAX_FRAME).expect("encodes");
        let json = serde_json::to_vec(&envelope).expect("json encodes");
        println!(
            "{name}: bincode frame {} bytes, serde_json {} bytes",
            frame.len(),
            json.len()
        );
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("bincode", name), &message, |b, m| {
            b.iter(|| {
                let frame = encode_frame(black_box(m), DEFAULT_MAX_FRAME).expect("encodes");
                decode_payload(&frame[HEADER_LEN..]).expect("decodes")
            })
        });
        group.bench_with_input(BenchmarkId::new("serde_json", name), &envelope, |b, e| {
            b.iter(|| {
                let bytes = serde_json::to_vec(black_box(e)).expect("encodes");
                serde_json::from_slice::<Envelope>(&bytes).expect("decodes")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
