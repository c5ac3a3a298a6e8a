//! Logins that take over a claim: deciding against the claim read from the store, writing
//! the new claim (compare-epoch, re-deciding after a lost race), and holding the answer
//! while the old session's server is asked to close it — so two sessions of one user never
//! overlap. Part of [`RouteLogin`]; its inputs are in the parent module.

use super::*;

impl RouteLogin {
    pub(super) fn decide_and_claim(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        api: ApiRequestId,
        login: LoginCtx,
        state: &ClaimState,
    ) {
        let mut login = login;
        let claim_server_live = state
            .claim
            .as_ref()
            .is_some_and(|c| self.live.contains_key(&c.server));
        // A retry of the login that made the live claim, whose answer was lost (the route
        // holding it crashed): it takes the claim over again, waiting on every server.
        login.retries_lost_answer = match (&login.presented, &state.claim) {
            (Some(presented), Some(claim)) if is_live(claim, wall) => {
                self.bearer
                    .derives_to(presented, login.user, claim.epoch, &claim.resume_token_hash)
            }
            _ => false,
        };
        let decision = match decide_login(state, wall, login.resume_hash, claim_server_live) {
            Ok(decision) => decision,
            Err(_) if login.retries_lost_answer => LoginDecision::Takeover {
                epoch: state.epoch.next(),
                old: state
                    .claim
                    .clone()
                    .expect("a lost answer's retry is only recognized against a live claim"),
            },
            Err(_) => {
                self.logged_in(api, Err(LoginError::RepeatLogin));
                return;
            }
        };
        let placeable = placeable(&self.live, &self.linked);
        // `registry_lost`: a login already past its password check when the view was lost.
        let server = if self.registry_lost {
            None
        } else {
            self.balancer
                .pick(login.user, &placeable)
                .and_then(|id| placeable.get(&id).cloned())
        };
        let Some(server) = server else {
            self.logged_in(api, Err(LoginError::NoServerAvailable));
            return;
        };
        // Derived from the token presented, if any, so that a retry of this very login can
        // be recognized by any route should its answer be lost.
        let resume = match &login.presented {
            Some(presented) => self
                .bearer
                .derive_resume(presented, login.user, decision.epoch()),
            None => {
                let mut token = [0u8; 32];
                self.rng.fill_bytes(&mut token);
                ResumeToken(token)
            }
        };
        // A takeover's answer may be held until the old lease ends: the new claim must
        // outlive that by a whole claim_ttl, or it could expire before the client connects.
        let lease_from = match &decision {
            LoginDecision::Fresh { .. } => wall,
            LoginDecision::Takeover { old, .. } => wall.max(old.lease_until),
        };
        // Every login issues the next resumption secret; a resumption's write also requires
        // the one it presented to be still the claim's, so each secret is used once.
        // A lifetime of zero turns resumption off: no secret, so every login checks the
        // password (what a deployment chooses that wants no credential but the password).
        let secret = (!self.config.resume_secret_ttl.is_zero())
            .then(|| ResumptionSecret::random(&mut self.rng));
        let claim = Claim {
            epoch: decision.epoch(),
            server: server.id.clone(),
            lease_until: lease_from.plus(self.config.claim_ttl),
            resume_token_hash: resume_token_hash(&resume),
            resume_secret: secret.as_ref().map(|secret| ResumeSecret {
                hash: resumption::secret_hash(login.user, secret),
                expires_at: wall.plus(self.config.resume_secret_ttl),
            }),
        };
        let command = match login.secret_hash {
            Some(presented) => StoreCommand::ResumeClaim {
                user: login.user,
                expected: state.epoch,
                secret: presented,
                claim,
            },
            None => StoreCommand::ReplaceClaim {
                user: login.user,
                expected: state.epoch,
                claim,
            },
        };
        self.send(
            now,
            command,
            Step::ReplaceClaim {
                api,
                login,
                decision,
                server,
                resume,
                secret,
            },
        );
    }

