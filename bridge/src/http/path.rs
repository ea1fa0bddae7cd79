//! Canonical request paths: the one path the ACL decides on, the tunnel carries and the
//! upstream receives, so an upstream never sees a path other than the one authorised.
//!
//! Owns RFC 3986 normalisation (§6.2.2: escapes of unreserved characters decoded, the hex of
//! every other escape upper-cased; §5.2.4: dot-segments removed after decoding), merged
//! slashes, and the refusal of what has no single meaning across servers (escaped slashes
//! unless kept, backslashes, control bytes, malformed escapes, `;` path parameters, targets
//! that are not paths). Pure: no I/O, no configuration, no logging.

use std::borrow::Cow;

use http::Uri;
use http::uri::PathAndQuery;
use serde::Deserialize;

use super::percent::{hex_value, push_escape};

/// Longest canonical request target: what `http::Uri` can hold (`u16::MAX - 1` bytes).
pub(crate) const MAX_TARGET_LEN: usize = u16::MAX as usize - 1;

/// What an import listener or an export does with an escaped slash (`%2F`, `%5C`, any case)
/// in a path, like Envoy's `path_with_escaped_slashes_action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    /// Refuse the request with 400 `invalid-path`: most servers decode `%2F` into a
    /// separator after the decision, so the path they route on is not the one decided on.
    #[default]
    Reject,
    /// Keep the escape (hex upper-cased) as data inside its segment, for the decision and the
    /// upstream alike. Only for upstreams that never decode it into a separator.
    Keep,
}

impl EscapedSlashes {
    /// `"reject"` or `"keep"`, as written in the config.
    #[cfg(test)]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EscapedSlashes::Reject => "reject",
            EscapedSlashes::Keep => "keep",
        }
    }
}

/// Why a request target has no canonical path. The message is sent to the caller (body,
/// `grpc-message`): it names the offending escape or byte, never echoes the whole path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error(
        "escaped slash `{escape}` in the path: servers may decode it into a separator after the ACL decision (a listener or export with `escaped_slashes = \"keep\"` forwards it unchanged)"
    )]
    EscapedSlash { escape: String },
    #[error("backslash in the path: some servers treat it as `/`")]
    Backslash,
    #[error("control byte 0x{byte:02X} in the path")]
    ControlByte { byte: u8 },
    #[error("escaped control byte `{escape}` in the path")]
    EscapedControl { escape: String },
    #[error(
        "doubly escaped `{escape}` in the path: a server that decodes twice would see another path than the ACL decided on"
    )]
    DoubleEscape { escape: String },
    #[error(
        "malformed percent-escape `{escape}` in the path: `%` must be followed by two hex digits"
    )]
    MalformedEscape { escape: String },
    #[error(
        "path parameter `{found}` in the path: servers that strip `;` parameters (Tomcat, Spring) would route it elsewhere than the ACL decided"
    )]
    PathParameter { found: &'static str },
    #[error("`#` in the path: a fragment is not part of a request")]
    Fragment,
    /// Only for rule prefixes: in a request target, `?` starts the query.
    #[error("`?` in the path: rules match paths, never queries")]
    Query,
    #[error(
        "request target {form}: only a path (origin-form) or a URL with a path (absolute-form) is forwarded"
    )]
    NotOriginForm { form: &'static str },
    #[error("canonical request target is longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
}

/// A request target reduced to its canonical path and its query, which is kept as sent: a
/// query is not a path, and nothing in it is decoded, checked or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalTarget<'a> {
    path: Cow<'a, str>,
    query: Option<&'a str>,
    /// The target was origin-form and already canonical (nothing to rewrite).
    unchanged: bool,
}

