//! Certificates for the TLS tests, made fresh in each test: a CA, server certificates for
//! 127.0.0.1, client certificates (also expired ones), written as PEM files the way an
//! operator would install them (keys mode 0600).

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    /// Its certificate as a PEM file.
    pub file: PathBuf,
}

/// A certificate and its key on disk.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

pub enum Use {
    Server,
    Client,
}

/// Valid from 2024 to 2036, or expired (2020 to 2021).
pub enum Validity {
    Current,
    Expired,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let file = dir.join(format!("{name}.pem"));
        std::fs::write(&file, cert.pem()).unwrap();
        Ca { cert, key, file }
    }

    /// Issues a certificate for `name` (a CN; for servers also the names it is valid for)
    /// and writes `<file>.crt` and `<file>.key` (0600) into `dir`.
    pub fn issue(
        &self,
        dir: &Path,
        file: &str,
        name: &str,
        usage: Use,
        validity: Validity,
    ) -> Issued {
        let key = KeyPair::generate().unwrap();
        let sans = match usage {
            Use::Server => vec![name.to_string(), "localhost".to_string()],
            Use::Client => vec![],
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Use::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Use::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        (params.not_before, params.not_after) = match validity {
            Validity::Current => (
                rcgen::date_time_ymd(2024, 1, 1),
                rcgen::date_time_ymd(2036, 1, 1),
            ),
            Validity::Expired => (
                rcgen::date_time_ymd(2020, 1, 1),
                rcgen::date_time_ymd(2021, 1, 1),
            ),
        };
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let issued = Issued {
            cert: dir.join(format!("{file}.crt")),
            key: dir.join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&issued.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        issued
    }
}
