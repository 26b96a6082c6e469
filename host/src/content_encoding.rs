//! `Content-Encoding`: the request body as sent → the body it encodes.
//!
//! Runs on every request body (`POST /` and `POST /dead-letter`) after it
//! was read under the body limit and before [`crate::decode`] looks at it,
//! so the handler, the payload hash and the dead-letter store all see the
//! event's data, never its compressed bytes. The codings are gzip (also
//! `x-gzip`, RFC 9110 §8.4.1.3), deflate (the zlib format, RFC 9110
//! §8.4.1.2; a raw deflate stream, which some senders send as `deflate`
//! all the same, is taken too) and identity, in any case, listed in the
//! order they were applied, in one header (two are refused, as every
//! repeated header that shapes the event: [`crate::decode::single_header`]);
//! any other coding is 415. The decoded body is bounded
//! by the same limit as the body, and decoding stops one byte past it: a
//! small body that inflates to gigabytes costs at most `limit + 1` bytes
//! of memory before it is refused (413).

use std::io::Read;

use flate2::bufread::GzDecoder;
use flate2::bufread::{DeflateDecoder, ZlibDecoder};
use http::HeaderMap;
use http::header::CONTENT_ENCODING;

use crate::rejection::Rejection;
use crate::decode::single_header;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    Deflate,
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The body `headers` say was encoded into `body`, at most `limit` bytes.
pub fn decode_body(headers: &HeaderMap, body: Vec<u8>, limit: usize) -> Result<Vec<u8>, Rejection> {
    let Some(value) = single_header(headers, &CONTENT_ENCODING)? else {
        return Ok(body);
    };
    let value = value
        .to_str()
        .map_err(|_| Rejection::InvalidEvent("the Content-Encoding header is not visible ASCII".into()))?;
    let codings = parse(value)?;
    // No body, nothing encoded: some clients label an empty body with
    // the encoding they would have used.
    if body.is_empty() {
        return Ok(body);
    }
    let mut body = body;
    // Listed in the order they were applied: undone last first.
    for coding in codings.into_iter().rev() {
        body = inflate(coding, &body, limit)?;
    }
    Ok(body)
}

/// The codings of a Content-Encoding value, `identity` left out; every one
/// is checked before anything is decoded. Any other coding is refused, and
/// the 415 lists [`SUPPORTED_ENCODINGS`](crate::rejection::SUPPORTED_ENCODINGS):
/// the codings taken here.
fn parse(value: &str) -> Result<Vec<Coding>, Rejection> {
    let mut codings = Vec::new();
    for name in value.split(',').map(|name| name.trim_matches([' ', '\t'])) {
        match name.to_ascii_lowercase().as_str() {
            "" | "identity" => {}
            "gzip" | "x-gzip" => codings.push(Coding::Gzip),
            "deflate" => codings.push(Coding::Deflate),
            _ => return Err(Rejection::UnsupportedEncoding(name.to_owned())),
        }
    }
    Ok(codings)
}

fn inflate(coding: Coding, body: &[u8], limit: usize) -> Result<Vec<u8>, Rejection> {
    let invalid = |error: std::io::Error| {
        Rejection::InvalidEvent(format!(
            "the request body is not valid {} data (Content-Encoding: {}): {error}",
            coding.name(),
            coding.name()
        ))
    };
    let mut decoded = Vec::new();
    match coding {
        // Member after member (RFC 1952 §2.2: concatenated members are one
        // body); zero bytes after the last member are padding, which
        // `gzip -d` ignores too. Anything else after it is not gzip.
        Coding::Gzip => {
            let mut rest = body;
            while !rest.is_empty() && !rest.iter().all(|byte| *byte == 0) {
                let budget = (limit as u64 + 1).saturating_sub(decoded.len() as u64);
                let mut member = GzDecoder::new(rest);
                (&mut member).take(budget).read_to_end(&mut decoded).map_err(invalid)?;
                if decoded.len() > limit {
                    break;
                }
                let after = member.into_inner();
                if after.len() >= rest.len() {
                    return Err(invalid(std::io::Error::other("a gzip member that ends where it began")));
                }
                rest = after;
            }
        }
        // One stream (RFC 1950, RFC 1951 have no members): bytes after its
        // end are not deflate data, and were silently dropped.
        Coding::Deflate => {
            let rest = if is_zlib(body) {
                let mut stream = ZlibDecoder::new(body);
                (&mut stream).take(limit as u64 + 1).read_to_end(&mut decoded).map_err(invalid)?;
                stream.into_inner()
            } else {
                let mut stream = DeflateDecoder::new(body);
                (&mut stream).take(limit as u64 + 1).read_to_end(&mut decoded).map_err(invalid)?;
                stream.into_inner()
            };
            if decoded.len() <= limit && !rest.is_empty() {
                return Err(invalid(std::io::Error::other(format!("{} bytes after the end of the deflate stream", rest.len()))));
            }
        }
    }
    if decoded.len() > limit {
        return Err(Rejection::DecodedTooLarge { limit, encoding: coding.name() });
    }
    Ok(decoded)
}

