//! The route's request limits that live in the shell: token buckets per client address
//! (`/login`, `/registerAccount`) and per user (`/groupRoute`, `/p2pRoute`), the client
//! address itself (the TCP peer, or `X-Forwarded-For` from a trusted proxy only), and the
//! bearer tokens' session check (a token works only while its claim epoch is the user's
//! current one).
//!
//! The buckets are `cim_core::server::TokenBucket`, the same one the servers hold each
//! user's TCP sends to. The per-account failed-login throttle is not here: it is kept in the
//! store and decided by the login machine (`cim_core::login_throttle`).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::HeaderMap;
use cim_core::ids::{Epoch, UserId};
use cim_core::server::TokenBucket;
use cim_core::time::Instant;

/// A token bucket's parameters: `rate_per_sec` requests a second, `burst` at once. A rate of
/// 0 switches the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub rate_per_sec: u32,
    pub burst: u32,
}

impl RateLimit {
    pub const OFF: Self = Self {
        rate_per_sec: 0,
        burst: 0,
    };

    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        Self {
            rate_per_sec,
            burst: burst.max(1),
        }
    }

    pub fn is_off(&self) -> bool {
        self.rate_per_sec == 0
    }
}

/// Past this many keys, buckets that are full again (idle keys) are dropped; if that frees
/// nothing, all are (the limit then restarts for everyone rather than grow without bound).
const MAX_KEYS: usize = 100_000;

/// One token bucket per key, created full on first use.
#[derive(Debug)]
pub(super) struct KeyedBuckets<K> {
    limit: RateLimit,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Hash + Eq> KeyedBuckets<K> {
    pub(super) fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token of `key`'s bucket, or says how long until there is one.
    pub(super) fn check(&self, key: K, now: Instant) -> Result<(), Duration> {
        if self.limit.is_off() {
            return Ok(());
        }
        // A poisoned lock only means a thread panicked holding it; the map is still sound.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(&key) {
            buckets.retain(|_, bucket| !bucket.is_full(now));
            if buckets.len() >= MAX_KEYS {
                tracing::warn!(keys = MAX_KEYS, "rate limit table full; starting it over");
                buckets.clear();
            }
        }
        let bucket = buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::full(now, self.limit.rate_per_sec, self.limit.burst));
        if bucket.try_take(now) {
            Ok(())
        } else {
            Err(bucket.retry_after(now).max(Duration::from_millis(1)))
        }
    }
}

// --- client addresses ---------------------------------------------------------------------

/// An address block: `10.0.0.0/8`, `2001:db8::/32`, or one address (`10.0.0.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(net)), self.prefix, 32)
                    == masked(u128::from(u32::from(ip)), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.prefix, 128)
                    == masked(u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let shift = u32::from(width - prefix.min(width));
    (bits >> shift) << shift
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 peers) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or address/prefix"))?;
        let addr = canonical(addr);
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {width}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

/// Parses `--trusted-proxies`: a comma-separated list of addresses and blocks.
pub fn parse_trusted_proxies(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

/// The client a request comes from: the TCP peer, unless the peer is a trusted proxy; then
/// `X-Forwarded-For` read from the right, skipping trusted proxies, the first address that
/// is not one (what each proxy appended, which the client cannot forge). A header that does
/// not parse is ignored (the peer is the client then).
pub(super) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return peer;
        };
        for hop in value.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(canonical(ip)),
                Err(_) => return peer,
            }
        }
    }
    // Every hop trusted: the leftmost is as far as the chain goes.
    let first = hops.first().copied();
    hops.into_iter()
        .rev()
        .find(|ip| !is_trusted(*ip))
        .or(first)
        .unwrap_or(peer)
}

/// What the per-address limits count by: an IPv4 address, or an IPv6 /64 (one subscriber's
/// block, which an attacker gets whole).
pub(super) fn address_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(masked(u128::from(v6), 64, 128))),
        v4 => v4,
    }
}

// --- bearer tokens' sessions ------------------------------------------------------------------

/// How stale the session check may be: a logout or newer login on another route is seen
/// within this; this route's own are seen at once.
pub const SESSION_CACHE_TTL: Duration = Duration::from_secs(1);

/// Per user, the claim epoch a bearer token must carry (`None`: no claim, logged out), as
/// last read from the store or set by this route's own logins and logouts.
#[derive(Debug, Default)]
pub(super) struct SessionCache {
    entries: Mutex<HashMap<UserId, (Option<Epoch>, Instant)>>,
}

