use super::*;
use crate::balance::Strategy;
use crate::claims::ClaimTable;
use crate::store::{Account, StoreUnavailable};

const TICKET_SECRET: &[u8] = b"ticket-secret";
const WALL0: UnixMillis = UnixMillis(1_700_000_000_000);

#[allow(clippy::disallowed_methods)] // the one clock read: a base for explicit offsets
fn t0() -> Instant {
    Instant::now()
}

fn server(name: &str) -> LiveServer {
    LiveServer {
        id: ServerId::new(name),
        host: "127.0.0.1".into(),
        client_port: 11211,
        link_port: 11311,
        http_port: 8081,
        connections: 0,
        client_tls: false,
    }
}

fn registry(names: &[&str]) -> BTreeMap<ServerId, LiveServer> {
    names
        .iter()
        .map(|n| (ServerId::new(*n), server(n)))
        .collect()
}

fn config() -> RouteLoginConfig {
    RouteLoginConfig {
        password: PasswordParams::for_tests(),
        // These tables use "pw"; the minimum has its own table in `accounts`.
        min_password_len: 1,
        ..RouteLoginConfig::default()
    }
}

/// The store side: accounts in a map, claims in the reference table.
#[derive(Default, Clone)]
struct Store {
    claims: ClaimTable,
    accounts: BTreeMap<UserId, Account>,
    /// The throttle's records (forgetting is the conformance suite's business).
    failures: BTreeMap<UserId, LoginFailures>,
}

impl Store {
    fn answer(&mut self, wall: UnixMillis, command: &StoreCommand) -> StoreReply {
        if let Some(reply) = self.claims.apply(wall, command) {
            return reply;
        }
        match command {
            StoreCommand::RegisterAccount {
                name,
                password_hash,
            } => {
                if self.accounts.values().any(|a| a.name == *name) {
                    return StoreReply::AccountRegistered(Err(NameTaken));
                }
                let user = UserId(self.accounts.len() as u64 + 1);
                self.accounts.insert(
                    user,
                    Account {
                        user,
                        name: name.clone(),
                        password_hash: password_hash.clone(),
                        all_from: Default::default(),
                    },
                );
                StoreReply::AccountRegistered(Ok(user))
            }
            StoreCommand::LoadAccount { user } => {
                StoreReply::Account(self.accounts.get(user).cloned())
            }
            StoreCommand::LoadAccountByName { name } => StoreReply::Account(
                self.accounts
                    .values()
                    .find(|a| a.name.eq_ignore_ascii_case(name))
                    .cloned(),
            ),
            StoreCommand::CountLoginFailure { user, expected, .. } => {
                let current = self.failures.get(user).copied().unwrap_or_default();
                if current.count != *expected {
                    return StoreReply::LoginFailureCounted(Err(current));
                }
                let counted = LoginFailures {
                    count: current.count + 1,
                    last_at: wall,
                };
                self.failures.insert(*user, counted);
                StoreReply::LoginFailureCounted(Ok(counted))
            }
            StoreCommand::ClearLoginFailures { user } => {
                self.failures.remove(user);
                StoreReply::LoginFailuresCleared
            }
            other => panic!("route login sent {other:?}"),
        }
    }
}

struct Harness {
    m: RouteLogin,
    store: Store,
    t0: Instant,
    next_api: u64,
}

impl Harness {
    fn new(live: &[&str]) -> Self {
        Self::with_config(live, config())
    }

    fn with_config(live: &[&str], config: RouteLoginConfig) -> Self {
        let mut m = RouteLogin::new(
            config,
            TicketKeys::new(1, TICKET_SECRET.to_vec()),
            b"token-secret".to_vec(),
            Balancer::new(Strategy::RoundRobin, 0),
            42,
        );
        let t0 = t0();
        m.handle_registry(t0, WALL0, registry(live));
        Self {
            m,
            store: Store::default(),
            t0,
            next_api: 0,
        }
    }

    fn set_registry(&mut self, ms: u64, live: &[&str]) -> Vec<RouteEvent> {
        let (now, wall) = self.at(ms);
        self.m.handle_registry(now, wall, registry(live));
        self.run(ms)
    }

    fn kick_done(&mut self, ms: u64, server: &str, user: u64, below: u64) -> Vec<RouteEvent> {
        let (now, wall) = self.at(ms);
        self.m.handle_kick_done(
            now,
            wall,
            &ServerId::new(server),
            UserId(user),
            Epoch(below),
        );
        self.run(ms)
    }

    fn timeout(&mut self, ms: u64) -> Vec<RouteEvent> {
        self.m.handle_timeout(self.at(ms).0);
        self.run(ms)
    }

    fn at(&self, ms: u64) -> (Instant, UnixMillis) {
        (
            self.t0 + Duration::from_millis(ms),
            UnixMillis(WALL0.0 + ms),
        )
    }

    fn api(&mut self) -> ApiRequestId {
        self.next_api += 1;
        ApiRequestId(self.next_api)
    }

    /// Answers store requests and runs password jobs until there are none, then drains
    /// the events.
    fn run(&mut self, ms: u64) -> Vec<RouteEvent> {
        let (now, wall) = self.at(ms);
        loop {
            if let Some(req) = self.m.poll_store() {
                let reply = self.store.answer(wall, &req.command);
                self.m.handle_store_reply(now, wall, req.id, Ok(reply));
            } else if let Some(job) = self.m.poll_password() {
                self.m.handle_password(now, job.id, job.work.run());
            } else {
                break;
            }
        }
        std::iter::from_fn(|| self.m.poll_event()).collect()
    }

    /// Answers the store request the machine must have queued next (from the store),
    /// at `ms`, and returns its command.
    fn store_step(&mut self, ms: u64) -> StoreCommand {
        let (now, wall) = self.at(ms);
        let req = self.m.poll_store().expect("a store request");
        let reply = self.store.answer(wall, &req.command);
        self.m.handle_store_reply(now, wall, req.id, Ok(reply));
        req.command
    }

    /// Runs the one password job the machine must have queued, at `ms`.
    fn password(&mut self, ms: u64) {
        let job = self.m.poll_password().expect("a password job");
        assert!(self.m.poll_password().is_none(), "one job at a time here");
        self.m
            .handle_password(self.at(ms).0, job.id, job.work.run());
    }

    fn register(&mut self, ms: u64, name: &str, password: &str) -> Vec<RouteEvent> {
        let api = self.api();
        self.m.handle_register(self.at(ms).0, api, name, password);
        self.run(ms)
    }

