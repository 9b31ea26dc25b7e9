//! TLS to Redis. A `rediss://` URL makes every connection to it TLS: the
//! subscriber connection written here and redis-rs's (the publisher,
//! streams, Redis Cluster). The server is verified against the system's
//! roots, or the CA certificates of `redis.tls_ca_file`, with its name sent
//! as SNI; a client certificate and key (`redis.tls_cert_file`,
//! `redis.tls_key_file`) answer a server that asks for one (mutual TLS).
//! `redis.tls_insecure` turns verification off, for test setups only, and is
//! logged loudly whenever it is used.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Where the certificates for TLS to Redis come from (the `redis.tls_*`
/// settings). The default: the system's roots, no client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates of the CAs that sign the server's certificate;
    /// `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The client certificate chain (PEM), for a server that asks for one.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate, for any name: never in production.
    pub insecure: bool,
}

/// Why the TLS settings cannot be used; each says which setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read, or holds nothing of what it should.
    #[error("{key} = {path:?}: {problem}")]
    File {
        /// The setting that names it.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A certificate without a key, or a key without a certificate.
    #[error("redis.tls_cert_file and redis.tls_key_file are set together or not at all")]
    HalfPair,
    /// rustls refused the configuration (a key that does not fit the
    /// certificate, an unsupported key type).
    #[error("TLS client certificate: {0}")]
    Rustls(#[from] rustls::Error),
}

/// TLS as loaded from [`TlsFiles`]: once, for every connection.
#[derive(Clone)]
pub struct Tls {
    files: TlsFiles,
    /// The CA and client certificate as redis-rs takes them (PEM bytes).
    ca_pem: Option<Vec<u8>>,
    client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The configuration of the subscriber connection written here.
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key's bytes stay out of logs.
        f.debug_struct("Tls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Whether `url` asks for TLS (`rediss://`).
#[must_use]
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("rediss:")
}

impl Tls {
    /// TLS for connections to `urls`, loaded from `files`, when any of them
    /// asks for it; `None` when none does (the files are not read).
    pub fn for_urls<'u>(
        urls: impl IntoIterator<Item = &'u str>,
        files: &TlsFiles,
    ) -> Result<Option<Self>, TlsError> {
        let wanted = urls.into_iter().any(is_tls_url);
        wanted.then(|| Self::load(files)).transpose()
    }

    /// Reads the files `files` names and builds the configuration; every
    /// problem is one line naming its setting.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca_pem = files
            .ca_file
            .as_deref()
            .map(|path| read(path, "redis.tls_ca_file"))
            .transpose()?;
        let client_pem = match (&files.cert_file, &files.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                read(cert, "redis.tls_cert_file")?,
                read(key, "redis.tls_key_file")?,
            )),
            _ => return Err(TlsError::HalfPair),
        };
        let builder = if files.insecure {
            ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything::new()))
        } else {
            ClientConfig::builder().with_root_certificates(roots(files, ca_pem.as_deref())?)
        };
        let config = match &client_pem {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certificates(cert, "redis.tls_cert_file", files)?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|err| TlsError::File {
                    key: "redis.tls_key_file",
                    path: files.key_file.clone().unwrap_or_default(),
                    problem: format!("no PEM private key ({err})"),
                })?;
                builder.with_client_auth_cert(chain, key)?
            }
        };
        Ok(Self {
            files: files.clone(),
            ca_pem,
            client_pem,
            config: Arc::new(config),
        })
    }

    /// Whether server certificates go unverified.
    #[must_use]
    pub fn is_insecure(&self) -> bool {
        self.files.insecure
    }

    /// The certificates as redis-rs's connections take them.
    #[must_use]
    pub fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self.client_pem.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: self.ca_pem.clone(),
        }
    }

    /// Wraps a connected stream to `host` in TLS.
    pub(crate) async fn connect<S>(
        &self,
        host: &str,
        stream: S,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
    }
}

fn read(path: &Path, key: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::File {
        key,
        path: path.to_owned(),
        problem: err.to_string(),
    })
}

/// Every certificate in `pem`; at least one.
fn certificates(
    pem: &[u8],
    key: &'static str,
    files: &TlsFiles,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = || match key {
        "redis.tls_ca_file" => files.ca_file.clone().unwrap_or_default(),
        _ => files.cert_file.clone().unwrap_or_default(),
    };
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::File {
            key,
            path: path(),
            problem: format!("not PEM certificates ({err})"),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::File {
            key,
            path: path(),
            problem: "holds no PEM certificate".into(),
        });
    }
    Ok(certificates)
}

/// The CAs of `redis.tls_ca_file`, else the system's.
fn roots(files: &TlsFiles, ca_pem: Option<&[u8]>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for certificate in certificates(pem, "redis.tls_ca_file", files)? {
                roots.add(certificate)?;
            }
        }
        None => {
            let system = rustls_native_certs::load_native_certs();
            for err in &system.errors {
                tracing::warn!(cause = %err, "a system root certificate could not be read");
            }
            roots.add_parsable_certificates(system.certs);
        }
    }
    Ok(roots)
}

/// `redis.tls_insecure`: every server certificate accepted. Signatures are
/// still checked (the handshake needs them), names and chains are not.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl AcceptAnything {
    fn new() -> Self {
        Self(Arc::new(rustls::crypto::ring::default_provider()))
    }
}

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
