//! `cim smoke`: the end-to-end check CI runs against `cim up`, and an operator may run
//! against production. Two fresh users register, log in through the SDK, make a group of
//! their own and exchange a group message and a private message each way. Over TLS when the
//! route is `https://` (against `cim up --tls`, with `--ca` its CA file).
//!
//! It touches nobody else: nothing is posted to `all` (every user's group), the group is the
//! run's own (both leave it at the end), and the two accounts are named
//! `cim-smoke-<run>-a` / `-b` (the [`SMOKE_PREFIX`]), so they are easy to tell apart from
//! real users and to remove. Both log out at the end.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;

use cim_core::client::{ClientConfig, ClientEvent};
use cim_core::ids::{ConvId, UserId};
use cim_io::clock::Clock;
use cim_io::launch;
use cim_io::net::TokioNet;
use cim_io::sdk::{Client, Events, RouteAddr, RouteApi, SdkOptions, SdkTls};
use cim_io::tls::{ClientTls, ClientTlsSettings};

/// Every account and group a smoke run makes starts with this.
pub const SMOKE_PREFIX: &str = "cim-smoke-";

/// The smoke accounts' password: each account is used by one run only, and logged out.
const PASSWORD: &str = "smoke-password";

/// The SDK's TLS: with an https route, or a `--ca` (then servers that expect TLS are
/// reached over it even behind a plain route). Never a fallback to plaintext.
fn sdk_tls(route: &RouteAddr, ca: Option<&Path>) -> anyhow::Result<Option<SdkTls>> {
    if !route.https && ca.is_none() {
        return Ok(None);
    }
    let client = ClientTls::load(ClientTlsSettings {
        ca: ca.map(Path::to_owned),
        ..ClientTlsSettings::default()
    })
    .context("loading the trusted certificates")?;
    Ok(Some(SdkTls {
        client,
        route_https: route.https,
    }))
}

pub async fn run(route: &str, ca: Option<&Path>) -> anyhow::Result<()> {
    let route = RouteAddr::parse(route).map_err(anyhow::Error::msg)?;
    let tls = sdk_tls(&route, ca)?;
    let (host, port) = (route.host.as_str(), route.port);
    let mut api = RouteApi::new(TokioNet, host, port, Duration::from_secs(5));
    if let Some(tls) = tls.as_ref().filter(|tls| tls.route_https) {
        api = api.with_tls(tls.client.clone());
    }
    // Fresh names each run, so the check also works against a long-running cluster.
    let tag = launch::os_seed() % 1_000_000_000;
    let mut users = Vec::new();
    for who in ["a", "b"] {
        let name = format!("{SMOKE_PREFIX}{tag}-{who}");
        let registered = register(&api, &name)
            .await
            .with_context(|| format!("registering {name}"))?;
        println!("registered {name} as user {}", registered.user_id);
        users.push((UserId(registered.user_id), name));
    }

    let mut clients = Vec::new();
    for (user, name) in &users {
        let options = SdkOptions {
            route_host: host.to_owned(),
            route_port: port,
            session: ClientConfig::new(*user, name.clone(), PASSWORD, launch::os_seed()),
            state: None,
            max_frame: cim_proto::codec::DEFAULT_MAX_FRAME,
            tls: tls.clone(),
        };
        let (client, mut events) = Client::start(TokioNet, Clock::System, options);
        let server = wait_online(&mut events).await?;
        println!("{name} is online on server {server}");
        clients.push((client, events));
    }
    let (a, b) = (users[0].0, users[1].0);
    let private = ConvId::private(a, b).context("two distinct users")?;
    // A group of the run's own, never `all`: other users see nothing of a smoke run.
    let group_name = format!("{SMOKE_PREFIX}{tag}");
    let group = ConvId::group(&group_name).context("the smoke group's name")?;
    for (i, (user, name)) in users.iter().enumerate() {
        let (api, token) = api_of(&clients[i].0)?;
        let result = if i == 0 {
            api.create_group(&token, *user, &group_name).await
        } else {
            api.join_group(&token, *user, &group_name).await
        };
        result.with_context(|| format!("{name} joining the group {group_name}"))?;
    }
    println!("both joined the group {group_name}");

    let steps = [
        (0, group.clone(), "hello, group"),
        (0, private.clone(), "hello, b"),
        (1, private.clone(), "hello, a"),
    ];
    for (from, conv, text) in steps {
        let to = 1 - from;
        let acked = clients[from]
            .0
            .send(conv.clone(), Bytes::from_static(text.as_bytes()))
            .await
            .with_context(|| format!("sending {text:?}"))?;
        println!(
            "{} sent {text:?} to {conv}: seq {}",
            users[from].1, acked.seq
        );
        wait_message(&mut clients[to].1, &conv, text).await?;
        println!("{} received it", users[to].1);
    }
    // Clean up what can be: leave the group, log out. The accounts stay (accounts are not
    // deleted through the API), named `cim-smoke-…` for an operator to find and remove.
    for (i, (user, name)) in users.iter().enumerate() {
        let (api, token) = api_of(&clients[i].0)?;
        if let Err(error) = api.leave_group(&token, *user, &group_name).await {
            println!("warning: {name} could not leave {group_name}: {error}");
        }
        if let Err(error) = api.offline(&token, *user).await {
            println!("warning: {name} could not log out: {error}");
        }
    }
    for (client, _) in clients {
        client.shutdown().await;
    }
    println!(
        "smoke check passed (accounts {} and {} stay, with the prefix {SMOKE_PREFIX})",
        users[0].1, users[1].1
    );
    Ok(())
}

/// Registers `name`, waiting out the route's per-address registration limit (429, as when
/// smoke runs follow each other closely) as often as it asks; the caller's timeout bounds it.
async fn register(
    api: &RouteApi<TokioNet>,
    name: &str,
) -> Result<cim_io::api::RegisterResponse, cim_io::sdk::ApiError> {
    loop {
        match api.register(name, PASSWORD).await {
            Err(cim_io::sdk::ApiError::Status { http: 429, .. }) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// The route API as `client` logs in through, and its bearer token.
fn api_of(client: &Client<TokioNet>) -> anyhow::Result<(RouteApi<TokioNet>, String)> {
    let token = client.token().context("a logged-in client has a token")?;
    Ok((client.route_api(), token))
}

async fn wait_online(events: &mut Events) -> anyhow::Result<String> {
    while let Some(event) = events.next().await {
        match event {
            ClientEvent::Online { server, .. } => return Ok(server.to_string()),
            ClientEvent::LoginRejected(error) => bail!("login rejected: {error}"),
            ClientEvent::Stopped(reason) => bail!("client stopped: {reason:?}"),
            _ => {}
        }
    }
    bail!("client ended before going online")
}

async fn wait_message(events: &mut Events, conv: &ConvId, text: &str) -> anyhow::Result<()> {
    while let Some(event) = events.next().await {
        match event {
            ClientEvent::Message(m) if m.conv == *conv && m.body == text.as_bytes() => {
                return Ok(());
            }
            ClientEvent::Stopped(reason) => bail!("client stopped: {reason:?}"),
            _ => {}
        }
    }
    bail!("client ended before receiving {text:?}")
}
