//! The HTTP client of `exactly dlq replay` and of the OTLP exporter, for
//! `http://` and `https://` alike: rustls (ring), the server checked
//! against the public web roots built into the binary (a static image has
//! no system store) plus, when given, the CA certificates of a PEM file of
//! the operator's (an in-cluster CA, say). HTTP/1.1 only.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// What the client connects through: plain TCP for `http://`, TLS for
/// `https://`.
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A client for `http://` and `https://` URLs whose servers must chain to
/// the built-in web roots or to a certificate of `ca_file` (PEM, one or
/// more `CERTIFICATE` blocks).
///
/// Errors: `ca_file` cannot be read or holds no certificate.
pub fn client(ca_file: Option<&Path>) -> anyhow::Result<Client<Connector, Full<Bytes>>> {
    let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certificates = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("cannot read the CA file {}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("the CA file {} is not PEM certificates", path.display()))?;
        if certificates.is_empty() {
            anyhow::bail!("the CA file {} holds no certificate", path.display());
        }
        for certificate in certificates {
            roots.add(certificate).with_context(|| format!("a certificate of {} is not one a client can trust", path.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
