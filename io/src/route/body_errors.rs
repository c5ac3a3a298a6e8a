//! A request body that does not parse, said in the API's words: the JSON field names the
//! client sent (`missing field userName`, `userId: expected a whole number, got a string`),
//! never the parser's internals (Rust type names such as `struct RegisterRequest`, `u64`,
//! serde's phrasing).

use serde_json::error::Category;

/// A body that is a JSON list where the API wants an object: serde's derive would take
/// its items as the fields in order, which no client means.
pub(super) fn list_for_object(body: &[u8]) -> Option<String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    (*first == b'[').then(|| "the body must be a JSON object, not a list".to_owned())
}

/// Why a JSON body was refused, for the 400 envelope's message.
pub(super) fn json_error(error: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = error.inner();
    match inner.classify() {
        Category::Syntax => format!(
            "the body is not valid JSON (line {}, column {})",
            inner.line(),
            inner.column()
        ),
        Category::Eof => "the body is not valid JSON: it ends too early".to_owned(),
        Category::Io => "the body could not be read".to_owned(),
        Category::Data => data_error(&error.path().to_string(), &inner.to_string()),
    }
}

/// A well-formed body with the wrong content. `path` is where (`.` for the body itself),
/// `message` serde's description (with " at line L column C" at the end).
fn data_error(path: &str, message: &str) -> String {
    let message = message
        .rsplit_once(" at line ")
        .map_or(message, |(head, _)| head);
    let at_root = path == "." || path.is_empty();
    let place = if at_root { "the body" } else { path };
    if let Some(field) = quoted_after(message, "missing field ") {
        return if at_root {
            format!("missing field {field}")
        } else {
            format!("{path}: missing field {field}")
        };
    }
    if let Some(field) = quoted_after(message, "unknown field ") {
        // The path names the unknown field itself; the place is its parent.
        let parent = path
            .strip_suffix(field)
            .map(|p| p.trim_end_matches('.'))
            .unwrap_or(path);
        let at_root = parent.is_empty() || parent == ".";
        let path = parent;
        let known: Vec<&str> = message
            .split_once(", expected ")
            .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default();
        let known = if known.is_empty() {
            String::new()
        } else {
            format!(" (the fields are {})", known.join(", "))
        };
        return if at_root {
            format!("unknown field {field}{known}")
        } else {
            format!("{path}: unknown field {field}{known}")
        };
    }
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        let (got, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        return format!(
            "{place} must be {}, not {}",
            plain_expected(expected),
            plain_got(got)
        );
    }
    if let Some(rest) = message.strip_prefix("invalid value: ") {
        let (got, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
        return format!(
            "{place} must be {}, not {}",
            plain_expected(expected),
            plain_got(got)
        );
    }
    if message.starts_with("invalid length") && message.contains("expected struct ") {
        // serde would take a list for an object's fields in order; the API never does.
        return format!("{place} must be a JSON object, not a list");
    }
    if message.starts_with("invalid length") {
        return format!("{place} has the wrong number of items");
    }
    if message.starts_with("duplicate field ")
        && let Some(field) = quoted_after(message, "duplicate field ")
    {
        return format!("field {field} is given twice");
    }
    // Messages of this API's own parsers (ids, names), already in its words.
    if at_root {
        message.to_owned()
    } else {
        format!("{path}: {message}")
    }
}

/// Why a query string was refused (axum's rejection text), in the API's words.
pub(super) fn query_error(text: &str) -> String {
    let rest = text
        .split_once("query string: ")
        .map_or(text, |(_, rest)| rest)
        .trim();
    if let Some(field) = quoted_after(rest, "missing field ") {
        return format!("missing query parameter {field}");
    }
    if let Some(field) = quoted_after(rest, "unknown field ") {
        return format!("unknown query parameter {field}");
    }
    match rest.split_once(": ") {
        Some((field, why))
            if why.contains("invalid digit")
                || why.contains("too large")
                || why.contains("too small")
                || why.contains("empty string") =>
        {
            format!("query parameter {field} must be a whole number")
        }
        Some((field, why)) if !field.contains(' ') => format!("query parameter {field}: {why}"),
        _ => format!("bad query: {rest}"),
    }
}

/// `name` in "<prefix>`name`..."
fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').nth(1)
}

/// What serde expected, in JSON terms.
fn plain_expected(expected: &str) -> String {
    let expected = expected.trim();
    let integer = [
        "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize",
    ];
    if integer.contains(&expected) {
        return "a whole number".to_owned();
    }
    if matches!(expected, "f32" | "f64") {
        return "a number".to_owned();
    }
    if expected.starts_with("struct ") || expected == "a map" {
        return "a JSON object".to_owned();
    }
    if expected.starts_with("enum ") {
        return "one of the allowed values".to_owned();
    }
    match expected {
        "a sequence" => "a list".to_owned(),
        "a string" | "a borrowed string" | "a char" => "a string".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "unit" => "null".to_owned(),
        "" => "something else".to_owned(),
        other => other.to_owned(),
    }
}

