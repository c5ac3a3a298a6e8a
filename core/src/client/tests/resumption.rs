//! Resumption from the client's side: re-logins present the last answer's secret instead of
//! the password; a refused one falls back to the password, or stops when there is none.

use super::*;

/// Online (answer with token 0xA and its secret), then the connection drops: the re-login
/// presents token and secret, and no password.
fn online_then_relogin(h: &mut Harness) {
    h.online();
    assert!(h.s.has_resume_secret());
    h.table(vec![
        (
            100,
            In::Disconnected,
            vec![],
            vec![reconnecting(0, ConnectionLoss::Disconnected)],
        ),
        (
            100,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
    ]);
}

#[test]
fn a_refused_resumption_logs_in_with_the_password_at_once() {
    let mut h = Harness::new(config());
    online_then_relogin(&mut h);
    h.table(vec![
        (
            110,
            In::Answer(2, Err(LoginFailure::Rejected(LoginError::ResumeRefused))),
            // No backoff: the same token, now with the password and no secret.
            vec![ClientCommand::Login {
                attempt: LoginAttempt(3),
                request: password_request(Some(0xA)),
            }],
            vec![ClientEvent::LoggingIn],
        ),
        (
            120,
            In::Answer(3, Ok(answer(7, 0xB))),
            vec![connect_s1()],
            vec![connecting_s1()],
        ),
    ]);
    // The new answer's secret is the one kept (and persisted).
    assert_eq!(
        h.s.snapshot(h.at(130), UnixMillis(0)).resume_secret,
        Some(secret(0xB))
    );
}

#[test]
fn without_a_password_a_refused_resumption_stops_until_one_is_given() {
    let mut cfg = config();
    cfg.password = String::new();
    let state = ClientState {
        resume_token: Some(token(0xA)),
        resume_secret: Some(secret(0xA)),
        ..ClientState::default()
    };
    let t0 = base();
    let mut h = Harness {
        s: ClientSession::restore(cfg, state, t0, UnixMillis(0)),
        t0,
    };
    h.table(vec![
        (
            0,
            In::Start,
            vec![login_cmd(1, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            10,
            In::Answer(1, Err(LoginFailure::Rejected(LoginError::ResumeRefused))),
            vec![],
            vec![
                ClientEvent::LoginRejected(LoginError::ResumeRefused),
                ClientEvent::Stopped(StopReason::PasswordNeeded),
            ],
        ),
    ]);
    assert!(!h.s.has_resume_secret());
    assert_eq!(h.s.poll_timeout(), None);
    // The application asks the user and starts again: a password login, same token.
    h.s.set_password("pw");
    h.table(vec![(
        20,
        In::Start,
        vec![ClientCommand::Login {
            attempt: LoginAttempt(2),
            request: password_request(Some(0xA)),
        }],
        vec![ClientEvent::LoggingIn],
    )]);
}

#[test]
fn a_secret_restored_without_its_token_is_dropped() {
    let state = ClientState {
        resume_token: None,
        resume_secret: Some(secret(0xA)),
        ..ClientState::default()
    };
    let s = ClientSession::restore(config(), state, base(), UnixMillis(0));
    assert!(!s.has_resume_secret());
}
