//! Where a client finds the route: `host:port`, `http://host[:port][/]` or
//! `https://host[:port][/]` (ports 80 and 443 by default), parsed once for every program
//! that takes a `--route`.

/// A route's address and whether it speaks HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteAddr {
    pub host: String,
    pub port: u16,
    pub https: bool,
}

impl RouteAddr {
    /// Parses `--route`; the error is a sentence naming the text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (https, rest) = match text.split_once("://") {
            None => (false, text),
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some(_) => {
                return Err(format!(
                    "--route {text:?}: only http:// and https:// are supported"
                ));
            }
        };
        let rest = rest.trim_end_matches('/');
        let scheme = text.contains("://");
        let default_port = if https { 443 } else { 80 };
        let (host, port) = match rest.strip_prefix('[') {
            // `[::1]:80` or `[::1]`.
            Some(bracketed) => {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| format!("--route {text:?}: unclosed ["))?;
                match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None if after.is_empty() && scheme => (host, None),
                    None => return Err(format!("--route {text:?}: expected host:port")),
                }
            }
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None if scheme => (rest, None),
                None => return Err(format!("--route {text:?}: expected host:port")),
            },
        };
        let port = match port {
            Some(port) => port
                .parse()
                .map_err(|_| format!("--route {text:?}: bad port"))?,
            None => default_port,
        };
        if host.is_empty() {
            return Err(format!("--route {text:?}: no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            https,
        })
    }

    /// The route as a key for what a client keeps per route (its state file): the same
    /// for every spelling of one address. Host names are case-insensitive, and `localhost`,
    /// `127.0.0.1` and `::1` all name this machine's loopback, where one route listens
    /// (on all of them, or the client could not reach it through the name given).
    pub fn key(&self) -> String {
        let host = self.host.to_ascii_lowercase();
        let host = match host.as_str() {
            "localhost" | "localhost." | "127.0.0.1" | "::1" | "0:0:0:0:0:0:0:1" => "127.0.0.1",
            other => other,
        };
        format!("{host}:{}", self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_with_and_without_a_scheme() {
        let ok = |host: &str, port, https| RouteAddr {
            host: host.to_owned(),
            port,
            https,
        };
        for (text, want) in [
            ("127.0.0.1:8083", ok("127.0.0.1", 8083, false)),
            ("http://127.0.0.1:8083/", ok("127.0.0.1", 8083, false)),
            ("http://localhost:80/", ok("localhost", 80, false)),
            ("https://chat.example:443/", ok("chat.example", 443, true)),
            ("https://[::1]:443/", ok("::1", 443, true)),
            ("[::1]:80", ok("::1", 80, false)),
            ("http://chat.example", ok("chat.example", 80, false)),
            ("https://chat.example/", ok("chat.example", 443, true)),
            ("https://[::1]", ok("::1", 443, true)),
        ] {
            assert_eq!(RouteAddr::parse(text).unwrap(), want, "{text}");
        }
        for bad in [
            "nohost",
            "ftp://a:1",
            "https://:1",
            ":80",
            "a:b",
            "a:99999",
            "[::1",
            "[::1]",
        ] {
            assert!(RouteAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_spelling_of_one_route_has_one_key() {
        let key = |text: &str| RouteAddr::parse(text).unwrap().key();
        for text in [
            "127.0.0.1:18083",
            "http://127.0.0.1:18083",
            "http://localhost:18083/",
            "LOCALHOST:18083",
            "http://[::1]:18083",
        ] {
            assert_eq!(key(text), "127.0.0.1:18083", "{text}");
        }
        assert_eq!(key("http://Chat.Example"), key("chat.example:80"));
        assert_eq!(key("https://chat.example"), "chat.example:443");
        assert_ne!(key("127.0.0.1:18083"), key("127.0.0.1:18084"));
        assert_ne!(key("10.0.0.1:18083"), key("127.0.0.1:18083"));
    }
}
