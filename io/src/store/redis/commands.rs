//! Every [`StoreCommand`]'s step on Redis: one script, or one single-key command, each with
//! the semantics of `cim_core::memstore::MemoryStore`.

use super::keys::*;
use super::reply::*;
use super::*;

impl RedisStore {
    // --- accounts ---------------------------------------------------------------------

    pub(super) async fn register(&self, name: String, password_hash: String) -> R<StoreReply> {
        // Where the account starts reading `all`: the head before the reservation, so a
        // message appended meanwhile is owed rather than missed.
        let (all_epoch, all_seq): (Option<String>, Option<String>) = self
            .query(
                ::redis::cmd("HMGET")
                    .arg(conv_key(&ConvId::All, "meta"))
                    .arg("epoch")
                    .arg("head"),
            )
            .await?;
        let (all_epoch, all_seq) = match (all_epoch, all_seq) {
            (Some(epoch), Some(seq)) => (epoch, seq),
            _ => ("0".to_owned(), "0".to_owned()),
        };
        let v: Vec<Value> = self
            .invoke(
                self.scripts
                    .register
                    .key(name_key(&name.to_ascii_lowercase()))
                    .key(NEXT_USER)
                    .key(name_key(&name))
                    .arg(&password_hash)
                    .arg(&name)
                    .arg(&all_epoch)
                    .arg(&all_seq),
            )
            .await?;
        let [
            created,
            user,
            stored_hash,
            stored_name,
            all_epoch,
            all_seq,
            deleted,
        ] = v.as_slice()
        else {
            return Err(bad_reply("register", &Value::Array(v)));
        };
        let user = UserId(num(user)?);
        let stored_hash = string(stored_hash)?.unwrap_or_default();
        // The name as its owner typed it, never as a later look-alike typed it.
        let name = string(stored_name)?.unwrap_or(name);
        let all_epoch = string(all_epoch)?.unwrap_or_else(|| "0".into());
        let all_seq = string(all_seq)?.unwrap_or_else(|| "0".into());
        // Written after the reservation, from the reservation's values, also when the name
        // was taken: that completes a registration whose writer died in between (see the
        // module docs and account_complete.lua); never for a tombstone.
        let created = num(created)? == 1;
        if num(deleted)? == 0 {
            let _: Value = self
                .invoke(
                    self.scripts
                        .account_complete
                        .key(acct_key(user))
                        .key(claim_key(user))
                        .arg(&name)
                        .arg(&stored_hash)
                        .arg(&all_epoch)
                        .arg(&all_seq)
                        .arg(if created { "1" } else { "0" }),
                )
                .await?;
        }
        Ok(StoreReply::AccountRegistered(if created {
            Ok(user)
        } else {
            Err(NameTaken)
        }))
    }

    pub(super) async fn load_account(&self, user: UserId) -> R<StoreReply> {
        type Fields = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let (name, password_hash, deleted, all_epoch, all_seq): Fields = self
            .query(
                ::redis::cmd("HMGET")
                    .arg(acct_key(user))
                    .arg("name")
                    .arg("password_hash")
                    .arg("deleted")
                    .arg("all_epoch")
                    .arg("all_seq"),
            )
            .await?;
        Ok(StoreReply::Account(match (name, password_hash, deleted) {
            (Some(name), Some(password_hash), None) => Some(Account {
                user,
                name,
                password_hash,
                all_from: all_from(all_epoch.as_deref(), all_seq.as_deref()),
            }),
            _ => None,
        }))
    }

    /// `LoadAccountByName`: the reservation (lowercase key, then one written as typed
    /// before names ignored case and not migrated yet), then the account.
    pub(super) async fn load_account_by_name(&self, name: &str) -> R<StoreReply> {
        let (lower, typed): (Option<u64>, Option<u64>) = self
            .query_pipe(
                ::redis::pipe()
                    .hget(name_key(&name.to_ascii_lowercase()), "user")
                    .hget(name_key(name), "user"),
            )
            .await?;
        match lower.or(typed) {
            Some(user) => self.load_account(UserId(user)).await,
            None => Ok(StoreReply::Account(None)),
        }
    }