    fn login(&mut self, ms: u64, user: u64, resume: Option<&ResumeToken>) -> Vec<RouteEvent> {
        self.start_login(ms, user, "alice", "pw", resume);
        self.run(ms)
    }

    fn start_login(
        &mut self,
        ms: u64,
        user: u64,
        name: &str,
        password: &str,
        resume: Option<&ResumeToken>,
    ) -> ApiRequestId {
        let api = self.api();
        let request = LoginRequest {
            user: UserId(user),
            name: name.into(),
            password: password.into(),
            resume_token: resume.cloned(),
        };
        self.m.handle_login(self.at(ms).0, api, request);
        api
    }

    fn logout(&mut self, ms: u64, token: &str) -> Vec<RouteEvent> {
        let api = self.api();
        let (now, wall) = self.at(ms);
        self.m.handle_logout(now, wall, api, token);
        self.run(ms)
    }

    /// Registers alice (user 1, password "pw").
    fn with_alice(live: &[&str]) -> Self {
        Self::with_alice_and(live, config())
    }

    fn with_alice_and(live: &[&str], config: RouteLoginConfig) -> Self {
        let mut h = Self::with_config(live, config);
        let events = h.register(0, "alice", "pw");
        assert!(matches!(
            events[..],
            [RouteEvent::Registered { result: Ok(_), .. }]
        ));
        h
    }
}

fn login_ok(events: &[RouteEvent]) -> &LoginAnswer {
    match events.last() {
        Some(RouteEvent::LoggedIn { result: Ok(a), .. }) => a,
        other => panic!("expected a successful login, got {other:?}"),
    }
}

fn login_err(events: &[RouteEvent]) -> LoginError {
    match events {
        [RouteEvent::LoggedIn { result: Err(e), .. }] => *e,
        other => panic!("expected one failed login, got {other:?}"),
    }
}

#[test]
fn register_table() {
    let mut h = Harness::new(&["s1"]);
    assert_eq!(
        h.register(0, "alice", "pw"),
        vec![RouteEvent::Registered {
            api: ApiRequestId(1),
            result: Ok(Registered {
                user: UserId(1),
                name: "alice".into()
            })
        }]
    );
    let stored = &h.store.accounts[&UserId(1)];
    assert!(accounts::verify_password("pw", &stored.password_hash));
    assert!(!accounts::verify_password("pw2", &stored.password_hash));

    let cases: &[(&str, &str, RegisterFailure, &str)] = &[
        ("alice", "other", RegisterFailure::NameTaken, "3000"),
        (
            "",
            "pw",
            RegisterFailure::Invalid(RegisterError::EmptyName),
            "3000",
        ),
        (
            "bob",
            "",
            RegisterFailure::Invalid(RegisterError::EmptyPassword),
            "3000",
        ),
        (
            "b b",
            "pw",
            RegisterFailure::Invalid(RegisterError::BadNameCharacter),
            "3000",
        ),
    ];
    for (name, pw, want, code) in cases {
        let events = h.register(0, name, pw);
        match &events[..] {
            [RouteEvent::Registered { result: Err(e), .. }] => {
                assert_eq!(e, want, "{name:?}");
                assert_eq!(e.code(), *code);
            }
            other => panic!("{name:?}: {other:?}"),
        }
    }
    assert_eq!(h.store.accounts.len(), 1);
    // Validation failures never reach the store.
    assert!(h.m.poll_store().is_none());
}

#[test]
fn fresh_login_claims_epoch_one_and_mints_credentials() {
    let mut h = Harness::with_alice(&["s1"]);
    let events = h.login(1_000, 1, None);
    assert_eq!(events.len(), 1, "{events:?}");
    let a = login_ok(&events).clone();
    let wall = h.at(1_000).1;
    assert_eq!(
        (a.user, a.epoch, a.server.id.as_str()),
        (UserId(1), Epoch(1), "s1")
    );

    let grant = TicketKeys::new(1, TICKET_SECRET.to_vec())
        .verify(&a.ticket, &ServerId::new("s1"), wall, Duration::ZERO)
        .unwrap();
    assert_eq!(grant.epoch, Epoch(1));
    assert_eq!(grant.expires_at, wall.plus(Duration::from_secs(30)));

    let bearer = h.m.verify_bearer(&a.token, wall).unwrap();
    assert_eq!((bearer.user, bearer.epoch), (UserId(1), Epoch(1)));

    let state = h.store.claims.load(UserId(1));
    let claim = state.claim.unwrap();
    assert_eq!(state.epoch, Epoch(1));
    assert_eq!(claim.server, ServerId::new("s1"));
    assert_eq!(claim.lease_until, wall.plus(Duration::from_secs(30)));
    assert_eq!(claim.resume_token_hash, resume_token_hash(&a.resume_token));
    assert!(h.m.poll_timeout().is_none(), "nothing pending");
}

#[test]
fn account_mismatches_are_9100_and_claim_nothing() {
    let mut h = Harness::with_alice(&["s1"]);
    let cases: &[(&str, u64, &str, &str)] = &[
        ("wrong password", 1, "alice", "nope"),
        ("unknown user", 9, "alice", "pw"),
        ("name of another id", 1, "mallory", "pw"),
        ("overlong password", 1, "alice", &"p".repeat(129)),
    ];
    for (label, user, name, pw) in cases {
        h.start_login(0, *user, name, pw, None);
        let e = login_err(&h.run(0));
        assert_eq!(e, LoginError::AccountMismatch, "{label}");
        assert_eq!(e.code(), "9100");
    }
    assert_eq!(h.store.claims.load(UserId(1)), ClaimState::default());
}

#[test]
fn names_ignore_case_and_id_zero_logs_in_by_name() {
    let cases: &[(&str, u64, &str, &str, Option<u64>)] = &[
        ("as registered", 1, "alice", "pw", Some(1)),
        ("other case", 1, "ALICE", "pw", Some(1)),
        ("mixed case", 1, "aLiCe", "pw", Some(1)),
        ("by name, id 0", 0, "Alice", "pw", Some(1)),
        ("by name, wrong password", 0, "alice", "nope", None),
        ("by unknown name", 0, "mallory", "pw", None),
        ("other case, wrong id", 2, "ALICE", "pw", None),
    ];
    for (label, user, name, pw, want) in cases {
        let mut h = Harness::with_alice(&["s1"]);
        h.start_login(0, *user, name, pw, None);
        let events = h.run(0);
        match want {
            Some(id) => assert_eq!(login_ok(&events).user, UserId(*id), "{label}"),
            None => assert_eq!(login_err(&events), LoginError::AccountMismatch, "{label}"),
        }
    }
}