/// RFC 1950: a zlib stream starts with a header whose method is deflate
/// (8) and whose two bytes are a multiple of 31.
fn is_zlib(body: &[u8]) -> bool {
    match body {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use http::HeaderValue;

    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn decode(coding: &str, body: Vec<u8>, limit: usize) -> Result<Vec<u8>, Rejection> {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_ENCODING, HeaderValue::from_str(coding).unwrap());
        decode_body(&headers, body, limit)
    }

    #[test]
    fn codings_are_undone_in_reverse_order() {
        let data = b"{\"n\": 1}".repeat(100);
        let mut zlib = ZlibEncoder::new(Vec::new(), Compression::default());
        zlib.write_all(&data).unwrap();
        let zlib = zlib.finish().unwrap();
        let mut raw = DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&data).unwrap();
        let raw = raw.finish().unwrap();
        assert_eq!(decode("gzip", gzip(&data), 1000).unwrap(), data);
        assert_eq!(decode("X-GZip", gzip(&data), 1000).unwrap(), data);
        assert_eq!(decode("identity,gzip , identity", gzip(&data), 1000).unwrap(), data);
        assert_eq!(decode("deflate", zlib.clone(), 1000).unwrap(), data);
        assert_eq!(decode("deflate", raw.clone(), 1000).unwrap(), data);
        assert_eq!(decode("deflate, gzip", gzip(&zlib), 1000).unwrap(), data);
        // A second stream, or anything, after the first is not deflate data
        // (it was dropped: the handler saw the first stream only).
        for trailing in [zlib.clone(), b"TRAILING".to_vec()] {
            let mut two = zlib.clone();
            two.extend(trailing);
            let Err(Rejection::InvalidEvent(m)) = decode("deflate", two, 1000) else { panic!("accepted") };
            assert!(m.contains("after the end of the deflate stream"), "{m}");
        }
        let mut raw_two = raw.clone();
        raw_two.extend(b"x");
        assert!(decode("deflate", raw_two, 1000).is_err());
        assert_eq!(decode("identity", data.clone(), 1000).unwrap(), data);
        assert_eq!(decode_body(&HeaderMap::new(), data.clone(), 1000).unwrap(), data);
        // Concatenated gzip members are one gzip body (RFC 1952 §2.2).
        let mut twice = gzip(b"ab");
        twice.extend(gzip(b"cd"));
        assert_eq!(decode("gzip", twice, 10).unwrap(), b"abcd");
        // Zero padding after the last member is ignored, as `gzip -d` does;
        // other trailing bytes are not gzip.
        let mut padded = gzip(b"ab");
        padded.extend([0u8; 7]);
        assert_eq!(decode("gzip", padded, 10).unwrap(), b"ab");
        let mut trailing = gzip(b"ab");
        trailing.extend(b"xyz");
        assert!(matches!(decode("gzip", trailing, 10), Err(Rejection::InvalidEvent(_))));
        // An empty body labelled with an encoding is an empty body.
        assert_eq!(decode("gzip", Vec::new(), 10).unwrap(), b"");
        assert!(matches!(decode("br", Vec::new(), 10), Err(Rejection::UnsupportedEncoding(_))));
    }

    /// What the 415 says is supported is decoded here.
    #[test]
    fn every_advertised_coding_is_taken() {
        for coding in crate::rejection::SUPPORTED_ENCODINGS.split(", ") {
            assert!(parse(coding).is_ok_and(|codings| codings.len() == 1), "{coding}");
        }
    }

    #[test]
    fn inflating_stops_past_the_limit() {
        let data = vec![0u8; 1001];
        assert_eq!(decode("gzip", gzip(&data[..1000]), 1000).unwrap().len(), 1000);
        assert_eq!(
            decode("gzip", gzip(&data), 1000),
            Err(Rejection::DecodedTooLarge { limit: 1000, encoding: "gzip" })
        );
    }

    #[test]
    fn unknown_and_broken_codings_are_refused() {
        for (coding, named) in [("br", "br"), ("gzip, zstd", "zstd"), ("compress", "compress"), ("gzip;q=1", "gzip;q=1")] {
            assert_eq!(decode(coding, gzip(b"x"), 10), Err(Rejection::UnsupportedEncoding(named.into())), "{coding}");
        }
        let Err(Rejection::InvalidEvent(message)) = decode("gzip", b"plain".to_vec(), 10) else { panic!() };
        assert!(message.contains("gzip"), "{message}");
        let mut cut = gzip(b"some data");
        cut.truncate(cut.len() - 4);
        assert!(matches!(decode("gzip", cut, 100), Err(Rejection::InvalidEvent(_))));
    }

    proptest::proptest! {
        /// Whatever the bytes (compressed or not), decoding never panics,
        /// never returns more than the limit, and refuses only as the
        /// sender's fault; what was compressed comes back as it was.
        #[test]
        fn arbitrary_bodies_are_decoded_or_refused_within_the_limit(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            compress in proptest::prelude::any::<bool>(),
            coding in proptest::sample::select(vec!["gzip", "x-gzip", "deflate", "identity, gzip"]),
            limit in 0usize..3000,
        ) {
            let body = if compress && coding != "deflate" { gzip(&data) } else { data.clone() };
            match decode(coding, body, limit) {
                Ok(decoded) => {
                    proptest::prop_assert!(decoded.len() <= limit);
                    if compress && coding != "deflate" {
                        proptest::prop_assert_eq!(decoded, data);
                    }
                }
                Err(Rejection::InvalidEvent(_)) => {}
                Err(Rejection::DecodedTooLarge { limit: said, .. }) => {
                    proptest::prop_assert_eq!(said, limit);
                    proptest::prop_assert!(!compress || coding == "deflate" || data.len() > limit);
                }
                Err(other) => proptest::prop_assert!(false, "refused as {other:?}"),
            }
        }
    }

    #[test]
    fn a_repeated_content_encoding_is_refused() {
        // RFC 9110 would read two lines as one list; exactly refuses every
        // repeated header that shapes the event instead of guessing.
        let mut headers = HeaderMap::new();
        headers.append(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        headers.append(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let Err(Rejection::InvalidEvent(message)) = decode_body(&headers, gzip(b"x"), 10) else { panic!() };
        assert!(message.contains("content-encoding") && message.contains("more than once"), "{message}");
    }
}