    /// `ListAccounts`: ids are dense (`INCR`), so a page is a range of ids read in one
    /// pipeline; an id without an account hash (a registration whose writer died before
    /// writing it) is skipped.
    pub(super) async fn list_accounts(&self, after: UserId, limit: u32) -> R<StoreReply> {
        let last: Option<u64> = self.query(::redis::cmd("GET").arg(NEXT_USER)).await?;
        let last = last.unwrap_or(0);
        let mut rows = Vec::new();
        let mut next = after.0.saturating_add(1);
        while rows.len() < limit as usize && next <= last {
            let chunk_end = last.min(next.saturating_add(u64::from(limit).max(1) - 1));
            let ids: Vec<u64> = (next..=chunk_end).collect();
            let cmds = ids
                .iter()
                .map(|id| {
                    let key = acct_key(UserId(*id));
                    let mut cmd = ::redis::cmd("HMGET");
                    cmd.arg(&key).arg("name").arg("deleted");
                    (key, cmd)
                })
                .collect();
            let fields: Vec<(Option<String>, Option<String>)> = self.query_each(cmds).await?;
            for (id, (name, deleted)) in ids.iter().zip(fields) {
                if let Some(name) = name
                    && rows.len() < limit as usize
                {
                    rows.push(AccountSummary {
                        user: UserId(*id),
                        name,
                        deleted: deleted.is_some(),
                    });
                }
            }
            next = chunk_end.saturating_add(1);
        }
        Ok(StoreReply::Accounts(rows))
    }

    pub(super) async fn set_password(&self, user: UserId, password_hash: String) -> R<StoreReply> {
        let found: i64 = self
            .invoke(
                self.scripts
                    .set_password
                    .key(acct_key(user))
                    .key(claim_key(user))
                    .arg(&password_hash),
            )
            .await?;
        Ok(StoreReply::PasswordSet { found: found == 1 })
    }

    /// `DeleteAccount`, in an order an interruption cannot harm (each step idempotent; a
    /// retry finishes the rest): the account's tombstone first (from then on no login
    /// passes and no fresh existence check does), then the name's, the claim and route
    /// record, group memberships, the failure record; last, the answer waits out
    /// [`ACCOUNT_CACHE_TTL`], so every route's cache has forgotten the account by the time
    /// the caller hears "deleted".
    pub(super) async fn delete_account(&self, now: UnixMillis, user: UserId) -> R<StoreReply> {
        let v: Vec<Value> = self
            .invoke(self.scripts.tombstone.key(acct_key(user)).arg(now.0))
            .await?;
        let [status, name] = v.as_slice() else {
            return Err(bad_reply("delete account", &Value::Array(v)));
        };
        let Some(name) = string(name)? else {
            return Ok(StoreReply::AccountDeleted(None));
        };
        let already = num(status)? == 2;
        // The reservation: only the one that is this account's (after a migration conflict
        // the lowercase name may belong to an older account).
        let _: i64 = self
            .invoke(
                self.scripts
                    .tombstone_name
                    .key(name_key(&name.to_ascii_lowercase()))
                    .key(name_key(&name))
                    .arg(user.0)
                    .arg(now.0),
            )
            .await?;
        let StoreReply::Claim(state) = self.load_claim(user).await? else {
            return Err(StoreUnavailable("redis: claim answered oddly".into()));
        };
        if let Some(claim) = &state.claim {
            let _: i64 = self
                .invoke(
                    self.scripts
                        .claim_release
                        .key(claim_key(user))
                        .key(route_key(user))
                        .arg(claim.epoch.0),
                )
                .await?;
        }
        let indexed: Vec<String> = self
            .query(::redis::cmd("SMEMBERS").arg(convs_key(user)))
            .await?;
        // Each group's membership is under that group's tag: one script call each (a
        // removal counts as a membership change in the same step, see leave_group.lua).
        for conv in indexed.iter().filter_map(|c| c.parse::<ConvId>().ok()) {
            if matches!(conv, ConvId::Group(_)) {
                self.leave_group(&conv, user).await?;
            }
        }
        let _: i64 = self
            .query(::redis::cmd("DEL").arg(failures_key(user)))
            .await?;
        self.known_accounts().clear();
        // Also on a retry: the first attempt may have died before its wait.
        tokio::time::sleep(ACCOUNT_CACHE_TTL).await;
        Ok(StoreReply::AccountDeleted(Some(Deleted {
            name,
            claim: state.claim,
            already,
        })))
    }