impl CanonicalTarget<'_> {
    /// The canonical path: what the ACL decides on.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the target was already exactly `path?query` (origin-form, canonical).
    pub(crate) fn is_unchanged(&self) -> bool {
        self.unchanged
    }

    /// `path?query`, what goes in the tunnel frame and to the upstream.
    pub(crate) fn to_origin_form(&self) -> String {
        match self.query {
            Some(query) => format!("{}?{query}", self.path),
            None => self.path.to_string(),
        }
    }
}

/// Canonicalises a request target written as text: origin-form (`/a/b?q`) or absolute-form
/// (`http://host/a/b?q`, whose path is taken; an empty path is `/`). Asterisk-form (`*`),
/// authority-form (`host:443`) and an empty target are refused.
pub fn canonical_target(
    target: &str,
    escaped_slashes: EscapedSlashes,
) -> Result<CanonicalTarget<'_>, PathError> {
    let (path_and_query, origin_form) = if target.starts_with('/') {
        (target, true)
    } else if target.is_empty() {
        return Err(PathError::NotOriginForm { form: "is empty" });
    } else if target == "*" {
        return Err(PathError::NotOriginForm {
            form: "`*` (asterisk-form)",
        });
    } else if let Some(rest) = after_scheme_and_authority(target) {
        (rest, false)
    } else {
        return Err(PathError::NotOriginForm {
            form: "is neither a path nor a URL (authority-form or relative)",
        });
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    // RFC 9110 §4.2.3: an http(s) URL with an empty path has the path "/".
    let path = if path.is_empty() { "/" } else { path };
    let path = canonical_path(path, escaped_slashes)?;
    let unchanged = origin_form && matches!(path, Cow::Borrowed(_));
    let target = CanonicalTarget {
        path,
        query,
        unchanged,
    };
    if target.path.len() + target.query.map_or(0, |q| q.len() + 1) > MAX_TARGET_LEN {
        return Err(PathError::TooLong);
    }
    Ok(target)
}

/// Rewrites `uri` (as hyper parsed a caller's request) to its canonical target, keeping the
/// scheme, the authority and the query. Leaves `uri` untouched when it is refused.
pub(crate) fn canonicalise_uri(
    uri: &mut Uri,
    escaped_slashes: EscapedSlashes,
) -> Result<(), PathError> {
    let original = uri.path_and_query().map_or("", PathAndQuery::as_str);
    let canonical = if uri.scheme().is_some() && !original.starts_with('/') {
        // Absolute-form with an empty path (`http://host`, `http://host?q`): the path is `/`.
        canonical_target(&format!("/{original}"), escaped_slashes)?.to_origin_form()
    } else if original.is_empty() && uri.authority().is_some() {
        // CONNECT's `host:port`.
        return Err(PathError::NotOriginForm {
            form: "is in authority-form",
        });
    } else {
        let target = canonical_target(original, escaped_slashes)?;
        if target.is_unchanged() {
            return Ok(());
        }
        target.to_origin_form()
    };
    let canonical = PathAndQuery::try_from(canonical).map_err(|_| PathError::TooLong)?;
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(canonical);
    match Uri::from_parts(parts) {
        Ok(rewritten) => {
            *uri = rewritten;
            Ok(())
        }
        // Cannot happen for parts taken from a valid URI; refused rather than assumed.
        Err(_) => Err(PathError::TooLong),
    }
}

/// The canonical path an operator means by `typed` (`hybridge acl check`): the path of
/// [`canonical_target`] with escaped slashes refused (the default), the query dropped.
pub fn decision_path(typed: &str) -> Result<String, PathError> {
    canonical_target(typed, EscapedSlashes::Reject).map(|t| t.path().to_owned())
}

/// Whether `prefix` is a canonical path (as ACL rule prefixes must be), and if not, why.
/// `Ok(Some(canonical))` names the canonical form of a prefix that has one.
pub(crate) fn check_canonical(prefix: &str) -> Result<Option<String>, PathError> {
    if prefix.contains('?') {
        return Err(PathError::Query);
    }
    let canonical = canonical_path(prefix, EscapedSlashes::Reject)?;
    Ok((canonical != prefix).then(|| canonical.into_owned()))
}

