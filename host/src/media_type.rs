//! Media types (RFC 9110 §8.3.1) compared as media types, not as text.
//!
//! One media type has many spellings: `application/json`,
//! `Application/JSON` and `application/json; charset="utf-8"` are the same
//! (type and subtype are case-insensitive, a quoted parameter value is the
//! same value unquoted, and JSON has no charset parameter: RFC 8259 §11).
//! Senders differ in the spelling they use (the JavaScript SDK sends
//! `application/json; charset=utf-8`, the Go SDK `application/json`), and a
//! redelivery may travel another way than the first delivery. [`canonical`]
//! is the one spelling of each media type: the payload identity (the
//! event's payload hash) hashes it, so two spellings of one
//! media type are the same payload and two media types are not.
//! [`is_json`] says whether data of a media type is JSON, in both modes.

use std::fmt::Write;

/// The essence of the JSON event format's structured mode (CloudEvents
/// JSON Event Format §4): a request with it carries the event in its body.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// The essence of the JSON event format's batched mode (§4.2).
pub const BATCHED: &str = "application/cloudevents-batch+json";

/// A parsed `type/subtype *(; name=value)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    /// `type/subtype`, lower case.
    pub essence: String,
    /// Names lower case, values unquoted, in the order sent.
    pub parameters: Vec<(String, String)>,
}

impl MediaType {
    /// Parses a Content-Type value; `None` unless it is a media type.
    /// Lenient about whitespace (around `;`, `/` and `=`), strict about
    /// everything else: tokens, quoted strings, one `/`.
    pub fn parse(text: &str) -> Option<MediaType> {
        let mut rest = text;
        let ty = take_token(&mut rest)?;
        rest = rest.trim_start_matches(is_space).strip_prefix('/')?;
        let subtype = take_token(&mut rest)?;
        let essence = format!("{ty}/{subtype}").to_ascii_lowercase();
        let mut parameters = Vec::new();
        loop {
            rest = rest.trim_start_matches(is_space);
            if rest.is_empty() {
                break;
            }
            rest = rest.strip_prefix(';')?.trim_start_matches(is_space);
            if rest.is_empty() || rest.starts_with(';') {
                // An empty parameter (`a/b;` or `a/b;;c=d`): allowed.
                continue;
            }
            let name = take_token(&mut rest)?.to_ascii_lowercase();
            rest = rest.trim_start_matches(is_space).strip_prefix('=')?.trim_start_matches(is_space);
            let value = match rest.strip_prefix('"') {
                Some(quoted) => {
                    let (value, after) = take_quoted(quoted)?;
                    rest = after;
                    value
                }
                None => take_token(&mut rest)?.to_owned(),
            };
            parameters.push((name, value));
        }
        Some(MediaType { essence, parameters })
    }

    /// `*/json` and `*/*+json`: the data is JSON.
    pub fn is_json(&self) -> bool {
        essence_is_json(&self.essence)
    }

    /// The one spelling of this media type: the essence, then its
    /// meaningful parameters sorted, `; name=value` each, a value quoted
    /// only when it is not a token. Meaningless: `charset` of a JSON media
    /// type (JSON is UTF-8). Charset names are case-insensitive (RFC 9110
    /// §8.3.2), so a `charset` value is lower case; other values are kept
    /// as they are (their case may matter).
    pub fn canonical(&self) -> String {
        let json = self.is_json();
        let mut parameters: Vec<(&str, String)> = self
            .parameters
            .iter()
            .filter(|(name, _)| !(json && name == "charset"))
            .map(|(name, value)| {
                let value = if name == "charset" { value.to_ascii_lowercase() } else { value.clone() };
                (name.as_str(), value)
            })
            .collect();
        parameters.sort();
        let mut text = self.essence.clone();
        for (name, value) in parameters {
            if !value.is_empty() && value.bytes().all(is_token_byte) {
                let _ = write!(text, "; {name}={value}");
            } else {
                let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = write!(text, "; {name}=\"{escaped}\"");
            }
        }
        text
    }
}

/// The canonical spelling of a Content-Type value ([`MediaType::canonical`]);
/// a value that is not a media type stays as it is, less surrounding
/// whitespace.
pub fn canonical(text: &str) -> String {
    match MediaType::parse(text) {
        Some(media_type) => media_type.canonical(),
        None => text.trim_matches(is_space).to_owned(),
    }
}