    /// `LoadNames`: one `HGET` per account, pipelined (each name is written once and never
    /// changes, so the pipeline need not be one snapshot).
    pub(super) async fn names(&self, users: Vec<UserId>) -> R<StoreReply> {
        if users.is_empty() {
            return Ok(StoreReply::Names(Vec::new()));
        }
        let names: Vec<Option<String>> = self.query_each(name_reads(&users)).await?;
        if names.len() != users.len() {
            return Err(StoreUnavailable("redis: names answered oddly".into()));
        }
        Ok(StoreReply::Names(users.into_iter().zip(names).collect()))
    }

    // --- claims -----------------------------------------------------------------------

    pub(super) async fn load_claim(&self, user: UserId) -> R<StoreReply> {
        let v: Vec<Value> = self
            .invoke(&self.scripts.claim_load.key(claim_key(user)))
            .await?;
        let [epoch, rest @ .., foreign] = v.as_slice() else {
            return Err(bad_reply("load claim", &Value::Array(v)));
        };
        Ok(StoreReply::Claim(ClaimState {
            epoch: Epoch(opt_num(epoch)?.unwrap_or(0)),
            claim: parse_claim(rest)?,
            foreign: num(foreign)? == 1,
        }))
    }

    /// `ReplaceClaim`, and `ResumeClaim` when `presented` is the secret hash a resumption
    /// presented (one script: the resumption only adds its compare).
    pub(super) async fn replace_claim(
        &self,
        now: UnixMillis,
        user: UserId,
        expected: Epoch,
        claim: Claim,
        presented: Option<[u8; 32]>,
    ) -> R<StoreReply> {
        let (secret, secret_exp) = match &claim.resume_secret {
            Some(s) => (&s.hash[..], s.expires_at.0),
            None => (&[][..], 0),
        };
        let presented = presented.as_ref().map_or(&[][..], |p| &p[..]);
        let v: Vec<Value> = self
            .invoke(
                self.scripts
                    .claim_replace
                    .key(claim_key(user))
                    .key(acct_key(user))
                    .arg(expected.0)
                    .arg(claim.epoch.0)
                    .arg(claim.server.as_str())
                    .arg(claim.lease_until.0)
                    .arg(&claim.resume_token_hash[..])
                    .arg(secret)
                    .arg(secret_exp)
                    .arg(presented)
                    .arg(now.0),
            )
            .await?;
        let [replaced, counter, old @ ..] = v.as_slice() else {
            return Err(bad_reply("replace claim", &Value::Array(v)));
        };
        let old = parse_claim(old)?;
        Ok(StoreReply::ClaimReplaced(if num(replaced)? == 1 {
            Ok(old)
        } else {
            // The script stamps a foreign claim when it raises the counter: the raised
            // counter above the claim's epoch says what `foreign` said.
            Err(ClaimState {
                epoch: Epoch(num(counter)?),
                claim: old,
                foreign: false,
            })
        }))
    }

    pub(super) async fn refresh(
        &self,
        now: UnixMillis,
        server: ServerId,
        lease_until: UnixMillis,
        sessions: Vec<(UserId, Epoch)>,
    ) -> R<StoreReply> {
        if sessions.is_empty() {
            return Ok(StoreReply::LeasesRefreshed(Vec::new()));
        }
        // One script per slot on a cluster (see `cluster`): each user's outcome is its own,
        // so only the batch's atomicity across users is lost, which no caller relies on. A
        // slot whose master does not answer makes its users' outcomes unknown, not everyone's
        // (the server then fences only them, at their deadline).
        let outcomes = self
            .per_slot_or(
                &sessions,
                sessions.iter().map(|(user, _)| claim_key(*user)).collect(),
                |part| self.refresh_part(now, &server, lease_until, part),
                |(user, _)| (*user, LeaseRefresh::Unknown),
            )
            .await?;
        Ok(StoreReply::LeasesRefreshed(outcomes))
    }

    /// `RefreshLeases` of sessions whose claims share a slot (or any, on one node): one script.
    async fn refresh_part(
        &self,
        now: UnixMillis,
        server: &ServerId,
        lease_until: UnixMillis,
        sessions: Vec<&(UserId, Epoch)>,
    ) -> R<Vec<(UserId, LeaseRefresh)>> {
        let mut invocation = self.scripts.claim_refresh.prepare_invoke();
        invocation
            .arg(server.as_str())
            .arg(lease_until.0)
            .arg(now.0);
        for (user, epoch) in &sessions {
            invocation.key(claim_key(*user)).arg(epoch.0);
        }
        let v: Vec<Value> = self.invoke(&invocation).await?;
        if v.len() != sessions.len() * 2 {
            return Err(bad_reply("refresh", &Value::Array(v)));
        }
        sessions
            .iter()
            .zip(v.chunks_exact(2))
            .map(|((user, _), pair)| {
                let outcome = match num(&pair[0])? {
                    0 => LeaseRefresh::Refreshed,
                    1 => LeaseRefresh::Superseded {
                        current: Epoch(num(&pair[1])?),
                    },
                    _ => LeaseRefresh::Gone,
                };
                Ok((*user, outcome))
            })
            .collect()
    }

