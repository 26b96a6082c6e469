//! What a handler returns on success: [`Outcome`] and its optional [`Reply`].

use serde::Serialize;

use crate::Error;
use crate::bindings::exactly::handler::types as wit_types;

/// A processed event: a JSON result for the audit trail and at most one
/// reply event.
///
/// The result is stored with the event's claim in the same transaction; it
/// is not the HTTP body. Without a reply the host answers 202 with an empty
/// body; with one it answers 200 with the reply as a binary-mode CloudEvent,
/// which the Knative broker publishes (and routes through its Triggers like
/// any event). A redelivery of the event gets the same answer replayed.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Serialization is deferred to the end of `handle` so the builder stays
    /// infallible; a failure there becomes a permanent error.
    result: Result<String, String>,
    reply: Option<Reply>,
}

impl Outcome {
    /// An outcome whose result is this JSON document.
    pub fn json(result: serde_json::Value) -> Self {
        Outcome {
            result: Ok(result.to_string()),
            reply: None,
        }
    }

    /// An outcome whose result is any `Serialize` value, as JSON.
    ///
    /// If `serde` cannot represent it as JSON (a map with non-string keys,
    /// say), the event fails permanently when the handler returns.
    pub fn new(result: impl Serialize) -> Self {
        Outcome {
            result: serde_json::to_string(&result).map_err(|error| error.to_string()),
            reply: None,
        }
    }

    /// Adds the reply event (at most one: Knative carries one reply per
    /// delivery; a second call replaces the first).
    pub fn with_reply(mut self, reply: Reply) -> Self {
        self.reply = Some(reply);
        self
    }

    pub(crate) fn into_wit(self) -> Result<wit_types::Outcome, Error> {
        let result = self.result.map_err(|error| {
            Error::permanent(format!(
                "the handler's result is not representable as JSON: {error}"
            ))
        })?;
        let reply = self.reply.map(Reply::into_wit).transpose()?;
        Ok(wit_types::Outcome { result, reply })
    }
}

/// A follow-up event, answered as the Knative reply.
///
/// The host gives it an `id` derived deterministically from the incoming
/// event's `(source, id)`, so a redelivery that replays the answer replies
/// with the very same event and consumers can deduplicate it; it sets `time`
/// and `specversion` too. It is stored in the same transaction as the
/// handler's writes: a reply exists if and only if the event committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    ty: String,
    source: Option<String>,
    subject: Option<String>,
    datacontenttype: Option<String>,
    data: Option<Result<Vec<u8>, String>>,
    extensions: Vec<(String, String)>,
}

impl Reply {
    /// A reply of this CloudEvent `type`, without data yet.
    pub fn new(ty: impl Into<String>) -> Self {
        Reply {
            ty: ty.into(),
            source: None,
            subject: None,
            datacontenttype: None,
            data: None,
            extensions: Vec::new(),
        }
    }

    /// Sets the data to `data` serialized as JSON, content type
    /// `application/json`. (A failure to serialize fails the event
    /// permanently when the handler returns.)
    pub fn data_json(mut self, data: &impl Serialize) -> Self {
        self.data = Some(serde_json::to_vec(data).map_err(|error| error.to_string()));
        self.datacontenttype = Some("application/json".to_owned());
        self
    }

    /// Sets raw data bytes with their content type. The content type is
    /// sent as the reply's `Content-Type` header: one that is not visible
    /// ASCII, or that names a CloudEvents event format
    /// (`application/cloudevents+json`, …: the broker would read the data
    /// as the event), fails the event with 422 `bad-outcome`, as does a
    /// reply attribute holding a control character.
    pub fn data(mut self, content_type: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.data = Some(Ok(data.into()));
        self.datacontenttype = Some(content_type.into());
        self
    }

    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Overrides the `source`, which by default names the handler
    /// (`/exactly/<handler name>`).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Adds an extension attribute. The host refuses (422 `bad-outcome`) a
    /// name that is not lower-case ASCII letters and digits, or that is a
    /// CloudEvents context attribute (`id`, `source`, `type`, …). It does
    /// not check the length: CloudEvents only advises names of at most 20
    /// characters, so keep to that for other consumers.
    pub fn extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extensions.push((name.into(), value.into()));
        self
    }

    fn into_wit(self) -> Result<wit_types::EmittedEvent, Error> {
        let data = self.data.transpose().map_err(|error| {
            Error::permanent(format!(
                "the reply's data is not representable as JSON: {error}"
            ))
        })?;
        Ok(wit_types::EmittedEvent {
            type_: self.ty,
            source: self.source,
            subject: self.subject,
            datacontenttype: self.datacontenttype,
            data,
            extensions: self.extensions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn converts_to_the_wit_outcome() {
        let outcome = Outcome::json(serde_json::json!({"status": "created"})).with_reply(
            Reply::new("order.accepted")
                .data_json(&serde_json::json!({"order_id": "o-1"}))
                .subject("o-1")
                .extension("traceparent", "00-abc"),
        );
        let wit = outcome.into_wit().unwrap();
        assert_eq!(wit.result, r#"{"status":"created"}"#);
        let reply = wit.reply.unwrap();
        assert_eq!(reply.type_, "order.accepted");
        assert_eq!(reply.data.as_deref(), Some(&br#"{"order_id":"o-1"}"#[..]));
        assert_eq!(reply.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(reply.subject.as_deref(), Some("o-1"));
        assert_eq!(reply.source, None);
    }

    #[test]
    fn unserializable_results_fail_permanently() {
        let mut map = BTreeMap::new();
        map.insert((1, 2), "tuple keys are not JSON");
        let error = Outcome::new(&map).into_wit().unwrap_err();
        assert!(error.is_permanent());
        let error = Outcome::new("ok")
            .with_reply(Reply::new("t").data_json(&map))
            .into_wit()
            .unwrap_err();
        assert!(error.is_permanent());
    }
}
