//! The one codec: bincode configuration, envelope versioning and framing.
//!
//! A frame is a big-endian `u32` payload length followed by the payload, a bincode
//! encoding of an [`Envelope`] under [`config`]. The payload starts with the sender's
//! protocol version, which is checked before the rest is decoded, so a peer of another
//! version gets [`FrameError::VersionMismatch`], not a garbled message.
//!
//! Changing the wire format (another serializer, other options) is a change to this
//! file only. The byte fixtures in the tests below fail on any accidental change.

use bincode::config::{Configuration, Limit, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::PROTOCOL_VERSION;
use crate::messages::{Envelope, Message};

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// Hard ceiling for any decode, whatever the configured frame limit: bincode refuses to
/// allocate beyond it even if a length field inside a payload claims more.
pub const DECODE_LIMIT: usize = 64 << 20;

type WireConfig = Configuration<bincode::config::LittleEndian, Varint, Limit<DECODE_LIMIT>>;

/// The pinned bincode configuration.
pub const fn config() -> WireConfig {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// What can go wrong turning bytes into messages and back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The frame's declared payload length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared or actual payload length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid envelope.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks version {theirs}, this side speaks {ours}")]
    VersionMismatch {
        /// The peer's version.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// A value could not be encoded (a bug, not a peer's fault).
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Encodes any serde value under the pinned configuration (no framing).
pub fn encode_value<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes a value encoded by [`encode_value`]; trailing bytes are an error.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the value",
            bytes.len() - used
        )));
    }
    Ok(value)
}

/// A whole frame (header and payload) carrying `message` at [`PROTOCOL_VERSION`].
pub fn encode_frame(message: &Message, max_frame: usize) -> Result<Vec<u8>, FrameError> {
    encode_envelope(
        &Envelope {
            version: PROTOCOL_VERSION,
            message: message.clone(),
        },
        max_frame,
    )
}

/// A whole frame carrying `envelope` as it is (tests use it to speak other versions).
pub fn encode_envelope(envelope: &Envelope, max_frame: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0; HEADER_LEN];
    bincode::serde::encode_into_std_write(envelope, &mut out, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame,
        });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The payload length a header declares, checked against `max_frame`.
pub fn payload_len(header: [u8; HEADER_LEN], max_frame: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame,
        });
    }
    Ok(len)
}

