//! HTTP request → validated [`CloudEvent`].
//!
//! Binary mode (`ce-*` headers, percent-decoded as the HTTP binding
//! requires) and structured mode (`application/cloudevents+json`, `data` or
//! `data_base64`). `cloudevents-sdk` builds and validates the event; this
//! module adds what it leaves out: percent-decoding, duplicate headers,
//! extension-name rules, structured data read by its media type (every
//! JSON media type is JSON: [`crate::media_type::is_json`]), and error
//! messages that name the problem. A
//! `CloudEvent` that exists is valid: the next stage never re-checks it.

use cloudevents::event::{AttributesReader, AttributesWriter, Data, ExtensionValue};
use cloudevents::{EventBuilder, EventBuilderV10};
use http::{HeaderMap, HeaderName, HeaderValue};
use http::header::CONTENT_TYPE;
use percent_encoding::percent_decode;
use sha2::{Digest, Sha256};

use crate::rejection::Rejection;
use crate::media_type;
use crate::media_type::{BATCHED, STRUCTURED};

/// A delivered CloudEvent (spec version 1.0), attributes as text.
///
/// Made only by [`decode`] (parsed once, at the edge), so one that exists
/// is valid; its fields are read through the accessors and never changed.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudEvent {
    id: String,
    source: String,
    ty: String,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    extensions: Vec<(String, String)>,
    data: Option<Vec<u8>>,
    /// [`CloudEvent::payload_sha256`], computed once by [`checked`] (the
    /// data is parsed there once, for its depth and its canonical form).
    payload_sha256: [u8; 32],
}

impl CloudEvent {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `type` attribute.
    pub fn ty(&self) -> &str {
        &self.ty
    }

    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// RFC 3339.
    pub fn time(&self) -> Option<&str> {
        self.time.as_deref()
    }

    pub fn datacontenttype(&self) -> Option<&str> {
        self.datacontenttype.as_deref()
    }

    pub fn dataschema(&self) -> Option<&str> {
        self.dataschema.as_deref()
    }

    /// Extension attributes: lower-case names, sorted, values as text.
    pub fn extensions(&self) -> &[(String, String)] {
        &self.extensions
    }

    /// The data bytes (structured mode: the `data` member as JSON text, or
    /// the decoded `data_base64`).
    pub fn data(&self) -> Option<&[u8]> {
        self.data.as_deref()
    }

    /// An event as a test needs it, built without a request.
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn for_tests(
        id: &str,
        source: &str,
        ty: &str,
        subject: Option<&str>,
        datacontenttype: Option<&str>,
        extensions: &[(&str, &str)],
        data: Option<&[u8]>,
    ) -> CloudEvent {
        checked(CloudEvent {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            subject: subject.map(Into::into),
            time: None,
            datacontenttype: datacontenttype.map(Into::into),
            dataschema: None,
            extensions: extensions.iter().map(|(n, v)| ((*n).into(), (*v).into())).collect(),
            data: data.map(<[u8]>::to_vec),
            payload_sha256: [0; 32],
        })
        .expect("a valid test event")
    }
}

pub const SPEC_VERSION: &str = "1.0";
/// The first byte hashed by [`CloudEvent::payload_sha256`]; the legacy
/// hash starts with 1 (the type is always present).
const PAYLOAD_FORMAT: u8 = 2;
const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];
const OPTIONAL: [&str; 5] = ["datacontenttype", "dataschema", "subject", "time", "data"];

/// Decodes a request into an event, or says precisely why it is not one.
pub fn decode(headers: &HeaderMap, body: Vec<u8>) -> Result<CloudEvent, Rejection> {
    let content_type = match single_header(headers, &CONTENT_TYPE)? {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| invalid("the Content-Type header is not visible ASCII"))?,
        ),
        None => None,
    };
    // A binary-mode event (ce-specversion) whose Content-Type names an
    // event format is two events at once: SDKs read it as structured and
    // ignore the ce-* headers, so what the data holds would be taken for
    // the event (a dead letter replayed so became another event).
    if content_type.is_some_and(media_type::is_event_format) && headers.contains_key("ce-specversion") {
        return Err(invalid(
            "ambiguous request: binary-mode headers (ce-specversion) with a Content-Type that names a CloudEvents \
             event format; send the event in one mode",
        ));
    }
    match content_type.map(media_type::essence).as_deref() {
        Some(BATCHED) => Err(invalid("batched mode (application/cloudevents-batch+json) is not supported; send one event per request")),
        Some(STRUCTURED) => decode_structured(&body),
        _ => decode_binary(headers, content_type, body),
    }
}