    /// The claim is ours: answer, or hold the answer while the old session may be open.
    pub(super) fn login_succeeded(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        granted: Granted,
        decision: LoginDecision,
        login: &LoginCtx,
    ) {
        if let LoginDecision::Takeover { old, .. } = decision {
            // The old claim's session is on its server. For a retry of a login whose answer
            // was lost, the claim it replaces was never answered: the session that takeover
            // was waiting for may be on any server, so every live one is asked.
            let awaiting: BTreeSet<ServerId> = if login.retries_lost_answer {
                self.live.keys().cloned().collect()
            } else {
                BTreeSet::from([old.server.clone()])
            };
            for server in &awaiting {
                self.events.push_back(RouteEvent::KickOld {
                    server: server.clone(),
                    user: granted.user,
                    below_epoch: granted.epoch,
                });
            }
            // The old session may still be open on a live server: answering now could let
            // the new one start before it ends. Wait, at most until its lease runs out
            // (a server that cannot refresh it fences itself by then). `old` is the claim
            // as ReplaceClaim found it, so a refresh since our read is accounted for.
            // For a lost answer's retry, the replaced claim's lease covers the older one's
            // (a takeover's claim outlives the lease it waited for by a claim_ttl).
            let awaiting: BTreeSet<ServerId> = awaiting
                .into_iter()
                .filter(|s| self.live.contains_key(s))
                .collect();
            if !awaiting.is_empty() && is_live(&old, wall) {
                // `is_live` just held, so lease_until > wall.
                let remaining = Duration::from_millis(old.lease_until.0 - wall.0);
                self.held.push(HeldLogin {
                    granted,
                    presented: login.resume_hash,
                    presented_secret: login.secret_hash,
                    waiters: Vec::new(),
                    awaiting,
                    old_epoch: old.epoch,
                    deadline: now + remaining,
                    held_at: (now, wall),
                    asked_at: login.asked_at,
                });
                return;
            }
        }
        self.answer(wall, granted);
    }

    /// A login presenting the resume token of a takeover that is held, or was released
    /// within `claim_ttl`, while the claim it made is still the live one: the same client
    /// retrying after its request timed out. It gets that takeover's answer (now, or when
    /// the hold ends) rather than a second takeover, which would not wait for the first
    /// one's old session. `true` if it was taken care of.
    pub(super) fn rejoin_takeover(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        api: ApiRequestId,
        login: &LoginCtx,
        state: &ClaimState,
    ) -> bool {
        let Some(presented) = login.resume_hash else {
            return false;
        };
        let Some(current) = state.claim.as_ref().filter(|c| is_live(c, wall)) else {
            return false;
        };
        // The same claim, on a server still live: an answer naming a server that has left
        // the registry would only send the client to a dead end; a fresh decision (a
        // takeover, its server being gone) serves it better.
        let same = |granted: &Granted| {
            granted.user == login.user
                && granted.epoch == current.epoch
                && self.live.contains_key(&granted.server.id)
        };
        // A password login proved who it is; a resumption must present the very secret the
        // held one did (its answer carries the next secret). While held, the first request
        // has had no answer: a retry of the same use is what the client does on a timeout.
        let secret_ok = |held_secret: Option<[u8; 32]>| match login.secret_hash {
            None => true,
            Some(secret) => held_secret.is_some_and(|h| bool::from(h.ct_eq(&secret))),
        };
        if let Some(held) = self.held.iter_mut().find(|h| {
            h.presented == Some(presented) && secret_ok(h.presented_secret) && same(&h.granted)
        }) {
            held.waiters.push(api);
            return true;
        }
        self.released.retain(|r| r.until > now);
        // A released answer has gone out: the secret it was asked with is used. A copy of it
        // presented now must fail, not be handed the next secret (a stolen state file
        // replayed right after its owner's re-home) — unless its request had waited so long
        // (queued for the store, then held) that it timed out on the client (a re-home from
        // a crashed server still listed): then this is that client's retry, and refusing it
        // would cost an argon2 check per re-homed user, and a password prompt for a client
        // that keeps none. The secret must still be the one the hold was asked with.
        let rejoin_after = self.config.resume_rejoin_after;
        let Some(released) = self.released.iter().find(|r| {
            r.presented == presented
                && same(&r.granted)
                && (login.secret_hash.is_none()
                    || (r.waited >= rejoin_after && secret_ok(r.presented_secret)))
        }) else {
            return false;
        };
        let granted = Granted {
            api,
            ..released.granted.clone()
        };
        self.answer(wall, granted);
        true
    }

    /// A held takeover's hold is over: answer it and every retry that joined it, and keep
    /// the answer for retries still to come.
    pub(super) fn release(&mut self, now: Instant, wall: UnixMillis, held: HeldLogin) {
        for api in held.waiters {
            let again = Granted {
                api,
                ..held.granted.clone()
            };
            self.answer(wall, again);
        }
        if let Some(presented) = held.presented {
            self.released.push(ReleasedTakeover {
                presented,
                presented_secret: held.presented_secret,
                waited: now.saturating_duration_since(held.asked_at),
                granted: held.granted.clone(),
                until: now + self.config.claim_ttl,
            });
        }
        self.answer(wall, held.granted);
    }
}

/// Removes and returns the held answers `which` selects, keeping the others in order.
pub(super) fn take_held(
    held: &mut Vec<HeldLogin>,
    which: impl Fn(&HeldLogin) -> bool,
) -> Vec<HeldLogin> {
    let (taken, kept) = std::mem::take(held).into_iter().partition(which);
    *held = kept;
    taken
}