#[test]
fn duplicate_login_is_5000() {
    let mut h = Harness::with_alice(&["s1"]);
    let first = login_ok(&h.login(0, 1, None)).clone();
    let before = h.store.claims.load(UserId(1));
    let e = login_err(&h.login(29_999, 1, None));
    assert_eq!((e, e.code()), (LoginError::RepeatLogin, "5000"));
    // A wrong resume token is no better than none.
    let wrong = ResumeToken([0x55; 32]);
    assert_eq!(
        login_err(&h.login(1_000, 1, Some(&wrong))),
        LoginError::RepeatLogin
    );
    assert_eq!(h.store.claims.load(UserId(1)), before);
    assert_ne!(first.resume_token, wrong);
}

fn kick_old(server: &str, user: u64, below: u64) -> RouteEvent {
    RouteEvent::KickOld {
        server: ServerId::new(server),
        user: UserId(user),
        below_epoch: Epoch(below),
    }
}

/// The ticket's expiry, as the server would read it.
fn ticket_expiry(answer: &LoginAnswer) -> UnixMillis {
    UnixMillis(answer.ticket.expires_at_ms)
}

/// Alice logged in at 0 (epoch 1 on s1, lease to 30 s, never bound), and a takeover
/// with her resume token started at 1 s and got its claim: the answer is held.
fn held_takeover(live: &[&str]) -> (Harness, LoginAnswer, ApiRequestId) {
    let mut h = Harness::with_alice(live);
    let first = login_ok(&h.login(0, 1, None)).clone();
    assert_eq!(first.server.id.as_str(), "s1");
    let api = h.start_login(1_000, 1, "alice", "pw", Some(&first.resume_token));
    assert_eq!(
        h.run(1_000),
        vec![kick_old("s1", 1, 2)],
        "answer must be held"
    );
    let claim = h.store.claims.load(UserId(1)).claim.unwrap();
    assert_eq!(claim.epoch, Epoch(2), "the claim is taken before the hold");
    // The new claim outlives the old lease (30 s) by a whole claim_ttl.
    assert_eq!(claim.lease_until, UnixMillis(WALL0.0 + 60_000));
    assert_eq!(
        h.m.poll_timeout(),
        Some((h.t0 + Duration::from_secs(30), TimerReason::TakeoverHold))
    );
    (h, first, api)
}

#[test]
fn takeover_is_held_until_the_old_server_confirms_the_kick() {
    let (mut h, first, api) = held_takeover(&["s1"]);
    // Reports that do not cover the old session change nothing.
    for (server, user, below) in [("s2", 1, 2), ("s1", 2, 2), ("s1", 1, 1)] {
        assert_eq!(
            h.kick_done(5_000, server, user, below),
            vec![],
            "{server} {user} {below}"
        );
    }
    let events = h.kick_done(6_000, "s1", 1, 2);
    let second = login_ok(&events).clone();
    assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, .. }] if a == api));
    assert_eq!((second.epoch, second.server.id.as_str()), (Epoch(2), "s1"));
    // Minted on release, so the ticket's life counts from then.
    assert_eq!(ticket_expiry(&second), UnixMillis(WALL0.0 + 36_000));
    let bearer = h.m.verify_bearer(&second.token, h.at(6_000).1).unwrap();
    assert_eq!((bearer.user, bearer.epoch), (UserId(1), Epoch(2)));
    assert_ne!(second.resume_token, first.resume_token);
    assert_eq!(
        h.store
            .claims
            .load(UserId(1))
            .claim
            .unwrap()
            .resume_token_hash,
        resume_token_hash(&second.resume_token)
    );
    assert_eq!(h.m.poll_timeout(), None);
    // Answered once: a repeated report and the old deadline do nothing.
    assert_eq!(h.kick_done(7_000, "s1", 1, 2), vec![]);
    assert_eq!(h.timeout(30_000), vec![]);
    // A retry with the token the takeover was asked with (its client gave up before
    // the release) gets the same answer again: same claim, no new takeover or kick.
    let events = h.login(8_000, 1, Some(&first.resume_token));
    let again = login_ok(&events);
    assert_eq!(
        (again.epoch, &again.resume_token),
        (Epoch(2), &second.resume_token)
    );
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(2));
    // Past claim_ttl after the release, the route has forgotten the answer, but the
    // claim's token is still the first one's derivation: a retry of that login (its
    // answer lost with a crashed route) takes the claim over again, asking every live
    // server, since the session it waited for may be anywhere.
    assert_eq!(
        h.login(36_001, 1, Some(&first.resume_token)),
        vec![kick_old("s1", 1, 3)]
    );
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(3));
    // A token the claim does not derive from is refused.
    assert_eq!(
        login_err(&h.login(36_002, 1, Some(&ResumeToken([7; 32])))),
        LoginError::RepeatLogin
    );
}

#[test]
fn a_retry_whose_answer_was_lost_takes_over_waiting_on_every_server() {
    // A takeover is held on s1; the route then crashes: a new route (same secrets, no
    // memory) meets the retry presenting the token the takeover was asked with.
    let (h, first, _) = held_takeover(&["s1", "s2", "s3"]);
    let mut h2 = Harness::new(&["s1", "s2", "s3"]);
    h2.store = h.store.clone();
    let events = h2.login(2_000, 1, Some(&first.resume_token));
    assert_eq!(
        events,
        vec![
            kick_old("s1", 1, 3),
            kick_old("s2", 1, 3),
            kick_old("s3", 1, 3)
        ],
        "every live server is asked"
    );
    assert_eq!(h2.store.claims.load(UserId(1)).epoch, Epoch(3));
    assert_eq!(h2.kick_done(2_100, "s1", 1, 3), vec![]);
    assert_eq!(h2.kick_done(2_200, "s3", 1, 3), vec![]);
    // The last one to confirm releases the answer.
    let events = h2.kick_done(2_300, "s2", 1, 3);
    let answer = login_ok(&events);
    assert_eq!(answer.epoch, Epoch(3));
    assert_eq!(
        h2.store
            .claims
            .load(UserId(1))
            .claim
            .unwrap()
            .resume_token_hash,
        resume_token_hash(&answer.resume_token)
    );
    // Another route (the same secret) derives the same token: the claim is this one's.
    assert_eq!(
        h2.m.bearer
            .derive_resume(&first.resume_token, UserId(1), Epoch(3)),
        answer.resume_token
    );
}