fn decode_binary(headers: &HeaderMap, content_type: Option<&str>, body: Vec<u8>) -> Result<CloudEvent, Rejection> {
    let mut required: [Option<String>; 4] = Default::default();
    let mut builder = EventBuilderV10::new();
    let mut extensions = Vec::new();
    let mut dataschema = None;
    let mut time = None;
    for name in headers.keys() {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let raw = single_header(headers, name)?.map(|v| v.as_bytes()).unwrap_or_default();
        let value = percent_decode(raw)
            .decode_utf8()
            .map_err(|_| invalid(format!("header {name} is not UTF-8 after percent-decoding")))?
            .into_owned();
        if let Some(slot) = REQUIRED.iter().position(|r| *r == attribute) {
            required[slot] = Some(value);
            continue;
        }
        builder = match attribute {
            "subject" => builder.subject(value),
            "time" => {
                time = Some(value.clone());
                builder.time(value)
            }
            "dataschema" => {
                dataschema = Some(absolute_uri(value)?);
                continue;
            }
            "datacontenttype" => {
                return Err(invalid("binary mode carries datacontenttype in the Content-Type header, not ce-datacontenttype"));
            }
            "data" => return Err(invalid("`data` is not an attribute: send the payload as the body")),
            _ => {
                check_extension_name(attribute)?;
                extensions.push((attribute.to_owned(), value));
                continue;
            }
        };
    }
    let [specversion, id, source, ty] = required;
    let specversion = specversion.ok_or_else(|| {
        invalid("not a CloudEvent: missing required attribute `specversion` (header ce-specversion in binary mode, or Content-Type application/cloudevents+json for structured mode)")
    })?;
    check_spec_version(&specversion)?;
    let id = id.ok_or_else(|| missing("id", "ce-id"))?;
    let source = source.ok_or_else(|| missing("source", "ce-source"))?;
    let ty = ty.ok_or_else(|| missing("type", "ce-type"))?;
    check_required_values(&id, &source, &ty)?;
    builder = builder.id(id).source(source).ty(ty);
    let mut event = builder.build().map_err(|e| invalid(format!("invalid CloudEvent: {e}")))?;
    event.set_datacontenttype(content_type);
    if !body.is_empty() {
        event.set_data_unchecked(Data::Binary(body));
    }
    for (name, value) in extensions {
        event.set_extension(&name, value);
    }
    checked(CloudEvent { time, dataschema, ..from_sdk(event) })
}

/// serde_json's error, with what its words leave unclear said: a lone
/// UTF-16 surrogate escape (`"\ud800"` without its pair) is reported as
/// "unexpected end of hex escape" or "lone leading surrogate".
fn json_error(error: &serde_json::Error) -> String {
    let text = error.to_string();
    if text.contains("hex escape") || text.contains("surrogate") {
        format!(
            "{text}: a \\uD800-\\uDFFF escape must be half of a UTF-16 surrogate pair; a lone one is no Unicode \
             character (RFC 8259 §8.2)"
        )
    } else {
        text
    }
}