/// The canonical form of `path` (origin-form, without the query): escapes normalised, dot
/// segments removed, repeated slashes merged. Borrowed when `path` is already canonical.
pub(crate) fn canonical_path(
    path: &str,
    escaped_slashes: EscapedSlashes,
) -> Result<Cow<'_, str>, PathError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotOriginForm {
            form: if path.is_empty() {
                "is empty"
            } else {
                "does not start with `/`"
            },
        });
    };
    if is_canonical(rest, escaped_slashes) {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    // Where each kept segment's `/` sits in `out`, so `..` can drop the last one.
    let mut starts: Vec<usize> = Vec::new();
    let mut ends_with_slash = false;
    let mut segment = String::new();
    for raw in rest.split('/') {
        segment.clear();
        canonical_segment(raw, escaped_slashes, &mut segment)?;
        match segment.as_str() {
            // An empty segment is a repeated (or trailing) slash; `.` is the segment itself.
            "" | "." => ends_with_slash = true,
            ".." => {
                if let Some(start) = starts.pop() {
                    out.truncate(start);
                }
                ends_with_slash = true;
            }
            _ => {
                starts.push(out.len());
                out.push('/');
                out.push_str(&segment);
                ends_with_slash = false;
            }
        }
    }
    if out.is_empty() || ends_with_slash {
        out.push('/');
    }
    if out.len() > MAX_TARGET_LEN {
        return Err(PathError::TooLong);
    }
    Ok(Cow::Owned(out))
}

/// The `path?query` after `scheme://authority` in an absolute-form target, or `None` when
/// `target` does not start with a scheme and `//`.
fn after_scheme_and_authority(target: &str) -> Option<&str> {
    let (scheme, rest) = target.split_once("://")?;
    let mut scheme_bytes = scheme.bytes();
    let scheme_ok = scheme_bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && scheme_bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return None;
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&rest[authority_end..])
}

/// The fast path: every byte a literal path character or a canonical escape, no empty
/// segment but the last, no dot-segment.
fn is_canonical(rest: &str, escaped_slashes: EscapedSlashes) -> bool {
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment == "." || segment == ".." {
            return false;
        }
        let bytes = segment.as_bytes();
        let mut i = 0;
        while let Some(&byte) = bytes.get(i) {
            if byte == b'%' {
                let canonical_escape = match (bytes.get(i + 1), bytes.get(i + 2)) {
                    (Some(&high), Some(&low)) if is_upper_hex(high) && is_upper_hex(low) => {
                        hex_value(high)
                            .zip(hex_value(low))
                            .is_some_and(|(h, l)| stays_escaped((h << 4) | l, escaped_slashes))
                    }
                    _ => false,
                };
                // `%25` before two hex digits is refused by the full path (an escaped escape).
                let escaped_escape = bytes.get(i + 1..i + 3) == Some(b"25".as_slice())
                    && bytes.get(i + 3).copied().and_then(hex_value).is_some()
                    && bytes.get(i + 4).copied().and_then(hex_value).is_some();
                if !canonical_escape || escaped_escape {
                    return false;
                }
                i += 3;
            } else if is_literal(byte) {
                i += 1;
            } else {
                return false;
            }
        }
    }
    true
}

/// Whether an escape of `decoded` is part of a canonical path (upper-cased): everything but
/// unreserved characters (decoded), control bytes and `;` (refused), and slashes unless kept.
fn stays_escaped(decoded: u8, escaped_slashes: EscapedSlashes) -> bool {
    match decoded {
        b'/' | b'\\' => escaped_slashes == EscapedSlashes::Keep,
        0x00..=0x1f | 0x7f | b';' => false,
        _ => !is_unreserved(decoded),
    }
}

fn is_upper_hex(byte: u8) -> bool {
    byte.is_ascii_digit() || (b'A'..=b'F').contains(&byte)
}

