//! `cim smoke`: the end-to-end check CI runs against `cim up`, and an operator may run
//! against production. Two fresh users register, log in through the SDK, make a group of
//! their own and exchange a group message and a private message each way. Over TLS when the
//! route is `https://` (against `cim up --tls`, with `--ca` its CA file).
//!
//! Then a third user logs in and connects at the login answer's `wsUrl`, as a browser
//! would (`wss://` trusting the same CA), and trades a private message each way with the
//! first over the WebSocket gateway; a server without one is said so and skipped.
//!
//! It touches nobody else: nothing is posted to `all` (every user's group), the group is the
//! run's own (both leave it at the end), and the two accounts are named
//! `cim-smoke-<run>-a` / `-b` (the [`SMOKE_PREFIX`]), so they are easy to tell apart from
//! real users and to remove (`-w` too, the WebSocket round's). All log out at the end.

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
            server_transport: Default::default(),
            entropy: Some(launch::os_entropy()),
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
    websocket_round(&api, tls.as_ref(), tag, users[0].0, &mut clients[0])
        .await
        .context("the WebSocket round")?;

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
        "smoke check passed (accounts {}, {} and the WebSocket round's -w stay, with the \
         prefix {SMOKE_PREFIX})",
        users[0].1, users[1].1
    );
    Ok(())
}

/// A user over the WebSocket gateway: logs in through the route, connects at `wsUrl` (TLS
/// with the SDK's trust when the endpoint says so), logs in with the ticket, then receives a
/// private message from `peer` and answers it. Protobuf frames, one binary message each.
async fn websocket_round(
    api: &RouteApi<TokioNet>,
    tls: Option<&SdkTls>,
    tag: u64,
    peer: UserId,
    (peer_client, peer_events): &mut (Client<TokioNet>, Events),
) -> anyhow::Result<()> {
    use cim_proto::Frame;
    use cim_proto::frame::Kind;
    use futures::{SinkExt as _, StreamExt as _};
    use prost::Message as _;
    use tokio_tungstenite::tungstenite::Message;

    let name = format!("{SMOKE_PREFIX}{tag}-w");
    let registered = register(api, &name)
        .await
        .with_context(|| format!("registering {name}"))?;
    let user = UserId(registered.user_id);
    let login = api
        .login(&cim_io::api::LoginRequest {
            user_id: user.0,
            user_name: name.clone(),
            password: PASSWORD.into(),
            resume_token: None,
            resume_secret: None,
        })
        .await
        .with_context(|| format!("logging {name} in"))?;
    let Some(endpoint) = login.endpoint.clone() else {
        println!("the route's login answer names no endpoint: WebSocket round skipped");
        return Ok(());
    };
    let Some(url) = endpoint.ws_url.clone() else {
        println!(
            "server {} has no WebSocket gateway: WebSocket round skipped",
            login.server_id
        );
        return Ok(());
    };
    let uri: tokio_tungstenite::tungstenite::http::Uri =
        url.parse().with_context(|| format!("wsUrl {url:?}"))?;
    let port = uri
        .port_u16()
        .with_context(|| format!("wsUrl {url:?} names no port"))?;
    let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let stream = match (endpoint.tls, tls) {
        (true, Some(tls)) => tls
            .client
            .connect(tcp, &endpoint.host)
            .await
            .with_context(|| format!("TLS to {url}"))?,
        (true, None) => bail!("{url} needs TLS: give --ca (or an https:// route)"),
        (false, _) => cim_io::tls::MaybeTls::plain(tcp),
    };
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), stream)
        .await
        .with_context(|| format!("upgrading at {url}"))?;
    let ticket = cim_io::api::decode_ticket(&login.ticket)
        .map_err(|e| anyhow::anyhow!("the login answer's ticket: {e}"))?;
    let frame = |kind| Message::Binary(Frame { kind: Some(kind) }.encode_to_vec().into());
    ws.send(frame(Kind::Login(cim_proto::Login {
        ticket: Some(ticket),
    })))
    .await?;
    // Frames until one `pick` takes; a close or an Error frame ends the round.
    async fn next_kind<S, T>(
        ws: &mut tokio_tungstenite::WebSocketStream<S>,
        mut pick: impl FnMut(&Kind) -> Option<T>,
    ) -> anyhow::Result<T>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        while let Some(message) = ws.next().await {
            match message? {
                Message::Binary(body) => {
                    let kind = Frame::decode(body.as_ref())?.kind;
                    if let Some(Kind::Error(error)) = &kind {
                        bail!("the server refused: {}", error.message);
                    }
                    if let Some(found) = kind.as_ref().and_then(&mut pick) {
                        return Ok(found);
                    }
                }
                Message::Close(close) => bail!("the server closed the WebSocket: {close:?}"),
                _ => {}
            }
        }
        bail!("the WebSocket ended")
    }
    next_kind(&mut ws, |k| matches!(k, Kind::LoginOk(_)).then_some(())).await?;
    println!("{name} logged in at server {} over {url}", login.server_id);

    let conv = ConvId::private(peer, user).context("two distinct users")?;
    let text = "hello, browser";
    peer_client
        .send(conv.clone(), Bytes::from_static(text.as_bytes()))
        .await
        .with_context(|| format!("sending {text:?}"))?;
    next_kind(&mut ws, |k| match k {
        Kind::Deliver(d) => d
            .message
            .as_ref()
            .filter(|m| m.body.as_ref() == text.as_bytes())
            .map(|_| ()),
        _ => None,
    })
    .await?;
    println!("{name} received {text:?} over the WebSocket");

    let reply = "hello from the browser";
    let msg_id = launch::os_seed();
    ws.send(frame(Kind::Send(cim_proto::Send {
        msg_id_hi: msg_id,
        msg_id_lo: tag,
        conv: conv.to_string(),
        body: Bytes::from_static(reply.as_bytes()),
        sent_at_ms: 0,
        order_stream: 0,
        order_seq: 0,
        order_after: 0,
    })))
    .await?;
    next_kind(&mut ws, |k| match k {
        Kind::SendAck(ack) if ack.msg_id_hi == msg_id => Some(Ok(())),
        Kind::SendNack(nack) if nack.msg_id_hi == msg_id => Some(Err(nack.reason.clone())),
        _ => None,
    })
    .await?
    .map_err(|reason| anyhow::anyhow!("the send over the WebSocket was refused: {reason}"))?;
    wait_message(peer_events, &conv, reply).await?;
    println!("{name} sent {reply:?} over the WebSocket; it was received");
    let _ = ws.close(None).await;
    if let Err(error) = api.offline(&login.token, user).await {
        println!("warning: {name} could not log out: {error}");
    }
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