fn decode_structured(body: &[u8]) -> Result<CloudEvent, Rejection> {
    let Members(members) = serde_json::from_slice(body).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            invalid("malformed structured CloudEvent: the body is not a JSON object")
        } else {
            invalid(format!("malformed structured CloudEvent: the body is not valid JSON ({})", json_error(&e)))
        }
    })?;
    let mut map = serde_json::Map::new();
    let mut data = None;
    let mut data_base64 = None;
    for (name, raw) in members {
        if map.contains_key(&name) || (name == "data" && data.is_some()) || (name == "data_base64" && data_base64.is_some()) {
            return Err(invalid(format!("malformed structured CloudEvent: member `{name}` appears more than once")));
        }
        match name.as_str() {
            "data" => data = Some(raw),
            "data_base64" => data_base64 = Some(raw),
            _ => {
                let value = serde_json::from_str(raw.get())
                    .map_err(|e| invalid(format!("malformed structured CloudEvent: member `{name}` ({})", json_error(&e))))?;
                map.insert(name, value);
            }
        }
    }
    for attribute in REQUIRED {
        match map.get(attribute) {
            None | Some(serde_json::Value::Null) => {
                return Err(invalid(format!("not a CloudEvent: missing required attribute `{attribute}`")));
            }
            Some(serde_json::Value::String(_)) => {}
            Some(_) => return Err(invalid(format!("attribute `{attribute}` must be a string"))),
        }
    }
    let text = |key: &str| map.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    check_spec_version(text("specversion"))?;
    check_required_values(text("id"), text("source"), text("type"))?;
    for name in map.keys() {
        if !REQUIRED.contains(&name.as_str()) && !OPTIONAL.contains(&name.as_str()) {
            check_extension_name(name)?;
        }
    }
    // Kept as the sender wrote them (cloudevents-sdk re-formats both).
    let time = map.get("time").and_then(|v| v.as_str()).map(str::to_owned);
    let dataschema = match map.remove("dataschema") {
        Some(serde_json::Value::String(text)) => Some(absolute_uri(text)?),
        None | Some(serde_json::Value::Null) => None,
        Some(_) => return Err(invalid("attribute `dataschema` must be a string (an absolute URI)")),
    };
    // The data is read here, not by cloudevents-sdk: it decides "is this
    // JSON" by the exact text of datacontenttype (`+json` with a
    // parameter, or `APPLICATION/JSON`, are not JSON to it).
    let datacontenttype = map.get("datacontenttype").and_then(|v| v.as_str()).map(str::to_owned);
    let data = match (data, data_base64) {
        (Some(_), Some(_)) => return Err(invalid("a structured CloudEvent has `data` or `data_base64`, not both")),
        (Some(raw), None) => Some(structured_data(&raw, datacontenttype.as_deref())?),
        (None, Some(raw)) => match serde_json::from_str::<serde_json::Value>(raw.get()) {
            Ok(serde_json::Value::String(text)) => {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| invalid(format!("attribute `data_base64` is not valid base64 ({e})")))?;
                Some(bytes)
            }
            _ => return Err(invalid("attribute `data_base64` must be a string (base64)")),
        },
        (None, None) => None,
    };
    let event: cloudevents::Event = serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| invalid(format!("invalid structured CloudEvent: {e}")))?;
    checked(CloudEvent { data, time, dataschema, ..from_sdk(event) })
}

/// Refuses an event one of whose attributes holds a character the
/// CloudEvents String type forbids (spec 1.0 "Type System": the control
/// characters U+0000–U+001F and U+007F–U+009F, and noncharacters; a
/// surrogate cannot reach here, neither JSON nor UTF-8 carries one alone).
/// Binary mode lets a sender write any of them percent-encoded (`%0A`);
/// a handler, a log line or a replayed header must never see one.
///
/// Then the payload hash, JSON data parsed once for it: refused when it
/// nests deeper than [`MAX_JSON_DEPTH`] (such data could not be compared as
/// JSON, a redelivery in another spelling would look like another payload,
/// nor parsed by a handler); bytes that are not JSON at all are compared
/// byte for byte.
fn checked(mut event: CloudEvent) -> Result<CloudEvent, Rejection> {
    let attributes = [
        ("id", Some(event.id.as_str())),
        ("source", Some(event.source.as_str())),
        ("type", Some(event.ty.as_str())),
        ("subject", event.subject.as_deref()),
        ("time", event.time.as_deref()),
        ("datacontenttype", event.datacontenttype.as_deref()),
        ("dataschema", event.dataschema.as_deref()),
    ];
    let extensions = event.extensions.iter().map(|(name, value)| (name.as_str(), Some(value.as_str())));
    for (name, value) in attributes.into_iter().chain(extensions) {
        if let Some(c) = value.and_then(|value| value.chars().find(|&c| forbidden_in_string(c))) {
            return Err(invalid(format!(
                "attribute `{name}` contains U+{:04X}, which a CloudEvents String may not hold (control characters and noncharacters)",
                c as u32
            )));
        }
    }
    let json = event.datacontenttype.as_deref().is_none_or(media_type::is_json);
    // Empty data is no data: binary mode cannot tell them apart (an empty
    // body), so a structured `"data": ""` redelivered binary is the same
    // payload. (The legacy hash kept them apart, as stored.)
    let data = event.data.as_deref().filter(|bytes| !bytes.is_empty());
    let canonical = match data.filter(|_| json).map(serde_json::from_slice::<serde_json::Value>) {
        Some(Err(e)) if e.to_string().starts_with("recursion limit exceeded") => {
            return Err(invalid(format!(
                "JSON data nested deeper than {MAX_JSON_DEPTH} levels (arrays and objects) is not accepted"
            )));
        }
        Some(Ok(value)) => Some(value.to_string().into_bytes()),
        Some(Err(_)) | None => None,
    };
    let content_type = media_type::canonical(event.datacontenttype.as_deref().unwrap_or("application/json"));
    event.payload_sha256 = event.payload_digest(Some(PAYLOAD_FORMAT), Some(&content_type), canonical.as_deref().or(data));
    Ok(event)
}