/// A client's first login presents a token of its own making. If the answer is lost,
/// its retry (same token) takes the claim over instead of being refused as a repeat
/// login until the claim's lease runs out; a login with any other token still is.
#[test]
fn a_first_login_retried_with_its_own_token_takes_its_claim_over() {
    let mut h = Harness::with_alice(&["s1", "s2"]);
    let own = ResumeToken([0x5e; 32]);
    // The answer is lost: the client never learns this claim's token.
    let lost = login_ok(&h.login(0, 1, Some(&own))).clone();
    assert_eq!(lost.epoch, Epoch(1));
    assert_eq!(
        login_err(&h.login(100, 1, Some(&ResumeToken([0x77; 32])))),
        LoginError::RepeatLogin,
        "someone else's token is a repeat login"
    );
    assert_eq!(
        login_err(&h.login(100, 1, None)),
        LoginError::RepeatLogin,
        "no token is a repeat login"
    );
    let events = h.login(200, 1, Some(&own));
    assert_eq!(
        events,
        vec![kick_old("s1", 1, 2), kick_old("s2", 1, 2)],
        "the retry takes over, waiting on every live server"
    );
    h.kick_done(300, "s1", 1, 2);
    let answer = login_ok(&h.kick_done(300, "s2", 1, 2)).clone();
    assert_eq!(answer.epoch, Epoch(2));
}

#[test]
fn logins_are_not_placed_on_a_server_whose_link_is_down() {
    let mut h = Harness::with_alice(&["s1", "s2"]);
    for name in ["bob", "carol", "dave"] {
        assert!(matches!(
            h.register(0, name, "pw")[..],
            [RouteEvent::Registered { result: Ok(_), .. }]
        ));
    }
    let server_of = |h: &mut Harness, user: u64, name: &str| {
        h.start_login(100, user, name, "pw", None);
        login_ok(&h.run(100)).server.id.as_str().to_owned()
    };
    // Only s2's link is up; s1's never came up (a wrong link secret, say). Round robin
    // would start with s1; it has no link, so both go to s2.
    h.m.handle_server_reachable(&ServerId::new("s2"));
    assert_eq!(server_of(&mut h, 1, "alice"), "s2");
    assert_eq!(server_of(&mut h, 2, "bob"), "s2");
    // Back up: placement uses it again.
    h.m.handle_server_reachable(&ServerId::new("s1"));
    assert_eq!(server_of(&mut h, 3, "carol"), "s1");
    // With every link down, logins are placed on any live server rather than refused.
    h.m.handle_server_unreachable(&ServerId::new("s1"));
    h.m.handle_server_unreachable(&ServerId::new("s2"));
    assert_eq!(server_of(&mut h, 4, "dave"), "s2");
}

#[test]
fn a_reconnected_old_server_is_asked_again() {
    let (mut h, _, api) = held_takeover(&["s1", "s2"]);
    // The first kick went nowhere (the link was down); a link to s1 comes up again.
    h.m.handle_server_reachable(&ServerId::new("s2"));
    assert_eq!(h.run(2_000), vec![], "only the old server is asked");
    h.m.handle_server_reachable(&ServerId::new("s1"));
    assert_eq!(h.run(2_000), vec![kick_old("s1", 1, 2)]);
    let events = h.kick_done(2_100, "s1", 1, 2);
    assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
}

#[test]
fn a_retry_during_the_hold_joins_the_held_answer() {
    let (mut h, first, api) = held_takeover(&["s1"]);
    // The client timed out and retries with the token it has: no second takeover.
    let retry = h.start_login(6_000, 1, "alice", "pw", Some(&first.resume_token));
    assert_eq!(h.run(6_000), vec![], "joins the hold, no new kick");
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(2));
    // Without the token a login is still refused.
    assert_eq!(login_err(&h.login(6_500, 1, None)), LoginError::RepeatLogin);
    let events = h.kick_done(7_000, "s1", 1, 2);
    let answered: Vec<ApiRequestId> = events
        .iter()
        .map(|e| match e {
            RouteEvent::LoggedIn { api, result: Ok(a) } => {
                assert_eq!(a.epoch, Epoch(2));
                *api
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(answered.len(), 2);
    assert!(answered.contains(&api) && answered.contains(&retry));
}

#[test]
fn held_takeover_is_released_when_the_old_lease_runs_out() {
    let (mut h, _, api) = held_takeover(&["s1"]);
    assert_eq!(h.timeout(29_999), vec![]);
    let events = h.timeout(30_000);
    assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
    // The wall clock at release is derived from the monotonic time elapsed since the hold.
    assert_eq!(
        ticket_expiry(login_ok(&events)),
        UnixMillis(WALL0.0 + 60_000)
    );
    assert_eq!(h.m.poll_timeout(), None);
}

#[test]
fn held_takeover_is_released_when_the_old_server_leaves_the_registry() {
    let (mut h, _, api) = held_takeover(&["s1", "s2"]);
    // A change that keeps s1 releases nothing.
    assert_eq!(h.set_registry(2_000, &["s1", "s2", "s3"]), vec![]);
    let events = h.set_registry(3_000, &["s2", "s3"]);
    assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
    let a = login_ok(&events);
    assert_eq!((a.epoch, a.server.id.as_str()), (Epoch(2), "s2"));
    assert_eq!(ticket_expiry(a), UnixMillis(WALL0.0 + 33_000));
    assert_eq!(h.m.poll_timeout(), None);
}

#[test]
fn takeover_when_the_old_server_left_the_registry() {
    let mut h = Harness::with_alice(&["s1"]);
    login_ok(&h.login(0, 1, None));
    assert_eq!(h.set_registry(500, &["s2"]), vec![]);
    // Answered at once (no one to wait for); the kick is still sent, best effort.
    let events = h.login(1_000, 1, None);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0], kick_old("s1", 1, 2));
    let a = login_ok(&events);
    assert_eq!((a.epoch, a.server.id.as_str()), (Epoch(2), "s2"));
    assert_eq!(ticket_expiry(a), UnixMillis(WALL0.0 + 31_000));
    assert_eq!(h.m.poll_timeout(), None, "nothing held");
}

#[test]
fn expired_claim_gives_a_fresh_login() {
    let mut h = Harness::with_alice(&["s1"]);
    login_ok(&h.login(0, 1, None));
    // claim_ttl is 30 s: live at 29.999 s, expired at 30 s.
    assert_eq!(
        login_err(&h.login(29_999, 1, None)),
        LoginError::RepeatLogin
    );
    let events = h.login(30_000, 1, None);
    assert_eq!(events.len(), 1, "no kick for an expired claim: {events:?}");
    assert_eq!(login_ok(&events).epoch, Epoch(2));
}

