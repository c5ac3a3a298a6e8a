//! The facade's own rules: one drain in a fixed order across both machines, store replies
//! routed by machine, and the deadline named with its machine and reason.

use std::time::Duration;

use super::*;
use crate::accounts::PasswordParams;
use crate::route::balance::{Balancer, Strategy};
use crate::route::delivery::DeliveryConfig;
use crate::route::login::RouteLoginConfig;
use crate::route::tickets::TicketKeys;
use crate::store::{StoreCommand, StoreUnavailable};

fn t0() -> Instant {
    Instant::from_nanos(0)
}

const WALL: UnixMillis = UnixMillis(1_700_000_000_000);

fn node() -> RouteNode {
    let config = RouteLoginConfig {
        password: PasswordParams::for_tests(),
        store_timeout: Duration::from_secs(2),
        ..RouteLoginConfig::default()
    };
    let login = RouteLogin::new(
        config,
        TicketKeys::new(1, b"ticket-secret".to_vec()),
        b"token-secret".to_vec(),
        Balancer::new(Strategy::RoundRobin, 0),
        7,
    );
    let delivery = RouteDelivery::new(DeliveryConfig {
        store_timeout: Duration::from_secs(3),
        ..DeliveryConfig::default()
    });
    RouteNode::new(login, delivery)
}

fn send(conv: &str) -> cim_proto::Send {
    cim_proto::Send {
        msg_id_hi: 0,
        msg_id_lo: 1,
        conv: conv.into(),
        body: bytes::Bytes::from_static(b"hi"),
        ..Default::default()
    }
}

fn login_request() -> LoginRequest {
    LoginRequest {
        user: UserId(1),
        name: "alice".into(),
        password: "pw".into(),
        resume_token: None,
        resume_secret: None,
    }
}

/// Delivery's request was queued first, yet the login machine's outputs come first: the
/// order is by machine and kind, not by arrival (the order the route's shell always had).
#[test]
fn one_drain_gives_login_outputs_then_delivery_outputs() {
    let now = t0();
    let mut n = node();
    n.handle_send(
        now,
        WALL,
        SendOrigin::Http(ApiRequestId(1)),
        UserId(1),
        send("all"),
    );
    n.handle_login(now, ApiRequestId(2), login_request());
    n.handle_logout(now, WALL, ApiRequestId(3), "not-a-token");
    let outputs: Vec<String> = std::iter::from_fn(|| n.poll_output())
        .map(|o| match o {
            RouteOutput::Store { machine, request } => match request.command {
                StoreCommand::LoadAccount { .. } => format!("{machine:?} load account"),
                StoreCommand::Append { .. } => format!("{machine:?} append"),
                other => panic!("unexpected {other:?}"),
            },
            RouteOutput::Event(RouteEvent::LoggedOut { api, .. }) => format!("logged out {api:?}"),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        outputs,
        [
            "Login load account",
            "logged out ApiRequestId(3)",
            "Delivery append"
        ]
    );
}

/// Both machines number their requests from the same start, so the same id is pending in
/// each: the reply goes to the machine it is tagged with, and only that one answers.
#[test]
fn a_store_reply_reaches_the_machine_it_is_tagged_with() {
    let now = t0();
    let mut n = node();
    n.handle_send(
        now,
        WALL,
        SendOrigin::Http(ApiRequestId(1)),
        UserId(1),
        send("all"),
    );
    n.handle_login(now, ApiRequestId(2), login_request());
    let mut ids = BTreeMap::new();
    while let Some(output) = n.poll_output() {
        if let RouteOutput::Store { machine, request } = output {
            ids.insert(machine, request.id);
        }
    }
    assert_eq!(ids[&RouteMachine::Login], ids[&RouteMachine::Delivery]);
    let failed = || Err(StoreUnavailable("down".into()));
    n.handle_store_reply(
        now,
        WALL,
        RouteMachine::Delivery,
        ids[&RouteMachine::Delivery],
        failed(),
    );
    match n.poll_output() {
        Some(RouteOutput::SendResult { origin, result }) => {
            assert_eq!(origin, SendOrigin::Http(ApiRequestId(1)));
            assert!(result.nack.is_some_and(|nack| nack.retryable));
        }
        other => panic!("expected the send's nack, got {other:?}"),
    }
    assert_eq!(n.poll_output(), None, "the login is still waiting");
    assert_eq!(n.delivery().in_flight(), 0);
    n.handle_store_reply(
        now,
        WALL,
        RouteMachine::Login,
        ids[&RouteMachine::Login],
        failed(),
    );
    assert!(matches!(
        n.poll_output(),
        Some(RouteOutput::Event(RouteEvent::LoggedIn {
            result: Err(_),
            ..
        }))
    ));
}

/// The deadline says whose it is: the login's store deadline (2 s) comes before delivery's
/// (3 s); once it has passed, delivery's is next.
#[test]
fn poll_timeout_names_the_machine_and_its_reason() {
    let now = t0();
    let mut n = node();
    assert_eq!(n.poll_timeout(), None);
    n.handle_send(
        now,
        WALL,
        SendOrigin::Http(ApiRequestId(1)),
        UserId(1),
        send("all"),
    );
    n.handle_login(now, ApiRequestId(2), login_request());
    while n.poll_output().is_some() {}
    assert_eq!(
        n.poll_timeout(),
        Some((
            now + Duration::from_secs(2),
            RouteTimer::Login(login::TimerReason::StoreDeadline)
        ))
    );
    n.handle_timeout(now + Duration::from_secs(2));
    while n.poll_output().is_some() {}
    assert_eq!(
        n.poll_timeout(),
        Some((
            now + Duration::from_secs(3),
            RouteTimer::Delivery(delivery::TimerReason::StoreDeadline)
        ))
    );
}
