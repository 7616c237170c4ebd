//! The SQL of private pools (issue 17), written once for both backends as
//! `sql.rs` is: [`pool_sql!`] expands to `PoolStore` for one backend's store type, in
//! the module where `sql_stores!` expanded (it uses that expansion's helpers:
//! `apply_in`, `lock`, the row parsers).
//!
//! A cycle is one transaction under the pool's lock: read, have the shell's
//! decision plan it (`surplus_market::pool::plan`), write the plan with its postings
//! and notices, and claim the cycle's timer by a conditional update, so that of two
//! controllers polling one pool exactly one runs each cycle.

macro_rules! pool_sql {
    ($store:ident, $row:ty) => {
        fn stored_pool(row: &$row) -> Result<StoredPool, StoreError> {
            Ok(StoredPool {
                id: parse_uuid(row.try_get("id")?)?,
                owner: row.try_get("owner")?,
                name: row.try_get("name")?,
                settings: parse_json(row.try_get("record")?, "pool settings")?,
                asking: row.try_get::<i64, _>("asking")?.max(0) as u64,
                next_cycle_at_ms: row.try_get("next_cycle_at_ms")?,
                requested_at_ms: row.try_get("requested_at_ms")?,
                cycled_at_ms: row.try_get("cycled_at_ms")?,
                created_at_ms: row.try_get("created_at_ms")?,
                dissolved_at_ms: row.try_get("dissolved_at_ms")?,
            })
        }

        fn pool_slot_row(row: &$row) -> Result<PoolSlotRow, StoreError> {
            Ok(PoolSlotRow {
                slot: parse_uuid(row.try_get("slot")?)?,
                pool: parse_uuid(row.try_get("pool")?)?,
                entity: row.try_get("entity")?,
                host: parse_uuid(row.try_get("host")?)?,
                account: row.try_get("account")?,
                facts: parse_json(row.try_get("record")?, "pool slot")?,
                burst: row.try_get::<i64, _>("burst")? != 0,
                added_at_ms: row.try_get("added_at_ms")?,
                leaving_at_ms: row.try_get("leaving_at_ms")?,
            })
        }

        fn pool_member_row(row: &$row) -> Result<PoolMember, StoreError> {
            Ok(PoolMember {
                member: row.try_get("member")?,
                entity: row.try_get("entity")?,
                name: row.try_get("name")?,
                organisation: row.try_get("organisation")?,
                added_at_ms: row.try_get("added_at_ms")?,
            })
        }

        fn pool_entity_row(row: &$row) -> Result<PoolEntity, StoreError> {
            let limit = |v: Option<i64>| v.map(|l| u32::try_from(l.max(0)).unwrap_or(u32::MAX));
            Ok(PoolEntity {
                entity: row.try_get("entity")?,
                rights: parse_json(row.try_get("rights")?, "pool entity rights")?,
                lending_limit: limit(row.try_get("lending_limit")?),
                borrowing_limit: limit(row.try_get("borrowing_limit")?),
                invited_at_ms: row.try_get("invited_at_ms")?,
                joined_at_ms: row.try_get("joined_at_ms")?,
                leaving_at_ms: row.try_get("leaving_at_ms")?,
            })
        }

        fn pool_request_row(row: &$row) -> Result<StoredPoolRequest, StoreError> {
            let why: Option<String> = row.try_get("why")?;
            Ok(StoredPoolRequest {
                pool: parse_uuid(row.try_get("pool")?)?,
                request: parse_json(row.try_get("record")?, "pool request")?,
                cancelled_at_ms: row.try_get("cancelled_at_ms")?,
                why: why.as_deref().map(|w| parse_json(w, "pool request why")).transpose()?,
            })
        }

        fn pool_allocation_row(row: &$row) -> Result<(surplus_market::pool::Allocation, Uuid), StoreError> {
            Ok((
                surplus_market::pool::Allocation {
                    id: parse_uuid(row.try_get("id")?)?,
                    request: parse_uuid(row.try_get("request")?)?,
                    user: row.try_get("member")?,
                    slot: parse_uuid(row.try_get("slot")?)?,
                    price: row.try_get::<i64, _>("price")?.max(0) as u64,
                    from_ms: row.try_get("from_ms")?,
                    until_ms: row.try_get("until_ms")?,
                    noticed: row.try_get::<i64, _>("noticed")? != 0,
                    charged_to_ms: row.try_get("charged_to_ms")?,
                },
                parse_uuid(row.try_get("host")?)?,
            ))
        }

        fn pool_price(p: u64) -> Result<i64, StoreError> {
            i64::try_from(p).map_err(|_| StoreError::Corrupt(format!("price {p} out of range")))
        }

        const POOL_COLUMNS: &str = "SELECT id, owner, name, record, asking, next_cycle_at_ms, requested_at_ms, cycled_at_ms, created_at_ms, dissolved_at_ms FROM pools";
        const POOL_ALLOCATION_COLUMNS: &str = "SELECT id, request, member, slot, host, price, from_ms, until_ms, noticed, charged_to_ms, done FROM pool_allocations";

        #[async_trait]
        impl PoolStore for $store {
            async fn create_pool(&self, p: &StoredPool) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO pools (id, owner, name, record, asking, next_cycle_at_ms, requested_at_ms, cycled_at_ms, created_at_ms, dissolved_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
                    .bind(p.id.to_string())
                    .bind(&p.owner)
                    .bind(&p.name)
                    .bind(json_text(&p.settings))
                    .bind(pool_price(p.asking)?)
                    .bind(p.next_cycle_at_ms)
                    .bind(p.requested_at_ms)
                    .bind(p.cycled_at_ms)
                    .bind(p.created_at_ms)
                    .bind(p.dissolved_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn pool(&self, id: Uuid) -> Result<Option<StoredPool>, StoreError> {
                sqlx::query(&format!("{POOL_COLUMNS} WHERE id = $1"))
                    .bind(id.to_string())
                    .fetch_optional(self.reader())
                    .await?
                    .as_ref()
                    .map(stored_pool)
                    .transpose()
            }

            async fn pools(&self) -> Result<Vec<StoredPool>, StoreError> {
                sqlx::query(&format!("{POOL_COLUMNS} ORDER BY created_at_ms, id"))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_pool)
                    .collect()
            }

            async fn set_pool_settings(&self, id: Uuid, settings: &surplus_market::pool::Settings) -> Result<(), StoreError> {
                sqlx::query("UPDATE pools SET record = $2 WHERE id = $1")
                    .bind(id.to_string())
                    .bind(json_text(settings))
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn grant_pool_account(&self, owner: &str, account: &str, now_ms: UnixMillis) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO pool_accounts (owner, account, granted_at_ms) VALUES ($1, $2, $3) ON CONFLICT (owner, account) DO NOTHING")
                    .bind(owner)
                    .bind(account)
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn pool_accounts(&self, owner: &str) -> Result<Vec<String>, StoreError> {
                Ok(sqlx::query_scalar("SELECT account FROM pool_accounts WHERE owner = $1 ORDER BY account")
                    .bind(owner)
                    .fetch_all(self.reader())
                    .await?)
            }

            async fn add_pool_slot(&self, slot: &PoolSlotRow, now_ms: UnixMillis) -> Result<Result<(), MarketRefusal>, StoreError> {
                let mut tx = self.write_tx().await?;
                $store::lock(&mut tx, Lock::Pool(&slot.pool.to_string())).await?;
                // A slot that left a pool (its deadline passed, nothing of its last
                // allocations left to charge) may join another.
                sqlx::query("DELETE FROM pool_slots WHERE slot = $1 AND leaving_at_ms IS NOT NULL AND leaving_at_ms <= $2 AND NOT EXISTS (SELECT 1 FROM pool_allocations a WHERE a.pool = pool_slots.pool AND a.slot = pool_slots.slot AND a.done = 0)")
                    .bind(slot.slot.to_string())
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                let inserted = sqlx::query("INSERT INTO pool_slots (slot, pool, entity, host, account, record, burst, added_at_ms, leaving_at_ms) VALUES ($1, $2, $8, $3, $4, $5, $6, $7, NULL) ON CONFLICT (slot) DO NOTHING")
                    .bind(slot.slot.to_string())
                    .bind(slot.pool.to_string())
                    .bind(slot.host.to_string())
                    .bind(&slot.account)
                    .bind(json_text(&slot.facts))
                    .bind(i64::from(slot.burst))
                    .bind(slot.added_at_ms)
                    .bind(&slot.entity)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if inserted == 0 {
                    let pool: Option<String> = sqlx::query_scalar("SELECT pool FROM pool_slots WHERE slot = $1")
                        .bind(slot.slot.to_string())
                        .fetch_optional(&mut *tx)
                        .await?;
                    return Ok(Err(MarketRefusal {
                        rule: "slot_taken",
                        message: format!(
                            "slot {} is in pool {} already: a slot is in one pool at a time",
                            slot.slot,
                            pool.unwrap_or_default()
                        ),
                    }));
                }
                tx.commit().await?;
                Ok(Ok(()))
            }

            async fn leave_pool_slot(&self, pool: Uuid, slot: Uuid, leaving_at_ms: UnixMillis) -> Result<bool, StoreError> {
                Ok(sqlx::query("UPDATE pool_slots SET leaving_at_ms = $3 WHERE pool = $1 AND slot = $2 AND leaving_at_ms IS NULL")
                    .bind(pool.to_string())
                    .bind(slot.to_string())
                    .bind(leaving_at_ms)
                    .execute(self.writer())
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn pool_slots(&self, pool: Uuid) -> Result<Vec<PoolSlotRow>, StoreError> {
                sqlx::query("SELECT * FROM pool_slots WHERE pool = $1 ORDER BY added_at_ms, slot")
                    .bind(pool.to_string())
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(pool_slot_row)
                    .collect()
            }

            async fn pool_slot_on(&self, host: Uuid, now_ms: UnixMillis) -> Result<Option<PoolSlotRow>, StoreError> {
                sqlx::query("SELECT * FROM pool_slots WHERE host = $1 AND (leaving_at_ms IS NULL OR leaving_at_ms > $2) ORDER BY added_at_ms DESC, slot LIMIT 1")
                    .bind(host.to_string())
                    .bind(now_ms)
                    .fetch_optional(self.reader())
                    .await?
                    .as_ref()
                    .map(pool_slot_row)
                    .transpose()
            }

            async fn pooled_slots(&self, now_ms: UnixMillis) -> Result<Vec<Uuid>, StoreError> {
                let ids: Vec<String> = sqlx::query_scalar("SELECT slot FROM pool_slots WHERE leaving_at_ms IS NULL OR leaving_at_ms > $1")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?;
                ids.iter().map(|s| parse_uuid(s)).collect()
            }

            async fn put_pool_member(&self, pool: Uuid, m: &PoolMember, max_users: u32) -> Result<Result<(), MarketRefusal>, StoreError> {
                let mut tx = self.write_tx().await?;
                $store::lock(&mut tx, Lock::Pool(&pool.to_string())).await?;
                let others: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pool_members WHERE pool = $1 AND member <> $2")
                    .bind(pool.to_string())
                    .bind(&m.member)
                    .fetch_one(&mut *tx)
                    .await?;
                if others >= i64::from(max_users) {
                    return Ok(Err(MarketRefusal {
                        rule: "pool_full_of_users",
                        message: format!("the pool admits {max_users} users and has {others}"),
                    }));
                }
                sqlx::query("INSERT INTO pool_members (pool, member, entity, name, organisation, added_at_ms) VALUES ($1, $2, $6, $3, $4, $5) ON CONFLICT (pool, member) DO UPDATE SET name = excluded.name, organisation = excluded.organisation, entity = excluded.entity")
                    .bind(pool.to_string())
                    .bind(&m.member)
                    .bind(&m.name)
                    .bind(&m.organisation)
                    .bind(m.added_at_ms)
                    .bind(&m.entity)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(()))
            }

            async fn remove_pool_member(&self, pool: Uuid, member: &str) -> Result<bool, StoreError> {
                Ok(sqlx::query("DELETE FROM pool_members WHERE pool = $1 AND member = $2")
                    .bind(pool.to_string())
                    .bind(member)
                    .execute(self.writer())
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn pool_members(&self, pool: Uuid) -> Result<Vec<PoolMember>, StoreError> {
                sqlx::query("SELECT * FROM pool_members WHERE pool = $1 ORDER BY added_at_ms, member")
                    .bind(pool.to_string())
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(pool_member_row)
                    .collect()
            }

            async fn pools_of_member(&self, member: &str) -> Result<Vec<Uuid>, StoreError> {
                let ids: Vec<String> = sqlx::query_scalar("SELECT pool FROM pool_members WHERE member = $1 ORDER BY pool")
                    .bind(member)
                    .fetch_all(self.reader())
                    .await?;
                ids.iter().map(|s| parse_uuid(s)).collect()
            }

            async fn place_pool_request(&self, r: &StoredPoolRequest) -> Result<bool, StoreError> {
                Ok(sqlx::query("INSERT INTO pool_requests (id, pool, member, record, placed_at_ms, cancelled_at_ms, why) VALUES ($1, $2, $3, $4, $5, NULL, NULL) ON CONFLICT (id) DO NOTHING")
                    .bind(r.request.id.to_string())
                    .bind(r.pool.to_string())
                    .bind(&r.request.user)
                    .bind(json_text(&r.request))
                    .bind(r.request.placed_at_ms)
                    .execute(self.writer())
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn pool_request(&self, id: Uuid) -> Result<Option<StoredPoolRequest>, StoreError> {
                sqlx::query("SELECT * FROM pool_requests WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(self.reader())
                    .await?
                    .as_ref()
                    .map(pool_request_row)
                    .transpose()
            }

            async fn pool_requests(&self, pool: Uuid) -> Result<Vec<StoredPoolRequest>, StoreError> {
                sqlx::query("SELECT * FROM pool_requests WHERE pool = $1 ORDER BY placed_at_ms, id")
                    .bind(pool.to_string())
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(pool_request_row)
                    .collect()
            }

            async fn set_pool_bid(&self, id: Uuid, bid: u64, only_rise: bool) -> Result<Result<bool, MarketRefusal>, StoreError> {
                let mut tx = self.write_tx().await?;
                let pool: Option<String> = sqlx::query_scalar("SELECT pool FROM pool_requests WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(pool) = pool else { return Ok(Ok(false)) };
                // Read again under the pool's lock: the bid compared is the one changed.
                $store::lock(&mut tx, Lock::Pool(&pool)).await?;
                let Some(row) = sqlx::query("SELECT * FROM pool_requests WHERE id = $1 AND cancelled_at_ms IS NULL")
                    .bind(id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(Ok(false));
                };
                let mut r = pool_request_row(&row)?;
                if only_rise && bid < r.request.bid {
                    return Ok(Err(MarketRefusal {
                        rule: "ascending",
                        message: format!("an English pool's bids only rise: {bid} is below the bid {}", r.request.bid),
                    }));
                }
                r.request.bid = bid;
                sqlx::query("UPDATE pool_requests SET record = $2 WHERE id = $1")
                    .bind(id.to_string())
                    .bind(json_text(&r.request))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(true))
            }

            async fn set_pool_request_why(&self, id: Uuid, why: &serde_json::Value) -> Result<(), StoreError> {
                sqlx::query("UPDATE pool_requests SET why = $2 WHERE id = $1")
                    .bind(id.to_string())
                    .bind(json_text(why))
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn cancel_pool_request(&self, id: Uuid, now_ms: UnixMillis) -> Result<bool, StoreError> {
                Ok(sqlx::query("UPDATE pool_requests SET cancelled_at_ms = $2 WHERE id = $1 AND cancelled_at_ms IS NULL")
                    .bind(id.to_string())
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn pool_allocations(&self, pool: Uuid, all: bool) -> Result<Vec<(surplus_market::pool::Allocation, Uuid)>, StoreError> {
                sqlx::query(&format!("{POOL_ALLOCATION_COLUMNS} WHERE pool = $1 AND ($2 = 1 OR done = 0) ORDER BY from_ms, id"))
                    .bind(pool.to_string())
                    .bind(i64::from(all))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(pool_allocation_row)
                    .collect()
            }

            async fn allocation_on(&self, pool: Uuid, slot: Uuid, member: &str, now_ms: UnixMillis) -> Result<Option<surplus_market::pool::Allocation>, StoreError> {
                Ok(sqlx::query(&format!("{POOL_ALLOCATION_COLUMNS} WHERE pool = $1 AND slot = $2 AND member = $3 AND from_ms <= $4 AND (until_ms IS NULL OR until_ms > $4) ORDER BY from_ms DESC, id LIMIT 1"))
                    .bind(pool.to_string())
                    .bind(slot.to_string())
                    .bind(member)
                    .bind(now_ms)
                    .fetch_optional(self.reader())
                    .await?
                    .as_ref()
                    .map(pool_allocation_row)
                    .transpose()?
                    .map(|(a, _)| a))
            }

            async fn pool_charges(&self, pool: Uuid) -> Result<Vec<PoolCharge>, StoreError> {
                let mut out = Vec::new();
                for row in sqlx::query("SELECT member, request, slot, from_ms, to_ms, price, amount, currency FROM pool_charges WHERE pool = $1 ORDER BY from_ms, key")
                    .bind(pool.to_string())
                    .fetch_all(self.reader())
                    .await?
                {
                    out.push(PoolCharge {
                        member: row.try_get("member")?,
                        request: parse_uuid(row.try_get("request")?)?,
                        slot: parse_uuid(row.try_get("slot")?)?,
                        from_ms: row.try_get("from_ms")?,
                        to_ms: row.try_get("to_ms")?,
                        price: row.try_get::<i64, _>("price")?.max(0) as u64,
                        amount: row.try_get("amount")?,
                        currency: row.try_get("currency")?,
                    });
                }
                Ok(out)
            }

            async fn request_pool_cycle(&self, pool: Uuid, now_ms: UnixMillis) -> Result<(), StoreError> {
                sqlx::query("UPDATE pools SET requested_at_ms = $2 WHERE id = $1 AND requested_at_ms IS NULL")
                    .bind(pool.to_string())
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn due_pools(&self, now_ms: UnixMillis) -> Result<Vec<Uuid>, StoreError> {
                let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM pools WHERE (next_cycle_at_ms <= $1 OR requested_at_ms <= $1 OR dissolved_at_ms <= $1) AND (dissolved_at_ms IS NULL OR cycled_at_ms IS NULL OR cycled_at_ms < dissolved_at_ms OR EXISTS (SELECT 1 FROM pool_allocations a WHERE a.pool = pools.id AND a.done = 0)) ORDER BY id")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?;
                ids.iter().map(|s| parse_uuid(s)).collect()
            }

            async fn run_pool_cycle(&self, pool: Uuid, decide: PoolDecide<'_>, now_ms: UnixMillis) -> Result<Option<PoolDecision>, PostError> {
                let id = pool.to_string();
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Pool(&id)).await.map_err(StoreError::from)?;
                let Some(row) = sqlx::query(&format!("{POOL_COLUMNS} WHERE id = $1"))
                    .bind(&id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                else {
                    return Ok(None);
                };
                let stored = stored_pool(&row)?;
                // A dissolved pool cycles once more after its slots have gone (to charge
                // the notice), then no more.
                let open: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pool_allocations WHERE pool = $1 AND done = 0")
                    .bind(&id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                let finished = open == 0 && stored.dissolved_at_ms.is_some_and(|d| stored.cycled_at_ms.is_some_and(|c| c >= d));
                let due = !finished
                    && (stored.next_cycle_at_ms <= now_ms
                        || stored.requested_at_ms.is_some_and(|r| r <= now_ms)
                        || stored.dissolved_at_ms.is_some_and(|d| d <= now_ms));
                if !due {
                    return Ok(None);
                }
                // Slots, each with when its owner's hold of it ends.
                let mut slots = Vec::new();
                for row in sqlx::query("SELECT s.*, r.record AS reservation, n.deadline_ms AS deadline FROM pool_slots s LEFT JOIN reservations r ON r.id = s.slot LEFT JOIN interruptions n ON n.reservation = s.slot WHERE s.pool = $1 ORDER BY s.added_at_ms, s.slot")
                    .bind(&id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                {
                    let slot = pool_slot_row(&row)?;
                    let reservation: Option<String> = row.try_get("reservation").map_err(StoreError::from)?;
                    let until = match reservation {
                        Some(text) => {
                            let r: Reservation = parse_json(&text, "reservation")?;
                            let deadline: Option<i64> = row.try_get("deadline").map_err(StoreError::from)?;
                            let mut until = r.end_ms();
                            if let Some(d) = deadline {
                                until = Some(until.map_or(d, |u| u.min(d)));
                            }
                            until
                        }
                        None => None,
                    };
                    slots.push((slot, until));
                }
                let members = sqlx::query("SELECT * FROM pool_members WHERE pool = $1 ORDER BY added_at_ms, member")
                    .bind(&id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                    .iter()
                    .map(pool_member_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let entities = sqlx::query("SELECT * FROM pool_entities WHERE pool = $1 AND joined_at_ms IS NOT NULL ORDER BY joined_at_ms, entity")
                    .bind(&id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                    .iter()
                    .map(pool_entity_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let requests = sqlx::query("SELECT * FROM pool_requests WHERE pool = $1 AND cancelled_at_ms IS NULL ORDER BY placed_at_ms, id")
                    .bind(&id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                    .iter()
                    .map(pool_request_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let rows = sqlx::query(&format!("{POOL_ALLOCATION_COLUMNS} WHERE pool = $1 AND (done = 0 OR until_ms > $2) ORDER BY from_ms, id"))
                    .bind(&id)
                    .bind(now_ms.saturating_sub(stored.settings.half_life_ms.saturating_mul(8)))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                let mut allocations = Vec::new();
                let mut stretches: std::collections::BTreeMap<String, Vec<(i64, i64)>> = Default::default();
                for row in &rows {
                    let over = row.try_get::<i64, _>("done").map_err(StoreError::from)? != 0;
                    let (a, _) = pool_allocation_row(row)?;
                    stretches
                        .entry(a.user.clone())
                        .or_default()
                        .push((a.from_ms, a.until_ms.unwrap_or(now_ms).min(now_ms)));
                    if !over {
                        allocations.push(a);
                    }
                }
                let state = PoolState {
                    pool: stored.clone(),
                    slots,
                    members,
                    entities,
                    requests,
                    allocations,
                    stretches,
                };
                let decision = decide(&state);
                let plan = &decision.plan;
                // The next cycle: a period on, or sooner at the first deadline this
                // one set or found (a slot leaving, an allocation ending or starting),
                // so that what ends is charged and given back on time.
                let next = state
                    .slots
                    .iter()
                    .filter_map(|(s, _)| s.leaving_at_ms)
                    .chain(plan.ended.iter().map(|(_, until)| *until))
                    .chain(plan.made.iter().map(|m| m.from_ms))
                    .filter(|t| *t > now_ms)
                    .fold(now_ms.saturating_add(stored.settings.cycle_ms), i64::min);
                // Claimed by a conditional update on the timers read above.
                let claimed = sqlx::query("UPDATE pools SET asking = $2, next_cycle_at_ms = $3, requested_at_ms = NULL, cycled_at_ms = $4 WHERE id = $1 AND next_cycle_at_ms = $5 AND COALESCE(requested_at_ms, -1) = $6")
                    .bind(&id)
                    .bind(pool_price(plan.cycle.asking)?)
                    .bind(next)
                    .bind(now_ms)
                    .bind(stored.next_cycle_at_ms)
                    .bind(stored.requested_at_ms.unwrap_or(-1))
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                    .rows_affected();
                if claimed == 0 {
                    return Ok(None);
                }
                for c in &plan.charges {
                    sqlx::query("UPDATE pool_allocations SET charged_to_ms = $2 WHERE id = $1")
                        .bind(c.allocation.to_string())
                        .bind(c.to_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                    if c.amount > 0 {
                        sqlx::query("INSERT INTO pool_charges (key, pool, member, request, slot, from_ms, to_ms, price, amount, currency) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (key) DO NOTHING")
                            .bind(format!("pool-charge:{}:{}", c.allocation, c.to_ms))
                            .bind(&id)
                            .bind(&c.user)
                            .bind(c.request.to_string())
                            .bind(c.slot.to_string())
                            .bind(c.from_ms)
                            .bind(c.to_ms)
                            .bind(pool_price(c.price)?)
                            .bind(c.amount)
                            .bind(&stored.settings.currency)
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::from)?;
                    }
                }
                for (a, until) in &plan.ended {
                    sqlx::query("UPDATE pool_allocations SET until_ms = $2, noticed = 1 WHERE id = $1")
                        .bind(a.to_string())
                        .bind(until)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                }
                for (a, price) in &plan.repriced {
                    sqlx::query("UPDATE pool_allocations SET price = $2 WHERE id = $1")
                        .bind(a.to_string())
                        .bind(pool_price(*price)?)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                }
                for m in &plan.made {
                    let Some((slot, _)) = state.slots.iter().find(|(s, _)| s.slot == m.slot) else { continue };
                    sqlx::query("INSERT INTO pool_allocations (id, pool, request, member, slot, host, price, from_ms, until_ms, noticed, charged_to_ms, done) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $8, 0)")
                        .bind(Uuid::now_v7().to_string())
                        .bind(&id)
                        .bind(m.request.to_string())
                        .bind(&m.user)
                        .bind(m.slot.to_string())
                        .bind(slot.host.to_string())
                        .bind(pool_price(m.price)?)
                        .bind(m.from_ms)
                        .bind(m.until_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                }
                // Over: ended and charged to its end.
                sqlx::query("UPDATE pool_allocations SET done = 1 WHERE pool = $1 AND done = 0 AND until_ms IS NOT NULL AND until_ms <= charged_to_ms")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                for (request, why) in &decision.why {
                    sqlx::query("UPDATE pool_requests SET why = $2 WHERE id = $1")
                        .bind(request.to_string())
                        .bind(json_text(why))
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                }
                // Entities whose deadline to leave passed are gone, with their users.
                for statement in [
                    "DELETE FROM pool_members WHERE pool = $1 AND entity IN (SELECT entity FROM pool_entities WHERE pool = $1 AND leaving_at_ms IS NOT NULL AND leaving_at_ms <= $2)",
                    "DELETE FROM pool_entities WHERE pool = $1 AND leaving_at_ms IS NOT NULL AND leaving_at_ms <= $2",
                ] {
                    sqlx::query(statement)
                        .bind(&id)
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                }
                // Slots whose deadline to leave passed, or whose reservation ended, are
                // gone once their allocations are charged to their end.
                sqlx::query("DELETE FROM pool_slots WHERE pool = $1 AND ((leaving_at_ms IS NOT NULL AND leaving_at_ms <= $2) OR slot IN (SELECT r.id FROM reservations r WHERE r.until_ms IS NOT NULL AND r.until_ms <= $2)) AND NOT EXISTS (SELECT 1 FROM pool_allocations a WHERE a.pool = pool_slots.pool AND a.slot = pool_slots.slot AND a.done = 0)")
                    .bind(&id)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                apply_in(&mut tx, &decision.changes, now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Some(decision))
            }

            async fn put_pool_entity(&self, pool: Uuid, e: &PoolEntity) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO pool_entities (pool, entity, rights, lending_limit, borrowing_limit, invited_at_ms, joined_at_ms, leaving_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (pool, entity) DO UPDATE SET rights = excluded.rights, lending_limit = excluded.lending_limit, borrowing_limit = excluded.borrowing_limit")
                    .bind(pool.to_string())
                    .bind(&e.entity)
                    .bind(json_text(&e.rights))
                    .bind(e.lending_limit.map(i64::from))
                    .bind(e.borrowing_limit.map(i64::from))
                    .bind(e.invited_at_ms)
                    .bind(e.joined_at_ms)
                    .bind(e.leaving_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn pool_entities(&self, pool: Uuid) -> Result<Vec<PoolEntity>, StoreError> {
                sqlx::query("SELECT * FROM pool_entities WHERE pool = $1 ORDER BY invited_at_ms, entity")
                    .bind(pool.to_string())
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(pool_entity_row)
                    .collect()
            }

            async fn join_pool(&self, pool: Uuid, from: Uuid, entity: &str, limits: (Option<u32>, Option<u32>), now_ms: UnixMillis) -> Result<Result<(), MarketRefusal>, StoreError> {
                let (to, from_id) = (pool.to_string(), from.to_string());
                let mut tx = self.write_tx().await?;
                // Both pools' locks, in one order, so two merges never wait on each other.
                let (first, second) = if to < from_id { (&to, &from_id) } else { (&from_id, &to) };
                $store::lock(&mut tx, Lock::Pool(first)).await?;
                $store::lock(&mut tx, Lock::Pool(second)).await?;
                let joined: Option<Option<i64>> = sqlx::query_scalar("SELECT joined_at_ms FROM pool_entities WHERE pool = $1 AND entity = $2")
                    .bind(&to)
                    .bind(entity)
                    .fetch_optional(&mut *tx)
                    .await?;
                match joined {
                    None => {
                        return Ok(Err(MarketRefusal {
                            rule: "not_invited",
                            message: format!("{entity} was not invited into pool {pool}"),
                        }));
                    }
                    Some(Some(_)) => {
                        return Ok(Err(MarketRefusal {
                            rule: "joined",
                            message: format!("{entity} has joined pool {pool} already"),
                        }));
                    }
                    Some(None) => {}
                }
                let theirs: Option<String> = sqlx::query_scalar("SELECT owner FROM pools WHERE id = $1 AND dissolved_at_ms IS NULL")
                    .bind(&from_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if theirs.as_deref() != Some(entity) || pool == from {
                    return Ok(Err(MarketRefusal {
                        rule: "unknown_pool",
                        message: format!("{entity} has no pool {from} to merge"),
                    }));
                }
                let open: Option<String> = sqlx::query_scalar("SELECT id FROM pools WHERE id = $1 AND dissolved_at_ms IS NULL")
                    .bind(&to)
                    .fetch_optional(&mut *tx)
                    .await?;
                if open.is_none() {
                    return Ok(Err(MarketRefusal {
                        rule: "dissolved",
                        message: format!("pool {pool} is dissolved"),
                    }));
                }
                // Only a pool of its own, settled: another's entities, users or slots,
                // or allocations not charged to their end in its own currency, do not
                // move.
                let merged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pool_entities WHERE pool = $1")
                    .bind(&from_id)
                    .fetch_one(&mut *tx)
                    .await?;
                let open_allocations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pool_allocations WHERE pool = $1 AND done = 0")
                    .bind(&from_id)
                    .fetch_one(&mut *tx)
                    .await?;
                if merged > 0 {
                    return Ok(Err(MarketRefusal {
                        rule: "merged",
                        message: format!("pool {from} is a merged pool: only a pool of one owner merges into another"),
                    }));
                }
                let bursts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pool_bursts WHERE pool = $1 AND ended_at_ms IS NULL")
                    .bind(&from_id)
                    .fetch_one(&mut *tx)
                    .await?;
                if bursts > 0 {
                    return Ok(Err(MarketRefusal {
                        rule: "bursting",
                        message: format!("pool {from} holds {bursts} bursts: they are given back before it merges"),
                    }));
                }
                if open_allocations > 0 {
                    return Ok(Err(MarketRefusal {
                        rule: "allocated",
                        message: format!("pool {from} has {open_allocations} allocations not yet over: cancel its requests and let them end first"),
                    }));
                }
                for statement in [
                    "UPDATE pool_slots SET pool = $1, entity = $3 WHERE pool = $2",

                    "INSERT INTO pool_members (pool, member, entity, name, organisation, added_at_ms) SELECT $1, member, $3, name, organisation, added_at_ms FROM pool_members WHERE pool = $2 ON CONFLICT (pool, member) DO NOTHING",
                    "DELETE FROM pool_members WHERE pool = $2",
                ] {
                    sqlx::query(statement)
                        .bind(&to)
                        .bind(&from_id)
                        .bind(entity)
                        .execute(&mut *tx)
                        .await?;
                }
                // Its requests were bids in its own currency: they end with it.
                sqlx::query("UPDATE pool_requests SET cancelled_at_ms = $2 WHERE pool = $1 AND cancelled_at_ms IS NULL")
                    .bind(&from_id)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE pools SET dissolved_at_ms = $2, cycled_at_ms = $2 WHERE id = $1")
                    .bind(&from_id)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE pool_entities SET joined_at_ms = $3, lending_limit = $4, borrowing_limit = $5 WHERE pool = $1 AND entity = $2")
                    .bind(&to)
                    .bind(entity)
                    .bind(now_ms)
                    .bind(limits.0.map(i64::from))
                    .bind(limits.1.map(i64::from))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE pools SET requested_at_ms = $2 WHERE id = $1 AND requested_at_ms IS NULL")
                    .bind(&to)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(()))
            }

            async fn leave_pool_entity(&self, pool: Uuid, entity: &str, leaving_at_ms: UnixMillis) -> Result<Result<bool, MarketRefusal>, StoreError> {
                let mut tx = self.write_tx().await?;
                $store::lock(&mut tx, Lock::Pool(&pool.to_string())).await?;
                let owner: Option<String> = sqlx::query_scalar("SELECT owner FROM pools WHERE id = $1")
                    .bind(pool.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                if owner.as_deref() == Some(entity) {
                    return Ok(Err(MarketRefusal {
                        rule: "owner_stays",
                        message: format!("{entity} made pool {pool} and pays its bursts: it dissolves it rather than leave"),
                    }));
                }
                let staying: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM pool_entities WHERE pool = $1 AND entity <> $2 AND joined_at_ms IS NOT NULL AND leaving_at_ms IS NULL")
                    .bind(pool.to_string())
                    .bind(entity)
                    .fetch_one(&mut *tx)
                    .await?;
                if staying == 0 {
                    return Ok(Err(MarketRefusal {
                        rule: "last_entity",
                        message: format!("{entity} is the last entity of pool {pool}: dissolve it instead"),
                    }));
                }
                let left = sqlx::query("UPDATE pool_entities SET leaving_at_ms = $3 WHERE pool = $1 AND entity = $2 AND joined_at_ms IS NOT NULL AND leaving_at_ms IS NULL")
                    .bind(pool.to_string())
                    .bind(entity)
                    .bind(leaving_at_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if left == 0 {
                    return Ok(Ok(false));
                }
                sqlx::query("UPDATE pool_slots SET leaving_at_ms = $3 WHERE pool = $1 AND entity = $2 AND (leaving_at_ms IS NULL OR leaving_at_ms > $3)")
                    .bind(pool.to_string())
                    .bind(entity)
                    .bind(leaving_at_ms)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(true))
            }

            async fn dissolve_pool(&self, pool: Uuid, at_ms: UnixMillis, now_ms: UnixMillis) -> Result<bool, StoreError> {
                let mut tx = self.write_tx().await?;
                $store::lock(&mut tx, Lock::Pool(&pool.to_string())).await?;
                let done = sqlx::query("UPDATE pools SET dissolved_at_ms = $2, requested_at_ms = COALESCE(requested_at_ms, $3) WHERE id = $1 AND dissolved_at_ms IS NULL")
                    .bind(pool.to_string())
                    .bind(at_ms)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if done == 0 {
                    return Ok(false);
                }
                sqlx::query("UPDATE pool_slots SET leaving_at_ms = $2 WHERE pool = $1 AND (leaving_at_ms IS NULL OR leaving_at_ms > $2)")
                    .bind(pool.to_string())
                    .bind(at_ms)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE pool_requests SET cancelled_at_ms = $2 WHERE pool = $1 AND cancelled_at_ms IS NULL")
                    .bind(pool.to_string())
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn put_pool_burst(&self, pool: Uuid, b: &PoolBurst) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO pool_bursts (slot, pool, request, source, price, started_at_ms, ended_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (slot) DO NOTHING")
                    .bind(b.slot.to_string())
                    .bind(pool.to_string())
                    .bind(b.request.to_string())
                    .bind(&b.source)
                    .bind(pool_price(b.price)?)
                    .bind(b.started_at_ms)
                    .bind(b.ended_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn pool_bursts(&self, pool: Uuid) -> Result<Vec<PoolBurst>, StoreError> {
                let mut out = Vec::new();
                for row in sqlx::query("SELECT * FROM pool_bursts WHERE pool = $1 ORDER BY started_at_ms, slot")
                    .bind(pool.to_string())
                    .fetch_all(self.reader())
                    .await?
                {
                    out.push(PoolBurst {
                        slot: parse_uuid(row.try_get("slot")?)?,
                        request: parse_uuid(row.try_get("request")?)?,
                        source: row.try_get("source")?,
                        price: row.try_get::<i64, _>("price")?.max(0) as u64,
                        started_at_ms: row.try_get("started_at_ms")?,
                        ended_at_ms: row.try_get("ended_at_ms")?,
                    });
                }
                Ok(out)
            }

            async fn end_pool_burst(&self, slot: Uuid, now_ms: UnixMillis) -> Result<(), StoreError> {
                sqlx::query("UPDATE pool_bursts SET ended_at_ms = $2 WHERE slot = $1 AND ended_at_ms IS NULL")
                    .bind(slot.to_string())
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use pool_sql;