#[test]
fn no_live_server_is_7100() {
    let mut h = Harness::with_alice(&[]);
    let e = login_err(&h.login(0, 1, None));
    assert_eq!((e, e.code()), (LoginError::NoServerAvailable, "7100"));
    assert_eq!(h.store.claims.load(UserId(1)), ClaimState::default());
}

#[test]
fn lost_claim_race_redecides_to_5000() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    // Login A reads the account and the (empty) claim state...
    h.start_login(0, 1, "alice", "pw", None);
    let load_account = h.m.poll_store().unwrap();
    let reply = h.store.answer(wall, &load_account.command);
    h.m.handle_store_reply(now, wall, load_account.id, Ok(reply));
    h.store_step(0); // counts the attempt
    h.password(0);
    let load_claim = h.m.poll_store().unwrap();
    assert_eq!(
        load_claim.command,
        StoreCommand::LoadClaim { user: UserId(1) }
    );
    let stale = h.store.answer(wall, &load_claim.command);
    // ...then login B wins the claim before A's ReplaceClaim lands.
    let b = h.login(0, 1, None);
    assert_eq!(login_ok(&b).epoch, Epoch(1));
    h.m.handle_store_reply(now, wall, load_claim.id, Ok(stale));
    let replace = h.m.poll_store().unwrap();
    assert!(matches!(
        replace.command,
        StoreCommand::ReplaceClaim {
            expected: Epoch(0),
            ..
        }
    ));
    let lost = h.store.answer(wall, &replace.command);
    assert!(matches!(lost, StoreReply::ClaimReplaced(Err(_))));
    h.m.handle_store_reply(now, wall, replace.id, Ok(lost));
    // A re-decides against the winner's live claim, without another store round trip.
    assert!(h.m.poll_store().is_none());
    assert_eq!(login_err(&h.run(0)), LoginError::RepeatLogin);
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(1));
}

#[test]
fn endless_races_give_up_with_4000() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    h.start_login(0, 1, "alice", "pw", None);
    let req = h.m.poll_store().unwrap();
    let reply = h.store.answer(wall, &req.command);
    h.m.handle_store_reply(now, wall, req.id, Ok(reply));
    h.store_step(0); // counts the attempt
    h.password(0);
    let mut req = h.m.poll_store().unwrap();
    h.m.handle_store_reply(
        now,
        wall,
        req.id,
        Ok(StoreReply::Claim(ClaimState::default())),
    );
    assert_eq!(
        h.store_step(0),
        StoreCommand::ClearLoginFailures { user: UserId(1) }
    );
    // Every ReplaceClaim loses to a released claim with a higher counter: each retry is
    // a fresh decision, until the bound (3 retries) is spent.
    for round in 1..=4u64 {
        req = h.m.poll_store().unwrap();
        let StoreCommand::ReplaceClaim {
            expected, claim, ..
        } = &req.command
        else {
            panic!("{req:?}");
        };
        assert_eq!(*expected, Epoch(round - 1));
        assert_eq!(claim.epoch, Epoch(round));
        let winner = ClaimState {
            epoch: Epoch(round),
            claim: None,
        };
        h.m.handle_store_reply(
            now,
            wall,
            req.id,
            Ok(StoreReply::ClaimReplaced(Err(winner))),
        );
    }
    assert!(h.m.poll_store().is_none());
    assert_eq!(login_err(&h.run(0)), LoginError::Unavailable);
}

#[test]
fn store_timeout_is_4000_and_late_replies_are_ignored() {
    let mut h = Harness::with_alice(&["s1"]);
    let api = h.start_login(0, 1, "alice", "pw", None);
    let req = h.m.poll_store().unwrap();
    assert_eq!(
        h.m.poll_timeout(),
        Some((h.t0 + Duration::from_secs(2), TimerReason::StoreDeadline))
    );
    h.m.handle_timeout(h.t0 + Duration::from_millis(1_999));
    assert_eq!(h.m.poll_event(), None);
    h.m.handle_timeout(h.t0 + Duration::from_secs(2));
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::LoggedIn {
            api,
            result: Err(LoginError::Unavailable)
        })
    );
    assert_eq!(h.m.poll_timeout(), None);
    // The reply arrives after all: nothing happens.
    let (now, wall) = h.at(2_500);
    let reply = h.store.answer(wall, &req.command);
    h.m.handle_store_reply(now, wall, req.id, Ok(reply));
    assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
}

#[test]
fn store_errors_are_4000() {
    let mut h = Harness::new(&["s1"]);
    let api = h.api();
    let (now, wall) = h.at(0);
    h.m.handle_register(now, api, "alice", "pw");
    h.password(0);
    let req = h.m.poll_store().unwrap();
    h.m.handle_store_reply(now, wall, req.id, Err(StoreUnavailable("down".into())));
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api,
            result: Err(RegisterFailure::Unavailable)
        })
    );
    // A reply of the wrong kind is treated the same, not trusted.
    h.m.handle_register(now, api, "alice", "pw");
    h.password(0);
    let req = h.m.poll_store().unwrap();
    h.m.handle_store_reply(now, wall, req.id, Ok(StoreReply::CursorsAdvanced));
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api,
            result: Err(RegisterFailure::Unavailable)
        })
    );
}

#[test]
fn login_verifies_the_password_outside_the_machine() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    h.start_login(0, 1, "alice", "pw", None);
    let load = h.m.poll_store().unwrap();
    let reply = h.store.answer(wall, &load.command);
    h.m.handle_store_reply(now, wall, load.id, Ok(reply));
    // The attempt is counted against the account's throttle first.
    assert_eq!(
        h.store_step(0),
        StoreCommand::CountLoginFailure {
            user: UserId(1),
            expected: 0,
            forget_after: Duration::from_secs(900)
        }
    );
    // Nothing moves until the verification's outcome comes back.
    assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
    let job = h.m.poll_password().unwrap();
    let stored = h.store.accounts[&UserId(1)].password_hash.clone();
    assert_eq!(
        job.work,
        PasswordWork::Verify {
            password: "pw".into(),
            phc: stored
        }
    );
    assert_eq!(job.deadline, h.t0 + Duration::from_secs(5));
    assert_eq!(
        h.m.poll_timeout(),
        Some((job.deadline, TimerReason::StoreDeadline))
    );
    assert_eq!(
        format!("{:?}", job.work),
        "Verify(..)",
        "never prints a password"
    );
    // The outcome comes 40 ms later (argon2 on a worker thread).
    let later = h.at(40).0;
    h.m.handle_password(later, job.id, PasswordOutcome::Verified(true));
    assert_eq!(
        h.m.poll_store().unwrap().command,
        StoreCommand::LoadClaim { user: UserId(1) }
    );
    // ...and a success clears the count.
    assert_eq!(
        h.m.poll_store().unwrap().command,
        StoreCommand::ClearLoginFailures { user: UserId(1) }
    );
    assert_eq!(
        h.m.poll_timeout(),
        Some((later + Duration::from_secs(2), TimerReason::StoreDeadline))
    );
}

