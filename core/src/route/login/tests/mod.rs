mod logins;
mod passwords;
mod resumption;
mod store;
mod takeover;
mod throttle;
mod tokens;

use super::*;

use crate::route::balance::Strategy;

use crate::route::claims::ClaimTable;

use crate::store::{Account, StoreUnavailable};

const TICKET_SECRET: &[u8] = b"ticket-secret";

const WALL0: UnixMillis = UnixMillis(1_700_000_000_000);

#[allow(clippy::disallowed_methods)] // the one clock read: a base for explicit offsets
fn t0() -> Instant {
    Instant::from_nanos(0)
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
        ws_port: None,
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

    /// Drains `poll_output` as a shell does: answers store requests and runs password jobs
    /// at once, until nothing is left; returns the events.
    fn run(&mut self, ms: u64) -> Vec<RouteEvent> {
        let (now, wall) = self.at(ms);
        let mut events = Vec::new();
        while let Some(output) = self.m.poll_output() {
            match output {
                LoginOutput::Store(req) => {
                    let reply = self.store.answer(wall, &req.command);
                    self.m.handle_store_reply(now, wall, req.id, Ok(reply));
                }
                LoginOutput::Password(job) => {
                    self.m.handle_password(now, job.id, job.work.run());
                }
                LoginOutput::Event(event) => events.push(event),
            }
        }
        events
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
            resume_secret: None,
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

fn kick_old(server: &str, user: u64, below: u64) -> RouteEvent {
    RouteEvent::KickOld {
        server: ServerId::new(server),
        user: UserId(user),
        below_epoch: Epoch(below),
    }
}

/// A production route's generator takes all 256 bits it is given: two machines whose
/// entropy differs only past the first 8 bytes (all a `u64` seed could carry) draw
/// different credentials (here, the dummy hash's salt, the generator's first draw).
#[test]
fn with_entropy_uses_every_byte_of_its_seed() {
    let machine = |entropy: [u8; 32]| {
        RouteLogin::with_entropy(
            config(),
            TicketKeys::new(1, TICKET_SECRET.to_vec()),
            b"token-secret".to_vec(),
            Balancer::new(Strategy::RoundRobin, 0),
            entropy,
        )
    };
    let mut late = [7; 32];
    late[31] = 8;
    assert_ne!(machine([7; 32]).dummy_hash, machine(late).dummy_hash);
    assert_eq!(machine([7; 32]).dummy_hash, machine([7; 32]).dummy_hash);
}