    pub(super) async fn routes(&self, now: UnixMillis, users: Vec<UserId>) -> R<StoreReply> {
        if users.is_empty() {
            return Ok(StoreReply::Routes(Vec::new()));
        }
        // One script per slot on a cluster, as `refresh`: each user's record is judged alone.
        // A user whose slot does not answer is reported without a route: not pushed to, it
        // recovers the message by sync like any user a push misses.
        let routes = self
            .per_slot_or(
                &users,
                users.iter().map(|user| claim_key(*user)).collect(),
                |part| self.routes_part(now, part),
                |user| (*user, None),
            )
            .await?;
        Ok(StoreReply::Routes(routes))
    }

    /// `LoadRoutes` of users whose keys share a slot (or any, on one node): one script.
    async fn routes_part(
        &self,
        now: UnixMillis,
        users: Vec<&UserId>,
    ) -> R<Vec<(UserId, Option<RouteRecord>)>> {
        let mut invocation = self.scripts.claim_routes.prepare_invoke();
        invocation.arg(now.0);
        for user in &users {
            invocation.key(claim_key(**user)).key(route_key(**user));
        }
        let v: Vec<Value> = self.invoke(&invocation).await?;
        let users: Vec<UserId> = users.into_iter().copied().collect();
        route_records(&users, &v).ok_or_else(|| bad_reply("routes", &Value::Array(v)))?
    }

    /// `ListOnline`: SCAN the route records (never KEYS: it blocks Redis), judge each batch
    /// with the `LoadRoutes` script, read the names, stop once `limit` are found. SCAN may
    /// return a key twice; the map dedups.
    pub(super) async fn online(&self, now: UnixMillis, limit: u32) -> R<StoreReply> {
        let limit = limit as usize;
        let mut found: BTreeMap<UserId, OnlineEntry> = BTreeMap::new();
        // Every master's keys on a cluster: route records live in every slot.
        for node in self.scan_nodes().await? {
            if found.len() >= limit {
                break;
            }
            self.online_on(now, limit, node.as_ref(), &mut found)
                .await?;
        }
        Ok(StoreReply::Online(
            found.into_values().take(limit).collect(),
        ))
    }

