//! The whole shell over simulated sockets: one route, one server and one SDK client, each a
//! turmoil host, chatting. Proves the same code the binaries run works over `TurmoilNet`,
//! which is what the simulation suites build on.
//!
//! The store and registry are the in-memory ones, shared by the hosts (they live in this one
//! process); the simulation issue moves them behind the simulated network.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::client::{ClientConfig, ClientEvent};
use cim_core::ids::{ConvId, ServerId, UnixMillis, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::clock::Clock;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, PasswordRunner, RouteOptions};
use cim_io::sdk::{Client, RouteApi, SdkOptions};
use cim_io::server::{self, ServerOptions};
use cim_io::store::{MemoryBackend, Store};
use cim_sim_hosts::TurmoilNet;

const ORIGIN: UnixMillis = UnixMillis(1_800_000_000_000);
const TICKET_SECRET: &[u8] = b"turmoil-ticket-secret";
const LINK_SECRET: &[u8] = b"turmoil-link-secret!";
const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[test]
fn route_server_and_client_chat_over_simulated_sockets() {
    let seed: u64 = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    println!("SIM_SEED={seed}");
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .rng_seed(seed)
        .build();
    let store: Arc<dyn Store> = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();

    {
        let (store, registry) = (store.clone(), registry.clone());
        sim.host("server", move || {
            let (store, registry) = (store.clone(), registry.clone());
            async move {
                let node =
                    ServerConfig::new(ServerId::new("s1"), TicketKeys::new(1, TICKET_SECRET));
                let mut options = ServerOptions::new(node, LINK_SECRET.to_vec());
                options.listen_ip = ANY;
                options.advertise_host = "server".into();
                let mut handle = server::start(
                    TurmoilNet,
                    Clock::simulated(ORIGIN),
                    options,
                    store,
                    &registry,
                )
                .await?;
                handle.stopped().await?;
                Ok(())
            }
        });
    }
    sim.host("route", move || {
        let (store, registry) = (store.clone(), registry.clone());
        async move {
            let mut options = RouteOptions::new(
                "r1",
                TicketKeys::new(1, TICKET_SECRET),
                b"turmoil-bearer-secret".to_vec(),
                LINK_SECRET.to_vec(),
            );
            options.http_listen = SocketAddr::new(ANY, 8083);
            options.seed = 7;
            options.password_runner = PasswordRunner::Inline;
            let mut handle = route::start(
                TurmoilNet,
                Clock::simulated(ORIGIN),
                options,
                store,
                &registry,
            )
            .await?;
            handle.stopped().await?;
            Ok(())
        }
    });
    sim.client("client", async move {
        let api = RouteApi::new(TurmoilNet, "route", 8083, Duration::from_secs(5));
        // The route may still be starting: its first answers can be refusals.
        let registered = loop {
            match api.register("ann", "ann-password").await {
                Ok(registered) => break registered,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let user = UserId(registered.user_id);
        let options = SdkOptions {
            route_host: "route".into(),
            route_port: 8083,
            session: ClientConfig::new(user, "ann", "ann-password", seed),
            state: None,
            max_frame: cim_proto::codec::DEFAULT_MAX_FRAME,
            server_transport: Default::default(),
            entropy: None,
            tls: None,
        };
        let (client, mut events) = Client::start(TurmoilNet, Clock::simulated(ORIGIN), options);
        loop {
            match events.next().await.expect("events") {
                ClientEvent::Online { server, .. } => {
                    assert_eq!(server, ServerId::new("s1"));
                    break;
                }
                ClientEvent::LoginRejected(e) => panic!("login rejected: {e}"),
                _ => {}
            }
        }
        let ack = client
            .send(ConvId::All, Bytes::from_static(b"hello, simulation"))
            .await
            .expect("acked");
        // The sender sees its own message in the conversation, at the acked seq.
        loop {
            if let ClientEvent::Message(m) = events.next().await.expect("events") {
                assert_eq!(
                    (m.seq, m.body.as_ref()),
                    (ack.seq, &b"hello, simulation"[..])
                );
                break;
            }
        }
        client.shutdown().await;
        Ok(())
    });
    sim.run()
        .unwrap_or_else(|e| panic!("SIM_SEED={seed} failed: {e}"));
}
