//! `HostPort`: a destination written as `"host:port"` (a peer's tunnel address, an upstream
//! endpoint), checked while the config is deserialised so a bad one is reported at its line.

use std::fmt;

use serde::Deserialize;

/// A `"host:port"` destination: a DNS name or an IP literal (IPv6 as `"[addr]:port"`) and a
/// port from 1 to 65535, that is also a valid HTTP authority.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct HostPort {
    /// As written.
    authority: http::uri::Authority,
    /// Where the host is in the text (brackets of an IPv6 literal excluded).
    host: std::ops::Range<usize>,
    port: u16,
}

impl HostPort {
    /// Checks `text`; the error quotes it and says what is wrong.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let invalid = |reason: String| format!("{text:?} is invalid: {reason}");
        let (host, port) = split_host_port(text).map_err(invalid)?;
        let authority = text
            .parse::<http::uri::Authority>()
            .map_err(|e| invalid(e.to_string()))?;
        let start = host.as_ptr() as usize - text.as_ptr() as usize;
        Ok(Self {
            authority,
            host: start..start + host.len(),
            port,
        })
    }

    /// The whole `"host:port"`, as written.
    pub(crate) fn as_str(&self) -> &str {
        self.authority.as_str()
    }

    /// The host: a name, or an IP literal without brackets.
    pub(crate) fn host(&self) -> &str {
        &self.as_str()[self.host.clone()]
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The same text as an HTTP authority (sent when a request carries none).
    pub(crate) fn authority(&self) -> http::uri::Authority {
        self.authority.clone()
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Splits `"host:port"` (IPv6 as `"[::1]:port"`) and checks both halves.
fn split_host_port(text: &str) -> Result<(&str, u16), String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("expected \"host:port\"".to_owned());
    };
    let host = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .ok_or_else(|| "unclosed '[' in IPv6 address".to_owned())?,
        None if host.contains(':') => {
            return Err("IPv6 addresses must be written as \"[addr]:port\"".to_owned());
        }
        None => host,
    };
    if host.is_empty() {
        return Err("host is empty".to_owned());
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number between 1 and 65535"))?;
    if port == 0 {
        return Err("port 0 is not a destination".to_owned());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_literals_split_into_host_and_port() {
        for (text, host, port) in [
            ("ledger.internal:8443", "ledger.internal", 8443),
            ("127.0.0.1:80", "127.0.0.1", 80),
            ("[::1]:9000", "::1", 9000),
        ] {
            let parsed = HostPort::parse(text).unwrap();
            assert_eq!(
                (parsed.as_str(), parsed.host(), parsed.port()),
                (text, host, port)
            );
            assert_eq!(parsed.authority().as_str(), text);
        }
    }

    #[test]
    fn each_mistake_is_named() {
        for (text, error) in [
            (
                "ledger.internal",
                r#""ledger.internal" is invalid: expected "host:port""#,
            ),
            (":80", r#"":80" is invalid: host is empty"#),
            ("::1:80", "IPv6 addresses must be written as"),
            ("[::1:80", "unclosed '['"),
            ("a:0", "port 0 is not a destination"),
            ("a:http", r#"port "http" is not a number"#),
            ("a b:80", r#""a b:80" is invalid: "#),
        ] {
            let e = HostPort::parse(text).unwrap_err();
            assert!(e.contains(error), "{text}: {e}");
        }
    }
}
