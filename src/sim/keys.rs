//! Key material the simulator makes for itself at start: a test CA plus a leaf certificate for STARTTLS, and
//! the RSA key that signs its access tokens. Also thumbprints of registered client certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::{DecodingKey, EncodingKey};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha1::Digest as _;

use super::SimError;
use super::util::b64url;

/// Everything TLS: the CA file path for clients and the rustls server config for STARTTLS.
pub struct TlsMaterial {
    pub ca_file: PathBuf,
    pub server_config: Arc<rustls::ServerConfig>,
}

fn rc(e: rcgen::Error) -> SimError {
    SimError::Crypto(e.to_string())
}

/// Makes a fresh CA and a leaf for `host_name`, `localhost` and 127.0.0.1, writes the CA PEM to `dir/ca.pem`.
pub fn make_tls(dir: &Path, host_name: &str) -> Result<TlsMaterial, SimError> {
    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "smtp-oauth-relay simulator test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rc)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec![
        host_name.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    names.dedup();
    let leaf_key = KeyPair::generate().map_err(rc)?;
    let mut leaf_params = CertificateParams::new(names).map_err(rc)?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, host_name);
    let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer).map_err(rc)?;

    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem())
        .map_err(|e| SimError::Io(format!("write {}", ca_file.display()), e))?;

    let key_der = PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|e| SimError::Crypto(e.to_string()))?;
    let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    // TLS 1.2 and 1.3 only, like smtp.office365.com; aws-lc-rs is the crate's one crypto backend.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| SimError::Crypto(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| SimError::Crypto(e.to_string()))?;
    Ok(TlsMaterial {
        ca_file,
        server_config: Arc::new(server_config),
    })
}

/// The RSA key the simulated Entra ID signs access tokens with (RS256, like the real one).
pub struct SigningKey {
    pub kid: String,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    pub public_pem: String,
}

pub fn make_signing_key() -> Result<SigningKey, SimError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(rc)?;
    let encoding = EncodingKey::from_rsa_pem(key.serialize_pem().as_bytes())
        .map_err(|e| SimError::Crypto(e.to_string()))?;
    let public_pem = key.public_key_pem();
    let decoding = DecodingKey::from_rsa_pem(public_pem.as_bytes())
        .map_err(|e| SimError::Crypto(e.to_string()))?;
    let kid = b64url(&sha1::Sha1::digest(key.public_key_raw()));
    Ok(SigningKey {
        kid,
        encoding,
        decoding,
        public_pem,
    })
}

/// A certificate registered on an app: its thumbprints and the key that verifies assertions.
#[derive(Clone)]
pub struct RegisteredCert {
    /// base64url SHA-1 of the DER (`x5t`).
    pub x5t: String,
    /// base64url SHA-256 of the DER (`x5t#S256`).
    pub x5t_s256: String,
    /// Upper-case hex SHA-1, as AADSTS700027 prints it.
    pub thumbprint_hex: String,
    pub key: DecodingKey,
}

/// Parses every certificate in a PEM text.
pub fn registered_certs(pem: &str) -> Result<Vec<RegisteredCert>, SimError> {
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = der.map_err(|e| SimError::Config(format!("bad certificate PEM: {e}")))?;
        out.push(cert_from_der(&der)?);
    }
    if out.is_empty() {
        return Err(SimError::Config(
            "no CERTIFICATE block in registered certificate PEM".into(),
        ));
    }
    Ok(out)
}

fn cert_from_der(der: &[u8]) -> Result<RegisteredCert, SimError> {
    let sha1 = sha1::Sha1::digest(der);
    let sha256 = sha2::Sha256::digest(der);
    // jsonwebtoken takes a CERTIFICATE PEM and uses its SubjectPublicKeyInfo bit string.
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der)
    );
    let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
        SimError::Config(format!("registered certificate has no usable RSA key: {e}"))
    })?;
    Ok(RegisteredCert {
        x5t: b64url(&sha1),
        x5t_s256: b64url(&sha256),
        thumbprint_hex: sha1.iter().map(|b| format!("{b:02X}")).collect(),
        key,
    })
}
