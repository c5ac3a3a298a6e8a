//! Where the route↔server link handshake draws its nonces from (`cim_core::link_auth`).
//!
//! Production draws every nonce from the OS: a nonce anyone could predict would let a
//! recorded handshake be replayed. A simulation must decide everything from its one seed, so
//! it gives each host a seeded stream of its own ([`NonceSource::seeded`]). That stream is
//! derived apart from turmoil's RNG and every other seed of the run, so drawing from it
//! shifts no other draw.

use std::sync::{Arc, Mutex};

use rand::rngs::OsRng;
use rand::{RngCore, SeedableRng, TryRngCore};
use rand_chacha::ChaCha8Rng;

/// A source of handshake nonces: the OS ([`NonceSource::os`], the default) or a seeded
/// stream shared by every link of one host.
#[derive(Clone, Default)]
pub struct NonceSource(Source);

#[derive(Clone, Default)]
enum Source {
    #[default]
    Os,
    /// Shared by the host's link tasks; under turmoil they run one at a time, in an order
    /// the seed decides, so the draws replay.
    Seeded(Arc<Mutex<ChaCha8Rng>>),
}

/// The OS had no entropy to give; the handshake is not attempted.
#[derive(Debug, thiserror::Error)]
#[error("no entropy for the nonce: {0}")]
pub struct NoEntropy(String);

impl NonceSource {
    /// The operating system's generator: what every production process uses.
    pub fn os() -> Self {
        Self(Source::Os)
    }

    /// A stream anyone who knows `seed` can predict: for simulations and tests only. Keep
    /// one per host across its restarts, or a restarted host repeats its nonces.
    pub fn seeded(seed: u64) -> Self {
        Self(Source::Seeded(Arc::new(Mutex::new(
            ChaCha8Rng::seed_from_u64(seed),
        ))))
    }

    /// Whether nonces come from the OS.
    pub fn is_os(&self) -> bool {
        matches!(self.0, Source::Os)
    }

    /// Fills `nonce` with fresh bytes.
    pub fn fill(&self, nonce: &mut [u8]) -> Result<(), NoEntropy> {
        match &self.0 {
            Source::Os => OsRng
                .try_fill_bytes(nonce)
                .map_err(|e| NoEntropy(e.to_string())),
            Source::Seeded(rng) => {
                // A panic while holding the lock cannot leave the generator half-updated in
                // a way that matters: any state is as good as another.
                rng.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .fill_bytes(nonce);
                Ok(())
            }
        }
    }
}

impl std::fmt::Debug for NonceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the generator's state: it would predict every later nonce.
        f.write_str(match self.0 {
            Source::Os => "NonceSource::Os",
            Source::Seeded(_) => "NonceSource::Seeded",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(source: &NonceSource) -> [u8; 32] {
        let mut nonce = [0u8; 32];
        source.fill(&mut nonce).expect("entropy");
        nonce
    }

    #[test]
    fn production_draws_link_nonces_from_the_os() {
        assert!(NonceSource::default().is_os());
        assert!(NonceSource::os().is_os());
        // What the binaries start from (they never set a source): the OS, on both ends.
        let node = cim_core::server::ServerConfig::new(
            cim_core::ids::ServerId::new("s1"),
            cim_core::route::tickets::TicketKeys::new(1, b"ticket-secret"),
        );
        let server = crate::server::ServerOptions::new(node, b"link".to_vec());
        assert!(server.link_nonces.is_os());
        let route = crate::route::RouteOptions::new(
            "r1",
            cim_core::route::tickets::TicketKeys::new(1, b"ticket-secret"),
            b"bearer".to_vec(),
            b"link".to_vec(),
        );
        assert!(route.link_nonces.is_os());
        // Two OS sources are not two copies of one stream.
        let (a, b) = (NonceSource::os(), NonceSource::os());
        assert_ne!(draw(&a), draw(&b));
        assert_ne!(draw(&a), draw(&a));
    }

    #[test]
    fn a_seeded_source_replays_and_its_clones_share_one_stream() {
        let a = NonceSource::seeded(7);
        let b = NonceSource::seeded(7);
        assert!(!a.is_os());
        let first = draw(&a);
        assert_eq!(first, draw(&b));
        // A clone (another link task of the host) continues the stream, never repeats it.
        let second = draw(&a.clone());
        assert_ne!(first, second);
        assert_eq!(second, draw(&b));
        assert_ne!(draw(&NonceSource::seeded(8)), draw(&NonceSource::seeded(7)));
        assert_eq!(format!("{a:?}"), "NonceSource::Seeded");
    }
}