#[test]
fn password_outcome_table() {
    // (label, user id, name, outcome fed back, expected result: None = goes on to LoadClaim)
    let cases: Vec<(&str, u64, &str, PasswordOutcome, Option<LoginError>)> = vec![
        (
            "right password",
            1,
            "alice",
            PasswordOutcome::Verified(true),
            None,
        ),
        (
            "wrong password",
            1,
            "alice",
            PasswordOutcome::Verified(false),
            Some(LoginError::AccountMismatch),
        ),
        (
            "wrong name, password matches",
            1,
            "bob",
            PasswordOutcome::Verified(true),
            Some(LoginError::AccountMismatch),
        ),
        (
            "unknown id, even if the dummy matched",
            9,
            "alice",
            PasswordOutcome::Verified(true),
            Some(LoginError::AccountMismatch),
        ),
        (
            "outcome of the wrong kind",
            1,
            "alice",
            PasswordOutcome::Hashed(Ok("x".into())),
            Some(LoginError::Busy),
        ),
    ];
    for (label, user, name, outcome, want) in cases {
        let mut h = Harness::with_alice(&["s1"]);
        let (now, wall) = h.at(0);
        h.start_login(0, user, name, "pw", None);
        let load = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &load.command);
        h.m.handle_store_reply(now, wall, load.id, Ok(reply));
        if user == 1 {
            h.store_step(0); // counts the attempt
        }
        let job = h.m.poll_password().unwrap();
        h.m.handle_password(now, job.id, outcome);
        match want {
            None => {
                let next = h.m.poll_store().map(|r| r.command);
                assert_eq!(
                    next,
                    Some(StoreCommand::LoadClaim { user: UserId(1) }),
                    "{label}"
                );
            }
            Some(e) => {
                assert_eq!(login_err(&[h.m.poll_event().unwrap()]), e, "{label}");
                assert!(h.m.poll_store().is_none(), "{label}");
            }
        }
    }
}

#[test]
fn unknown_ids_verify_against_the_dummy_hash() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    let mut dummies = Vec::new();
    for user in [7, 8] {
        h.start_login(0, user, "alice", "pw", None);
        let load = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &load.command);
        h.m.handle_store_reply(now, wall, load.id, Ok(reply));
        match h.m.poll_password().unwrap().work {
            PasswordWork::Verify { phc, .. } => dummies.push(phc),
            other => panic!("{other:?}"),
        }
    }
    // A real argon2id hash with the configured parameters (same cost as a real check),
    // the same one for every unknown id, and not alice's.
    assert!(
        dummies[0].starts_with("$argon2id$v=19$m=64,t=1,p=1$"),
        "{}",
        dummies[0]
    );
    assert_eq!(dummies[0], dummies[1]);
    assert_ne!(dummies[0], h.store.accounts[&UserId(1)].password_hash);
}

#[test]
fn registration_hashes_outside_the_machine() {
    let mut h = Harness::new(&["s1"]);
    let now = h.at(0).0;
    let (a, b) = (h.api(), h.api());
    h.m.handle_register(now, a, "alice", "pw");
    h.m.handle_register(now, b, "bob", "pw");
    assert!(h.m.poll_store().is_none(), "nothing stored before the hash");
    let (ja, jb) = (h.m.poll_password().unwrap(), h.m.poll_password().unwrap());
    let salt = |job: &PasswordJob| match &job.work {
        PasswordWork::Hash {
            params,
            salt,
            password,
        } => {
            assert_eq!((params, password.as_str()), (&config().password, "pw"));
            *salt
        }
        other => panic!("{other:?}"),
    };
    assert_ne!(salt(&ja), salt(&jb), "a fresh salt per account");
    // alice's hash fails (only bad parameters can): 4000, nothing stored.
    h.m.handle_password(
        now,
        ja.id,
        PasswordOutcome::Hashed(Err(HashError("bad params".into()))),
    );
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api: a,
            result: Err(RegisterFailure::Unavailable)
        })
    );
    assert!(h.m.poll_store().is_none());
    // bob's hash is stored as computed.
    let outcome = jb.work.run();
    let PasswordOutcome::Hashed(Ok(phc)) = &outcome else {
        panic!("{outcome:?}");
    };
    let phc = phc.clone();
    h.m.handle_password(now, jb.id, outcome);
    assert_eq!(
        h.m.poll_store().unwrap().command,
        StoreCommand::RegisterAccount {
            name: "bob".into(),
            password_hash: phc
        }
    );
}

#[test]
fn password_job_timeout_is_busy_and_late_outcomes_are_ignored() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    let api = h.start_login(0, 1, "alice", "pw", None);
    let load = h.m.poll_store().unwrap();
    let reply = h.store.answer(wall, &load.command);
    h.m.handle_store_reply(now, wall, load.id, Ok(reply));
    h.store_step(0); // counts the attempt
    let job = h.m.poll_password().unwrap();
    h.m.handle_timeout(h.at(4_999).0);
    assert_eq!(h.m.poll_event(), None);
    // A password check that did not come back in time is the route's queue, not the
    // store: "busy", never "store unavailable".
    h.m.handle_timeout(h.at(5_000).0);
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::LoggedIn {
            api,
            result: Err(LoginError::Busy)
        })
    );
    assert_eq!(h.m.poll_timeout(), None);
    // The pool got to it after all: nothing happens.
    h.m.handle_password(h.at(6_000).0, job.id, job.work.run());
    assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
    // Registration too: the hash's deadline fails it with "busy".
    let api = h.api();
    h.m.handle_register(h.at(7_000).0, api, "bob", "pw");
    assert!(h.m.poll_password().is_some());
    h.m.handle_timeout(h.at(12_000).0);
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api,
            result: Err(RegisterFailure::Busy)
        })
    );
}