/// Appends the canonical form of one segment (between two `/`) to `out`.
fn canonical_segment(
    raw: &str,
    escaped_slashes: EscapedSlashes,
    out: &mut String,
) -> Result<(), PathError> {
    let bytes = raw.as_bytes();
    let start = out.len();
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'%' => {
                // `%` is ASCII, so `i` is a char boundary and the slices below are sound.
                let escape = || raw[i..].chars().take(3).collect::<String>();
                let decoded = match (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) {
                    (Some(high), Some(low)) => (high << 4) | low,
                    _ => return Err(PathError::MalformedEscape { escape: escape() }),
                };
                match decoded {
                    _ if is_unreserved(decoded) => out.push(char::from(decoded)),
                    b'/' | b'\\' => match escaped_slashes {
                        EscapedSlashes::Reject => {
                            return Err(PathError::EscapedSlash { escape: escape() });
                        }
                        EscapedSlashes::Keep => push_escape(out, decoded),
                    },
                    0x00..=0x1f | 0x7f => {
                        return Err(PathError::EscapedControl { escape: escape() });
                    }
                    b';' => return Err(PathError::PathParameter { found: "%3B" }),
                    // `%25` followed by two hex digits is an escape of an escape: decoded
                    // once more (some frameworks do) it becomes another character, `%2569`
                    // an `i`, so the path decided on is not the path served.
                    b'%' => match escaped_escape_at(raw, i) {
                        Some(escape) => {
                            return Err(PathError::DoubleEscape {
                                escape: escape.to_owned(),
                            });
                        }
                        None => push_escape(out, decoded),
                    },
                    _ => push_escape(out, decoded),
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::PathParameter { found: ";" }),
            b'#' => return Err(PathError::Fragment),
            0x00..=0x1f | 0x7f => return Err(PathError::ControlByte { byte }),
            _ if is_literal(byte) => out.push(char::from(byte)),
            // Space, `"<>[]^`{|}?` and every non-ASCII byte: not allowed raw in a path.
            _ => push_escape(out, byte),
        }
        i += 1;
    }
    // Decoding can make an escaped escape where the raw segment had none: `%25a%41` is
    // written out `%25aA`.
    match escaped_escape(&out[start..]) {
        Some(escape) => Err(PathError::DoubleEscape {
            escape: escape.to_owned(),
        }),
        None => Ok(()),
    }
}

/// The first `%25` followed by two hex digits in `written` (canonical text), with them.
fn escaped_escape(written: &str) -> Option<&str> {
    written
        .match_indices("%25")
        .find_map(|(at, _)| escaped_escape_at(written, at))
}

/// The `%25` at `at` in `text` with the two characters after it, if both are hex digits.
fn escaped_escape_at(text: &str, at: usize) -> Option<&str> {
    let after = text.as_bytes().get(at + 3..at + 5)?;
    after
        .iter()
        .all(|&b| hex_value(b).is_some())
        .then(|| &text[at..at + 5])
}

