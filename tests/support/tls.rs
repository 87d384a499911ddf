//! TLS in front of the test servers, as AWS's endpoints are: a throwaway CA made with
//! `openssl` (the tool every Debian machine has with ca-certificates), a certificate for
//! 127.0.0.1 it signed, and a listener that ends TLS and forwards the bytes to a plain
//! server on loopback. The client trusts the CA the way a user's CA bundle is trusted
//! (`aws.ca_bundle` or AWS_CA_BUNDLE), never by turning verification off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_rustls::rustls;

/// A CA that lives as long as its directory, and the server certificate it signed.
pub struct ThrowawayCa {
    _dir: tempfile::TempDir,
    /// The CA's certificate: what a client's bundle holds.
    pub ca_pem: PathBuf,
    cert_pem: PathBuf,
    key_pem: PathBuf,
}

/// Runs `openssl` with `args` in `dir`; the error says what failed.
fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl cannot run ({e}): apt-get install -y openssl"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A new CA (ECDSA P-256, valid two days) and a certificate for 127.0.0.1 and localhost.
pub fn throwaway_ca() -> Result<ThrowawayCa, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(p256);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=kvs-archiver throwaway test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir.path(), &ca)?;
    let mut request = vec!["req"];
    request.extend(p256);
    request.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir.path(), &request)?;
    std::fs::write(
        dir.path().join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    openssl(
        dir.path(),
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    )?;
    Ok(ThrowawayCa {
        ca_pem: dir.path().join("ca.pem"),
        cert_pem: dir.path().join("server.pem"),
        key_pem: dir.path().join("server.key"),
        _dir: dir,
    })
}

/// A TLS listener on 127.0.0.1 forwarding to a plain server.
pub struct TlsFront {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The cipher suite of the last handshake (rustls's name), to show which AEAD ran.
    pub cipher: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves TLS with `ca`'s server certificate on a new port of 127.0.0.1, each connection
/// forwarded to `backend` (a plain `http://127.0.0.1:PORT` URL).
pub async fn serve(ca: &ThrowawayCa, backend: &str) -> TlsFront {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the TLS front");
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca.cert_pem)
        .expect("server certificate")
        .collect::<Result<_, _>>()
        .expect("server certificate parses");
    let key = PrivateKeyDer::from_pem_file(&ca.key_pem).expect("server key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate and key match");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let backend: SocketAddr = backend
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("a plain http://127.0.0.1:PORT backend");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
    let cipher: Arc<Mutex<Option<String>>> = Arc::default();
    let seen = cipher.clone();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                // A client that gives up mid-handshake (a refused certificate) is not an
                // error of the front.
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                if let Some(suite) = tls.get_ref().1.negotiated_cipher_suite() {
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(format!("{:?}", suite.suite()));
                }
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = plain.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    TlsFront { url, cipher, task }
}