    /// [`Self::online`]'s scan of one node, adding to `found` until it holds `limit`.
    async fn online_on(
        &self,
        now: UnixMillis,
        limit: usize,
        node: Option<&::redis::cluster_routing::RoutingInfo>,
        found: &mut BTreeMap<UserId, OnlineEntry>,
    ) -> R<()> {
        let mut cursor: u64 = 0;
        while found.len() < limit {
            let (next, keys) = self
                .scan_page(node, cursor, "cim:route:*", SCAN_COUNT)
                .await?;
            let users: Vec<UserId> = keys
                .iter()
                .filter_map(|k| user_of_route_key(k))
                .filter(|u| !found.contains_key(u))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if !users.is_empty() {
                let StoreReply::Routes(routes) = self.routes(now, users).await? else {
                    return Err(StoreUnavailable("redis: routes answered oddly".into()));
                };
                let online: Vec<(UserId, ServerId)> = routes
                    .into_iter()
                    .filter_map(|(user, record)| Some((user, record?.server)))
                    .collect();
                let users: Vec<UserId> = online.iter().map(|(user, _)| *user).collect();
                let names: Vec<Option<String>> = self.query_each(name_reads(&users)).await?;
                for ((user, server), name) in online.into_iter().zip(names) {
                    // A route record without an account is not a user anyone can address.
                    if let Some(name) = name {
                        found.insert(user, OnlineEntry { user, name, server });
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(())
    }

    // --- conversations ----------------------------------------------------------------

    pub(super) async fn members(&self, conv: ConvId) -> R<StoreReply> {
        let members = match &conv {
            ConvId::All => Vec::new(),
            ConvId::Private { low, high } => vec![*low, *high],
            ConvId::Group(_) => {
                let ids: Vec<u64> = self
                    .query(::redis::cmd("HKEYS").arg(conv_key(&conv, "members")))
                    .await?;
                let set: BTreeSet<u64> = ids.into_iter().collect();
                set.into_iter().map(UserId).collect()
            }
        };
        Ok(StoreReply::Members(members))
    }

    /// `store_now` judges the route records read for the push (as `LoadRoutes` at that
    /// moment would); `now` stamps the message and judges its idempotency and order records.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn append(
        &self,
        store_now: UnixMillis,
        conv: ConvId,
        sender: UserId,
        msg_id: ClientMsgId,
        body: Bytes,
        now: UnixMillis,
        order: Option<SendOrder>,
        members_known: Option<MembersVersion>,
    ) -> R<StoreReply> {
        // Membership of private conversations and `all` is about accounts, which live under
        // other tags: checked first, from a cache at most `ACCOUNT_CACHE_TTL` old, which a
        // deletion waits out before it answers (see the module docs).
        let mut pipe = ::redis::pipe();
        match &conv {
            ConvId::Private { low, high } => {
                if !self.accounts_exist(&[*low, *high]).await? {
                    return Ok(StoreReply::Appended(Err(AppendError::UnknownConversation)));
                }
                if sender != *low && sender != *high {
                    return Ok(StoreReply::Appended(Err(AppendError::NotMember)));
                }
                // The index first (see the module docs): a pipeline runs in order, so the
                // entries are in before the script, in the same round trip. On a cluster
                // they are under the users' tags: sent (and answered) before the script.
                if self.is_cluster() {
                    let _: Vec<i64> = self
                        .query_each(
                            [*low, *high]
                                .into_iter()
                                .map(|user| {
                                    let key = convs_key(user);
                                    let mut cmd = ::redis::cmd("SADD");
                                    cmd.arg(&key).arg(conv.to_string());
                                    (key, cmd)
                                })
                                .collect(),
                        )
                        .await?;
                } else {
                    pipe.sadd(convs_key(*low), conv.to_string())
                        .ignore()
                        .sadd(convs_key(*high), conv.to_string())
                        .ignore();
                }
            }
            ConvId::All => {
                if !self.accounts_exist(&[sender]).await? {
                    return Ok(StoreReply::Appended(Err(AppendError::NotMember)));
                }
            }
            ConvId::Group(_) => {}
        }
        let body_hash: [u8; 32] = Sha256::digest(&body).into();
        let encoded = cim_proto::Message {
            sender: sender.0,
            msg_id_hi: msg_id.hi(),
            msg_id_lo: msg_id.lo(),
            body: body.clone(),
            appended_at_ms: now.0,
            ..Default::default()
        }
        .encode_to_vec();
        let script = &self.scripts.append;
        // The two users' route records, read by the script for the push (see append.lua),
        // only where they may share the script's node: never on a cluster.
        let route_users: Vec<UserId> = match &conv {
            ConvId::Private { low, high } if !self.is_cluster() => vec![*low, *high],
            _ => Vec::new(),
        };
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(5 + 2 * route_users.len())
            .arg(conv_key(&conv, "meta"))
            .arg(conv_key(&conv, "log"))
            .arg(idem_key(&conv, sender, msg_id))
            .arg(conv_key(&conv, "members"))
            // Unordered appends never touch it; any key of the conversation's slot will do.
            .arg(order_key(&conv, sender, order.map_or(0, |o| o.stream)));
        for user in &route_users {
            pipe.arg(claim_key(*user)).arg(route_key(*user));
        }
        pipe.arg(if matches!(conv, ConvId::Group(_)) {
            "1"
        } else {
            "0"
        })
        .arg(sender.0)
        .arg(&body_hash[..])
        .arg(encoded)
        .arg(now.0)
        .arg(millis(self.options.idempotency_ttl))
        .arg(self.options.max_log_len as u64)
        .arg(self.new_log_epoch().0)
        .arg(order.map_or(0, |o| o.seq))
        .arg(order.map_or(0, |o| o.after))
        .arg(store_now.0)
        .arg(members_known.map_or(0, |v| v.log_epoch.0))
        .arg(members_known.map_or(0, |v| v.changes));
        let waiting = self.options.wait_replicas;
        let v: Vec<Value> = if waiting == 0 {
            let (v,): (Vec<Value>,) = self.query_pipe_with_script(&pipe, script).await?;
            v
        } else {
            // `WAIT` in the script's pipeline: on one node the same connection; on a cluster
            // the crate routes a pipeline by its first keyed command, so it goes to the
            // slot's master with the script (a bare `WAIT` would go to every master).
            pipe.cmd("WAIT")
                .arg(waiting)
                .arg(millis(self.options.wait_timeout()));
            let (v, confirmed): (Vec<Value>, i64) =
                self.query_pipe_with_script(&pipe, script).await?;
            let status = v.first().map(string).transpose()?.flatten();
            let confirmed = match status.as_deref() {
                // A duplicate wrote nothing: `WAIT` counted only this connection's earlier
                // writes, which need not include the original append (another route's, or
                // one before a reconnect). A write of its own moves the connection's
                // replication offset past everything the master has, the original included.
                Some("dup") => {
                    let (confirmed,): (i64,) = self
                        .query_pipe(
                            ::redis::pipe()
                                .cmd("SET")
                                .arg(conv_key(&conv, "wait"))
                                .arg(now.0)
                                .arg("PX")
                                .arg(millis(self.options.wait_timeout()).max(1))
                                .ignore()
                                .cmd("WAIT")
                                .arg(waiting)
                                .arg(millis(self.options.wait_timeout())),
                        )
                        .await?;
                    confirmed
                }
                _ => confirmed,
            };
            if matches!(status.as_deref(), Some("ok" | "dup")) && confirmed < i64::from(waiting) {
                return Err(StoreUnavailable(format!(
                    "redis: the append reached {confirmed} of {waiting} replicas within {} ms: \
                     it may be stored; resend it",
                    millis(self.options.wait_timeout())
                )));
            }
            v
        };
        let status = v.first().map(string).transpose()?.flatten();
        let result = match (status.as_deref(), v.as_slice()) {
            (Some("unknown"), _) => Err(AppendError::UnknownConversation),
            (Some("not_member"), _) => Err(AppendError::NotMember),
            (Some("conflict"), _) => Err(AppendError::ConflictingRetry),
            (Some("out_of_order"), _) => Err(AppendError::OutOfOrder),
            (Some("superseded"), _) => Err(AppendError::Superseded),
            (Some(kind @ ("ok" | "dup")), [_, epoch, seq, at, read]) => {
                let log_epoch = LogEpoch(num(epoch)?);
                Ok(Appended {
                    recipients: push_recipients(&conv, log_epoch, &route_users, read)?,
                    message: StoredMessage {
                        conv,
                        log_epoch,
                        seq: num(seq)?,
                        sender,
                        msg_id,
                        // A duplicate's body is the retry's, equal to the original's (same hash).
                        body,
                        appended_at: UnixMillis(num(at)?),
                    },
                    duplicate: kind == "dup",
                })
            }
            _ => return Err(bad_reply("append", &Value::Array(v))),
        };
        Ok(StoreReply::Appended(result))
    }

    pub(super) async fn heads(&self, user: UserId) -> R<StoreReply> {
        let (exists, all_from) = self.account_state(user).await?;
        let (indexed, cursors): (Vec<String>, BTreeMap<String, String>) = self
            .query_pipe(
                ::redis::pipe()
                    .smembers(convs_key(user))
                    .hgetall(cursors_key(user)),
            )
            .await?;
        if !exists {
            return Ok(StoreReply::Heads(Vec::new()));
        }
        // Unparseable entries cannot come from this code; skipping them keeps one bad key
        // from hiding every conversation.
        let mut convs: BTreeSet<ConvId> = indexed.iter().filter_map(|c| c.parse().ok()).collect();
        convs.insert(ConvId::All);
        convs.retain(|c| !matches!(c, ConvId::Private { .. }) || c.peer_of(user).is_some());
        let convs: Vec<ConvId> = convs.into_iter().collect();
        let calls: Vec<_> = convs
            .iter()
            .map(|conv| read_call(user, conv, LogEpoch(0), 0, 0, false, self.new_log_epoch()))
            .collect();
        let values = self.read_pipelined(&calls).await?;
        if values.len() != convs.len() {
            return Err(StoreUnavailable("redis: heads answered oddly".into()));
        }
        let mut heads = Vec::new();
        let mut unavailable = Vec::new();
        for (conv, value) in convs.into_iter().zip(values) {
            let Some(value) = value else {
                unavailable.push(conv); // its shard did not answer
                continue;
            };
            let Some(read) = parse_read(&value)? else {
                continue; // no log (yet): not reported
            };
            if read.joined < 0 {
                continue; // indexed group the user is not (or no longer) a member of
            }
            let mut cursor =
                cursor_in(cursors.get(&conv.to_string()), read.log_epoch, read.carried);
            if conv == ConvId::All {
                cursor = cursor.max(all_from.floor_in(read.log_epoch, read.carried));
            }
            heads.push(read.head(conv, cursor));
        }
        if unavailable.is_empty() {
            Ok(StoreReply::Heads(heads))
        } else {
            Ok(StoreReply::PartialHeads { heads, unavailable })
        }
    }

    pub(super) async fn fetch(
        &self,
        user: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        after_seq: u64,
        limit: u32,
    ) -> R<StoreReply> {
        let (exists, all_from) = self.account_state(user).await?;
        let cursor: Option<String> = self
            .query(
                ::redis::cmd("HGET")
                    .arg(cursors_key(user))
                    .arg(conv.to_string()),
            )
            .await?;
        let may_read = match &conv {
            ConvId::All => exists,
            ConvId::Private { .. } => conv.peer_of(user).is_some(),
            ConvId::Group(_) => false, // the script checks membership
        };
        if !may_read && !matches!(conv, ConvId::Group(_)) {
            return Ok(StoreReply::NotMember);
        }
        let call = read_call(
            user,
            &conv,
            log_epoch,
            after_seq,
            limit,
            may_read,
            self.new_log_epoch(),
        );
        // One read: it answered, or the whole call failed.
        let value = self.read_pipelined(&[call]).await?;
        let Some(Some(value)) = value.first() else {
            return Err(StoreUnavailable("redis: fetch answered oddly".into()));
        };
        let read = parse_read(value)?;
        // A group has a log from its creation: no log, or no membership, is not a member.
        let is_group = matches!(conv, ConvId::Group(_));
        if is_group && read.as_ref().is_none_or(|r| r.joined < 0) {
            return Ok(StoreReply::NotMember);
        }
        let Some(read) = read else {
            return Ok(StoreReply::Fetched {
                head: ConvHead {
                    conv,
                    log_epoch: LogEpoch(0),
                    head_seq: 0,
                    first_available_seq: 1,
                    cursor_seq: 0,
                    carried_from: LogEpoch(0),
                    carried_up_to: 0,
                },
                messages: Vec::new(),
            });
        };
        let mut cursor = cursor_in(cursor.as_ref(), read.log_epoch, read.carried);
        if conv == ConvId::All {
            cursor = cursor.max(all_from.floor_in(read.log_epoch, read.carried));
        }
        let messages = read
            .messages
            .iter()
            .map(|(seq, bytes)| decode_message(&conv, read.log_epoch, *seq, bytes))
            .collect::<R<Vec<_>>>()?;
        Ok(StoreReply::Fetched {
            head: read.head(conv, cursor),
            messages,
        })
    }

    pub(super) async fn advance_cursors(
        &self,
        user: UserId,
        cursors: Vec<(ConvId, LogEpoch, u64)>,
    ) -> R<StoreReply> {
        if cursors.is_empty() {
            return Ok(StoreReply::CursorsAdvanced);
        }
        let reads = cursors
            .iter()
            .map(|(conv, _, _)| {
                let key = conv_key(conv, "meta");
                let mut cmd = ::redis::cmd("HGET");
                cmd.arg(&key).arg("epoch");
                (key, cmd)
            })
            .collect();
        let current: Vec<Option<u64>> = self.query_each(reads).await?;
        let mut invocation = self.scripts.advance_cursors.prepare_invoke();
        invocation.key(cursors_key(user));
        let mut any = false;
        for ((conv, log_epoch, seq), current) in cursors.iter().zip(current) {
            // A cursor of a replaced (or absent) log means nothing now.
            if current == Some(log_epoch.0) {
                invocation.arg(conv.to_string()).arg(log_epoch.0).arg(*seq);
                any = true;
            }
        }
        if any {
            let _: i64 = self.invoke(&invocation).await?;
        }
        Ok(StoreReply::CursorsAdvanced)
    }

    pub(super) async fn create_group(&self, conv: ConvId, owner: UserId) -> R<StoreReply> {
        if !matches!(conv, ConvId::Group(_)) {
            return Ok(StoreReply::GroupCreated { created: false });
        }
        let _: i64 = self
            .query(
                ::redis::cmd("SADD")
                    .arg(convs_key(owner))
                    .arg(conv.to_string()),
            )
            .await?;
        let created: i64 = self
            .invoke(
                self.scripts
                    .create_group
                    .key(conv_key(&conv, "meta"))
                    .key(conv_key(&conv, "members"))
                    .arg(owner.0)
                    .arg(self.new_log_epoch().0),
            )
            .await?;
        Ok(StoreReply::GroupCreated {
            created: created == 1,
        })
    }

    /// Removes `user` from the group `conv`; true if it was a member.
    pub(super) async fn leave_group(&self, conv: &ConvId, user: UserId) -> R<bool> {
        let removed: i64 = self
            .invoke(
                self.scripts
                    .leave_group
                    .key(conv_key(conv, "meta"))
                    .key(conv_key(conv, "members"))
                    .arg(user.0),
            )
            .await?;
        Ok(removed == 1)
    }

    pub(super) async fn join_group(&self, conv: ConvId, user: UserId) -> R<StoreReply> {
        if !matches!(conv, ConvId::Group(_)) {
            return Ok(StoreReply::GroupJoined(None));
        }
        let _: i64 = self
            .query(
                ::redis::cmd("SADD")
                    .arg(convs_key(user))
                    .arg(conv.to_string()),
            )
            .await?;
        let joined: i64 = self
            .invoke(
                self.scripts
                    .join_group
                    .key(conv_key(&conv, "meta"))
                    .key(conv_key(&conv, "members"))
                    .arg(user.0),
            )
            .await?;
        Ok(StoreReply::GroupJoined(u64::try_from(joined).ok()))
    }
}

/// `HGET <account> name` of each user, for [`RedisStore::query_each`].
fn name_reads(users: &[UserId]) -> Vec<(String, ::redis::Cmd)> {
    users
        .iter()
        .map(|user| {
            let key = acct_key(*user);
            let mut cmd = ::redis::cmd("HGET");
            cmd.arg(&key).arg("name");
            (key, cmd)
        })
        .collect()
}

/// The push's recipients as the append script read them (its reply's 5th element, see
/// append.lua): a group's member ids, sorted, under the membership version `log_epoch` and
/// the script's change count (or that the members are those of the version the caller
/// named); the route records of `route_users` (those whose keys the script was given), as
/// `LoadRoutes` reads them; `None` where nothing was read.
fn push_recipients(
    conv: &ConvId,
    log_epoch: LogEpoch,
    route_users: &[UserId],
    read: &Value,
) -> R<Option<Recipients>> {
    let Value::Array(items) = read else {
        return Err(bad_reply("append recipients", read));
    };
    Ok(match conv {
        ConvId::Group(_) => {
            let (changes, ids) = match items.as_slice() {
                [changes] => (changes, None),
                [changes, Value::Array(ids)] => (changes, Some(ids)),
                _ => return Err(bad_reply("append recipients", read)),
            };
            let version = MembersVersion {
                log_epoch,
                changes: num(changes)?,
            };
            Some(match ids {
                None => Recipients::MembersUnchanged(version),
                Some(ids) => {
                    let ids = ids.iter().map(num).collect::<R<BTreeSet<u64>>>()?;
                    Recipients::Members {
                        version,
                        members: ids.into_iter().map(UserId).collect(),
                    }
                }
            })
        }
        ConvId::Private { .. } if !route_users.is_empty() => {
            let routes = route_records(route_users, items)
                .ok_or_else(|| bad_reply("append recipients", read))??;
            Some(Recipients::Routes(routes))
        }
        _ => None,
    })
}

/// One user's live route record, if any.
type UserRoute = (UserId, Option<RouteRecord>);

/// Route records as `claim_routes.lua` (and the append script, the same judgement) answer
/// them: a (server, epoch) pair per user, both nil where the user has no live route.
/// `None` if the count does not match the users.
fn route_records(users: &[UserId], pairs: &[Value]) -> Option<R<Vec<UserRoute>>> {
    if pairs.len() != users.len() * 2 {
        return None;
    }
    Some(
        users
            .iter()
            .zip(pairs.chunks_exact(2))
            .map(|(user, pair)| {
                let record = match string(&pair[0])? {
                    Some(server) => Some(RouteRecord {
                        server: ServerId(server),
                        epoch: Epoch(num(&pair[1])?),
                    }),
                    None => None,
                };
                Ok((*user, record))
            })
            .collect(),
    )
}
