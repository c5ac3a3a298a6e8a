//! The login throttle and session-bound tokens in the real deployment: two `cim-route`
//! processes on one Redis (the throttle's record and the claims live there), as an attacker
//! meets them.

mod support;

use std::time::Duration;

use cim_io::api;
use cim_io::sdk::ApiError;
use hyper::{Method, StatusCode};

use support::{Cluster, PASSWORD};

fn login(user: u64, name: &str, password: &str) -> api::LoginRequest {
    api::LoginRequest {
        resume_secret: None,
        user_id: user,
        user_name: name.to_owned(),
        password: password.to_owned(),
        resume_token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_are_throttled_across_routes_and_tokens_die_with_their_session() {
    let Some(cluster) = Cluster::start("limits").await else {
        return;
    };
    let ann = cluster
        .api(0)
        .register("ann", PASSWORD)
        .await
        .unwrap()
        .user_id;
    // Five wrong guesses, alternating the two route processes: each is checked.
    for i in 0..5 {
        let answer = cluster.api(i % 2).login(&login(ann, "ann", "guess")).await;
        match answer {
            Err(ApiError::Status {
                http: 200, code, ..
            }) => {
                assert_eq!(code, api::CODE_ACCOUNT_MISMATCH);
            }
            other => panic!("guess {i}: {other:?}"),
        }
    }
    // The sixth, on either route, is throttled: the count is in Redis.
    for route in 0..2 {
        match cluster.api(route).login(&login(ann, "ann", PASSWORD)).await {
            Err(ApiError::Status {
                http: 429,
                code,
                message,
            }) => {
                assert_eq!(code, api::CODE_THROTTLED);
                assert!(message.contains("retry in"), "{message}");
            }
            other => panic!("route {route}: {other:?}"),
        }
    }

    // A token works on both routes until its session is logged out, then on neither
    // (at once on the route that logged out, within a second on the other).
    let bea = cluster
        .api(0)
        .register("bea", PASSWORD)
        .await
        .unwrap()
        .user_id;
    let token = cluster
        .api(0)
        .login(&login(bea, "bea", PASSWORD))
        .await
        .unwrap()
        .token;
    for route in 0..2 {
        let (status, _) = cluster
            .http(route)
            .request(Method::GET, "/group/list", Some(&token), None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "route {route}");
    }
    cluster
        .api(0)
        .offline(&token, cim_core::ids::UserId(bea))
        .await
        .unwrap();
    let (status, _) = cluster
        .http(0)
        .request(Method::GET, "/group/list", Some(&token), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, _) = cluster
        .http(1)
        .request(Method::GET, "/group/list", Some(&token), None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