/// Whether the CloudEvents String type forbids this character (spec 1.0
/// "Type System"): a control character or a noncharacter.
pub fn forbidden_in_string(c: char) -> bool {
    let code = c as u32;
    c.is_control() || (0xFDD0..=0xFDEF).contains(&code) || (code & 0xFFFE) == 0xFFFE
}

/// A JSON object's members in the order written, values unparsed; names
/// that repeat are kept (and refused by the caller: which one describes
/// the event would be a guess, as for repeated headers).
struct Members(Vec<(String, Box<serde_json::value::RawValue>)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = access.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A structured event's `data` member as bytes: its JSON text as written
/// when the media type is JSON (every `*/json` and `*/*+json`, any case,
/// any parameters) or absent (the JSON event format's default; `null` is
/// an explicit null payload, distinct from no `data`, JSON format §3.1.1);
/// otherwise the member must be a string, and its text is the data.
fn structured_data(raw: &serde_json::value::RawValue, datacontenttype: Option<&str>) -> Result<Vec<u8>, Rejection> {
    if datacontenttype.is_none_or(media_type::is_json) {
        return Ok(raw.get().as_bytes().to_vec());
    }
    match serde_json::from_str::<serde_json::Value>(raw.get()) {
        Ok(serde_json::Value::String(text)) => Ok(text.into_bytes()),
        _ => Err(invalid(format!(
            "attribute `data` must be a string: datacontenttype {:?} is not a JSON media type \
             (send JSON data with a JSON media type, or other bytes as `data_base64`)",
            datacontenttype.unwrap_or_default()
        ))),
    }
}

/// How deeply JSON data may nest (arrays and objects): serde_json's own
/// limit, the one a handler's `serde_json` applies to the same bytes.
pub const MAX_JSON_DEPTH: usize = 127;

/// `dataschema` as the sender wrote it, once it is known to be an
/// absolute URI (CloudEvents 1.0: type URI). The payload identity compares
/// it as a URL ([`CloudEvent::payload_sha256`]), so the ASCII characters no
/// URI holds (RFC 3986 §2; Java's `URI` refuses them too) are refused
/// rather than read the URL Standard's way: it trims spaces, turns `\`
/// into `/` (`a\b` would be the same payload as `a/b`) and percent-encodes
/// `"<>^`{|}`. Non-ASCII is taken as an IRI (RFC 3987 §3.1 maps it).
fn absolute_uri(text: String) -> Result<String, Rejection> {
    if let Some(c) = text.chars().find(|c| matches!(c, ' ' | '"' | '<' | '>' | '\\' | '^' | '`' | '{' | '|' | '}')) {
        let what = if c == ' ' { "a space".to_owned() } else { format!("{c:?}") };
        return Err(invalid(format!("attribute `dataschema` is not an absolute URI (it holds {what}, which no URI may: RFC 3986 §2)")));
    }
    url::Url::parse(&text).map_err(|e| invalid(format!("attribute `dataschema` is not an absolute URI ({e})")))?;
    Ok(text)
}

fn from_sdk(event: cloudevents::Event) -> CloudEvent {
    let mut extensions: Vec<(String, String)> = event
        .iter_extensions()
        .map(|(name, value)| {
            let value = match value {
                ExtensionValue::String(s) => s.clone(),
                ExtensionValue::Boolean(b) => b.to_string(),
                ExtensionValue::Integer(i) => i.to_string(),
            };
            (name.to_owned(), value)
        })
        .collect();
    extensions.sort();
    let data = event.data().map(|data| match data {
        Data::Binary(bytes) => bytes.clone(),
        Data::String(text) => text.clone().into_bytes(),
        Data::Json(value) => value.to_string().into_bytes(),
    });
    CloudEvent {
        id: event.id().to_owned(),
        source: event.source().to_string(),
        ty: event.ty().to_owned(),
        subject: event.subject().map(str::to_owned),
        time: event.time().map(|t| t.to_rfc3339()),
        datacontenttype: event.datacontenttype().map(str::to_owned),
        dataschema: event.dataschema().map(|u| u.to_string()),
        extensions,
        data,
        payload_sha256: [0; 32],
    }
}

impl CloudEvent {
    /// What makes two deliveries "the same event": type, subject, data and
    /// its description. `time` and extensions are left out on purpose: a
    /// producer's retry may restamp them (Knative adds arrival-time
    /// extensions), and that is still the same event. The media type is
    /// hashed in its canonical spelling ([`media_type::canonical`]), so
    /// `application/json` and `application/json; charset=utf-8` are one
    /// payload. JSON data (a JSON media type, or none) is hashed in
    /// canonical form so binary and structured deliveries of one event
    /// match; other data byte for byte. The hashed text starts with a
    /// format byte that [`Self::legacy_payload_sha256`] never starts with,
    /// so the two hashes of different payloads never coincide. An absent
    /// media type is hashed as `application/json`: in structured mode that
    /// is what its absence means (CloudEvents JSON format), and JSON data is
    /// how it is read in either mode, so a structured delivery without
    /// `datacontenttype` and a binary one with `application/json` match.
    pub fn payload_sha256(&self) -> [u8; 32] {
        self.payload_sha256
    }

    /// The payload hash as `exactly` computed it before media types were
    /// compared as media types: the Content-Type text as sent, any data
    /// that parses as JSON in canonical form. A record stored by such a
    /// version holds this hash; the dedup transaction accepts it too, so
    /// that a redelivery across the upgrade is still a replay. Needed until
    /// every such record has expired (`--retention`).
    pub fn legacy_payload_sha256(&self) -> [u8; 32] {
        let data = self.data.as_deref();
        let canonical = data.and_then(|bytes| serde_json::from_slice::<serde_json::Value>(bytes).ok()).map(|v| v.to_string().into_bytes());
        self.payload_digest(None, self.datacontenttype.as_deref(), canonical.as_deref().or(data))
    }

    /// The hash of the payload's fields, `data` as the caller spells it
    /// (canonical JSON, or the bytes).
    fn payload_digest(&self, format: Option<u8>, content_type: Option<&str>, data: Option<&[u8]>) -> [u8; 32] {
        let mut hasher = Sha256::new();
        if let Some(format) = format {
            hasher.update([format]);
        }
        let mut field = |value: Option<&[u8]>| match value {
            None => hasher.update([0u8]),
            Some(bytes) => {
                hasher.update([1u8]);
                hasher.update((bytes.len() as u64).to_be_bytes());
                hasher.update(bytes);
            }
        };
        field(Some(self.ty.as_bytes()));
        field(self.subject.as_deref().map(str::as_bytes));
        field(content_type.map(str::as_bytes));
        // As a URL (the spelling `exactly` hashed before it kept the
        // sender's text): `HTTP://Example.com/a` and `http://example.com/a`
        // are one schema.
        let dataschema = self.dataschema.as_deref().map(|text| url::Url::parse(text).map_or_else(|_| text.to_owned(), String::from));
        field(dataschema.as_deref().map(str::as_bytes));
        field(data);
        hasher.finalize().into()
    }
}

/// The one value of a header that shapes the event (Content-Type,
/// Content-Encoding, every `ce-*`). Two are refused, equal or not: which
/// one describes the event would be a guess.
pub fn single_header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Result<Option<&'a HeaderValue>, Rejection> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(invalid(format!("header {name} appears more than once")));
    }
    Ok(first)
}

