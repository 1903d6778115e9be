//! TLS on the ports (`server.tls`: HTTP and gRPC, client certificates
//! optional, files reloaded when they change) and for the connections the
//! gateway opens itself (`upstreams[].tls`, `model_repository.shadows[].tls`:
//! a CA to trust, and a client certificate for mTLS). rustls throughout.
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// `server.tls`: the ports speak TLS only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// With this CA file (PEM), clients must present a certificate it
    /// signed (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for a change.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
}

/// How often the files are checked for a change, unless configured.
pub const DEFAULT_RELOAD_MS: u64 = 2000;

fn default_reload_ms() -> u64 {
    DEFAULT_RELOAD_MS
}

/// TLS for a connection the gateway opens (an upstream, a remote shadow).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// The CA (PEM) the server's certificate must chain to (default: the
    /// webpki roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for servers that ask for one (mTLS);
    /// needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// The certificates of a PEM file; `setting` names it in errors.
pub fn read_certs(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    parse_certs(&read_bytes(path, setting)?, path, setting)
}

/// The certificates of `pem`, read from `path`.
fn parse_certs(
    pem: &[u8],
    path: &Path,
    setting: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{setting} {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path, setting: &str) -> Result<PrivateKeyDer<'static>, String> {
    parse_key(&read_bytes(path, setting)?, path, setting)
}

fn parse_key(pem: &[u8], path: &Path, setting: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("{setting} {}: {e}", path.display()))
}