/// Decodes one payload: version first, then the message; trailing bytes are an error.
pub fn decode_payload(payload: &[u8]) -> Result<Envelope, FrameError> {
    let (version, used): (u16, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| FrameError::Malformed(format!("no version: {e}")))?;
    if version != PROTOCOL_VERSION {
        return Err(FrameError::VersionMismatch {
            theirs: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let message: Message = decode_value(&payload[used..])?;
    Ok(Envelope { version, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::*;
    use crate::inventory::*;
    use crate::messages::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn frame(m: &Message) -> Vec<u8> {
        encode_frame(m, crate::DEFAULT_MAX_FRAME).unwrap()
    }

    /// What `quic::read_frame` does with a stream's bytes: the header against the
    /// limit, then the payload. `Ok(None)`: the bytes end before the frame does.
    fn read(bytes: &[u8], max_frame: usize) -> Result<Option<(Envelope, usize)>, FrameError> {
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = payload_len(header.try_into().expect("four bytes"), max_frame)?;
        let Some(payload) = bytes.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        decode_payload(payload).map(|e| Some((e, HEADER_LEN + len)))
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Byte fixtures: a change here is a wire change and needs a PROTOCOL_VERSION bump.
    #[test]
    fn wire_fixtures_are_stable() {
        let cases: Vec<(Message, &str)> = vec![
            (
                Message::error(ErrorCode::TokenUsed, "used"),
                "000000080200030475736564",
            ),
            (
                Message::Hello(Hello {
                    protocol_version: 2,
                    agent_version: "0.1.0".into(),
                    boot_epoch: 1_700_000_000,
                    isolation: None,
                }),
                "0000000f02010205302e312e30fc00f1536500",
            ),
            (
                Message::Heartbeat(Heartbeat {
                    seq: 3,
                    sent_at_ms: 1_700_000_000_000,
                    uptime_secs: 60,
                    load_avg_1m: 0.5,
                    memory_used_bytes: 1024,
                    inventory_digest: [0xab; 32],
                }),
                "00000038020503fd00d0ca9f170300003c000000000000e03ffb0004abababababababababababababababababababababababababababababababab",
            ),
            (Message::Ping(Ping { nonce: 42 }), "00000003020b2a"),
            (
                Message::HelloAck(HelloAck {
                    protocol_version: 1,
                    controller_version: "0.1.0".into(),
                    agent_id: Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
                    server_time_ms: 5,
                    heartbeat_interval_ms: 10_000,
                }),
                "0000001e02020105302e312e30100123456789abcdef0123456789abcdef0afb1027",
            ),
            (
                Message::Control(crate::control::Command::Lifecycle {
                    op: crate::control::Lifecycle::Stop,
                    ids: vec!["i-0123456789abcdef".into()],
                }),
                "00000018021401010112692d30313233343536373839616263646566",
            ),
            (
                Message::UsageBatch(crate::usage::UsageBatch {
                    records: vec![crate::usage::UsageRecord {
                        epoch: 7,
                        seq: 1,
                        subject: crate::usage::Subject::Instance("i-0123456789abcdef".into()),
                        meter: "cpu_ns".into(),
                        start_ms: 60_000,
                        end_ms: 120_000,
                        reading: crate::usage::Reading::Counter {
                            generation: 2,
                            total: 1_000,
                        },
                        samples: 1,
                    }],
                    spool: crate::usage::SpoolState::default(),
                }),
                "0000003402180107010112692d30313233343536373839616263646566066370755f6e73fcc0d40100fc80a903000002fbe8030100000000",
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(
                hex(&frame(&message)),
                expected,
                "fixture of {}",
                message.kind()
            );
            let (env, _) = read(&frame(&message), 1 << 20).unwrap().unwrap();
            assert_eq!(env.message, message);
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        assert_eq!(
            read(&101u32.to_be_bytes(), 100),
            Err(FrameError::TooLarge { len: 101, max: 100 })
        );
        let big = Message::error(ErrorCode::Internal, "x".repeat(200));
        assert!(matches!(
            encode_frame(&big, 100),
            Err(FrameError::TooLarge { max: 100, .. })
        ));
    }

    #[test]
    fn garbage_is_malformed_and_other_versions_are_named() {
        assert!(matches!(
            read(&[0, 0, 0, 3, PROTOCOL_VERSION as u8, 0xff, 0xff], 1 << 20),
            Err(FrameError::Malformed(_))
        ));

        let other = Envelope {
            version: 9,
            message: Message::Ping(Ping { nonce: 1 }),
        };
        assert_eq!(
            read(&encode_envelope(&other, 1 << 20).unwrap(), 1 << 20),
            Err(FrameError::VersionMismatch {
                theirs: 9,
                ours: PROTOCOL_VERSION
            })
        );

        let mut trailing = frame(&Message::Ping(Ping { nonce: 1 }));
        trailing.push(0);
        trailing[3] += 1;
        assert!(matches!(
            read(&trailing, 1 << 20),
            Err(FrameError::Malformed(_))
        ));
    }

    fn text() -> impl Strategy<Value = String> {
        "[ -~]{0,24}"
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(text())
    }

    fn inventory() -> impl Strategy<Value = Inventory> {
        (
            any::<i64>(),
            opt_text(),
            (
                opt_text(),
                any::<u32>(),
                proptest::collection::vec(text(), 0..4),
            ),
            (any::<u64>(), any::<u64>()),
            proptest::collection::vec(
                (text(), opt_text(), proptest::option::of(any::<bool>())),
                0..3,
            ),
            proptest::collection::vec(
                (text(), opt_text(), proptest::option::of(any::<u32>())),
                0..3,
            ),
            proptest::option::of((any::<u32>(), proptest::option::of(any::<u32>()))),
        )
            .prop_map(
                |(at, host, (brand, cpus, flags), (mem, swap), disks, nics, pk)| Inventory {
                    collected_at_ms: at,
                    hostname: host,
                    cpu: CpuInfo {
                        brand,
                        logical_cpus: cpus,
                        flags,
                        caches: vec![CacheInfo {
                            level: 1,
                            kind: "Data".into(),
                            size_bytes: 32768,
                            shared_by_cpus: Some(2),
                        }],
                        ..Default::default()
                    },
                    memory: MemoryInfo {
                        total_bytes: mem,
                        swap_total_bytes: swap,
                    },
                    disks: disks
                        .into_iter()
                        .map(|(device, model, rotational)| Disk {
                            device,
                            model,
                            rotational,
                            mounts: vec![Mount {
                                mount_point: "/".into(),
                                filesystem: "ext4".into(),
                                total_bytes: 1,
                            }],
                            ..Default::default()
                        })
                        .collect(),
                    nics: nics
                        .into_iter()
                        .map(|(name, mac, speed_mbps)| Nic {
                            name,
                            mac,
                            speed_mbps,
                            ..Default::default()
                        })
                        .collect(),
                    packages: pk.map(|(installed, pending)| PackageInfo {
                        manager: "dpkg".into(),
                        installed,
                        pending_updates: pending,
                        pending_security_updates: None,
                    }),
                    ..Default::default()
                },
            )
    }

    fn issued() -> impl Strategy<Value = IssuedCertificate> {
        (text(), text(), any::<i64>(), any::<i64>()).prop_map(|(cert_pem, serial, a, b)| {
            IssuedCertificate {
                cert_pem,
                serial,
                issued_at_ms: a,
                not_after_ms: b,
            }
        })
    }

    fn error_code() -> impl Strategy<Value = ErrorCode> {
        prop_oneof![
            Just(ErrorCode::VersionMismatch),
            Just(ErrorCode::TokenUnknown),
            Just(ErrorCode::TokenExpired),
            Just(ErrorCode::TokenUsed),
            Just(ErrorCode::CsrRejected),
            Just(ErrorCode::Unexpected),
            Just(ErrorCode::Revoked),
            Just(ErrorCode::Internal),
            Just(ErrorCode::Busy),
        ]
    }

    /// Every variant of [`Message`]; the match in `kind()` keeps this list honest.
    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (error_code(), text())
                .prop_map(|(code, message)| Message::Error(ErrorReply { code, message })),
            (
                any::<u16>(),
                text(),
                any::<u64>(),
                proptest::option::of(isolation())
            )
                .prop_map(|(p, v, b, isolation)| Message::Hello(Hello {
                    protocol_version: p,
                    agent_version: v,
                    boot_epoch: b,
                    isolation,
                })),
            (
                any::<u16>(),
                text(),
                any::<u128>(),
                any::<i64>(),
                any::<u64>()
            )
                .prop_map(|(p, v, id, t, hb)| Message::HelloAck(HelloAck {
                    protocol_version: p,
                    controller_version: v,
                    agent_id: Uuid::from_u128(id),
                    server_time_ms: t,
                    heartbeat_interval_ms: hb
                })),
            (any::<u16>(), any::<[u8; 32]>(), text(), text(), text()).prop_map(
                |(p, s, c, h, v)| {
                    Message::EnrollRequest(EnrollRequest {
                        protocol_version: p,
                        token_secret: s,
                        csr_pem: c,
                        hostname: h,
                        agent_version: v,
                    })
                }
            ),
            (
                any::<u128>(),
                issued(),
                text(),
                proptest::collection::vec(text(), 0..3),
                text()
            )
                .prop_map(
                    |(id, certificate, ca_pem, controller_addresses, server_name)| {
                        Message::Enrolled(Enrolled {
                            agent_id: Uuid::from_u128(id),
                            certificate,
                            ca_pem,
                            controller_addresses,
                            server_name,
                        })
                    }
                ),
            (
                any::<u64>(),
                any::<i64>(),
                any::<u64>(),
                -1e9f64..1e9,
                any::<u64>(),
                any::<[u8; 32]>()
            )
                .prop_map(
                    |(
                        seq,
                        sent_at_ms,
                        uptime_secs,
                        load_avg_1m,
                        memory_used_bytes,
                        inventory_digest,
                    )| {
                        Message::Heartbeat(Heartbeat {
                            seq,
                            sent_at_ms,
                            uptime_secs,
                            load_avg_1m,
                            memory_used_bytes,
                            inventory_digest,
                        })
                    }
                ),
            (any::<i64>(), any::<bool>()).prop_map(|(t, w)| Message::HeartbeatAck(HeartbeatAck {
                server_time_ms: t,
                inventory_wanted: w
            })),
            inventory().prop_map(|i| Message::InventoryReport(Box::new(i))),
            any::<bool>().prop_map(|changed| Message::InventoryAck(InventoryAck { changed })),
            text().prop_map(|csr_pem| Message::RenewRequest(RenewRequest { csr_pem })),
            issued().prop_map(Message::Renewed),
            any::<u64>().prop_map(|nonce| Message::Ping(Ping { nonce })),
            any::<u64>().prop_map(|nonce| Message::Pong(Pong { nonce })),
            (
                any::<u128>(),
                proptest::option::of((any::<u64>(), any::<u32>(), any::<bool>(), any::<u64>())),
                any::<bool>()
            )
                .prop_map(|(id, bench, security)| Message::RunValidation(
                    ValidationRequest {
                        run_id: Uuid::from_u128(id),
                        bench: bench.map(|(budget_ms, repetitions, quick, network_bytes)| {
                            BenchRequest {
                                budget_ms,
                                repetitions,
                                quick,
                                network_bytes,
                            }
                        }),
                        security,
                    }
                )),
            (any::<u128>(), any::<u32>(), any::<u32>(), text()).prop_map(
                |(id, done, total, step)| Message::ValidationProgress(ValidationProgress {
                    run_id: Uuid::from_u128(id),
                    done,
                    total,
                    step
                })
            ),
            (
                any::<u128>(),
                text(),
                any::<bool>(),
                any::<u8>(),
                0.0f64..1e9
            )
                .prop_map(|(id, agent_version, cancelled, index, value)| {
                    Message::ValidationResult(Box::new(ValidationReport {
                        run_id: Uuid::from_u128(id),
                        agent_version,
                        bench: Some(crate::bench::BenchReport {
                            plan: crate::bench::BenchPlan::default(),
                            results: vec![crate::bench::BenchResult {
                                id: "cpu.int.single".into(),
                                unit: "Mops/s".into(),
                                value,
                                repetitions: vec![value],
                                cv: 0.0,
                                reference: 1.0,
                                score: value,
                                duration_ms: 1,
                                note: None,
                            }],
                            cache_levels_bytes: vec![32768],
                            composite_score: value,
                            skipped: vec![],
                            cancelled,
                            duration_ms: 2,
                        }),
                        security: Some(crate::security::SecurityReport {
                            root: "/".into(),
                            live: true,
                            findings: vec![],
                            hardening_index: index.min(100),
                            band: "good".into(),
                        }),
                        cancelled,
                    }))
                }),
            any::<u128>().prop_map(|id| Message::CancelValidation(CancelValidation {
                run_id: Uuid::from_u128(id)
            })),
            (any::<u128>(), any::<bool>()).prop_map(|(id, was_running)| Message::CancelAck(
                CancelAck {
                    run_id: Uuid::from_u128(id),
                    was_running
                }
            )),
            proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|data| Message::NetworkProbe(NetworkProbe { data })),
            any::<u64>()
                .prop_map(|received| Message::NetworkProbeAck(NetworkProbeAck { received })),
            command().prop_map(Message::Control),
            control_result().prop_map(Message::ControlResult),
            (text(), any::<bool>(), opt_text(), any::<i64>(), isolation()).prop_map(
                |(driver, passed, message, at, isolation)| {
                    let checks = vec![CompatCheck {
                        operation: "run".into(),
                        passed,
                        message,
                    }];
                    Message::CompatReport(CompatReport {
                        driver,
                        level: compat_level(&checks),
                        checks,
                        isolation,
                        ran_at_ms: at,
                    })
                }
            ),
            any::<u128>().prop_map(|id| Message::CompatAck(CompatAck {
                agent_id: Uuid::from_u128(id)
            })),
            proptest::collection::vec(usage_record(), 0..4).prop_map(|records| {
                Message::UsageBatch(crate::usage::UsageBatch {
                    records,
                    spool: crate::usage::SpoolState {
                        pending_records: 3,
                        bytes: 4096,
                        merged_records: 0,
                        discarded_records: 1,
                    },
                })
            }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
                |(stored, duplicates, rejected)| {
                    Message::UsageAck(crate::usage::UsageAck {
                        stored,
                        duplicates,
                        rejected,
                    })
                }
            ),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| {
                Message::SetMetering(crate::usage::MeteringPeriods {
                    instance_ms: a,
                    host_ms: b,
                    subscription_ms: c,
                })
            }),
            (any::<u64>(), any::<i64>()).prop_map(|(a, at)| {
                Message::MeteringAck(crate::usage::MeteringAck {
                    periods: crate::usage::MeteringPeriods {
                        instance_ms: a,
                        ..Default::default()
                    },
                    effective_from_ms: at,
                })
            }),
            (
                proptest::option::of(any::<u32>()),
                proptest::option::of(text())
            )
                .prop_map(|(count, instance)| Message::Reclaim(ReclaimRequest { count, instance })),
            (any::<u128>(), any::<i64>(), text()).prop_map(|(id, at, why)| {
                Message::ReclaimResult(if at % 2 == 0 {
                    Ok(vec![Reclaimed {
                        reservation: uuid::Uuid::from_u128(id),
                        deadline_ms: at,
                    }])
                } else {
                    Err(why)
                })
            }),
            (any::<u64>(), text(), any::<i64>(), any::<u64>()).prop_map(
                |(seq, user, at, units)| {
                    Message::Peer(Box::new(crate::peer::PeerMessage::Usage(
                        crate::peer::UsageBatch {
                            rows: vec![crate::peer::PeerUsageRow {
                                seq,
                                resource: "os_instances".into(),
                                user,
                                minute_ms: at,
                                unit_ms: units,
                            }],
                        },
                    )))
                }
            ),
        ]
    }

    fn usage_record() -> impl Strategy<Value = crate::usage::UsageRecord> {
        use crate::usage::{Reading, Subject, UsageRecord};
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(text()),
            text(),
            any::<i64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(
                |(epoch, seq, instance, meter, start_ms, counter, a, b, samples)| UsageRecord {
                    epoch,
                    seq,
                    subject: instance.map_or(Subject::Host, Subject::Instance),
                    meter,
                    start_ms,
                    end_ms: start_ms.saturating_add(1000),
                    reading: if counter {
                        Reading::Counter {
                            generation: a,
                            total: b,
                        }
                    } else {
                        Reading::Gauge {
                            last: a,
                            peak: b,
                            mean: a / 2,
                        }
                    },
                    samples,
                },
            )
    }

    fn labels() -> impl Strategy<Value = std::collections::BTreeMap<String, String>> {
        proptest::collection::btree_map(text(), text(), 0..3)
    }

    fn limits() -> impl Strategy<Value = Limits> {
        (
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(millicpus, memory_bytes, pids)| Limits {
                millicpus,
                memory_bytes,
                pids,
            })
    }

    fn isolation() -> impl Strategy<Value = Isolation> {
        (
            text(),
            any::<[bool; 5]>(),
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<u32>()),
            proptest::collection::vec(text(), 0..2),
        )
            .prop_map(
                |(driver, b, user_namespaces, default_pids, notes)| Isolation {
                    driver,
                    host_user: b[0],
                    own_user: b[1],
                    capabilities_dropped: b[2],
                    user_namespaces,
                    default_pids,
                    volume_sizes_enforced: b[3],
                    syscall_filter: b[4],
                    notes,
                },
            )
    }

    fn run_spec() -> impl Strategy<Value = RunSpec> {
        (
            opt_text(),
            opt_text(),
            proptest::collection::vec(text(), 0..3),
            labels(),
            limits(),
            labels(),
            any::<(u16, u16, bool)>(),
            text(),
        )
            .prop_map(
                |(name, image, command, env, limits, labels, (h, i, udp), mount)| RunSpec {
                    name,
                    image,
                    command,
                    env,
                    limits,
                    ports: vec![PortMapping {
                        host_port: h,
                        instance_port: i,
                        protocol: if udp {
                            PortProtocol::Udp
                        } else {
                            PortProtocol::Tcp
                        },
                    }],
                    labels,
                    volumes: vec![VolumeAttachment {
                        volume_id: mount.clone(),
                        mount_path: mount,
                    }],
                },
            )
    }

    fn instance_state() -> impl Strategy<Value = InstanceState> {
        proptest::sample::select(InstanceState::ALL.to_vec())
    }

    fn command() -> impl Strategy<Value = Command> {
        let lifecycle = proptest::sample::select(vec![
            Lifecycle::Start,
            Lifecycle::Stop,
            Lifecycle::Reboot,
            Lifecycle::Terminate,
        ]);
        prop_oneof![
            (text(), run_spec())
                .prop_map(|(instance_id, spec)| Command::RunInstances { instance_id, spec }),
            (lifecycle, proptest::collection::vec(text(), 0..3))
                .prop_map(|(op, ids)| Command::Lifecycle { op, ids }),
            (
                proptest::collection::vec(text(), 0..3),
                proptest::collection::vec(instance_state(), 0..3),
                labels()
            )
                .prop_map(|(ids, states, labels)| Command::DescribeInstances(
                    Filters {
                        ids,
                        states,
                        labels
                    }
                )),
            proptest::collection::vec(text(), 0..3)
                .prop_map(|ids| Command::DescribeInstanceStatus { ids }),
            text().prop_map(|instance_id| Command::DescribeInstanceAttribute {
                instance_id,
                attribute: AttributeName::Ports
            }),
            (
                text(),
                proptest::option::of(limits()),
                proptest::option::of(labels())
            )
                .prop_map(|(instance_id, limits, labels)| {
                    Command::ModifyInstanceAttribute {
                        instance_id,
                        limits,
                        labels,
                    }
                }),
            (text(), opt_text(), any::<u64>()).prop_map(|(volume_id, name, size_bytes)| {
                Command::CreateVolume {
                    volume_id,
                    name,
                    size_bytes,
                }
            }),
            text().prop_map(|volume_id| Command::DeleteVolume { volume_id }),
            proptest::collection::vec(text(), 0..3)
                .prop_map(|ids| Command::DescribeVolumes { ids }),
            (text(), text()).prop_map(|(volume_id, snapshot_id)| Command::CreateSnapshot {
                volume_id,
                snapshot_id
            }),
            (text(), any::<u32>()).prop_map(|(instance_id, max_bytes)| Command::ReadLogs {
                instance_id,
                max_bytes
            }),
        ]
    }

    fn control_result() -> impl Strategy<Value = Result<ControlReply, ControlFailure>> {
        prop_oneof![
            (
                text(),
                run_spec(),
                instance_state(),
                opt_text(),
                any::<(i64, i64)>()
            )
                .prop_map(|(id, spec, state, reason, (a, b))| {
                    Ok(ControlReply::Instances(vec![Instance {
                        id,
                        spec,
                        state,
                        state_reason: reason.clone(),
                        driver: "process".into(),
                        native_id: reason,
                        launched_at_ms: a,
                        state_changed_at_ms: b,
                    }]))
                }),
            (text(), instance_state(), instance_state()).prop_map(
                |(instance_id, previous, current)| {
                    Ok(ControlReply::StateChanges(vec![StateChange {
                        instance_id,
                        previous,
                        current,
                    }]))
                }
            ),
            (
                text(),
                instance_state(),
                proptest::option::of(any::<i32>()),
                limits(),
                proptest::option::of(any::<u32>())
            )
                .prop_map(|(instance_id, state, exit_code, applied, processes)| {
                    Ok(ControlReply::Statuses(vec![InstanceStatus {
                        instance_id,
                        state,
                        state_reason: None,
                        exit_code,
                        applied,
                        processes,
                    }]))
                }),
            (text(), labels()).prop_map(|(instance_id, l)| Ok(ControlReply::Attribute {
                instance_id,
                value: AttributeValue::Labels(l)
            })),
            (
                text(),
                any::<u64>(),
                proptest::option::of(any::<u64>()),
                opt_text(),
                any::<i64>()
            )
                .prop_map(|(id, size_bytes, used_bytes, attached_to, at)| Ok(
                    ControlReply::Volumes(vec![Volume {
                        id,
                        name: None,
                        size_bytes,
                        used_bytes,
                        state: VolumeState::InUse,
                        attached_to,
                        native_id: None,
                        created_at_ms: at,
                    }])
                )),
            (text(), text(), any::<u64>(), any::<i64>()).prop_map(
                |(id, volume_id, size_bytes, at)| {
                    Ok(ControlReply::Snapshot(Snapshot {
                        id,
                        volume_id,
                        size_bytes,
                        location: "/x".into(),
                        created_at_ms: at,
                    }))
                }
            ),
            (text(), text(), text(), any::<bool>()).prop_map(
                |(instance_id, stdout, stderr, truncated)| {
                    Ok(ControlReply::Logs(InstanceLogs {
                        instance_id,
                        stdout,
                        stderr,
                        truncated,
                    }))
                }
            ),
            (opt_text(), text()).prop_map(|(field, message)| Err(ControlFailure {
                kind: FailureKind::NotFound,
                field,
                message
            })),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in message()) {
            let bytes = frame(&m);
            let (env, used) = read(&bytes, 1 << 20).unwrap().unwrap();
            prop_assert_eq!(env.version, PROTOCOL_VERSION);
            prop_assert_eq!(env.message, m);
            prop_assert_eq!(used, bytes.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_overrun(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            match read(&bytes, 128) {
                Ok(None) => {
                    let declared = bytes.get(..4).map(|h| u32::from_be_bytes(h.try_into().unwrap()) as usize);
                    prop_assert!(declared.is_none_or(|len| bytes.len() < HEADER_LEN + len), "incomplete only when short");
                }
                Ok(Some((env, used))) => {
                    // What decodes re-encodes to exactly the bytes it came from.
                    let again = encode_envelope(&env, 128).unwrap();
                    prop_assert_eq!(&again[..], &bytes[..used]);
                }
                Err(FrameError::Malformed(_)) | Err(FrameError::VersionMismatch { .. }) => {
                    let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
                    prop_assert!(len <= 128 && bytes.len() >= HEADER_LEN + len);
                }
                Err(FrameError::TooLarge { len, max }) => prop_assert!(len > max),
                Err(FrameError::Encode(_)) => prop_assert!(false, "decoding never encodes"),
            }
        }
    }
}
