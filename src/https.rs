//! The process's HTTPS client, and the certificate authorities it trusts: the system's,
//! or instead those of the PEM file `aws.ca_bundle` names, else `AWS_CA_BUNDLE` (as the
//! AWS CLI and the other SDKs read it), for a TLS-inspecting proxy, a VPC endpoint or an
//! S3-compatible store behind a private CA. The bundle is checked here, certificate by
//! certificate, because the SDK's TLS setup panics on one it cannot parse.

use crate::error::{Error, Result};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};

/// A bundle larger than this is not a list of CAs (the system's whole store is ~200 KiB).
const MAX_BUNDLE_BYTES: u64 = 16 << 20;

/// The CA bundle trusted instead of the system's CAs, named as the user set it.
#[derive(Debug, Clone, PartialEq)]
pub struct CaBundle {
    /// The setting that named the file, for error messages.
    pub source: &'static str,
    /// The PEM file.
    pub path: PathBuf,
}

impl CaBundle {
    /// `aws.ca_bundle` if set, else `$AWS_CA_BUNDLE` if set and not empty.
    pub fn chosen(configured: Option<&Path>) -> Option<CaBundle> {
        if let Some(path) = configured {
            return Some(CaBundle {
                source: "aws.ca_bundle",
                path: path.to_path_buf(),
            });
        }
        std::env::var_os("AWS_CA_BUNDLE")
            .filter(|value| !value.is_empty())
            .map(|value| CaBundle {
                source: "AWS_CA_BUNDLE",
                path: PathBuf::from(value),
            })
    }

    /// The bundle's certificates, each as its own PEM block, those a TLS verifier can
    /// use as a trust anchor: one it refuses is left out with a warning (as the SDK does
    /// with the system's store), and a bundle with none is an error.
    pub fn read(&self) -> Result<Vec<Vec<u8>>> {
        let unusable = |why: String| {
            Error::Usage(format!(
                "{} = {}: {why}; name a PEM file of CA certificates, or unset it to trust the system's CAs",
                self.source,
                self.path.display()
            ))
        };
        let file = std::fs::File::open(&self.path).map_err(|e| unusable(e.to_string()))?;
        let mut text = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_BUNDLE_BYTES + 1),
            &mut text,
        )
        .map_err(|e| unusable(e.to_string()))?;
        if text.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(unusable(format!(
                "larger than {} MiB",
                MAX_BUNDLE_BYTES >> 20
            )));
        }
        let mut anchors = Vec::new();
        let mut refused = Vec::new();
        for (index, block) in pem_blocks(&text).enumerate() {
            let mut store = rustls::RootCertStore::empty();
            match CertificateDer::from_pem_slice(block) {
                Ok(der) => match store.add(der) {
                    Ok(()) => anchors.push(block.to_vec()),
                    Err(e) => refused.push(format!("certificate {}: {e}", index + 1)),
                },
                Err(e) => refused.push(format!("certificate {}: {e}", index + 1)),
            }
        }
        if anchors.is_empty() {
            return Err(unusable(match refused.first() {
                Some(why) => format!("holds no certificate a TLS verifier can use ({why})"),
                None => "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string(),
            }));
        }
        if !refused.is_empty() {
            tracing::warn!(
                bundle = %self.path.display(),
                left_out = %refused.join("; "),
                "CA bundle: certificates left out"
            );
        }
        Ok(anchors)
    }
}

/// Each `-----BEGIN CERTIFICATE-----` … `-----END CERTIFICATE-----` block of `text`.
fn pem_blocks(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let find = |haystack: &[u8], needle: &[u8]| {
        haystack
            .windows(needle.len())
            .position(|window| window == needle)
    };
    let mut rest = text;
    std::iter::from_fn(move || {
        let start = find(rest, BEGIN)?;
        let Some(end) = find(&rest[start..], END).map(|at| start + at + END.len()) else {
            // An unterminated block is still one the caller reports.
            let block = &rest[start..];
            rest = &[];
            return Some(block);
        };
        let block = &rest[start..end];
        rest = &rest[end..];
        Some(block)
    })
}

/// The one HTTPS client every SDK client of the process shares (rustls with aws-lc-rs,
/// proxies from the environment, as the SDK's default), trusting the system's CAs, or
/// `bundle`'s instead. Shared, so that a client per stream (each data endpoint has its
/// own) adds no TLS configuration, root store or connection pool of its own: the SDK's
/// default builds all three for every client.
pub fn client(bundle: Option<Vec<Vec<u8>>>) -> Result<SharedHttpClient> {
    let trust = match bundle {
        Some(anchors) => anchors
            .into_iter()
            .fold(TrustStore::empty(), TrustStore::with_pem_certificate),
        None => TrustStore::default(),
    };
    let context = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| Error::Usage(format!("the TLS settings: {e}")))?;
    Ok(
        Builder::new().build_with_connector_fn(move |settings, components| {
            let mut connector = ConnectorBuilder::default()
                .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
                .tls_context(context.clone());
            connector.set_connector_settings(settings.cloned());
            if let Some(components) = components {
                connector.set_sleep_impl(components.sleep_impl());
            }
            connector.set_proxy_config(Some(ProxyConfig::from_env()));
            connector.build()
        }),
    )
}