fn check_spec_version(version: &str) -> Result<(), Rejection> {
    if version == SPEC_VERSION {
        Ok(())
    } else {
        Err(invalid(format!("unsupported specversion {version:?}: exactly accepts CloudEvents 1.0")))
    }
}

/// The required attributes are not empty (their characters: [`checked`]).
fn check_required_values(id: &str, source: &str, ty: &str) -> Result<(), Rejection> {
    for (name, value) in [("id", id), ("source", source), ("type", ty)] {
        if value.is_empty() {
            return Err(invalid(format!("attribute `{name}` must not be empty")));
        }
    }
    Ok(())
}

/// CloudEvents 1.0: extension names are lower-case ASCII letters and digits.
fn check_extension_name(name: &str) -> Result<(), Rejection> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid extension attribute name {name:?}: CloudEvents names are lower-case letters and digits only"
        )))
    }
}

fn missing(attribute: &str, header: &str) -> Rejection {
    invalid(format!("not a CloudEvent: missing required attribute `{attribute}` (header {header})"))
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::InvalidEvent(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn binary(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    const MINIMAL: [(&str, &str); 4] = [
        ("ce-specversion", "1.0"),
        ("ce-id", "1"),
        ("ce-source", "urn%3Aorders"),
        ("ce-type", "order.created"),
    ];

    #[test]
    fn binary_mode_percent_decodes_attributes() {
        let event = decode(&binary(&MINIMAL), b"{}".to_vec()).unwrap();
        assert_eq!(event.source, "urn:orders");
        assert_eq!(event.data.as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn binary_mode_names_the_missing_attribute() {
        for (skip, (header, _)) in MINIMAL.iter().enumerate() {
            let pairs: Vec<_> = MINIMAL.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, p)| *p).collect();
            let Err(Rejection::InvalidEvent(message)) = decode(&binary(&pairs), vec![]) else {
                panic!("accepted an event without {header}");
            };
            let attribute = header.trim_start_matches("ce-");
            assert!(message.contains(&format!("`{attribute}`")), "{message}");
        }
    }

    #[test]
    fn duplicate_headers_and_bad_extension_names_are_refused() {
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("ce-id", "2"));
        assert!(decode(&binary(&pairs), vec![]).is_err());
        for content_type in ["application/json", "text/plain"] {
            let mut pairs = MINIMAL.to_vec();
            pairs.extend([("content-type", "application/json"), ("Content-Type", content_type)]);
            let Err(Rejection::InvalidEvent(m)) = decode(&binary(&pairs), vec![]) else { panic!() };
            assert!(m.contains("content-type") && m.contains("more than once"), "{m}");
        }
        let pairs = [("content-type", STRUCTURED), ("content-type", STRUCTURED)];
        assert!(decode(&binary(&pairs), vec![]).is_err());
        let mut pairs = MINIMAL.to_vec();
        pairs.push(("ce-my_ext", "x"));
        assert!(decode(&binary(&pairs), vec![]).is_err());
    }

    #[test]
    fn structured_and_binary_deliveries_hash_alike() {
        let mut headers = binary(&MINIMAL);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let from_binary = decode(&headers, br#"{"b": 1, "a": [1, 2]}"#.to_vec()).unwrap();
        let structured = br#"{"specversion":"1.0","id":"1","source":"urn:orders","type":"order.created",
            "datacontenttype":"application/json","data":{"a":[1,2],"b":1}}"#;
        let headers = binary(&[("content-type", STRUCTURED)]);
        let from_structured = decode(&headers, structured.to_vec()).unwrap();
        assert_eq!(from_binary.payload_sha256(), from_structured.payload_sha256());
        let changed = br#"{"specversion":"1.0","id":"1","source":"urn:orders","type":"order.created",
            "datacontenttype":"application/json","data":{"a":[1,2],"b":2}}"#;
        let changed = decode(&headers, changed.to_vec()).unwrap();
        assert_ne!(changed.payload_sha256(), from_structured.payload_sha256());
    }

    #[test]
    fn the_payload_hash_compares_media_types_as_media_types() {
        let event = |content_type: &str, data: &[u8]| {
            let mut headers = binary(&MINIMAL);
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
            decode(&headers, data.to_vec()).unwrap()
        };
        let json = event("application/json", br#"{"a": 1}"#);
        for same in ["application/json; charset=utf-8", "Application/JSON", "application/json;charset=\"UTF-8\""] {
            assert_eq!(event(same, br#"{"a":1}"#).payload_sha256(), json.payload_sha256(), "{same}");
        }
        for other in ["application/xml", "text/plain", "application/json; profile=x"] {
            assert_ne!(event(other, br#"{"a": 1}"#).payload_sha256(), json.payload_sha256(), "{other}");
        }
        // Text is compared byte for byte, even when it parses as JSON.
        let text = event("text/plain; charset=utf-8", br#"{"a":1}"#);
        assert_eq!(event("TEXT/plain; charset=UTF-8", br#"{"a":1}"#).payload_sha256(), text.payload_sha256());
        assert_ne!(event("text/plain; charset=utf-8", br#"{"a": 1}"#).payload_sha256(), text.payload_sha256());
        // The hash of a record stored before media types were compared as
        // such is never the hash of another payload.
        assert_ne!(json.legacy_payload_sha256(), json.payload_sha256());
        let spaced = event("text/plain; charset=utf-8", br#"{"a": 1}"#);
        assert_ne!(spaced.legacy_payload_sha256(), text.payload_sha256());
    }

    #[test]
    fn structured_data_of_every_json_media_type_is_json() {
        let headers = binary(&[("content-type", "application/cloudevents+json; charset=utf-8")]);
        let document = |datacontenttype: &str, data: &str| {
            format!(
                r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"{datacontenttype}","data":{data}}}"#
            )
            .into_bytes()
        };
        for json in ["application/vnd.shop.order+json; charset=utf-8", "APPLICATION/JSON", "text/json", "application/json"] {
            let event = decode(&headers, document(json, r#"{"b": [1, 2]}"#)).unwrap();
            // As written: the member's own text.
            assert_eq!(event.data.as_deref(), Some(&br#"{"b": [1, 2]}"#[..]), "{json}");
            assert_eq!(event.datacontenttype.as_deref(), Some(json));
        }
        let text = decode(&headers, document("text/plain", r#""{\"b\": 1}""#)).unwrap();
        assert_eq!(text.data.as_deref(), Some(&br#"{"b": 1}"#[..]));
        let Err(Rejection::InvalidEvent(m)) = decode(&headers, document("text/plain", "{}")) else { panic!() };
        assert!(m.contains("`data`") && m.contains("text/plain"), "{m}");
        let both = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data_base64":"AA=="}"#;
        assert!(decode(&headers, both.to_vec()).is_err());
        let base64 = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"application/json","data_base64":"eyJhIjogMX0="}"#;
        assert_eq!(decode(&headers, base64.to_vec()).unwrap().data.as_deref(), Some(&br#"{"a": 1}"#[..]));
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    fn structured_document(members: &str) -> Vec<u8> {
        format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t"{members}}}"#).into_bytes()
    }

    #[test]
    fn json_data_deeper_than_the_limit_is_refused_in_both_modes() {
        let structured = binary(&[("content-type", STRUCTURED)]);
        let mut json = binary(&MINIMAL);
        json.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let at_limit = nested(MAX_JSON_DEPTH);
        let past = nested(MAX_JSON_DEPTH + 1);
        assert!(decode(&json, at_limit.clone().into_bytes()).is_ok());
        assert!(decode(&structured, structured_document(&format!(r#","data":{at_limit}"#))).is_ok());
        let Err(Rejection::InvalidEvent(m)) = decode(&json, past.clone().into_bytes()) else { panic!("binary") };
        assert!(m.contains("nested deeper than 127"), "{m}");
        let Err(Rejection::InvalidEvent(m)) = decode(&structured, structured_document(&format!(r#","data":{past}"#))) else {
            panic!("structured")
        };
        assert!(m.contains("nested deeper than 127"), "{m}");
        // Not JSON data: bytes, taken whatever they look like.
        let mut text = binary(&MINIMAL);
        text.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(decode(&text, past.into_bytes()).is_ok());
        // The hash of data at the limit is a JSON hash: whitespace does not count.
        let spaced = format!("{} 1 {}", "[ ".repeat(MAX_JSON_DEPTH), " ]".repeat(MAX_JSON_DEPTH));
        assert_eq!(
            decode(&json, spaced.into_bytes()).unwrap().payload_sha256(),
            decode(&json, at_limit.into_bytes()).unwrap().payload_sha256()
        );
    }

    #[test]
    fn attributes_and_json_data_are_kept_as_the_sender_wrote_them() {
        let mut headers = binary(&MINIMAL);
        headers.insert("ce-type", HeaderValue::from_static("t"));
        headers.insert("ce-time", HeaderValue::from_static("2026-12-01T07:00:00Z"));
        headers.insert("ce-dataschema", HeaderValue::from_static("HTTP://Example.com/a/../schema"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let from_binary = decode(&headers, b"{\n  \"b\": 1, \"a\": 2\n}".to_vec()).unwrap();
        assert_eq!(from_binary.time(), Some("2026-12-01T07:00:00Z"));
        assert_eq!(from_binary.dataschema(), Some("HTTP://Example.com/a/../schema"));
        let document = structured_document(
            r#", "time": "2026-12-01T07:00:00.000Z", "dataschema": "http://example.com/schema",
               "data" : { "b": 1,
                          "a": 2 } "#,
        );
        let from_structured = decode(&binary(&[("content-type", STRUCTURED)]), document).unwrap();
        assert_eq!(from_structured.time(), Some("2026-12-01T07:00:00.000Z"));
        assert_eq!(from_structured.dataschema(), Some("http://example.com/schema"));
        assert_eq!(from_structured.data(), Some(&b"{ \"b\": 1,\n                          \"a\": 2 }"[..]));
        // Spellings of one URL, one instant or one JSON value are one payload.
        assert_eq!(from_structured.payload_sha256(), from_binary.payload_sha256());
        // A URI holds no space (the URL parser would trim it silently).
        let mut spaced = binary(&MINIMAL);
        spaced.insert("ce-dataschema", HeaderValue::from_static("%20http://example.com/schema"));
        let Err(Rejection::InvalidEvent(m)) = decode(&spaced, vec![]) else { panic!("a URI with a space") };
        assert!(m.contains("dataschema") && m.contains("space"), "{m}");
        // Nor the other characters RFC 3986 excludes, which the URL parser
        // would rewrite (`\` into `/`) or percent-encode.
        for (sent, shown) in [("http://e.com/a%5Cb", "'\\\\'"), ("http://e.com/%7Bx%7D", "'{'"), ("http://e.com/a%22", "'\"'")] {
            let mut odd = binary(&MINIMAL);
            odd.insert("ce-dataschema", HeaderValue::from_static(sent));
            let Err(Rejection::InvalidEvent(m)) = decode(&odd, vec![]) else { panic!("{sent} is no URI") };
            assert!(m.contains(shown) && m.contains("RFC 3986"), "{sent}: {m}");
        }
        let mut iri = binary(&MINIMAL);
        iri.insert("ce-dataschema", HeaderValue::from_static("http://e.com/caf%C3%A9"));
        assert_eq!(decode(&iri, vec![]).unwrap().dataschema(), Some("http://e.com/café"));
        // A time that is no RFC 3339 timestamp is still refused.
        // RFC 3339 §5.6 lets a space stand for the `T`: taken, kept as sent.
        let spaced = decode(&binary(&[("content-type", STRUCTURED)]), structured_document(r#","time":"2026-12-01 07:00:00Z""#));
        assert_eq!(spaced.unwrap().time(), Some("2026-12-01 07:00:00Z"));
        // A lone surrogate escape is named as such (serde_json says "hex
        // escape").
        let lone = structured_document(r#","subject":"\ud800""#);
        let Err(Rejection::InvalidEvent(m)) = decode(&binary(&[("content-type", STRUCTURED)]), lone) else { panic!("lone") };
        assert!(m.contains("`subject`") && m.contains("surrogate pair"), "{m}");
        let bad = structured_document(r#","time":"yesterday""#);
        assert!(decode(&binary(&[("content-type", STRUCTURED)]), bad).is_err());
    }

    #[test]
    fn structured_null_data_is_a_payload_and_null_attributes_are_absent() {
        let headers = binary(&[("content-type", STRUCTURED)]);
        let null = decode(&headers, structured_document(r#","data":null,"subject":null,"time":null,"myext":null"#)).unwrap();
        assert_eq!(null.data(), Some(&b"null"[..]));
        assert_eq!((null.subject(), null.time()), (None, None));
        assert!(null.extensions().is_empty());
        let absent = decode(&headers, structured_document("")).unwrap();
        assert_eq!(absent.data(), None);
        assert_ne!(null.payload_sha256(), absent.payload_sha256());
    }

    #[test]
    fn empty_data_is_no_data() {
        let structured = binary(&[("content-type", STRUCTURED)]);
        let mut text = binary(&MINIMAL);
        text.insert("ce-type", HeaderValue::from_static("t"));
        text.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let empty_binary = decode(&text, Vec::new()).unwrap();
        for members in [r#","datacontenttype":"text/plain","data":"""#, r#","datacontenttype":"text/plain","data_base64":"""#] {
            let event = decode(&structured, structured_document(members)).unwrap();
            assert_eq!(event.data(), Some(&b""[..]));
            assert_eq!(event.payload_sha256(), empty_binary.payload_sha256(), "{members}");
        }
    }

    #[test]
    fn repeated_structured_members_are_refused() {
        let headers = binary(&[("content-type", STRUCTURED)]);
        for members in [r#","id":"2""#, r#","data":1,"data":2"#, r#","data_base64":"AA==","data_base64":"AA==""#, r#","x":1,"x":1"#] {
            let Err(Rejection::InvalidEvent(m)) = decode(&headers, structured_document(members)) else { panic!("{members}") };
            assert!(m.contains("more than once"), "{m}");
        }
        let Err(Rejection::InvalidEvent(m)) = decode(&headers, b"[1]".to_vec()) else { panic!() };
        assert!(m.contains("not a JSON object"), "{m}");
    }

    #[test]
    fn structured_mode_reports_bad_json_and_missing_attributes() {
        let headers = binary(&[("content-type", "application/cloudevents+json; charset=utf-8")]);
        let Err(Rejection::InvalidEvent(m)) = decode(&headers, b"{not json".to_vec()) else { panic!() };
        assert!(m.contains("JSON"), "{m}");
        let Err(Rejection::InvalidEvent(m)) = decode(&headers, br#"{"specversion":"1.0","id":"1","type":"t"}"#.to_vec()) else { panic!() };
        assert!(m.contains("`source`"), "{m}");
        let body = br#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"!!"}"#;
        assert!(decode(&headers, body.to_vec()).is_err());
    }
}
