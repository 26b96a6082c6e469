//! The delivered CloudEvent.

use serde::de::DeserializeOwned;

use crate::Error;
use crate::bindings::exactly::handler::types as wit_types;

/// The CloudEvent being handled.
///
/// The host has already validated it (required attributes present, spec
/// version 1.0) and claimed its `(source, id)`: a handler sees each event
/// at most once per commit, so it does not deduplicate by itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    inner: wit_types::Event,
}

impl Event {
    pub(crate) fn from_wit(inner: wit_types::Event) -> Self {
        Event { inner }
    }

    /// The `id` attribute: unique within [`source`](Event::source). Together
    /// they identify the event; record both when you keep a history.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The `source` attribute.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The `type` attribute, which selected this handler (`type` is a Rust
    /// keyword).
    pub fn ty(&self) -> &str {
        &self.inner.type_
    }

    /// The `specversion` attribute (always "1.0" today).
    pub fn specversion(&self) -> &str {
        &self.inner.specversion
    }

    pub fn subject(&self) -> Option<&str> {
        self.inner.subject.as_deref()
    }

    /// The `time` attribute as sent, RFC 3339 text.
    pub fn time(&self) -> Option<&str> {
        self.inner.time.as_deref()
    }

    pub fn datacontenttype(&self) -> Option<&str> {
        self.inner.datacontenttype.as_deref()
    }

    pub fn dataschema(&self) -> Option<&str> {
        self.inner.dataschema.as_deref()
    }

    /// An extension attribute by name (CloudEvents names are lower case;
    /// the lookup ignores case), its value as text.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.inner
            .extensions
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// All extension attributes, as `(name, value)`.
    pub fn extensions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.inner
            .extensions
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
    }

    /// The payload bytes: in binary mode the HTTP body, in structured mode
    /// the `data` member's JSON text exactly as the sender wrote it (a
    /// string's text for a media type that is not JSON; `null` for an
    /// explicit null payload), or the decoded `data_base64`.
    pub fn data(&self) -> Option<&[u8]> {
        self.inner.data.as_deref()
    }

    /// The payload parsed as JSON into `T`.
    ///
    /// A missing payload or one that does not fit `T` is bad data that no
    /// retry can fix, so the error is [`Error::permanent`] (the event goes to
    /// the dead-letter sink) and says what is wrong, e.g. ``missing field
    /// `order_id` ``. The `datacontenttype` is not checked: a payload that
    /// parses is accepted.
    pub fn data_json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let data = self.data().ok_or_else(|| {
            Error::permanent(format!(
                "event {} has no data; a JSON document is expected",
                self.id()
            ))
        })?;
        serde_json::from_slice(data).map_err(|error| {
            let problem = match error.classify() {
                serde_json::error::Category::Data => {
                    format!("does not fit {}", std::any::type_name::<T>())
                }
                _ => "is not valid JSON".to_owned(),
            };
            Error::permanent(format!(
                "the data of event {} {problem}: {error}",
                self.id()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn event(data: Option<&str>) -> Event {
        Event::from_wit(wit_types::Event {
            id: "e-1".into(),
            source: "/test".into(),
            type_: "order.created".into(),
            specversion: "1.0".into(),
            subject: None,
            time: None,
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            extensions: vec![("traceparent".into(), "00-abc".into())],
            data: data.map(|text| text.as_bytes().to_vec()),
        })
    }

    #[derive(serde::Deserialize, Debug)]
    struct Order {
        #[allow(dead_code)]
        order_id: String,
    }

    #[test]
    fn data_json_fails_permanently_and_says_why() {
        let missing = event(None).data_json::<Order>().unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::Permanent);
        assert!(missing.message().contains("no data"), "{missing}");

        let wrong = event(Some("{}")).data_json::<Order>().unwrap_err();
        assert_eq!(wrong.kind(), ErrorKind::Permanent);
        assert!(wrong.message().contains("order_id"), "{wrong}");

        let invalid = event(Some("{"))
            .data_json::<serde_json::Value>()
            .unwrap_err();
        assert!(invalid.is_permanent());

        assert!(
            event(Some(r#"{"order_id":"o"}"#))
                .data_json::<Order>()
                .is_ok()
        );
    }

    #[test]
    fn extensions_ignore_case() {
        let event = event(None);
        assert_eq!(event.extension("TraceParent"), Some("00-abc"));
        assert_eq!(event.extension("missing"), None);
        assert_eq!(event.ty(), "order.created");
    }
}