/// `type/subtype` of a Content-Type value, lower case, whatever follows
/// it: what decides the mode (structured or binary).
pub fn essence(text: &str) -> String {
    text.split(';').next().unwrap_or_default().trim_matches(is_space).to_ascii_lowercase()
}

/// Whether this media type names a CloudEvents event format
/// (`application/cloudevents+json`, `application/cloudevents-batch+json`,
/// `+avro`, `+protobuf`, …): a request with such a Content-Type is a
/// structured-mode event to every SDK (the Java SDK tests the prefix), so
/// it can never be the data of a binary-mode event.
pub fn is_event_format(text: &str) -> bool {
    essence(text).starts_with("application/cloudevents")
}

/// Whether data of this media type is JSON: `*/json` or `*/*+json`, any
/// case, any parameters.
pub fn is_json(text: &str) -> bool {
    essence_is_json(&essence(text))
}

fn essence_is_json(essence: &str) -> bool {
    match essence.split_once('/') {
        Some((ty, subtype)) => !ty.is_empty() && (subtype == "json" || subtype.ends_with("+json")),
        None => false,
    }
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The token at the start of `rest` (at least one byte), and moves past it.
fn take_token<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let end = rest.bytes().position(|b| !is_token_byte(b)).unwrap_or(rest.len());
    if end == 0 {
        return None;
    }
    let (token, after) = rest.split_at(end);
    *rest = after;
    Some(token)
}

/// A quoted string's value (its opening quote already consumed), with
/// `\x` unescaped, and what follows its closing quote.
fn take_quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[at + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_media_type_are_one_canonical_text() {
        for text in [
            "application/json",
            "Application/JSON",
            " application/json ",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/json ; charset = \"utf-8\"",
            "application/json; charset=utf-16",
            "application/json;",
        ] {
            assert_eq!(canonical(text), "application/json", "{text:?}");
        }
        for text in [
            "text/plain; charset=utf-8",
            "TEXT/Plain;charset=\"UTF-8\"",
            "text/plain ;\tcharset=Utf-8",
        ] {
            assert_eq!(canonical(text), "text/plain; charset=utf-8", "{text:?}");
        }
        assert_eq!(
            canonical("application/vnd.shop.order+json; charset=utf-8; version=2"),
            "application/vnd.shop.order+json; version=2"
        );
        assert_eq!(
            canonical("multipart/mixed; Boundary=\"a b\"; a=\"x\""),
            canonical("multipart/mixed;a=x;boundary=\"a b\"")
        );
        assert_eq!(canonical("text/plain; a=\"q\\\"uote\""), "text/plain; a=\"q\\\"uote\"");
    }

    #[test]
    fn different_media_types_stay_different() {
        let distinct = [
            "application/json",
            "application/xml",
            "text/json",
            "application/json; profile=urn:a",
            "application/json; profile=urn:A",
            "text/plain",
            "text/plain; charset=utf-8",
            "text/plain; charset=iso-8859-1",
            "text/plain; format=flowed",
        ];
        let canonical: Vec<String> = distinct.iter().map(|text| canonical(text)).collect();
        for (i, a) in canonical.iter().enumerate() {
            for b in &canonical[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn text_that_is_not_a_media_type_is_kept() {
        for text in ["json", "application/", "/json", "a/b/c", "a/b; c", "a/b; c=\"open", "a b/c", "a/b; c=d e"] {
            assert_eq!(MediaType::parse(text), None, "{text:?}");
            assert_eq!(canonical(text), text.trim());
        }
    }

    #[test]
    fn json_media_types_are_recognised_whatever_their_spelling() {
        for text in [
            "application/json",
            "APPLICATION/JSON; charset=utf-8",
            "text/json",
            "application/vnd.shop.order+json; charset=utf-8",
            "application/cloudevents+json",
            "Application/LD+JSON;profile=\"x\"",
        ] {
            assert!(is_json(text), "{text:?}");
            assert!(MediaType::parse(text).unwrap().is_json(), "{text:?}");
        }
        for text in ["text/plain", "application/jsonx", "application/json-seq", "application/x-json+xml", "json", "/json", ""] {
            assert!(!is_json(text), "{text:?}");
        }
    }
}