impl SessionCache {
    /// The cached current epoch, if read or set within [`SESSION_CACHE_TTL`].
    pub(super) fn get(&self, user: UserId, now: Instant) -> Option<Option<Epoch>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&user)
            .filter(|(_, at)| now.saturating_duration_since(*at) < SESSION_CACHE_TTL)
            .map(|(epoch, _)| *epoch)
    }

    /// This route's own login or logout: known at once, replacing whatever was cached.
    pub(super) fn set(&self, user: UserId, epoch: Option<Epoch>, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Self::bound(&mut entries, now);
        entries.insert(user, (epoch, now));
    }

    /// A store read begun at `read_at`: kept unless something newer was set since (a login
    /// or logout of this route that the read may not have seen).
    pub(super) fn learn(&self, user: UserId, epoch: Option<Epoch>, read_at: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.get(&user).is_some_and(|(_, at)| *at > read_at) {
            return;
        }
        Self::bound(&mut entries, read_at);
        entries.insert(user, (epoch, read_at));
    }

    fn bound(entries: &mut HashMap<UserId, (Option<Epoch>, Instant)>, now: Instant) {
        if entries.len() >= MAX_KEYS {
            entries.retain(|_, (_, at)| now.saturating_duration_since(*at) < SESSION_CACHE_TTL);
            if entries.len() >= MAX_KEYS {
                entries.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nets_parse_and_contain() {
        let nets = parse_trusted_proxies("10.0.0.0/8, 192.168.1.7 ,2001:db8::/32,").unwrap();
        assert_eq!(nets.len(), 3);
        assert!(nets[0].contains(ip("10.200.1.2")));
        assert!(!nets[0].contains(ip("11.0.0.1")));
        assert!(nets[1].contains(ip("192.168.1.7")));
        assert!(nets[1].contains(ip("::ffff:192.168.1.7")));
        assert!(!nets[1].contains(ip("192.168.1.8")));
        assert!(nets[2].contains(ip("2001:db8:1::5")));
        assert!(!nets[2].contains(ip("10.0.0.1")));
        assert!(
            "0.0.0.0/0"
                .parse::<IpNet>()
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
        for bad in ["10.0.0.0/33", "ten", "10.0.0.0/x", "::/129"] {
            assert!(parse_trusted_proxies(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let trusted = parse_trusted_proxies("10.0.0.1, 10.0.0.2").unwrap();
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
            }
            h
        };
        // (peer, X-Forwarded-For values, client)
        let cases: &[(&str, &[&str], &str)] = &[
            // An untrusted peer's header is never read.
            ("203.0.113.9", &["1.2.3.4"], "203.0.113.9"),
            ("203.0.113.9", &[], "203.0.113.9"),
            // A trusted proxy: the rightmost address that is not a trusted proxy.
            ("10.0.0.1", &["198.51.100.7"], "198.51.100.7"),
            ("10.0.0.1", &["1.1.1.1, 198.51.100.7"], "198.51.100.7"),
            (
                "10.0.0.1",
                &["1.1.1.1, 198.51.100.7, 10.0.0.2"],
                "198.51.100.7",
            ),
            ("10.0.0.1", &["1.1.1.1", "198.51.100.7"], "198.51.100.7"),
            // No header, or one that does not parse: the peer.
            ("10.0.0.1", &[], "10.0.0.1"),
            ("10.0.0.1", &["garbage"], "10.0.0.1"),
            ("10.0.0.1", &["1.1.1.1, nope"], "10.0.0.1"),
            // Only proxies in the chain: the leftmost.
            ("10.0.0.1", &["10.0.0.2"], "10.0.0.2"),
        ];
        for (peer, values, want) in cases {
            assert_eq!(
                client_ip(ip(peer), &headers(values), &trusted),
                ip(want),
                "peer {peer}, XFF {values:?}"
            );
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        assert_eq!(
            address_key(ip("2001:db8:1:2:3:4:5:6")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            address_key(ip("2001:db8:1:2:ffff::1")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(address_key(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(address_key(ip("1.2.3.4")), ip("1.2.3.4"));
    }

    fn t0() -> Instant {
        Instant::from_nanos(0)
    }

    #[test]
    fn buckets_are_per_key_and_off_means_off() {
        let t0 = t0();
        let limits = KeyedBuckets::new(RateLimit::new(2, 2));
        assert_eq!(limits.check("a", t0), Ok(()));
        assert_eq!(limits.check("a", t0), Ok(()));
        assert_eq!(limits.check("a", t0), Err(Duration::from_millis(500)));
        assert_eq!(limits.check("b", t0), Ok(()));
        assert_eq!(limits.check("a", t0 + Duration::from_millis(500)), Ok(()));
        let off = KeyedBuckets::new(RateLimit::OFF);
        for _ in 0..1000 {
            assert_eq!(off.check("a", t0), Ok(()));
        }
    }

    #[test]
    fn session_cache_prefers_what_this_route_set() {
        let t0 = t0();
        let ms = |n| t0 + Duration::from_millis(n);
        let cache = SessionCache::default();
        let u = UserId(1);
        assert_eq!(cache.get(u, ms(0)), None);
        cache.learn(u, Some(Epoch(1)), ms(0));
        assert_eq!(cache.get(u, ms(999)), Some(Some(Epoch(1))));
        assert_eq!(cache.get(u, ms(1000)), None, "at most 1 s old");
        // A logout here at 10 ms beats a store read begun at 5 ms that lands later.
        cache.set(u, None, ms(10));
        cache.learn(u, Some(Epoch(1)), ms(5));
        assert_eq!(cache.get(u, ms(11)), Some(None));
        cache.learn(u, Some(Epoch(2)), ms(20));
        assert_eq!(cache.get(u, ms(21)), Some(Some(Epoch(2))));
    }
}
