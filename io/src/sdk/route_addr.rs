//! Where a client finds the route: `host:port`, `http://host:port[/]` or
//! `https://host:port[/]`, parsed once for every program that takes a `--route`.

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
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .ok_or_else(|| format!("--route {text:?}: expected host:port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("--route {text:?}: bad port"))?;
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() {
            return Err(format!("--route {text:?}: no host"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            https,
        })
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
        ] {
            assert_eq!(RouteAddr::parse(text).unwrap(), want, "{text}");
        }
        for bad in ["nohost", "ftp://a:1", "https://:1", ":80", "a:b", "a:99999"] {
            assert!(RouteAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
