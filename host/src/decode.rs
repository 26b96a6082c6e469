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
        CloudEvent {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            subject: subject.map(Into::into),
            time: None,
            datacontenttype: datacontenttype.map(Into::into),
            dataschema: None,
            extensions: extensions.iter().map(|(n, v)| ((*n).into(), (*v).into())).collect(),
            data: data.map(<[u8]>::to_vec),
        }
    }
}

pub const SPEC_VERSION: &str = "1.0";
const STRUCTURED: &str = "application/cloudevents+json";
const BATCHED: &str = "application/cloudevents-batch+json";
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
            "time" => builder.time(value),
            "dataschema" => {
                let url = url::Url::parse(&value)
                    .map_err(|e| invalid(format!("attribute `dataschema` is not an absolute URI ({e})")))?;
                dataschema = Some(url);
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
    event.set_dataschema(dataschema);
    if !body.is_empty() {
        event.set_data_unchecked(Data::Binary(body));
    }
    for (name, value) in extensions {
        event.set_extension(&name, value);
    }
    Ok(from_sdk(event))
}

fn decode_structured(body: &[u8]) -> Result<CloudEvent, Rejection> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("malformed structured CloudEvent: the body is not valid JSON ({e})")))?;
    let serde_json::Value::Object(mut map) = value else {
        return Err(invalid("malformed structured CloudEvent: the body is not a JSON object"));
    };
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
        if !REQUIRED.contains(&name.as_str()) && !OPTIONAL.contains(&name.as_str()) && name != "data_base64" {
            check_extension_name(name)?;
        }
    }
    // The data is read here, not by cloudevents-sdk: it decides "is this
    // JSON" by the exact text of datacontenttype (`+json` with a
    // parameter, or `APPLICATION/JSON`, are not JSON to it).
    let datacontenttype = map.get("datacontenttype").and_then(|v| v.as_str()).map(str::to_owned);
    let data = match (map.remove("data"), map.remove("data_base64")) {
        (Some(_), Some(_)) => return Err(invalid("a structured CloudEvent has `data` or `data_base64`, not both")),
        (Some(value), None) => Some(structured_data(value, datacontenttype.as_deref())?),
        (None, Some(serde_json::Value::String(text))) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| invalid(format!("attribute `data_base64` is not valid base64 ({e})")))?;
            Some(bytes)
        }
        (None, Some(_)) => return Err(invalid("attribute `data_base64` must be a string (base64)")),
        (None, None) => None,
    };
    let event: cloudevents::Event = serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| invalid(format!("invalid structured CloudEvent: {e}")))?;
    Ok(CloudEvent { data, ..from_sdk(event) })
}

/// A structured event's `data` member as bytes: JSON text when the media
/// type is JSON (every `*/json` and `*/*+json`, any case, any parameters)
/// or absent (the JSON event format's default); otherwise the member must
/// be a string, and its text is the data.
fn structured_data(value: serde_json::Value, datacontenttype: Option<&str>) -> Result<Vec<u8>, Rejection> {
    match (value, datacontenttype) {
        (value, None) => Ok(value.to_string().into_bytes()),
        (value, Some(media_type)) if media_type::is_json(media_type) => Ok(value.to_string().into_bytes()),
        (serde_json::Value::String(text), Some(_)) => Ok(text.into_bytes()),
        (_, Some(media_type)) => Err(invalid(format!(
            "attribute `data` must be a string: datacontenttype {media_type:?} is not a JSON media type \
             (send JSON data with a JSON media type, or other bytes as `data_base64`)"
        ))),
    }
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
        let content_type = Some(media_type::canonical(self.datacontenttype.as_deref().unwrap_or("application/json")));
        let json = self.datacontenttype.as_deref().is_none_or(media_type::is_json);
        self.payload_digest(Some(PAYLOAD_FORMAT), content_type.as_deref(), json)
    }

    /// The payload hash as `exactly` computed it before media types were
    /// compared as media types: the Content-Type text as sent, any data
    /// that parses as JSON in canonical form. A record stored by such a
    /// version holds this hash; the dedup transaction accepts it too, so
    /// that a redelivery across the upgrade is still a replay. Needed until
    /// every such record has expired (`--retention`).
    pub fn legacy_payload_sha256(&self) -> [u8; 32] {
        self.payload_digest(None, self.datacontenttype.as_deref(), true)
    }

    fn payload_digest(&self, format: Option<u8>, content_type: Option<&str>, json: bool) -> [u8; 32] {
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
        field(self.dataschema.as_deref().map(str::as_bytes));
        let canonical = self.data.as_deref().filter(|_| json).and_then(|bytes| {
            serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .map(|v| v.to_string().into_bytes())
        });
        field(canonical.as_deref().or(self.data.as_deref()));
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

fn check_required_values(id: &str, source: &str, ty: &str) -> Result<(), Rejection> {
    for (name, value) in [("id", id), ("source", source), ("type", ty)] {
        if value.is_empty() {
            return Err(invalid(format!("attribute `{name}` must not be empty")));
        }
        if value.chars().any(char::is_control) {
            return Err(invalid(format!("attribute `{name}` contains control characters")));
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
        let mut changed = from_structured.clone();
        changed.data = Some(br#"{"a":[1,2],"b":2}"#.to_vec());
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
            assert_eq!(event.data.as_deref(), Some(&br#"{"b":[1,2]}"#[..]), "{json}");
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