fn read_bytes(path: &Path, setting: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{setting} {}: {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration trusting `ca` (the webpki roots when `None`) and
/// presenting `identity` (a certificate chain and its key) to servers that
/// ask for one; `at` names the setting in errors.
pub fn client_config(
    ca: Option<Vec<CertificateDer<'static>>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    at: &str,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certs) => {
            for c in certs {
                roots.add(c).map_err(|e| format!("{at}: {e}"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match identity {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("{at}: the key does not fit the certificate: {e}")),
        None => Ok(builder.with_no_client_auth()),
    }
}

impl ServerTlsConfig {
    /// Builds the rustls configuration with the given ALPN protocols.
    fn build(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, String> {
        let certs = read_certs(&self.cert_file, "server.tls.cert_file")?;
        let key = read_key(&self.key_file, "server.tls.key_file")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca, "server.tls.client_ca_file")? {
                    roots
                        .add(c)
                        .map_err(|e| format!("server.tls.client_ca_file {}: {e}", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| format!("server.tls.client_ca_file {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("server.tls: the key does not fit the certificate: {e}"))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// The files' modification times and sizes: a change in any reloads.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        [
            Some(&self.cert_file),
            Some(&self.key_file),
            self.client_ca_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
    }
}

/// The two configurations a server hands out: HTTP (h2 and http/1.1) and
/// gRPC (h2 only).
struct Current {
    http: Arc<rustls::ServerConfig>,
    grpc: Arc<rustls::ServerConfig>,
}

/// Server TLS whose certificate, key and client CA are read again when
/// their files change; a connection takes what is current when it starts.
#[derive(Clone)]
pub struct ServerTls {
    config: ServerTlsConfig,
    current: Arc<RwLock<Current>>,
}

/// Which port a connection came to.
#[derive(Clone, Copy)]
pub enum Port {
    Http,
    Grpc,
}

impl ServerTls {
    /// Reads the files; an unreadable one fails the start, naming it.
    pub fn load(config: ServerTlsConfig) -> Result<Self, String> {
        let current = Self::read(&config)?;
        Ok(Self {
            config,
            current: Arc::new(RwLock::new(current)),
        })
    }

    fn read(config: &ServerTlsConfig) -> Result<Current, String> {
        Ok(Current {
            http: Arc::new(config.build(&[b"h2", b"http/1.1"])?),
            grpc: Arc::new(config.build(&[b"h2"])?),
        })
    }

    /// The acceptor for a new connection to `port`.
    pub fn acceptor(&self, port: Port) -> tokio_rustls::TlsAcceptor {
        let current = self.current.read().expect("TLS config lock");
        tokio_rustls::TlsAcceptor::from(match port {
            Port::Http => current.http.clone(),
            Port::Grpc => current.grpc.clone(),
        })
    }

    /// Checks the files every `reload_interval_ms`, forever; a changed set
    /// that does not load (a key written before its certificate, say) keeps
    /// the old one in service and is tried again at the next change.
    pub async fn watch(self) {
        let every = Duration::from_millis(self.config.reload_interval_ms.max(100));
        let mut seen = self.config.stamp();
        loop {
            tokio::time::sleep(every).await;
            let now = self.config.stamp();
            if now == seen {
                continue;
            }
            seen = now;
            let config = self.config.clone();
            match tokio::task::spawn_blocking(move || Self::read(&config)).await {
                Ok(Ok(fresh)) => {
                    *self.current.write().expect("TLS config lock") = fresh;
                    metrics::counter!("switchyard:tls_reloads_total", "outcome" => "ok")
                        .increment(1);
                    tracing::info!(cert = %self.config.cert_file.display(), "TLS certificate reloaded");
                }
                Ok(Err(e)) => {
                    metrics::counter!("switchyard:tls_reloads_total", "outcome" => "error")
                        .increment(1);
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate");
                }
                Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
            }
        }
    }
}

impl ClientTlsConfig {
    /// Checks that the files load and the key fits the certificate; `at`
    /// names the setting.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        self.rustls(at).map(drop)
    }

    /// The CA and client identity PEM bytes, each file read once and
    /// checked to hold what it should.
    #[allow(clippy::type_complexity)]
    fn pem(&self, at: &str) -> Result<(Option<Vec<u8>>, Option<(Vec<u8>, Vec<u8>)>), String> {
        let certs = |p: &Path, setting: String| {
            let pem = read_bytes(p, &setting)?;
            parse_certs(&pem, p, &setting).map(|_| pem)
        };
        let ca = match &self.ca_file {
            Some(p) => Some(certs(p, format!("{at}.ca_file"))?),
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => {
                let setting = format!("{at}.key_file");
                let key = read_bytes(k, &setting)?;
                parse_key(&key, k, &setting)?;
                Some((certs(c, format!("{at}.cert_file"))?, key))
            }
            (None, None) => None,
            _ => return Err(format!("{at}: cert_file and key_file go together")),
        };
        Ok((ca, identity))
    }

    /// The rustls configuration: the CA (or the webpki roots) and the identity.
    pub fn rustls(&self, at: &str) -> Result<rustls::ClientConfig, String> {
        let (ca, identity) = self.pem(at)?;
        let ca = match (ca, &self.ca_file) {
            (Some(pem), Some(p)) => Some(parse_certs(&pem, p, &format!("{at}.ca_file"))?),
            _ => None,
        };
        let identity = match (identity, &self.cert_file, &self.key_file) {
            (Some((cert, key)), Some(c), Some(k)) => Some((
                parse_certs(&cert, c, &format!("{at}.cert_file"))?,
                parse_key(&key, k, &format!("{at}.key_file"))?,
            )),
            _ => None,
        };
        client_config(ca, identity, at)
    }

    /// tonic's client TLS: the CA (or the webpki roots) and the identity.
    pub fn tonic(&self, at: &str) -> Result<tonic::transport::ClientTlsConfig, String> {
        let (ca, identity) = self.pem(at)?;
        let mut tls = tonic::transport::ClientTlsConfig::new();
        tls = match ca {
            Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            None => tls.with_webpki_roots(),
        };
        if let Some((cert, key)) = identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        Ok(tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let cfg = ServerTlsConfig {
            cert_file: "/nonexistent/cert.pem".into(),
            key_file: "/nonexistent/key.pem".into(),
            client_ca_file: None,
            reload_interval_ms: 2000,
        };
        let err = ServerTls::load(cfg).err().unwrap();
        assert!(
            err.contains("server.tls.cert_file /nonexistent/cert.pem"),
            "{err}"
        );
        let client = ClientTlsConfig {
            ca_file: None,
            cert_file: Some("/nonexistent/c.pem".into()),
            key_file: None,
        };
        let err = client.validate("upstreams[0].tls").unwrap_err();
        assert_eq!(err, "upstreams[0].tls: cert_file and key_file go together");
    }

    #[test]
    fn a_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        let err = read_certs(&p, "server.tls.client_ca_file").unwrap_err();
        assert!(err.ends_with("no certificate in the file"), "{err}");
    }
}
