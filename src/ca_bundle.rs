//! The process's HTTPS client, and the certificate authorities it trusts besides the
//! system's: a TLS-inspecting proxy, a VPC endpoint or an S3-compatible store behind a
//! private CA. Read from `aws.ca_bundle`, else
//! from `AWS_CA_BUNDLE` as the AWS CLI and the other SDKs read it, and checked here,
//! because the SDK's TLS setup panics on a certificate it cannot parse.

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

/// Where the extra CAs come from, named as the user set them.
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

    /// The bundle's certificates, each parsed as a trust anchor, so that none can fail
    /// later inside the SDK.
    pub fn read(&self) -> Result<Vec<u8>> {
        let unusable = |why: String| {
            Error::Usage(format!(
                "{} = {}: {why}; name a PEM file of CA certificates, or unset it to trust the system's CAs only",
                self.source,
                self.path.display()
            ))
        };
        let file = std::fs::File::open(&self.path).map_err(|e| unusable(e.to_string()))?;
        let mut pem = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_BUNDLE_BYTES + 1),
            &mut pem,
        )
        .map_err(|e| unusable(e.to_string()))?;
        if pem.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(unusable(format!(
                "larger than {} MiB",
                MAX_BUNDLE_BYTES >> 20
            )));
        }
        let mut anchors = rustls::RootCertStore::empty();
        for (index, item) in CertificateDer::pem_slice_iter(&pem).enumerate() {
            let der = item.map_err(|e| unusable(format!("certificate {}: {e}", index + 1)))?;
            anchors
                .add(der)
                .map_err(|e| unusable(format!("certificate {}: {e}", index + 1)))?;
        }
        if anchors.is_empty() {
            return Err(unusable(
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string(),
            ));
        }
        Ok(pem)
    }
}

/// The one HTTPS client every SDK client of the process shares (rustls with aws-lc-rs,
/// proxies from the environment, as the SDK's default), trusting the system's CAs and
/// `extra`'s. Shared, so that a client per stream (each data endpoint has its own) adds no
/// TLS configuration, root store or connection pool of its own: the SDK's default builds
/// all three for every client.
pub fn https_client(extra: Option<Vec<u8>>) -> Result<SharedHttpClient> {
    let trust = match extra {
        Some(pem) => TrustStore::default().with_pem_certificate(pem),
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
