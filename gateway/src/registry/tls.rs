//! TLS under the PostgreSQL client: rustls, verifying the server's
//! certificate and name against a CA file (`registry.database_ca`) or the
//! webpki roots. Used when the URL says `sslmode=require`.
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use postgres::Socket;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Makes a verified TLS connection per PostgreSQL connection.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
}

impl Tls {
    /// Trusts the certificates of the PEM file `ca`, or the webpki roots.
    pub fn new(ca: Option<&Path>) -> Result<Self, String> {
        let (certs, at) = match ca {
            Some(path) => (
                Some(crate::tls::read_certs(path, "registry.database_ca")?),
                format!("registry.database_ca {}", path.display()),
            ),
            None => (None, "registry.database_ca".to_string()),
        };
        let config = crate::tls::client_config(certs, None, &at)?;
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// Whether a PostgreSQL URL asks for TLS (`sslmode=require`).
pub fn required(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|kv| kv.eq_ignore_ascii_case("sslmode=require"))
    })
}

impl MakeTlsConnect<Socket> for Tls {
    type Stream = Stream;
    type TlsConnect = Connect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<Connect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Connect {
            config: self.config.clone(),
            name,
        })
    }
}

pub struct Connect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for Connect {
    type Stream = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, socket)
                .await?;
            Ok(Stream(tls))
        })
    }
}

/// A TLS connection to the server.
pub struct Stream(tokio_rustls::client::TlsStream<Socket>);

impl TlsStream for Stream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_require_asks_for_tls() {
        assert!(required("postgres://u@h/db?sslmode=require"));
        assert!(required(
            "postgres://u@h/db?connect_timeout=3&sslmode=require"
        ));
        assert!(!required("postgres://u@h/db?sslmode=disable"));
        assert!(!required("postgres://u@h/db"));
        let e = Tls::new(Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .unwrap();
        assert!(e.starts_with("registry.database_ca"), "{e}");
    }
}
