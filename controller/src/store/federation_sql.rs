//! The SQL of federation (issue 18), written once for both backends as `sql.rs` is:
//! [`federation_sql!`] expands to `FederationStore` for one backend's store type, in
//! the module where `sql_stores!` expanded.
//!
//! The usage exchange is exactly-once by its sequence numbers: a host cloud makes a
//! peer's rows and moves its export cursor in one transaction (so a minute is made
//! once however often export runs or crashes), and a broker stores what
//! `surplus_market::exchange::accept` keeps and moves its received cursor in one
//! transaction, under the peer row's lock.

macro_rules! federation_sql {
    ($store:ident, $row:ty) => {
        fn stored_peer(row: &$row) -> Result<StoredPeer, StoreError> {
            let role: String = row.try_get("role")?;
            let our_role: String = row.try_get("our_role")?;
            let seq = |c: &str| -> Result<u64, StoreError> { Ok(row.try_get::<i64, _>(c)?.max(0) as u64) };
            Ok(StoredPeer {
                id: parse_uuid(row.try_get("id")?)?,
                name: row.try_get("name")?,
                role: surplus_protocol::peer::PeerRole::parse(&role)
                    .ok_or_else(|| StoreError::Corrupt(format!("peer role {role:?}")))?,
                our_role: surplus_protocol::peer::PeerRole::parse(&our_role)
                    .ok_or_else(|| StoreError::Corrupt(format!("peer role {our_role:?}")))?,
                ca_pem: row.try_get("ca_pem")?,
                fingerprint: row.try_get("fingerprint")?,
                addresses: parse_json(row.try_get("addresses")?, "peer addresses")?,
                server_name: row.try_get("server_name")?,
                dials: row.try_get::<i64, _>("dials")? != 0,
                joined_at_ms: row.try_get("joined_at_ms")?,
                removed_at_ms: row.try_get("removed_at_ms")?,
                last_seen_ms: row.try_get("last_seen_ms")?,
                out_seq: seq("out_seq")?,
                acked_seq: seq("acked_seq")?,
                in_seq: seq("in_seq")?,
            })
        }

        fn peer_usage_row(row: &$row) -> Result<surplus_protocol::peer::PeerUsageRow, StoreError> {
            Ok(surplus_protocol::peer::PeerUsageRow {
                seq: row.try_get::<i64, _>("seq")?.max(0) as u64,
                user: row.try_get("user_name")?,
                resource: row.try_get("resource")?,
                minute_ms: row.try_get("minute_ms")?,
                unit_ms: row.try_get::<i64, _>("unit_ms")?.max(0) as u64,
            })
        }

        fn seq_value(v: u64) -> i64 {
            i64::try_from(v).unwrap_or(i64::MAX)
        }

        fn stored_bundle(row: &$row) -> Result<StoredBundle, StoreError> {
            Ok(StoredBundle {
                id: parse_uuid(row.try_get("id")?)?,
                resource: row.try_get("resource")?,
                amount: row.try_get::<i64, _>("amount")?.max(0) as u64,
                from_ms: row.try_get("from_ms")?,
                until_ms: row.try_get("until_ms")?,
                price: row.try_get::<i64, _>("price")?.max(0) as u64,
                currency: row.try_get("currency")?,
                arrangement: parse_json(row.try_get("arrangement")?, "bundle arrangement")?,
                contributors: parse_json(row.try_get("contributors")?, "bundle contributors")?,
                created_at_ms: row.try_get("created_at_ms")?,
                settled_at_ms: row.try_get("settled_at_ms")?,
                reported_through_ms: row.try_get("reported_through_ms")?,
            })
        }

        fn stored_tender(row: &$row) -> Result<StoredTender, StoreError> {
            let bundle: Option<String> = row.try_get("bundle")?;
            Ok(StoredTender {
                offer: parse_json(row.try_get("offer")?, "tender offer")?,
                direction: row.try_get("direction")?,
                bundle: bundle.as_deref().map(parse_uuid).transpose()?,
                peer: parse_uuid(row.try_get("peer")?)?,
                state: row.try_get("state")?,
                accepted_amount: row.try_get::<i64, _>("accepted_amount")?.max(0) as u64,
                price: row.try_get::<i64, _>("price")?.max(0) as u64,
                reason: row.try_get("reason")?,
                created_at_ms: row.try_get("created_at_ms")?,
                answered_at_ms: row.try_get("answered_at_ms")?,
            })
        }

        fn money(v: u64) -> i64 {
            i64::try_from(v).unwrap_or(i64::MAX)
        }

        const BUNDLE_COLUMNS: &str = "SELECT id, resource, amount, from_ms, until_ms, price, currency, arrangement, contributors, created_at_ms, settled_at_ms, reported_through_ms FROM bundles";
        const TENDER_COLUMNS: &str = "SELECT id, direction, bundle, peer, offer, state, accepted_amount, price, reason, created_at_ms, answered_at_ms FROM tenders";

        const PEER_COLUMNS: &str = "SELECT id, name, role, our_role, ca_pem, fingerprint, addresses, server_name, dials, joined_at_ms, removed_at_ms, last_seen_ms, out_seq, acked_seq, in_seq FROM peers";
        const PEER_INSERT: &str = "INSERT INTO peers (id, name, role, our_role, ca_pem, fingerprint, addresses, server_name, dials, joined_at_ms, removed_at_ms, last_seen_ms) VALUES ($1, $2, $3, $10, $4, $5, $6, $7, $8, $9, NULL, NULL) ON CONFLICT (id) DO NOTHING";

        #[async_trait]
        impl FederationStore for $store {
            async fn controller_id(&self, candidate: Uuid, now_ms: UnixMillis) -> Result<Uuid, StoreError> {
                sqlx::query("INSERT INTO settings (key, value, updated_at_ms) VALUES ('controller_id', $1, $2) ON CONFLICT (key) DO NOTHING")
                    .bind(json_text(&candidate.to_string()))
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?;
                let value: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = 'controller_id'")
                    .fetch_one(self.writer())
                    .await?;
                let id: String = parse_json(&value, "controller id")?;
                parse_uuid(&id)
            }

            async fn create_peer_invite(&self, secret_hash: &str, role: surplus_protocol::peer::PeerRole, now_ms: UnixMillis, expires_at_ms: UnixMillis) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO peer_invites (secret_hash, role, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4)")
                    .bind(secret_hash)
                    .bind(role.as_str())
                    .bind(now_ms)
                    .bind(expires_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn take_peer_invite(&self, secret_hash: &str, joiner: &StoredPeer, now_ms: UnixMillis) -> Result<Result<surplus_protocol::peer::PeerRole, JoinRefusal>, StoreError> {
                let mut tx = self.write_tx().await?;
                let row = sqlx::query("SELECT role, expires_at_ms, used_at_ms FROM peer_invites WHERE secret_hash = $1")
                    .bind(secret_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(row) = row else { return Ok(Err(JoinRefusal::Unknown)) };
                if row.try_get::<Option<i64>, _>("used_at_ms")?.is_some() {
                    return Ok(Err(JoinRefusal::Used));
                }
                if row.try_get::<i64, _>("expires_at_ms")? <= now_ms {
                    return Ok(Err(JoinRefusal::Expired));
                }
                let role: String = row.try_get("role")?;
                let role = surplus_protocol::peer::PeerRole::parse(&role)
                    .ok_or_else(|| StoreError::Corrupt(format!("invite role {role:?}")))?;
                let known: Option<Option<i64>> = sqlx::query_scalar("SELECT removed_at_ms FROM peers WHERE id = $1")
                    .bind(joiner.id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                match known {
                    Some(None) => return Ok(Err(JoinRefusal::AlreadyPeer)),
                    Some(Some(_)) => return Ok(Err(JoinRefusal::Removed)),
                    None => {}
                }
                let taken = sqlx::query("UPDATE peer_invites SET used_at_ms = $2, peer_id = $3 WHERE secret_hash = $1 AND used_at_ms IS NULL")
                    .bind(secret_hash)
                    .bind(now_ms)
                    .bind(joiner.id.to_string())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if taken == 0 {
                    return Ok(Err(JoinRefusal::Used));
                }
                sqlx::query(PEER_INSERT)
                    .bind(joiner.id.to_string())
                    .bind(&joiner.name)
                    .bind(role.as_str())
                    .bind(&joiner.ca_pem)
                    .bind(&joiner.fingerprint)
                    .bind(json_text(&joiner.addresses))
                    .bind(&joiner.server_name)
                    .bind(i64::from(joiner.dials))
                    .bind(now_ms)
                    .bind(surplus_protocol::peer::PeerRole::Broker.as_str())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(role))
            }

            async fn put_peer(&self, p: &StoredPeer) -> Result<Result<(), JoinRefusal>, StoreError> {
                let mut tx = self.write_tx().await?;
                let known: Option<Option<i64>> = sqlx::query_scalar("SELECT removed_at_ms FROM peers WHERE id = $1")
                    .bind(p.id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                match known {
                    Some(None) => return Ok(Err(JoinRefusal::AlreadyPeer)),
                    Some(Some(_)) => return Ok(Err(JoinRefusal::Removed)),
                    None => {}
                }
                sqlx::query(PEER_INSERT)
                    .bind(p.id.to_string())
                    .bind(&p.name)
                    .bind(p.role.as_str())
                    .bind(&p.ca_pem)
                    .bind(&p.fingerprint)
                    .bind(json_text(&p.addresses))
                    .bind(&p.server_name)
                    .bind(i64::from(p.dials))
                    .bind(p.joined_at_ms)
                    .bind(p.our_role.as_str())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(()))
            }

            async fn peers(&self) -> Result<Vec<StoredPeer>, StoreError> {
                sqlx::query(&format!("{PEER_COLUMNS} ORDER BY joined_at_ms, id"))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_peer)
                    .collect()
            }

            async fn remove_peer(&self, id: Uuid, now_ms: UnixMillis) -> Result<bool, StoreError> {
                Ok(sqlx::query("UPDATE peers SET removed_at_ms = $2 WHERE id = $1 AND removed_at_ms IS NULL")
                    .bind(id.to_string())
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn touch_peer(&self, id: Uuid, now_ms: UnixMillis) -> Result<(), StoreError> {
                sqlx::query("UPDATE peers SET last_seen_ms = $2 WHERE id = $1")
                    .bind(id.to_string())
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn share_with_peer(&self, s: &PeerShare) -> Result<PeerShare, StoreError> {
                sqlx::query("INSERT INTO peer_shares (peer_id, account, user_name, through_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (peer_id, account) DO NOTHING")
                    .bind(s.peer.to_string())
                    .bind(&s.account)
                    .bind(&s.user)
                    .bind(s.through_ms)
                    .execute(self.writer())
                    .await?;
                let row = sqlx::query("SELECT user_name, through_ms FROM peer_shares WHERE peer_id = $1 AND account = $2")
                    .bind(s.peer.to_string())
                    .bind(&s.account)
                    .fetch_one(self.writer())
                    .await?;
                Ok(PeerShare {
                    user: row.try_get("user_name")?,
                    through_ms: row.try_get("through_ms")?,
                    ..s.clone()
                })
            }

            async fn peer_shares(&self, peer: Uuid) -> Result<Vec<PeerShare>, StoreError> {
                sqlx::query("SELECT peer_id, account, user_name, through_ms FROM peer_shares WHERE peer_id = $1 ORDER BY account")
                    .bind(peer.to_string())
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(PeerShare {
                            peer: parse_uuid(r.try_get("peer_id")?)?,
                            account: r.try_get("account")?,
                            user: r.try_get("user_name")?,
                            through_ms: r.try_get("through_ms")?,
                        })
                    })
                    .collect()
            }

            async fn export_peer_usage(&self, peer: Uuid, until_ms: UnixMillis) -> Result<u64, StoreError> {
                use surplus_market::exchange::{MINUTE_MS, MeterDelta, minute_usage};
                let until = until_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
                // Most calls find nothing due: asked on a reader, without the write lock.
                let due: Option<String> = sqlx::query_scalar("SELECT account FROM peer_shares WHERE peer_id = $1 AND through_ms < $2 LIMIT 1")
                    .bind(peer.to_string())
                    .bind(until)
                    .fetch_optional(self.reader())
                    .await?;
                if due.is_none() {
                    return Ok(0);
                }
                let mut tx = self.write_tx().await?;
                // The peer's row first: on PostgreSQL this locks it, so that two
                // exports of one peer are one after the other and never number a row
                // twice.
                let out_seq: Option<i64> = sqlx::query_scalar("UPDATE peers SET out_seq = out_seq WHERE id = $1 AND removed_at_ms IS NULL RETURNING out_seq")
                    .bind(peer.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(mut seq) = out_seq else { return Ok(0) };
                let shares = sqlx::query("SELECT account, user_name, through_ms FROM peer_shares WHERE peer_id = $1 AND through_ms < $2 ORDER BY account")
                    .bind(peer.to_string())
                    .bind(until)
                    .fetch_all(&mut *tx)
                    .await?;
                let mut made = 0u64;
                for share in &shares {
                    let account: String = share.try_get("account")?;
                    let user: String = share.try_get("user_name")?;
                    let from: i64 = share.try_get("through_ms")?;
                    let rows = sqlx::query("SELECT u.meter, u.start_ms, u.end_ms, u.delta FROM usage_records u JOIN instances i ON i.id = u.subject WHERE u.account = $1 AND i.owner_role = 'client' AND u.kind = 'counter' AND u.end_ms > $2 AND u.start_ms < $3 AND u.meter IN ('state_ms.running', 'cpu_ns', 'memory_byte_ms')")
                        .bind(&account)
                        .bind(from)
                        .bind(until)
                        .fetch_all(&mut *tx)
                        .await?;
                    let deltas = rows
                        .iter()
                        .map(|r| {
                            Ok(MeterDelta {
                                user: user.clone(),
                                meter: r.try_get("meter")?,
                                start_ms: r.try_get("start_ms")?,
                                end_ms: r.try_get("end_ms")?,
                                delta: r.try_get::<i64, _>("delta")?.max(0) as u64,
                            })
                        })
                        .collect::<Result<Vec<_>, StoreError>>()?;
                    for (user, resource, minute, unit_ms) in minute_usage(&deltas, from, until) {
                        seq += 1;
                        made += 1;
                        sqlx::query("INSERT INTO peer_usage_out (peer_id, seq, user_name, resource, minute_ms, unit_ms) VALUES ($1, $2, $3, $4, $5, $6)")
                            .bind(peer.to_string())
                            .bind(seq)
                            .bind(&user)
                            .bind(resource)
                            .bind(minute)
                            .bind(seq_value(unit_ms))
                            .execute(&mut *tx)
                            .await?;
                    }
                    sqlx::query("UPDATE peer_shares SET through_ms = $3 WHERE peer_id = $1 AND account = $2")
                        .bind(peer.to_string())
                        .bind(&account)
                        .bind(until)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("UPDATE peers SET out_seq = $2 WHERE id = $1")
                    .bind(peer.to_string())
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(made)
            }

            async fn peer_usage_out(&self, peer: Uuid, after_seq: u64, limit: u32) -> Result<Vec<surplus_protocol::peer::PeerUsageRow>, StoreError> {
                sqlx::query("SELECT seq, user_name, resource, minute_ms, unit_ms FROM peer_usage_out o WHERE peer_id = $1 AND seq > $2 AND EXISTS (SELECT 1 FROM peers p WHERE p.id = o.peer_id AND p.removed_at_ms IS NULL) ORDER BY seq LIMIT $3")
                    .bind(peer.to_string())
                    .bind(seq_value(after_seq))
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(peer_usage_row)
                    .collect()
            }

            async fn peer_usage_acked(&self, peer: Uuid, through_seq: u64) -> Result<(), StoreError> {
                sqlx::query("UPDATE peers SET acked_seq = $2 WHERE id = $1 AND acked_seq < $2 AND $2 <= out_seq")
                    .bind(peer.to_string())
                    .bind(seq_value(through_seq))
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn receive_peer_usage(&self, peer: Uuid, rows: &[surplus_protocol::peer::PeerUsageRow], now_ms: UnixMillis) -> Result<Result<u64, surplus_market::Refusal>, StoreError> {
                let mut tx = self.write_tx().await?;
                let have: Option<i64> = sqlx::query_scalar("UPDATE peers SET last_seen_ms = $2 WHERE id = $1 AND removed_at_ms IS NULL RETURNING in_seq")
                    .bind(peer.to_string())
                    .bind(now_ms)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(have) = have else {
                    return Ok(Err(surplus_market::Refusal {
                        rule: "not_peer",
                        message: format!("controller {peer} is not a peer of this one"),
                    }));
                };
                let accepted = match surplus_market::exchange::accept(have.max(0) as u64, rows) {
                    Ok(a) => a,
                    Err(refusal) => return Ok(Err(refusal)),
                };
                for r in &accepted.new {
                    sqlx::query("INSERT INTO peer_usage_in (peer_id, seq, user_name, resource, minute_ms, unit_ms, received_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)")
                        .bind(peer.to_string())
                        .bind(seq_value(r.seq))
                        .bind(&r.user)
                        .bind(&r.resource)
                        .bind(r.minute_ms)
                        .bind(seq_value(r.unit_ms))
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("UPDATE peers SET in_seq = $2 WHERE id = $1")
                    .bind(peer.to_string())
                    .bind(seq_value(accepted.through_seq))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(accepted.through_seq))
            }

            async fn peer_usage_in(&self, from_ms: UnixMillis, until_ms: UnixMillis) -> Result<Vec<PeerUsageIn>, StoreError> {
                sqlx::query("SELECT peer_id, seq, user_name, resource, minute_ms, unit_ms FROM peer_usage_in WHERE minute_ms >= $1 AND minute_ms < $2 ORDER BY peer_id, seq")
                    .bind(from_ms)
                    .bind(until_ms)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(PeerUsageIn {
                            peer: parse_uuid(r.try_get("peer_id")?)?,
                            row: peer_usage_row(r)?,
                        })
                    })
                    .collect()
            }

            async fn put_subscription(&self, s: &StoredSubscription) -> Result<(), StoreError> {
                let units = |v: u64| i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("limit {v} out of range")));
                sqlx::query("INSERT INTO subscriptions (user_name, resource, period_ms, limit_units, overage_rate, administrator, currency, created_at_ms, updated_at_ms, availability) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                    ON CONFLICT (user_name, resource) DO UPDATE SET period_ms = excluded.period_ms, limit_units = excluded.limit_units, overage_rate = excluded.overage_rate, administrator = excluded.administrator, currency = excluded.currency, updated_at_ms = excluded.updated_at_ms, availability = excluded.availability")
                    .bind(&s.subscription.user)
                    .bind(&s.subscription.resource)
                    .bind(s.subscription.period_ms)
                    .bind(units(s.subscription.limit)?)
                    .bind(s.subscription.overage_rate)
                    .bind(&s.administrator)
                    .bind(&s.currency)
                    .bind(s.created_at_ms)
                    .bind(s.updated_at_ms)
                    .bind(json_text(&s.availability))
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn subscriptions(&self) -> Result<Vec<StoredSubscription>, StoreError> {
                sqlx::query("SELECT user_name, resource, period_ms, limit_units, overage_rate, administrator, currency, created_at_ms, updated_at_ms, availability FROM subscriptions ORDER BY user_name, resource")
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(StoredSubscription {
                            subscription: surplus_market::brokerage::Subscription {
                                user: r.try_get("user_name")?,
                                resource: r.try_get("resource")?,
                                period_ms: r.try_get("period_ms")?,
                                limit: r.try_get::<i64, _>("limit_units")?.max(0) as u64,
                                overage_rate: r.try_get("overage_rate")?,
                            },
                            administrator: r.try_get("administrator")?,
                            currency: r.try_get("currency")?,
                            availability: parse_json(r.try_get("availability")?, "subscription availability")?,
                            created_at_ms: r.try_get("created_at_ms")?,
                            updated_at_ms: r.try_get("updated_at_ms")?,
                        })
                    })
                    .collect()
            }

            async fn create_bundle(&self, b: &StoredBundle) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO bundles (id, resource, amount, from_ms, until_ms, price, currency, arrangement, contributors, created_at_ms, settled_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL)")
                    .bind(b.id.to_string())
                    .bind(&b.resource)
                    .bind(money(b.amount))
                    .bind(b.from_ms)
                    .bind(b.until_ms)
                    .bind(money(b.price))
                    .bind(&b.currency)
                    .bind(json_text(&b.arrangement))
                    .bind(json_text(&b.contributors))
                    .bind(b.created_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn bundles(&self, limit: u32) -> Result<Vec<StoredBundle>, StoreError> {
                sqlx::query(&format!("{BUNDLE_COLUMNS} ORDER BY created_at_ms DESC, id DESC LIMIT $1"))
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_bundle)
                    .collect()
            }

            async fn due_bundles(&self, now_ms: UnixMillis) -> Result<Vec<StoredBundle>, StoreError> {
                sqlx::query(&format!("{BUNDLE_COLUMNS} WHERE settled_at_ms IS NULL AND until_ms <= $1 ORDER BY until_ms, id"))
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_bundle)
                    .collect()
            }

            async fn settle_bundle(&self, id: Uuid, changes: &ChangeSet, now_ms: UnixMillis) -> Result<bool, PostError> {
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Ledger).await?;
                let marked = sqlx::query("UPDATE bundles SET settled_at_ms = $2 WHERE id = $1 AND settled_at_ms IS NULL")
                    .bind(id.to_string())
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                    .rows_affected();
                if marked == 0 {
                    return Ok(false);
                }
                apply_in(&mut tx, changes, now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(true)
            }

            async fn open_bundles(&self, now_ms: UnixMillis) -> Result<Vec<StoredBundle>, StoreError> {
                sqlx::query(&format!("{BUNDLE_COLUMNS} WHERE settled_at_ms IS NULL AND from_ms <= $1 ORDER BY from_ms, id"))
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_bundle)
                    .collect()
            }

            async fn bundle_reported(&self, id: Uuid, through_ms: UnixMillis) -> Result<(), StoreError> {
                sqlx::query("UPDATE bundles SET reported_through_ms = $2 WHERE id = $1 AND (reported_through_ms IS NULL OR reported_through_ms < $2)")
                    .bind(id.to_string())
                    .bind(through_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn tender_shortfall(&self, id: Uuid, peer: Uuid, gap: surplus_market::provision::Gap, now_ms: UnixMillis) -> Result<bool, StoreError> {
                let Some(row) = sqlx::query(&format!("{TENDER_COLUMNS} WHERE id = $1 AND peer = $2 AND direction = 'in'"))
                    .bind(id.to_string())
                    .bind(peer.to_string())
                    .fetch_optional(self.writer())
                    .await?
                else {
                    return Ok(false);
                };
                // Only what the tender sold can fall short, and only inside its interval.
                let t = stored_tender(&row)?;
                if !matches!(t.state.as_str(), "accepted" | "part")
                    || gap.missing > t.accepted_amount
                    || gap.from < t.offer.from_ms
                    || gap.until > t.offer.until_ms
                    || gap.from >= gap.until
                {
                    return Ok(false);
                }
                sqlx::query("INSERT INTO tender_shortfalls (tender, from_ms, until_ms, missing, reported_at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tender, from_ms, until_ms, missing) DO NOTHING")
                    .bind(id.to_string())
                    .bind(gap.from)
                    .bind(gap.until)
                    .bind(money(gap.missing))
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?;
                Ok(true)
            }

            async fn tender_shortfalls(&self, id: Uuid) -> Result<Vec<surplus_market::provision::Gap>, StoreError> {
                sqlx::query("SELECT from_ms, until_ms, missing FROM tender_shortfalls WHERE tender = $1 ORDER BY from_ms, until_ms, missing")
                    .bind(id.to_string())
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(surplus_market::provision::Gap {
                            from: r.try_get("from_ms")?,
                            until: r.try_get("until_ms")?,
                            missing: r.try_get::<i64, _>("missing")?.max(0) as u64,
                        })
                    })
                    .collect()
            }

            async fn put_tender(&self, t: &StoredTender) -> Result<StoredTender, StoreError> {
                sqlx::query("INSERT INTO tenders (id, direction, bundle, peer, offer, state, accepted_amount, price, reason, created_at_ms, answered_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING")
                    .bind(t.offer.id.to_string())
                    .bind(&t.direction)
                    .bind(t.bundle.map(|b| b.to_string()))
                    .bind(t.peer.to_string())
                    .bind(json_text(&t.offer))
                    .bind(&t.state)
                    .bind(money(t.accepted_amount))
                    .bind(money(t.price))
                    .bind(&t.reason)
                    .bind(t.created_at_ms)
                    .bind(t.answered_at_ms)
                    .execute(self.writer())
                    .await?;
                let row = sqlx::query(&format!("{TENDER_COLUMNS} WHERE id = $1"))
                    .bind(t.offer.id.to_string())
                    .fetch_one(self.writer())
                    .await?;
                stored_tender(&row)
            }

            async fn answer_tender(&self, t: &StoredTender) -> Result<(), StoreError> {
                sqlx::query("UPDATE tenders SET state = $2, accepted_amount = $3, price = $4, reason = $5, answered_at_ms = $6 WHERE id = $1")
                    .bind(t.offer.id.to_string())
                    .bind(&t.state)
                    .bind(money(t.accepted_amount))
                    .bind(money(t.price))
                    .bind(&t.reason)
                    .bind(t.answered_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn tenders(&self, limit: u32) -> Result<Vec<StoredTender>, StoreError> {
                sqlx::query(&format!("{TENDER_COLUMNS} ORDER BY created_at_ms DESC, id DESC LIMIT $1"))
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_tender)
                    .collect()
            }

            async fn bundle_tenders(&self, bundle: Uuid) -> Result<Vec<StoredTender>, StoreError> {
                sqlx::query(&format!("{TENDER_COLUMNS} WHERE bundle = $1 ORDER BY created_at_ms, id"))
                    .bind(bundle.to_string())
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_tender)
                    .collect()
            }

            async fn local_usage_deltas(&self, accounts: Option<&[String]>, from_ms: UnixMillis, until_ms: UnixMillis) -> Result<Vec<surplus_market::exchange::MeterDelta>, StoreError> {
                let rows = sqlx::query("SELECT u.account, u.meter, u.start_ms, u.end_ms, u.delta FROM usage_records u JOIN instances i ON i.id = u.subject WHERE i.owner_role = 'client' AND u.kind = 'counter' AND u.end_ms > $1 AND u.start_ms < $2 AND u.meter IN ('state_ms.running', 'cpu_ns', 'memory_byte_ms') ORDER BY u.start_ms")
                    .bind(from_ms)
                    .bind(until_ms)
                    .fetch_all(self.reader())
                    .await?;
                let mut out = Vec::new();
                for r in &rows {
                    let account: Option<String> = r.try_get("account")?;
                    let Some(account) = account else { continue };
                    if accounts.is_some_and(|a| !a.contains(&account)) {
                        continue;
                    }
                    out.push(surplus_market::exchange::MeterDelta {
                        user: account,
                        meter: r.try_get("meter")?,
                        start_ms: r.try_get("start_ms")?,
                        end_ms: r.try_get("end_ms")?,
                        delta: r.try_get::<i64, _>("delta")?.max(0) as u64,
                    });
                }
                Ok(out)
            }
        }
    };
}

pub(crate) use federation_sql;