/// What the client sent, in JSON terms (serde says `string "one"`, `integer `5``, ...):
/// a number or boolean as written, anything else by its kind.
fn plain_got(got: &str) -> String {
    let kind = got.split([' ', '`']).next().unwrap_or("");
    let literal = got.split('`').nth(1);
    match (kind, literal) {
        ("integer" | "floating" | "boolean", Some(literal)) => literal.to_owned(),
        ("string" | "character", _) => "a string".to_owned(),
        ("integer" | "floating", None) => "a number".to_owned(),
        ("boolean", None) => "true or false".to_owned(),
        ("sequence", _) => "a list".to_owned(),
        ("map", _) => "an object".to_owned(),
        ("null" | "unit" | "Option", _) => "null".to_owned(),
        _ => "that".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{LoginRequest, P2pRouteRequest, RegisterRequest, UserNamesRequest};

    fn said<T: serde::de::DeserializeOwned + std::fmt::Debug>(raw: &str) -> String {
        let mut de = serde_json::Deserializer::from_str(raw);
        let error = serde_path_to_error::deserialize::<_, T>(&mut de).expect_err(raw);
        json_error(&error)
    }

    #[test]
    fn body_errors_name_json_fields_never_rust_types() {
        let register: &[(&str, &str)] = &[
            (r#"{"userName": "ann"}"#, "missing field password"),
            (r#"{"password": "a-password"}"#, "missing field userName"),
            (
                r#"{"userName": 5, "password": "a-password"}"#,
                "userName must be a string, not 5",
            ),
            (
                r#"{"userName": "ann", "password": "a-password", "admin": true}"#,
                "unknown field admin (the fields are userName, password)",
            ),
            ("[]", "the body must be a JSON object, not a list"),
            (r#""ann""#, "the body must be a JSON object, not a string"),
            ("null", "the body must be a JSON object, not null"),
            ("{not json", "the body is not valid JSON (line 1, column 2)"),
            (
                r#"{"userName": "ann""#,
                "the body is not valid JSON: it ends too early",
            ),
            ("", "the body is not valid JSON: it ends too early"),
        ];
        assert_eq!(
            list_for_object(br#" ["ann", "a-password"]"#).as_deref(),
            Some("the body must be a JSON object, not a list")
        );
        assert_eq!(list_for_object(br#"{"userName": ["x"]}"#), None);
        for (raw, want) in register {
            assert_eq!(said::<RegisterRequest>(raw), *want, "{raw}");
        }
        let login: &[(&str, &str)] = &[
            (
                r#"{"userId": "one", "userName": "a", "password": "b"}"#,
                "userId must be a whole number, not a string",
            ),
            (
                r#"{"userId": -1, "userName": "a", "password": "b"}"#,
                "userId must be a whole number, not -1",
            ),
            (
                r#"{"userId": 1.5, "userName": "a", "password": "b"}"#,
                "userId must be a whole number, not 1.5",
            ),
            (
                r#"{"userId": 1, "userName": "a", "password": "b", "resumeToken": 7}"#,
                "resumeToken must be a string, not 7",
            ),
        ];
        for (raw, want) in login {
            assert_eq!(said::<LoginRequest>(raw), *want, "{raw}");
        }
        // Ids are JSON int64 from 0 (the OpenAPI document's range), wherever they are.
        let range = "a whole number from 0 to 9223372036854775807";
        assert_eq!(
            said::<LoginRequest>(
                r#"{"userId": 9223372036854775808, "userName": "a", "password": "b"}"#
            ),
            format!("userId must be {range}, not 9223372036854775808")
        );
        assert_eq!(
            said::<UserNamesRequest>(r#"{"userIds": [1, 18446744073709551615]}"#),
            format!("userIds[1] must be {range}, not 18446744073709551615")
        );
        assert_eq!(
            said::<P2pRouteRequest>(
                r#"{"userId": 1, "receiveUserId": 9223372036854775808, "msg": "", "clientMsgId": ""}"#
            ),
            format!("receiveUserId must be {range}, not 9223372036854775808")
        );
        let query: &[(&str, &str)] = &[
            (
                "Failed to deserialize query string: missing field `conv`",
                "missing query parameter conv",
            ),
            (
                "Failed to deserialize query string: limit: invalid digit found in string",
                "query parameter limit must be a whole number",
            ),
            (
                "Failed to deserialize query string: limit: number too large to fit in target type",
                "query parameter limit must be a whole number",
            ),
        ];
        for (text, want) in query {
            assert_eq!(query_error(text), *want, "{text}");
        }
        // Whatever the input, no parser internals leak.
        for raw in [
            "[]",
            "{}",
            "1",
            r#"{"userId": {}}"#,
            r#"{"userId": [1]}"#,
            r#"{"userId": true, "userName": null}"#,
        ] {
            for message in [said::<LoginRequest>(raw), said::<RegisterRequest>(raw)] {
                for internal in ["struct", "u64", "Request", "`", "serde", "expected"] {
                    assert!(!message.contains(internal), "{raw}: {message}");
                }
            }
        }
    }
}