#[test]
fn timed_out_claim_write_is_released() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    h.start_login(0, 1, "alice", "pw", None);
    let replace = loop {
        let req = h.m.poll_store().unwrap();
        if matches!(req.command, StoreCommand::ReplaceClaim { .. }) {
            break req;
        }
        let reply = h.store.answer(wall, &req.command);
        h.m.handle_store_reply(now, wall, req.id, Ok(reply));
        // After the attempt is counted: the password check.
        if let Some(job) = h.m.poll_password() {
            h.m.handle_password(now, job.id, job.work.run());
        }
    };
    // The store applies the ReplaceClaim but its reply is lost.
    h.store.answer(wall, &replace.command);
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(1));
    h.m.handle_timeout(now + Duration::from_secs(2));
    assert_eq!(
        login_err(&[h.m.poll_event().unwrap()]),
        LoginError::Unavailable
    );
    let cleanup = h.m.poll_store().unwrap();
    assert_eq!(
        cleanup.command,
        StoreCommand::ReleaseClaim {
            user: UserId(1),
            epoch: Epoch(1)
        }
    );
    let reply = h.store.answer(wall, &cleanup.command);
    h.m.handle_store_reply(now, wall, cleanup.id, Ok(reply));
    assert_eq!(h.m.poll_event(), None, "the cleanup answers nobody");
    // So the retry is not locked out by a claim whose resume token nobody has.
    assert_eq!(login_ok(&h.login(3_000, 1, None)).epoch, Epoch(2));
}

#[test]
fn an_old_token_cannot_log_out_a_newer_session() {
    let mut h = Harness::with_alice(&["s1"]);
    let first = login_ok(&h.login(0, 1, None)).clone();
    assert_eq!(
        h.login(1_000, 1, Some(&first.resume_token)),
        vec![kick_old("s1", 1, 2)]
    );
    let second = login_ok(&h.kick_done(1_500, "s1", 1, 2)).clone();
    let events = h.logout(2_000, &first.token);
    assert!(
        matches!(
            events[..],
            [RouteEvent::LoggedOut {
                result: Ok(LoggedOut {
                    user: UserId(1),
                    released: false
                }),
                ..
            }]
        ),
        "{events:?}"
    );
    assert_eq!(
        h.store.claims.load(UserId(1)).claim.unwrap().epoch,
        Epoch(2)
    );
    let events = h.logout(3_000, &second.token);
    assert!(
        matches!(
            events[..],
            [RouteEvent::LoggedOut {
                result: Ok(LoggedOut {
                    user: UserId(1),
                    released: true
                }),
                ..
            }]
        ),
        "{events:?}"
    );
    assert_eq!(
        h.store.claims.load(UserId(1)),
        ClaimState {
            epoch: Epoch(2),
            claim: None
        }
    );
    // A forged token never reaches the store.
    let events = h.logout(3_000, "1.2.99999999999999.00");
    assert!(matches!(
        events[..],
        [RouteEvent::LoggedOut {
            result: Err(LogoutError::BadToken(TokenError::Malformed)),
            ..
        }]
    ));
    assert!(h.m.poll_store().is_none());
}

#[test]
fn bearer_rotation_mints_with_the_current_secret_and_accepts_the_previous() {
    let claims = BearerClaims {
        user: UserId(7),
        epoch: Epoch(3),
        expires_at: UnixMillis(10_000),
    };
    let now = UnixMillis(9_999);
    let old = BearerKey::new(b"old".to_vec());
    let rotating = BearerKey::new(b"new".to_vec()).with_previous(Some(b"old".to_vec()));
    let new_only = BearerKey::new(b"new".to_vec());
    let before = old.mint(&claims);
    let after = rotating.mint(&claims);
    assert_eq!(rotating.verify(&before, now), Ok(claims));
    assert_eq!(
        new_only.verify(&after, now),
        Ok(claims),
        "minted with the new one"
    );
    assert_eq!(old.verify(&after, now), Err(TokenError::BadMac));
    assert_eq!(new_only.verify(&before, now), Err(TokenError::BadMac));
    assert_eq!(
        rotating.verify(&before, UnixMillis(10_000)),
        Err(TokenError::Expired)
    );
}

#[test]
fn bearer_token_table() {
    let key = BearerKey::new(b"k".to_vec());
    let claims = BearerClaims {
        user: UserId(7),
        epoch: Epoch(3),
        expires_at: UnixMillis(10_000),
    };
    let good = key.mint(&claims);
    let mac = good.rsplit('.').next().unwrap().to_owned();
    let now = UnixMillis(9_999);
    let cases: Vec<(&str, String, UnixMillis, Result<BearerClaims, TokenError>)> = vec![
        ("valid", good.clone(), now, Ok(claims)),
        (
            "expired",
            good.clone(),
            UnixMillis(10_000),
            Err(TokenError::Expired),
        ),
        (
            "other user",
            format!("8.3.10000.{mac}"),
            now,
            Err(TokenError::BadMac),
        ),
        (
            "newer epoch",
            format!("7.4.10000.{mac}"),
            now,
            Err(TokenError::BadMac),
        ),
        (
            "longer life",
            format!("7.3.20000.{mac}"),
            now,
            Err(TokenError::BadMac),
        ),
        (
            "other key",
            BearerKey::new(b"j".to_vec()).mint(&claims),
            now,
            Err(TokenError::BadMac),
        ),
        (
            "leading zero",
            format!("07.3.10000.{mac}"),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "plus sign",
            format!("+7.3.10000.{mac}"),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "uppercase mac",
            format!("7.3.10000.{}", mac.to_uppercase()),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "short mac",
            format!("7.3.10000.{}", &mac[..62]),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "extra part",
            format!("{good}.x"),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "missing part",
            format!("7.3.{mac}"),
            now,
            Err(TokenError::Malformed),
        ),
        ("empty", String::new(), now, Err(TokenError::Malformed)),
        (
            "overflow",
            format!("99999999999999999999.3.10000.{mac}"),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "non-ascii",
            format!("7.3.10000.{}é", &mac[..62]),
            now,
            Err(TokenError::Malformed),
        ),
    ];
    for (label, token, now, want) in cases {
        assert_eq!(key.verify(&token, now), want, "{label}");
    }
}

// --- the per-account throttle and the password phase's bound ----------------------

fn throttled_config() -> RouteLoginConfig {
    RouteLoginConfig {
        throttle: LoginThrottle {
            free_failures: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(4),
        },
        ..config()
    }
}

/// One login of alice (user 1) at `ms` with `password`, to its end.
fn attempt(
    h: &mut Harness,
    ms: u64,
    password: &str,
    resume: Option<&ResumeToken>,
) -> Vec<RouteEvent> {
    h.start_login(ms, 1, "alice", password, resume);
    h.run(ms)
}

