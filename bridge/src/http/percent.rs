//! Percent-encoding (RFC 3986 §2.1), the one codec for every `%XX` hybridge reads or writes:
//! canonical paths, admin API paths and query strings, `grpc-message`. Pure bytes in, text
//! out; which bytes stay literal is the caller's to say, not this module's.

/// The value of one hex digit, either case.
pub(crate) fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Appends `%XX` (upper-case hex) for `byte`.
pub(crate) fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

/// Escapes every byte of `text` for which `literal` is false.
pub(crate) fn encode_except(text: &str, literal: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if literal(byte) {
            out.push(char::from(byte));
        } else {
            push_escape(&mut out, byte);
        }
    }
    out
}

/// Encodes a query parameter value or a path segment of the admin API (everything but
/// unreserved characters and `/`).
pub(crate) fn percent_encode(text: &str) -> String {
    encode_except(text, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/')
    })
}

/// Decodes `%XX` escapes and `+` (form encoding); malformed escapes are kept as written.
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let escaped = match (byte, bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&high), Some(&low)) => hex_value(high).zip(hex_value(low)),
            _ => None,
        };
        match (byte, escaped) {
            (_, Some((high, low))) => {
                out.push((high << 4) | low);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded value of the first `name=` parameter in a query string (`name` alone is an
/// empty value).
pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_coding_round_trips() {
        assert_eq!(percent_decode("%2Fapi%2fv1+x%zz%"), "/api/v1 x%zz%");
        assert_eq!(percent_decode(&percent_encode("a b&c=/d%")), "a b&c=/d%");
    }

    #[test]
    fn query_parameters_are_found_by_decoded_name() {
        let query = "dry%5Frun=1&file=a%20b.toml&flag";
        assert_eq!(query_param(query, "dry_run").as_deref(), Some("1"));
        assert_eq!(query_param(query, "file").as_deref(), Some("a b.toml"));
        assert_eq!(query_param(query, "flag").as_deref(), Some(""));
        assert_eq!(query_param(query, "limit"), None);
    }

    #[test]
    fn escapes_are_upper_case_and_chosen_by_the_caller() {
        assert_eq!(
            encode_except("a%b\n", |b| b != b'%' && b != b'\n'),
            "a%25b%0A"
        );
        assert_eq!(percent_encode("é/x y"), "%C3%A9/x%20y");
    }
}