/// RFC 3986 `unreserved`: ALPHA DIGIT `-` `.` `_` `~`.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// A byte that stands for itself in a canonical segment: RFC 3986 `pchar` without `%`
/// (escapes) and `;` (path parameters, refused).
fn is_literal(byte: u8) -> bool {
    is_unreserved(byte)
        || matches!(
            byte,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use EscapedSlashes::{Keep, Reject};

    fn canonical(path: &str) -> Result<String, PathError> {
        canonical_path(path, Reject).map(Cow::into_owned)
    }

    /// Input → canonical path, with escaped slashes refused.
    #[test]
    fn canonical_forms() {
        let cases = [
            ("/", "/"),
            ("/api", "/api"),
            ("/api/", "/api/"),
            ("/api/x", "/api/x"),
            // Repeated slashes merge, a trailing one stays.
            ("//", "/"),
            ("///api", "/api"),
            ("/api//internal/x", "/api/internal/x"),
            ("/api///internal//x//", "/api/internal/x/"),
            // RFC 3986 §5.2.4 dot-segment removal.
            ("/.", "/"),
            ("/..", "/"),
            ("/../..", "/"),
            ("/api/./internal/x", "/api/internal/x"),
            ("/api/x/../internal/x", "/api/internal/x"),
            ("/api/public/../internal/x", "/api/internal/x"),
            ("/a/b/c/./../../g", "/a/g"),
            ("/api/.", "/api/"),
            ("/api/..", "/"),
            ("/api/x/..", "/api/"),
            ("/../api/x", "/api/x"),
            ("/api/../api/internal/x", "/api/internal/x"),
            // Dots that are not dot-segments stay.
            ("/api/.../x", "/api/.../x"),
            ("/api/..x/.y", "/api/..x/.y"),
            ("/api/x.", "/api/x."),
            // Escaped unreserved characters are decoded, before dot-segments are removed.
            ("/api/%69nternal/x", "/api/internal/x"),
            ("/%7Euser/%7e", "/~user/~"),
            ("/%41%5a%61%7A%30%39%2D%2E%5F", "/AZaz09-._"),
            ("/api/%2e%2e/internal", "/internal"),
            ("/api/%2E/x", "/api/x"),
            ("/api/.%2e/x", "/x"),
            // Other escapes stay escaped, hex upper-cased.
            ("/a%3fb", "/a%3Fb"),
            ("/a%3Fb", "/a%3Fb"),
            ("/a%25b", "/a%25b"),
            ("/50%25", "/50%25"),
            ("/a%20b", "/a%20b"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/%40%3a%2b", "/%40%3A%2B"),
            // Raw characters not allowed in a path are escaped.
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a b", "/a%20b"),
            ("/{\"k\":1}", "/%7B%22k%22:1%7D"),
            ("/a|b^c`d[e]<f>", "/a%7Cb%5Ec%60d%5Be%5D%3Cf%3E"),
            // What a path may hold raw stays raw.
            ("/a!$&'()*+,=:@b", "/a!$&'()*+,=:@b"),
            // gRPC paths are canonical already.
            (
                "/payments.v1.Payments/Authorize",
                "/payments.v1.Payments/Authorize",
            ),
            (
                "/grpc.health.v1.Health/Check",
                "/grpc.health.v1.Health/Check",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(canonical(input).as_deref(), Ok(expected), "{input:?}");
        }
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for path in [
            "/",
            "/api/",
            "/api/x",
            "/pkg.Service/Method",
            "/a-b_c~d/e.f",
        ] {
            assert!(matches!(canonical_path(path, Reject), Ok(Cow::Borrowed(p)) if p == path));
        }
        for path in ["/a%3F", "/%C3%A9", "/a%2Fb"] {
            assert!(
                matches!(canonical_path(path, Keep), Ok(Cow::Borrowed(_))),
                "{path}"
            );
        }
        for path in ["//", "/a/./b", "/a%41", "/a%3f"] {
            assert!(matches!(canonical_path(path, Reject), Ok(Cow::Owned(_))));
        }
    }

    #[test]
    fn refusals_name_the_reason() {
        let escaped_slash = |escape: &str| PathError::EscapedSlash {
            escape: escape.into(),
        };
        let cases = [
            ("/api/internal%2fx", escaped_slash("%2f")),
            ("/api/internal%2Fx", escaped_slash("%2F")),
            ("/api%5cinternal", escaped_slash("%5c")),
            ("/api%5Cinternal", escaped_slash("%5C")),
            ("/api\\internal", PathError::Backslash),
            ("/api/\0", PathError::ControlByte { byte: 0 }),
            ("/api/\tx", PathError::ControlByte { byte: 9 }),
            ("/api/\u{7f}", PathError::ControlByte { byte: 0x7f }),
            (
                "/api/%00",
                PathError::EscapedControl {
                    escape: "%00".into(),
                },
            ),
            (
                "/api/%0a",
                PathError::EscapedControl {
                    escape: "%0a".into(),
                },
            ),
            (
                "/api/%1F",
                PathError::EscapedControl {
                    escape: "%1F".into(),
                },
            ),
            (
                "/api/%7f",
                PathError::EscapedControl {
                    escape: "%7f".into(),
                },
            ),
            (
                "/api/%2569nternal/x",
                PathError::DoubleEscape {
                    escape: "%2569".into(),
                },
            ),
            (
                "/a%252fb",
                PathError::DoubleEscape {
                    escape: "%252f".into(),
                },
            ),
            (
                "/%25a%41",
                PathError::DoubleEscape {
                    escape: "%25aA".into(),
                },
            ),
            ("/api/%", PathError::MalformedEscape { escape: "%".into() }),
            (
                "/api/%4",
                PathError::MalformedEscape {
                    escape: "%4".into(),
                },
            ),
            (
                "/api/%zz",
                PathError::MalformedEscape {
                    escape: "%zz".into(),
                },
            ),
            (
                "/api/%4g/x",
                PathError::MalformedEscape {
                    escape: "%4g".into(),
                },
            ),
            (
                "/api/%\u{e9}",
                PathError::MalformedEscape {
                    escape: "%\u{e9}".into(),
                },
            ),
            (
                "/api/internal;x=1/y",
                PathError::PathParameter { found: ";" },
            ),
            ("/api/..;/internal", PathError::PathParameter { found: ";" }),
            (
                "/api/internal%3bx/y",
                PathError::PathParameter { found: "%3B" },
            ),
            ("/api/x#frag", PathError::Fragment),
            ("", PathError::NotOriginForm { form: "is empty" }),
            (
                "api/x",
                PathError::NotOriginForm {
                    form: "does not start with `/`",
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(canonical(input), Err(expected), "{input:?}");
        }
        assert_eq!(
            PathError::EscapedSlash {
                escape: "%2f".into()
            }
            .to_string(),
            "escaped slash `%2f` in the path: servers may decode it into a separator after the ACL decision (a listener or export with `escaped_slashes = \"keep\"` forwards it unchanged)"
        );
        assert_eq!(
            PathError::ControlByte { byte: 0 }.to_string(),
            "control byte 0x00 in the path"
        );
    }

    #[test]
    fn kept_escaped_slashes_are_data_inside_their_segment() {
        let keep = |path| canonical_path(path, Keep).map(Cow::into_owned);
        assert_eq!(
            keep("/api/internal%2fx").as_deref(),
            Ok("/api/internal%2Fx")
        );
        assert_eq!(keep("/a%5cb").as_deref(), Ok("/a%5Cb"));
        // Not a separator: no dot-segment or slash merging across it.
        assert_eq!(keep("/a/..%2F/b").as_deref(), Ok("/a/..%2F/b"));
        assert_eq!(keep("/a/%2F%2F/b").as_deref(), Ok("/a/%2F%2F/b"));
        // Everything else is refused as with `reject`.
        assert_eq!(keep("/a\\b"), Err(PathError::Backslash));
        assert_eq!(keep("/a;b"), Err(PathError::PathParameter { found: ";" }));
    }

    #[test]
    fn targets_origin_and_absolute_form() {
        let target =
            |t| canonical_target(t, Reject).map(|c| (c.to_origin_form(), c.is_unchanged()));
        assert_eq!(target("/api/x?a=1"), Ok(("/api/x?a=1".into(), true)));
        // A query is not a path: nothing in it is normalised or refused.
        assert_eq!(
            target("/api//x?next=../internal/%2F%2f;a\\b"),
            Ok(("/api/x?next=../internal/%2F%2f;a\\b".into(), false))
        );
        assert_eq!(target("/api/x?"), Ok(("/api/x?".into(), true)));
        assert_eq!(
            target("http://any/api/../api/internal/x"),
            Ok(("/api/internal/x".into(), false))
        );
        assert_eq!(
            target("https://user@host:8443/a/./b?q=1"),
            Ok(("/a/b?q=1".into(), false))
        );
        assert_eq!(target("http://host"), Ok(("/".into(), false)));
        assert_eq!(target("http://host?q"), Ok(("/?q".into(), false)));
        assert_eq!(target("http://host/"), Ok(("/".into(), false)));
        for (input, form) in [
            ("*", "`*` (asterisk-form)"),
            ("", "is empty"),
            (
                "example.com:443",
                "is neither a path nor a URL (authority-form or relative)",
            ),
            (
                "api/x",
                "is neither a path nor a URL (authority-form or relative)",
            ),
            (
                "://host/x",
                "is neither a path nor a URL (authority-form or relative)",
            ),
        ] {
            assert_eq!(
                canonical_target(input, Reject),
                Err(PathError::NotOriginForm { form }),
                "{input:?}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_TARGET_LEN));
        assert_eq!(canonical_target(&long, Reject), Err(PathError::TooLong));
        let long_query = format!("/?{}", "q".repeat(MAX_TARGET_LEN));
        assert_eq!(
            canonical_target(&long_query, Reject),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn uris_are_rewritten_keeping_scheme_authority_and_query() {
        let rewrite = |text: &str, mode| {
            let mut uri: Uri = text.parse().map_err(|_| None)?;
            canonicalise_uri(&mut uri, mode).map_err(Some)?;
            Ok::<_, Option<PathError>>(uri.to_string())
        };
        assert_eq!(rewrite("/api/x?q=1", Reject), Ok("/api/x?q=1".into()));
        assert_eq!(
            rewrite("/api/%69nternal//x?q=../%2F", Reject),
            Ok("/api/internal/x?q=../%2F".into())
        );
        assert_eq!(
            rewrite("http://any:80/api/../api/internal/x", Reject),
            Ok("http://any:80/api/internal/x".into())
        );
        assert_eq!(rewrite("http://any", Reject), Ok("http://any/".into()));
        assert_eq!(
            rewrite("http://any?q=1", Reject),
            Ok("http://any/?q=1".into())
        );
        assert_eq!(rewrite("http://any/a/", Reject), Ok("http://any/a/".into()));
        assert_eq!(rewrite("/a%2fb", Keep), Ok("/a%2Fb".into()));
        assert_eq!(
            rewrite("/a%2fb", Reject),
            Err(Some(PathError::EscapedSlash {
                escape: "%2f".into()
            }))
        );
        assert_eq!(
            rewrite("*", Reject),
            Err(Some(PathError::NotOriginForm {
                form: "`*` (asterisk-form)"
            }))
        );
        assert_eq!(
            rewrite("example.com:443", Reject),
            Err(Some(PathError::NotOriginForm {
                form: "is in authority-form"
            }))
        );
        // A refused URI is left as it was (the access log shows what was refused).
        let mut uri: Uri = "/a\\b".parse().unwrap_or_default();
        assert_eq!(
            canonicalise_uri(&mut uri, Reject),
            Err(PathError::Backslash)
        );
        assert_eq!(uri.to_string(), "/a\\b");
    }

    #[test]
    fn operator_paths_and_rule_prefixes() {
        assert_eq!(decision_path("/api//x?q=1").as_deref(), Ok("/api/x"));
        assert_eq!(decision_path("http://h/a/../b").as_deref(), Ok("/b"));
        assert!(decision_path("/a%2Fb").is_err());
        assert_eq!(check_canonical("/api/"), Ok(None));
        assert_eq!(check_canonical("/payments.v1.Payments/"), Ok(None));
        assert_eq!(check_canonical("/api/../x"), Ok(Some("/x".into())));
        assert_eq!(check_canonical("//x"), Ok(Some("/x".into())));
        assert_eq!(check_canonical("/%7Eu"), Ok(Some("/~u".into())));
        assert_eq!(
            check_canonical("/a%2fb"),
            Err(PathError::EscapedSlash {
                escape: "%2f".into()
            })
        );
        assert_eq!(check_canonical("/a?b"), Err(PathError::Query));
        assert_eq!(
            check_canonical("/a;b"),
            Err(PathError::PathParameter { found: ";" })
        );
    }

    #[test]
    fn escaped_slashes_parse_from_config_words() {
        #[derive(Deserialize)]
        struct Holder {
            escaped_slashes: EscapedSlashes,
        }
        let parse = |text: &str| toml::from_str::<Holder>(text).map(|h| h.escaped_slashes);
        assert_eq!(parse("escaped_slashes = \"keep\"").ok(), Some(Keep));
        assert_eq!(parse("escaped_slashes = \"reject\"").ok(), Some(Reject));
        assert!(parse("escaped_slashes = \"decode\"").is_err());
        assert_eq!(EscapedSlashes::default(), Reject);
        assert_eq!((Reject.as_str(), Keep.as_str()), ("reject", "keep"));
    }

    /// Paths built from the pieces attacks are made of.
    fn arb_path() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "/", "//", ".", "..", "a", "api", "internal", "%2e", "%2E", "%2f", "%2F", "%5c", "%41",
            "%7e", "%3f", "%3a", "%25", "%c3%a9", "é", "~", "-", "_", "!", "@", ":", "%", "%4",
            "%zz", ";", "\\", "\0", " ", "{", "|", "?", "#", "x=1", "+", "*",
        ]);
        prop::collection::vec(piece, 0..16).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    proptest! {
        #[test]
        fn canonicalisation_is_idempotent_and_leaves_nothing_ambiguous(
            path in arb_path(),
            keep in any::<bool>(),
        ) {
            let mode = if keep { Keep } else { Reject };
            if let Ok(once) = canonical_path(&path, mode) {
                let twice = canonical_path(&once, mode);
                prop_assert_eq!(twice.as_deref(), Ok(once.as_ref()));
                prop_assert!(matches!(twice, Ok(Cow::Borrowed(_))), "{once:?} not borrowed");
                let upper = once.to_ascii_uppercase();
                prop_assert!(once.starts_with('/'));
                for bad in ["//", "/./", "/../", "\\", ";", "#", "?", "%3B"] {
                    prop_assert!(!once.contains(bad), "{path:?} -> {once:?} holds {bad:?}");
                }
                prop_assert!(!once.ends_with("/.") && !once.ends_with("/.."), "{once:?}");
                if !keep {
                    prop_assert!(!upper.contains("%2F") && !upper.contains("%5C"), "{once:?}");
                }
                prop_assert!(once.bytes().all(|b| b.is_ascii_graphic()), "{once:?}");
                // Escapes are upper-case and never of an unreserved character.
                for (i, _) in once.match_indices('%') {
                    let hex = &once[i + 1..i + 3];
                    prop_assert_eq!(hex, hex.to_ascii_uppercase());
                    let byte = u8::from_str_radix(hex, 16).unwrap_or(0);
                    prop_assert!(!is_unreserved(byte), "{once:?}");
                }
            }
        }

        #[test]
        fn any_string_is_canonicalised_or_refused_without_panicking(text in any::<String>()) {
            for target in [text.clone(), format!("/{text}"), format!("http://h/{text}")] {
                if let Ok(once) = canonical_target(&target, Reject) {
                    let again = canonical_target(once.path(), Reject).map(|t| t.path().to_owned());
                    prop_assert_eq!(again.as_deref(), Ok(once.path()));
                }
                let _ = canonical_target(&target, Keep);
            }
        }
    }
}