fn failures(h: &Harness) -> LoginFailures {
    h.store
        .failures
        .get(&UserId(1))
        .copied()
        .unwrap_or_default()
}

#[test]
fn failed_logins_grow_a_capped_delay_never_a_lock() {
    let mut h = Harness::with_alice_and(&["s1"], throttled_config());
    let wrong = |h: &mut Harness, ms| login_err(&attempt(h, ms, "guess", None));
    let throttled = |s: u64| LoginError::Throttled(Duration::from_millis(s));
    // (time ms, password, expected result)
    let steps: &[(u64, &str, LoginError)] = &[
        // Three free failures.
        (0, "guess", LoginError::AccountMismatch),
        (0, "guess", LoginError::AccountMismatch),
        (0, "guess", LoginError::AccountMismatch),
        // Then 1 s after the last one: even the right password is not checked.
        (0, "guess", throttled(1_000)),
        (0, "pw", throttled(1_000)),
        (999, "guess", throttled(1)),
        (1_000, "guess", LoginError::AccountMismatch),
        // 2 s, then 4 s, then capped at 4 s.
        (1_000, "guess", throttled(2_000)),
        (3_000, "guess", LoginError::AccountMismatch),
        (3_000, "guess", throttled(4_000)),
        (7_000, "guess", LoginError::AccountMismatch),
        (7_000, "guess", throttled(4_000)),
        (11_000, "guess", LoginError::AccountMismatch),
        (11_000, "guess", throttled(4_000)),
    ];
    for (i, (ms, password, want)) in steps.iter().enumerate() {
        let got = if *password == "guess" {
            wrong(&mut h, *ms)
        } else {
            login_err(&attempt(&mut h, *ms, password, None))
        };
        assert_eq!(got, *want, "step {i} at {ms} ms");
        // A throttled attempt checks no password.
        assert!(h.m.poll_password().is_none());
    }
    assert_eq!(throttled(1_500).code(), "4290");
    assert_eq!(
        throttled(1_500).to_string(),
        "too many failed logins for this account: retry in 2 s"
    );
    // The owner gets in once the delay has passed, which clears the record: the next
    // mistakes are free again.
    let events = attempt(&mut h, 15_000, "pw", None);
    assert_eq!(login_ok(&events).epoch, Epoch(1));
    assert_eq!(failures(&h).count, 0);
    assert_eq!(wrong(&mut h, 15_000), LoginError::AccountMismatch);
}

#[test]
fn concurrent_guesses_cannot_all_pass_on_one_read() {
    let mut h = Harness::with_alice_and(&["s1"], throttled_config());
    // Ten guesses in flight at once: all read "no failures", but each is counted by a
    // compare-and-count before its check, so only the free three are checked.
    for _ in 0..10 {
        h.start_login(0, 1, "alice", "guess", None);
    }
    let events = h.run(0);
    let mut results: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        let RouteEvent::LoggedIn { result: Err(e), .. } = e else {
            panic!("{e:?}");
        };
        *results.entry(e.code()).or_default() += 1;
    }
    assert_eq!(results, BTreeMap::from([("9100", 3), ("4290", 7)]));
    assert_eq!(failures(&h).count, 3);
}

#[test]
fn a_resume_token_of_the_users_claim_skips_the_throttle() {
    let mut h = Harness::with_alice_and(&["s1"], throttled_config());
    let first = login_ok(&attempt(&mut h, 0, "pw", None)).clone();
    // An attacker spends the free failures and throttles the account.
    for _ in 0..3 {
        attempt(&mut h, 100, "guess", None);
    }
    assert_eq!(
        login_err(&attempt(&mut h, 100, "pw", None)),
        LoginError::Throttled(Duration::from_secs(1))
    );
    // A made-up resume token does not help.
    let forged = ResumeToken([7; 32]);
    assert_eq!(
        login_err(&attempt(&mut h, 100, "pw", Some(&forged))),
        LoginError::Throttled(Duration::from_secs(1))
    );
    // The owner's client, whose server crashed (gone from the registry), re-homes at
    // once with the resume token of its claim: a takeover, not slowed.
    h.set_registry(200, &["s2"]);
    let events = attempt(&mut h, 200, "pw", Some(&first.resume_token));
    let again = login_ok(&events);
    assert_eq!(again.epoch, Epoch(2));
    // Its success leaves the attacker's record alone...
    assert_eq!(failures(&h).count, 3);
    assert_eq!(
        login_err(&attempt(&mut h, 200, "guess", None)),
        LoginError::Throttled(Duration::from_millis(900))
    );
    // ...and a wrong password with a valid token is still counted.
    assert_eq!(
        login_err(&attempt(&mut h, 200, "guess", Some(&again.resume_token))),
        LoginError::AccountMismatch
    );
    assert_eq!(failures(&h).count, 4);
}

#[test]
fn a_full_password_phase_answers_busy_at_once() {
    let mut h = Harness::with_alice_and(
        &["s1"],
        RouteLoginConfig {
            max_password_jobs: 2,
            ..config()
        },
    );
    let (now, wall) = h.at(0);
    // Two logins reach their password checks; the jobs have not come back yet. (Unknown
    // ids: checked against the dummy hash, nothing for the throttle to count.)
    let mut apis = Vec::new();
    for user in 7..10 {
        apis.push(h.start_login(0, user, "alice", "pw", None));
    }
    // Answer the three LoadAccounts (the third finds both places taken).
    for _ in 0..3 {
        let req = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &req.command);
        h.m.handle_store_reply(now, wall, req.id, Ok(reply));
    }
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::LoggedIn {
            api: apis[2],
            result: Err(LoginError::Busy)
        })
    );
    assert_eq!(LoginError::Busy.code(), "4500");
    // A registration meanwhile is refused the same way, before any hashing.
    let api = h.api();
    h.m.handle_register(now, api, "bob", "pw-bob");
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api,
            result: Err(RegisterFailure::Busy)
        })
    );
    assert_eq!(RegisterFailure::Busy.code(), "4500");
    // Once the two are through, there is room again.
    let events = h.run(0);
    let mismatches = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                RouteEvent::LoggedIn {
                    result: Err(LoginError::AccountMismatch),
                    ..
                }
            )
        })
        .count();
    assert_eq!(mismatches, 2, "{events:?}");
    let events = h.register(0, "bob", "pw-bob");
    assert!(matches!(
        events[..],
        [RouteEvent::Registered { result: Ok(_), .. }]
    ));
}
