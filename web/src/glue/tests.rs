use super::*;

fn ticket_b64() -> String {
    let ticket = cim_proto::Ticket::default();
    URL_SAFE_NO_PAD.encode(ticket.encode_to_vec())
}

fn answer(endpoint: Value) -> String {
    json!({"code": "9000", "message": "success", "dataBody": {
        "userId": 7, "epoch": 3, "serverId": "s1", "endpoint": endpoint,
        "ip": "127.0.0.1", "cimServerPort": 11211, "httpPort": 8081,
        "ticket": ticket_b64(), "token": "tok", "resumeToken": URL_SAFE_NO_PAD.encode([9u8; 32]),
        "resumeSecret": URL_SAFE_NO_PAD.encode([5u8; 32]),
    }})
    .to_string()
}

#[test]
fn the_login_answers_ws_url_is_where_the_session_connects() {
    let body = answer(json!({"host": "127.0.0.1", "port": 11211, "tls": false,
                             "wsUrl": "ws://127.0.0.1:11411/"}));
    let a = login_answer(UserId(7), 200, &body).unwrap();
    assert_eq!(a.server.ws_port, Some(11411));
    assert_eq!(
        a.server.client_endpoint().ws_url.as_deref(),
        Some("ws://127.0.0.1:11411/")
    );
    assert_eq!(a.resume_token, ResumeToken([9; 32]));
    assert_eq!(a.resume_secret, Some(ResumptionSecret([5; 32])));
    assert_eq!(a.token, "tok");
}

#[test]
fn a_server_without_a_websocket_port_gives_no_url() {
    let body = answer(json!({"host": "h", "port": 1, "tls": true}));
    let a = login_answer(UserId(7), 200, &body).unwrap();
    assert_eq!(a.server.client_endpoint().ws_url, None);
}

#[test]
fn login_codes_map_as_the_sdk_maps_them() {
    let refuse = |code: &str| {
        login_answer(
            UserId(7),
            400,
            &json!({"code": code, "message": "no"}).to_string(),
        )
        .unwrap_err()
    };
    assert_eq!(
        refuse("9100"),
        LoginFailure::Rejected(LoginError::AccountMismatch)
    );
    assert_eq!(
        refuse("5000"),
        LoginFailure::Rejected(LoginError::RepeatLogin)
    );
    assert_eq!(
        refuse("9110"),
        LoginFailure::Rejected(LoginError::ResumeRefused)
    );
    assert!(matches!(refuse("4290"), LoginFailure::Transport(_)));
    assert!(matches!(
        login_answer(UserId(7), 502, "<html>bad gateway</html>"),
        Err(LoginFailure::Transport(_))
    ));
    // Another user's answer is no answer for this session.
    let body = answer(json!({"host": "h", "port": 1, "tls": false}));
    assert!(matches!(
        login_answer(UserId(8), 200, &body),
        Err(LoginFailure::Transport(_))
    ));
}

#[test]
fn saved_state_round_trips_and_keeps_64_bit_epochs_exact() {
    let state = ClientState {
        resume_token: Some(ResumeToken([1; 32])),
        resume_secret: Some(ResumptionSecret([2; 32])),
        outbox: vec![SavedMessage {
            id: ClientMsgId(u128::MAX - 5),
            conv: ConvId::group("dev").unwrap(),
            body: Bytes::from_static("héllo".as_bytes()),
            created_at: UnixMillis(1_700_000_000_000),
        }],
        convs: vec![SavedConv {
            conv: ConvId::All,
            log_epoch: LogEpoch(u64::MAX - 1),
            delivered: 42,
        }],
    };
    let text = state_json(&state);
    assert!(text.contains(&format!("\"{}\"", u64::MAX - 1)), "{text}");
    assert!(!text.contains("password"));
    assert_eq!(parse_state(&text).unwrap(), state);
}

#[test]
fn bad_saved_state_is_a_typed_error() {
    assert!(matches!(parse_state("{"), Err(GlueError::Json(_))));
    let bad = r#"{"outbox":[{"id":"x","conv":"all","text":"a","createdAtMs":1}],"convs":[]}"#;
    assert!(matches!(
        parse_state(bad),
        Err(GlueError::Field("message id"))
    ));
}

/// A resumption's `POST /login` body: the secret, and no password field when the page has
/// none (a reload); a login by password keeps it.
#[test]
fn a_resumption_sends_the_secret_and_no_empty_password() {
    let body_of = |password: &str, secret: Option<ResumptionSecret>| {
        let command = ClientCommand::Login {
            attempt: cim_core::client::LoginAttempt(1),
            request: cim_core::route::login::LoginRequest {
                user: UserId(7),
                name: "ann".into(),
                password: password.into(),
                resume_token: Some(ResumeToken([9; 32])),
                resume_secret: secret,
            },
        };
        let (_, json, _) = output(ClientOutput::Command(command));
        let out: Value = serde_json::from_str(&json).unwrap();
        serde_json::from_str::<Value>(out["body"].as_str().unwrap()).unwrap()
    };
    let resumed = body_of("", Some(ResumptionSecret([5; 32])));
    assert_eq!(
        resumed["resumeSecret"],
        json!(URL_SAFE_NO_PAD.encode([5u8; 32]))
    );
    assert_eq!(resumed.get("password"), None);
    let by_password = body_of("pw-123456", None);
    assert_eq!(by_password["password"], json!("pw-123456"));
    assert_eq!(by_password.get("resumeSecret"), None);
}
