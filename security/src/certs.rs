//! A cluster CA and its node certificates, for `strata cert` (development, compose and
//! Kubernetes set-ups; production clusters bring certificates from their own CA).
//!
//! Files: `ca.pem`/`ca.key` for the CA; `<name>.pem`/`<name>.key` for a node. Keys are
//! written readable by their owner only.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::tls::TlsError;

/// The CA certificate and key file names in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// Lifetime of a CA `strata cert` creates.
pub const CA_VALID_DAYS: i64 = 3650;
/// Lifetime of a node certificate `strata cert` creates, unless told otherwise.
pub const NODE_VALID_DAYS_DEFAULT: i64 = 365;

fn generate(e: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn write(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| TlsError::Generate(format!("writing {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(failed)?;
    file.write_all(contents.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)
}

/// Writes a fresh random secret (32 URL-safe characters, 192 bits) to `path`, readable by
/// its owner only: a first admin's password (`strata serve --admin-password-file`) or a
/// gossip secret (`--cluster-secret-file`); refuses to overwrite one.
pub fn create_secret_file(path: &Path) -> Result<PathBuf, TlsError> {
    use base64::Engine;
    if path.exists() {
        return Err(TlsError::Generate(format!("{} exists; not replacing a secret", path.display())));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(generate)?;
    }
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
    write(path, &format!("{secret}\n"), true)?;
    Ok(path.to_path_buf())
}

/// Creates a CA in `dir` (`ca.pem`, `ca.key`); refuses to overwrite one.
pub fn create_ca(dir: &Path, common_name: &str) -> Result<PathBuf, TlsError> {
    std::fs::create_dir_all(dir).map_err(generate)?;
    let cert_path = dir.join(CA_CERT_FILE);
    if cert_path.exists() {
        return Err(TlsError::Generate(format!("{} exists; not replacing a CA", cert_path.display())));
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CA_VALID_DAYS);
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.self_signed(&key).map_err(generate)?;
    write(&dir.join(CA_KEY_FILE), &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// What a leaf certificate names and how long it lives.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// File stem of the certificate and key.
    pub file_stem: String,
    /// Common name (informational).
    pub common_name: String,
    /// DNS subject names (for a node: the reserved node name first).
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Seconds from now the certificate becomes valid (negative: in the past).
    pub valid_from_secs: i64,
    /// Seconds from now the certificate expires (negative: already expired, for tests).
    pub valid_until_secs: i64,
}

impl LeafSpec {
    /// A node certificate: the reserved node name, `localhost`, the loopback address and
    /// the given names and addresses.
    pub fn node(file_stem: &str, node_name: &str, dns_names: &[String], ips: &[IpAddr], valid_days: i64) -> Self {
        let mut all_dns = vec![node_name.to_owned(), "localhost".to_owned()];
        all_dns.extend(dns_names.iter().filter(|n| !all_dns.contains(n)).cloned().collect::<Vec<_>>());
        let mut all_ips = vec![IpAddr::from([127, 0, 0, 1])];
        all_ips.extend(ips.iter().filter(|ip| !all_ips.contains(ip)).copied().collect::<Vec<_>>());
        Self {
            file_stem: file_stem.to_owned(),
            common_name: file_stem.to_owned(),
            dns_names: all_dns,
            ips: all_ips,
            valid_from_secs: -3600,
            valid_until_secs: valid_days * 86_400,
        }
    }
}

/// Creates `<out>/<stem>.pem` and `<out>/<stem>.key`, signed by the CA in `ca_dir`,
/// usable as a server and as a client certificate. Returns the certificate's path.
pub fn create_leaf(ca_dir: &Path, out: &Path, spec: &LeafSpec) -> Result<PathBuf, TlsError> {
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| TlsError::Read { what: "the CA", path, reason: e.to_string() })
    };
    let ca_key = KeyPair::from_pem(&read(CA_KEY_FILE)?).map_err(generate)?;
    let issuer = Issuer::from_ca_cert_pem(&read(CA_CERT_FILE)?, ca_key).map_err(generate)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, spec.common_name.as_str());
    params.distinguished_name = name;
    for dns in &spec.dns_names {
        params.subject_alt_names.push(SanType::DnsName(dns.as_str().try_into().map_err(generate)?));
    }
    params.subject_alt_names.extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(spec.valid_from_secs);
    params.not_after = now + time::Duration::seconds(spec.valid_until_secs);
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    std::fs::create_dir_all(out).map_err(generate)?;
    write(&out.join(format!("{}.key", spec.file_stem)), &key.serialize_pem(), true)?;
    let cert_path = out.join(format!("{}.pem", spec.file_stem));
    write(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}
