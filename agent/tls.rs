//! TLS client settings shared by the MQTT source and the AWS IoT credentials provider: reads
//! CA bundles, client certificates and private keys from PEM files into a rustls config (ring
//! provider, like the AWS client), refuses private keys other users can read, and turns
//! handshake failures into sentences an operator can act on.
//!
//! It must never log, return or keep key material beyond the config it builds, and never fall
//! back to a weaker connection (no TLS, no client certificate, no verification) when a file is
//! missing or wrong: that is an error that stops the start.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// TLS client settings: PEM files, read when the agent starts (and by `config validate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA certificates that may sign the server's certificate; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// ALPN protocol names to offer (AWS IoT Core on port 443: `x-amzn-mqtt-ca`).
    pub alpn: Vec<String>,
}

/// A TLS file that cannot be used, with the file named and the fix where there is one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

impl TlsError {
    pub(crate) fn not_a_host_name(host: &str) -> TlsError {
        TlsError(format!("`{host}` is not a host name"))
    }

    /// The same error, said of `what` (a broker, a credentials provider).
    pub(crate) fn context(self, what: &str) -> TlsError {
        TlsError(format!("{what}: {}", self.0))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("cannot read {what} {}: {e}", path.display())))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{what} {}: not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{what} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// Refuses a key file that users other than its owner and group can read or write.
pub(crate) fn check_key_permissions(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| TlsError(format!("cannot read private key {}: {e}", path.display())))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(TlsError(format!(
            "private key {} is {} by every user (mode {mode:04o}); refusing to use it. \
             Fix: chmod 600 {} (or chown root:edgeship and chmod 640 for the packaged service)",
            path.display(),
            if mode & 0o004 != 0 {
                "readable"
            } else {
                "accessible"
            },
            path.display()
        )));
    }
    Ok(())
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    check_key_permissions(path)?;
    let pem = read(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        TlsError(format!(
            "private key {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ))
    })
}

/// Builds the client config for `tls`: its CA file (or the system's roots), its client
/// certificate and key if set, its ALPN names. Reads every file now, so a bad one stops the
/// start with its name rather than failing each connection later.
pub(crate) fn client_config(tls: &TlsConfig) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in certificates(path, "CA file")? {
                roots.add(cert).map_err(|e| {
                    TlsError(format!(
                        "CA file {}: a certificate cannot be used as a trust anchor: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // The system store may hold certificates rustls cannot parse; skip those.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError(
                    "no ca_file is set and the system has no CA certificates \
                     (install ca-certificates, or set ca_file)"
                        .into(),
                ));
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let chain = certificates(cert_path, "client certificate")?;
            let key = private_key(key_path)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsError(format!(
                    "client certificate {} and private key {} cannot be used together: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(config))
}

/// The rustls error somewhere in `err`'s chain, also inside an `io::Error` (how TLS streams
/// report alerts that arrive after the handshake).
fn find_rustls_error<'a>(
    mut err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    loop {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(r) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                return Some(r);
            }
        }
        err = err.source()?;
    }
}

/// Explains a failed TLS connection in terms of the config's files, or `None` when `err` is
/// not a TLS error (plain I/O, MQTT) and its own text says enough.
pub(crate) fn explain(err: &(dyn std::error::Error + 'static), tls: &TlsConfig) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C};
    let e = find_rustls_error(err)?;
    let ca = match &tls.ca_file {
        Some(p) => format!("the CA file {}", p.display()),
        None => "the system's CA certificates (set ca_file to use another CA)".into(),
    };
    let cert = match &tls.client_cert {
        Some(p) => p.display().to_string(),
        None => String::new(),
    };
    let text = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => {
                format!("the server's certificate is not signed by a CA in {ca}")
            }
            C::Expired | C::ExpiredContext { .. } => {
                "the server's certificate has expired (or this gateway's clock is wrong)".into()
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (is this gateway's clock right?)".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the server's certificate does not name the host this agent connects to \
                 (check the configured host against the certificate's names)"
                    .into()
            }
            other => format!("the server's certificate was rejected: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => match alert {
            A::CertificateRequired => "the server requires a client certificate; set \
                 client_cert and client_key"
                .into(),
            A::HandshakeFailure if tls.client_cert.is_none() => {
                "the server ended the handshake; it may require a client certificate \
                 (set client_cert and client_key)"
                    .into()
            }
            A::CertificateExpired if !cert.is_empty() => {
                format!("the server refused the client certificate {cert}: it has expired")
            }
            A::UnknownCA | A::BadCertificate | A::CertificateUnknown if !cert.is_empty() => {
                format!(
                    "the server refused the client certificate {cert}: not signed by a CA it \
                     trusts, or not valid ({alert:?})"
                )
            }
            A::NoApplicationProtocol => format!(
                "the server accepts none of the ALPN protocols offered ({:?})",
                tls.alpn
            ),
            other => format!("the server ended the TLS handshake: {other:?}"),
        },
        rustls::Error::NoApplicationProtocol => format!(
            "the server accepts none of the ALPN protocols offered ({:?})",
            tls.alpn
        ),
        other => format!("TLS error: {other}"),
    };
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn keypair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw-test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let c = dir.join("c.pem");
        let k = dir.join("k.pem");
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        (c, k)
    }

    #[test]
    fn world_readable_keys_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = keypair(dir.path());
        let tls = TlsConfig {
            ca_file: Some(c.clone()),
            client_cert: Some(c.clone()),
            client_key: Some(k.clone()),
            alpn: vec!["x-amzn-mqtt-ca".into()],
        };
        let config = client_config(&tls).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"x-amzn-mqtt-ca".to_vec()]);
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = client_config(&tls).unwrap_err().to_string();
        assert!(err.contains("readable by every user"), "{err}");
        assert!(err.contains(&format!("chmod 600 {}", k.display())), "{err}");
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
        client_config(&tls).unwrap();
    }

    #[test]
    fn wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = keypair(dir.path());
        let (other_c, _) = {
            let d = dir.path().join("other");
            std::fs::create_dir(&d).unwrap();
            keypair(&d)
        };
        let missing = dir.path().join("missing.pem");
        let cases = [
            (Some(missing.clone()), None, None, "cannot read CA file"),
            (Some(k.clone()), None, None, "holds no PEM certificate"),
            (
                Some(c.clone()),
                Some(c.clone()),
                Some(c.clone()),
                "holds no PEM private key",
            ),
            (
                Some(c.clone()),
                Some(other_c),
                Some(k.clone()),
                "cannot be used together",
            ),
        ];
        for (ca, cert, key, expect) in cases {
            if let Some(key) = &key {
                let _ = std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600));
            }
            let tls = TlsConfig {
                ca_file: ca,
                client_cert: cert,
                client_key: key,
                alpn: vec![],
            };
            let err = client_config(&tls).unwrap_err().to_string();
            assert!(err.contains(expect), "{expect}: {err}");
        }
    }

    #[test]
    fn handshake_failures_are_explained() {
        let tls = TlsConfig {
            ca_file: Some("/etc/edgeship/ca.pem".into()),
            client_cert: Some("/etc/edgeship/gw.crt".into()),
            client_key: Some("/etc/edgeship/gw.key".into()),
            alpn: vec![],
        };
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        let text = explain(&io, &tls).unwrap();
        assert!(text.contains("not signed by a CA in the CA file /etc/edgeship/ca.pem"));
        let expired = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired);
        let text = explain(&expired, &tls).unwrap();
        assert!(
            text.contains("refused the client certificate /etc/edgeship/gw.crt: it has expired")
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(explain(&plain, &tls).is_none());
    }
}
