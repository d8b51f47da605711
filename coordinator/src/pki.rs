//! The rollout PKI: `rollout certs init --dir DIR` and certificate issuing.
//!
//! Every connection in rollout is mutual TLS. One private CA signs every
//! certificate, and every certificate we issue says **who** it belongs to and in
//! **which role**:
//!
//! * the role is the Subject's organizational unit (OU): `rollout-coordinator`,
//!   `rollout-operator` or `rollout-agent` (see [`Role::ou`]); a certificate
//!   carries exactly one such OU;
//! * the identity is the Subject's common name (CN): the host name for an
//!   agent, `operator` for the operator and `coordinator` for the coordinator.
//!
//! The server reads both back from the verified client certificate
//! ([`crate::tls::peer_identity`]) and checks the role on every RPC. The CA
//! itself has no role OU, so it can never pass as a peer.
//!
//! Layout written by [`init`] (keys mode 0600, the directory 0700 when created):
//!
//! ```text
//! DIR/ca.pem  DIR/ca.key
//! DIR/coordinator.pem  DIR/coordinator.key
//! DIR/operator.pem  DIR/operator.key
//! DIR/agents/<host>.pem  DIR/agents/<host>.key   (only for `--agent` names)
//! ```
//!
//! Keys are ECDSA P-256. The CA is valid for 10 years, leaves for 1 year by
//! default ([`Validity`]). [`issue`] signs a fresh key pair for any role and
//! [`sign_csr`] signs a key that never leaves its host (join tokens).

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

/// CA certificate file name inside a PKI directory.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file name inside a PKI directory.
pub const CA_KEY: &str = "ca.key";
/// Sub-directory holding agent certificates issued by `certs init --agent`.
pub const AGENTS_DIR: &str = "agents";

/// Validity of the CA certificate: 10 years.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default validity of a leaf certificate: 1 year.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far `not_before` is back-dated to tolerate clock skew between hosts.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Common name of the coordinator certificate.
pub const COORDINATOR_CN: &str = "coordinator";
/// Common name of the operator certificate.
pub const OPERATOR_CN: &str = "operator";
/// Common name prefix of the CA certificate (followed by a per-CA key id).
pub const CA_CN: &str = "rollout CA";

/// The role a certificate grants; encoded as the Subject OU (see module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The coordinator daemon (server side of every connection).
    Coordinator,
    /// A human or tool driving the control API (`rollout` CLI).
    Operator,
    /// A host agent; its CN is the host it may speak for.
    Agent,
}

impl Role {
    /// Every role, in a stable order.
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Operator, Role::Agent];

    /// Short lowercase name: `coordinator`, `operator`, `agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Operator => "operator",
            Role::Agent => "agent",
        }
    }

    /// The Subject OU value that encodes this role in a certificate.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Coordinator => "rollout-coordinator",
            Role::Operator => "rollout-operator",
            Role::Agent => "rollout-agent",
        }
    }

    /// The role encoded by a Subject OU value, if it is one of ours.
    pub fn from_ou(ou: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.ou() == ou)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s || r.ou() == s)
            .ok_or_else(|| PkiError::InvalidName {
                name: s.to_string(),
                reason: "not a role; expected coordinator, operator or agent".to_string(),
            })
    }
}

/// Errors of the PKI functions; each message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `init` found an existing CA (or other PKI file) in the target directory.
    #[error(
        "{path} already exists: refusing to overwrite an existing PKI (every certificate it \
         issued would stop working); use another --dir, or delete {dir} first if you really \
         mean to start over"
    )]
    AlreadyExists {
        /// The directory given to `init`.
        dir: PathBuf,
        /// The first file found.
        path: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot read", "cannot write", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The CA directory lacks `ca.pem` or `ca.key`.
    #[error(
        "no CA in {dir}: {missing} is missing; run `rollout certs init --dir {dir}` first or \
         point at the directory that holds ca.pem and ca.key"
    )]
    NoCa {
        /// The directory searched.
        dir: PathBuf,
        /// The missing file name.
        missing: &'static str,
    },
    /// A host name or SAN is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected value.
        name: String,
        /// Why.
        reason: String,
    },
    /// A PEM certificate or key could not be parsed.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was parsed ("CA certificate", "CA key", "CSR", ...).
        what: &'static str,
        /// Parser message.
        reason: String,
    },
    /// The CA key does not belong to the CA certificate.
    #[error(
        "the CA key does not match the CA certificate; ca.key and ca.pem must come from the \
         same `rollout certs init`"
    )]
    KeyMismatch,
    /// The requested validity is empty or reversed.
    #[error("invalid validity: not_after must be later than not_before")]
    InvalidValidity,
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The validity window of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from now (back-dated by 5 minutes for clock skew) for `lifetime`.
    pub fn from_now(lifetime: Duration) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now.checked_sub(CLOCK_SKEW).unwrap_or(now),
            not_after: now + lifetime,
        }
    }

    /// An explicit window; may lie entirely in the past (tests of expiry).
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Validity {
        Validity {
            not_before,
            not_after,
        }
    }

    /// The default for leaf certificates: 1 year from now.
    pub fn leaf_default() -> Validity {
        Validity::from_now(LEAF_VALIDITY)
    }
}

/// Paths of one certificate and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key (mode 0600).
    pub key: PathBuf,
}

impl CertPaths {
    fn new(dir: &Path, stem: &str) -> CertPaths {
        CertPaths {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// Paths of the standard files in a PKI directory.
pub fn ca_paths(dir: &Path) -> CertPaths {
    CertPaths::new(dir, "ca")
}

/// Paths of the coordinator certificate in a PKI directory.
pub fn coordinator_paths(dir: &Path) -> CertPaths {
    CertPaths::new(dir, "coordinator")
}

/// Paths of the operator certificate in a PKI directory.
pub fn operator_paths(dir: &Path) -> CertPaths {
    CertPaths::new(dir, "operator")
}

/// Paths of an agent certificate issued by `init` in a PKI directory.
pub fn agent_paths(dir: &Path, host: &str) -> CertPaths {
    CertPaths::new(&dir.join(AGENTS_DIR), host)
}

/// What [`init`] wrote.
#[derive(Debug, Clone)]
pub struct InitOutput {
    /// The PKI directory.
    pub dir: PathBuf,
    /// CA certificate and key.
    pub ca: CertPaths,
    /// Coordinator certificate and key.
    pub coordinator: CertPaths,
    /// Operator certificate and key.
    pub operator: CertPaths,
    /// Agent host name → certificate and key.
    pub agents: Vec<(String, CertPaths)>,
    /// The names (DNS and IP) the coordinator certificate is valid for.
    pub coordinator_sans: Vec<String>,
}

/// A loaded CA: its certificate and key in PEM.
#[derive(Clone)]
pub struct Ca {
    /// CA certificate (PEM).
    pub cert_pem: String,
    /// CA private key (PEM).
    pub key_pem: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A CA from PEM texts (e.g. the coordinator's `[tls] ca` and `ca_key`);
    /// checks that the key belongs to the certificate.
    pub fn from_pem(cert_pem: String, key_pem: String) -> Result<Ca, PkiError> {
        ca_issuer(&cert_pem, &key_pem)?;
        Ok(Ca { cert_pem, key_pem })
    }

    /// Issues a fresh key pair and certificate; see [`issue`].
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        sans: &[String],
        validity: Validity,
    ) -> Result<(String, String), PkiError> {
        issue(&self.cert_pem, &self.key_pem, role, name, sans, validity)
    }

    /// Signs a CSR; see [`sign_csr`].
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        role: Role,
        name: &str,
        sans: &[String],
        validity: Validity,
    ) -> Result<String, PkiError> {
        sign_csr(
            &self.cert_pem,
            &self.key_pem,
            csr_pem,
            role,
            name,
            sans,
            validity,
        )
    }
}

/// Loads `ca.pem` and `ca.key` from `dir` and checks that they belong together.
pub fn load_ca(dir: &Path) -> Result<Ca, PkiError> {
    let paths = ca_paths(dir);
    let read = |path: &Path, missing: &'static str| {
        fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                PkiError::NoCa {
                    dir: dir.to_path_buf(),
                    missing,
                }
            } else {
                PkiError::Io {
                    action: "cannot read",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })
    };
    let ca = Ca {
        cert_pem: read(&paths.cert, CA_CERT)?,
        key_pem: read(&paths.key, CA_KEY)?,
    };
    ca_issuer(&ca.cert_pem, &ca.key_pem)?;
    Ok(ca)
}

/// Creates a new PKI in `dir`: CA, coordinator, operator and (for dev setups)
/// agent certificates for the host names in `agents`.
///
/// The coordinator certificate is valid for `coordinator_names` (DNS names or
/// IP addresses) plus `localhost` and `127.0.0.1`. Refuses to touch a
/// directory that already holds any of the files it would write.
pub fn init(
    dir: &Path,
    coordinator_names: &[String],
    agents: &[String],
) -> Result<InitOutput, PkiError> {
    let mut coordinator_sans: Vec<String> = Vec::new();
    for n in coordinator_names
        .iter()
        .map(|s| s.trim().to_string())
        .chain(["localhost".to_string(), "127.0.0.1".to_string()])
    {
        if !coordinator_sans.contains(&n) {
            coordinator_sans.push(n);
        }
    }
    let mut agent_names: Vec<String> = Vec::new();
    for a in agents {
        validate_host_name(a)?;
        if !agent_names.contains(a) {
            agent_names.push(a.clone());
        }
    }

    let out = InitOutput {
        dir: dir.to_path_buf(),
        ca: ca_paths(dir),
        coordinator: coordinator_paths(dir),
        operator: operator_paths(dir),
        agents: agent_names
            .iter()
            .map(|a| (a.clone(), agent_paths(dir, a)))
            .collect(),
        coordinator_sans: coordinator_sans.clone(),
    };

    // Refuse before generating or writing anything.
    let all_paths: Vec<&CertPaths> = [&out.ca, &out.coordinator, &out.operator]
        .into_iter()
        .chain(out.agents.iter().map(|(_, p)| p))
        .collect();
    for p in &all_paths {
        for f in [&p.cert, &p.key] {
            if f.exists() {
                return Err(PkiError::AlreadyExists {
                    dir: dir.to_path_buf(),
                    path: f.clone(),
                });
            }
        }
    }

    // Generate everything in memory first so a failure leaves no half PKI.
    let (ca_cert_pem, ca_key_pem) = generate_ca(Validity::from_now(CA_VALIDITY))?;
    let leaf = |role, name: &str, sans: &[String]| {
        issue(
            &ca_cert_pem,
            &ca_key_pem,
            role,
            name,
            sans,
            Validity::leaf_default(),
        )
    };
    let coordinator = leaf(Role::Coordinator, COORDINATOR_CN, &coordinator_sans)?;
    let operator = leaf(Role::Operator, OPERATOR_CN, &[])?;
    let mut agent_certs = Vec::new();
    for a in &agent_names {
        agent_certs.push(leaf(Role::Agent, a, std::slice::from_ref(a))?);
    }

    create_private_dir(dir)?;
    if !out.agents.is_empty() {
        create_private_dir(&dir.join(AGENTS_DIR))?;
    }
    write_pair(&out.ca, &ca_cert_pem, &ca_key_pem)?;
    write_pair(&out.coordinator, &coordinator.0, &coordinator.1)?;
    write_pair(&out.operator, &operator.0, &operator.1)?;
    for ((_, paths), (cert, key)) in out.agents.iter().zip(&agent_certs) {
        write_pair(paths, cert, key)?;
    }
    Ok(out)
}

/// Issues a certificate for `role` and `name` (the Subject CN; a host name for
/// agents) with a freshly generated ECDSA P-256 key, signed by the CA.
///
/// `sans` are DNS names or IP addresses put in the subjectAltName. Returns
/// `(cert_pem, key_pem)`. `validity` may lie in the past (expiry tests).
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    role: Role,
    name: &str,
    sans: &[String],
    validity: Validity,
) -> Result<(String, String), PkiError> {
    let issuer = ca_issuer(ca_cert_pem, ca_key_pem)?;
    let params = leaf_params(role, name, sans, validity)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Signs the public key of a PEM certificate signing request.
///
/// The CSR's own subject and extensions are ignored: the certificate gets the
/// `role`, `name` and `sans` given here, so a requester cannot choose its own
/// identity. The CSR signature is verified (proof of key possession).
pub fn sign_csr(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    role: Role,
    name: &str,
    sans: &[String],
    validity: Validity,
) -> Result<String, PkiError> {
    let issuer = ca_issuer(ca_cert_pem, ca_key_pem)?;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::Parse {
        what: "certificate signing request",
        reason: e.to_string(),
    })?;
    let params = leaf_params(role, name, sans, validity)?;
    Ok(params.signed_by(&csr.public_key, &issuer)?.pem())
}

/// Checks that a PEM CSR parses and is signed by its own key (proof of
/// possession), without issuing anything: a join checks this before it
/// spends the token.
pub fn verify_csr(csr_pem: &str) -> Result<(), PkiError> {
    CertificateSigningRequestParams::from_pem(csr_pem)
        .map(|_| ())
        .map_err(|e| PkiError::Parse {
            what: "certificate signing request",
            reason: e.to_string(),
        })
}

/// Generates a key pair and a CSR for `name`; returns `(csr_pem, key_pem)`.
/// The key stays with the caller (an agent joining the fleet).
pub fn generate_csr(name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Checks that `name` is usable as an agent host name (certificate CN and a
/// file name under `agents/`).
pub fn validate_host_name(name: &str) -> Result<(), PkiError> {
    let bad = |reason: &str| {
        Err(PkiError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("a host name cannot be empty");
    }
    if name.len() > 253 {
        return bad("a host name is at most 253 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("a host name cannot start with '.' or '-'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return bad("use only letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

fn generate_ca(validity: Validity) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    // A per-CA suffix makes every CA's name unique, so a certificate from
    // another rollout PKI fails as "unknown CA" rather than "bad signature".
    let suffix: String = params
        .key_identifier(&key)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rollout");
    dn.push(DnType::CommonName, format!("{CA_CN} {suffix}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, validity)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn leaf_params(
    role: Role,
    name: &str,
    sans: &[String],
    validity: Validity,
) -> Result<CertificateParams, PkiError> {
    if name.is_empty() {
        return Err(PkiError::InvalidName {
            name: String::new(),
            reason: "the certificate name (CN) cannot be empty".to_string(),
        });
    }
    if role == Role::Agent {
        validate_host_name(name)?;
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rollout");
    dn.push(DnType::OrganizationalUnitName, role.ou());
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Role::Coordinator | Role::Agent => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.use_authority_key_identifier_extension = true;
    // A random serial (rcgen's default derives it from the public key), so
    // every certificate is told apart, even two for the same key; host
    // revocation admits re-joined certificates by serial.
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<Vec<_>, _>>()?;
    set_validity(&mut params, validity)?;
    Ok(params)
}

fn san(s: &str) -> Result<SanType, PkiError> {
    let s = s.trim();
    if let Ok(ip) = IpAddr::from_str(s) {
        return Ok(SanType::IpAddress(ip));
    }
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '*'))
    {
        return Err(PkiError::InvalidName {
            name: s.to_string(),
            reason: "not a DNS name or IP address".to_string(),
        });
    }
    let dns = s
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| PkiError::InvalidName {
            name: s.to_string(),
            reason: e.to_string(),
        })?;
    Ok(SanType::DnsName(dns))
}

fn set_validity(params: &mut CertificateParams, v: Validity) -> Result<(), PkiError> {
    if v.not_after <= v.not_before {
        return Err(PkiError::InvalidValidity);
    }
    params.not_before = OffsetDateTime::from(v.not_before);
    params.not_after = OffsetDateTime::from(v.not_after);
    Ok(())
}

fn ca_issuer(ca_cert_pem: &str, ca_key_pem: &str) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(ca_key_pem).map_err(|e| PkiError::Parse {
        what: "CA key",
        reason: e.to_string(),
    })?;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(ca_cert_pem.as_bytes()).map_err(|e| PkiError::Parse {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
    let cert = pem.parse_x509().map_err(|e| PkiError::Parse {
        what: "CA certificate",
        reason: e.to_string(),
    })?;
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(PkiError::KeyMismatch);
    }
    Issuer::from_ca_cert_pem(ca_cert_pem, key).map_err(|e| PkiError::Parse {
        what: "CA certificate",
        reason: e.to_string(),
    })
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|source| PkiError::Io {
        action: "cannot create directory",
        path: dir.to_path_buf(),
        source,
    })
}

fn write_pair(paths: &CertPaths, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
    write_new(&paths.key, key_pem, 0o600)?;
    write_new(&paths.cert, cert_pem, 0o644)
}

/// Writes a file that must not exist yet, with `mode` from its creation on
/// (a key is never readable by others, not even briefly).
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let io = |action, source| PkiError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists {
                dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
                path: path.to_path_buf(),
            }
        } else {
            io("cannot create", e)
        }
    })?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io("cannot write", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(pem: &str) -> (Vec<String>, Vec<String>) {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let ou = cert
            .subject()
            .iter_organizational_unit()
            .map(|a| a.as_str().expect("str").to_string())
            .collect();
        let cn = cert
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().expect("str").to_string())
            .collect();
        (ou, cn)
    }

    #[test]
    fn pki_init_writes_all_files_with_roles_and_private_keys() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let out = init(
            &dir,
            &["coord.example".to_string()],
            &["web-1".to_string(), "web-2".to_string()],
        )
        .expect("init");
        assert_eq!(
            out.coordinator_sans,
            vec!["coord.example", "localhost", "127.0.0.1"]
        );
        for f in [
            "ca.pem",
            "ca.key",
            "coordinator.pem",
            "coordinator.key",
            "operator.pem",
            "operator.key",
            "agents/web-1.pem",
            "agents/web-1.key",
            "agents/web-2.pem",
            "agents/web-2.key",
        ] {
            assert!(dir.join(f).is_file(), "{f} missing");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in [
                "ca.key",
                "coordinator.key",
                "operator.key",
                "agents/web-1.key",
            ] {
                let mode = fs::metadata(dir.join(k))
                    .expect("meta")
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{k}");
            }
        }
        let read = |p: &Path| fs::read_to_string(p).expect("read");
        assert_eq!(
            subject(&read(&out.operator.cert)),
            (vec!["rollout-operator".into()], vec!["operator".into()])
        );
        assert_eq!(
            subject(&read(&out.coordinator.cert)),
            (
                vec!["rollout-coordinator".into()],
                vec!["coordinator".into()]
            )
        );
        assert_eq!(
            subject(&read(&out.agents[1].1.cert)),
            (vec!["rollout-agent".into()], vec!["web-2".into()])
        );
        // The CA carries no role.
        assert!(subject(&read(&out.ca.cert)).0.is_empty());
        load_ca(&dir).expect("load_ca");
    }

    #[test]
    fn pki_init_refuses_to_overwrite_a_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        init(tmp.path(), &[], &[]).expect("first init");
        let before = fs::read_to_string(tmp.path().join(CA_CERT)).expect("read");
        let err = init(tmp.path(), &[], &[]).expect_err("second init must fail");
        let msg = err.to_string();
        assert!(matches!(err, PkiError::AlreadyExists { .. }), "{msg}");
        assert!(msg.contains("another --dir"), "{msg}");
        let after = fs::read_to_string(tmp.path().join(CA_CERT)).expect("read");
        assert_eq!(before, after);
    }

    #[test]
    fn pki_rejects_hostile_agent_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for bad in ["", "../evil", "a/b", ".hidden", "-x", "sp ace"] {
            let err = init(tmp.path(), &[], &[bad.to_string()]).expect_err(bad);
            assert!(matches!(err, PkiError::InvalidName { .. }), "{bad}: {err}");
        }
        assert!(!tmp.path().join(CA_CERT).exists());
    }

    #[test]
    fn pki_issue_and_sign_csr_use_the_given_identity() {
        let tmp = tempfile::tempdir().expect("tempdir");
        init(tmp.path(), &[], &[]).expect("init");
        let ca = load_ca(tmp.path()).expect("ca");
        let (cert, key) = ca
            .issue(Role::Agent, "db-7", &[], Validity::leaf_default())
            .expect("issue");
        assert!(key.contains("PRIVATE KEY"));
        assert_eq!(
            subject(&cert),
            (vec!["rollout-agent".into()], vec!["db-7".into()])
        );

        let (csr, _key) = generate_csr("i-want-to-be-someone-else").expect("csr");
        let cert = ca
            .sign_csr(&csr, Role::Agent, "db-8", &[], Validity::leaf_default())
            .expect("sign");
        assert_eq!(
            subject(&cert),
            (vec!["rollout-agent".into()], vec!["db-8".into()])
        );
        assert!(
            ca.sign_csr("garbage", Role::Agent, "x", &[], Validity::leaf_default())
                .is_err()
        );
        verify_csr(&csr).expect("a fresh CSR verifies");
        assert!(verify_csr("garbage").is_err());
        // Two certificates for the same key still get distinct serials.
        let again = ca
            .sign_csr(&csr, Role::Agent, "db-8", &[], Validity::leaf_default())
            .expect("sign again");
        let serial = |pem: &str| {
            crate::tls::Identity::from_pem(pem)
                .expect("identity")
                .serial
        };
        assert_ne!(serial(&cert), serial(&again));
        let ca2 = Ca::from_pem(ca.cert_pem.clone(), ca.key_pem.clone()).expect("from_pem");
        assert_eq!(ca2.cert_pem, ca.cert_pem);
        let other = tempfile::tempdir().expect("tempdir");
        init(other.path(), &[], &[]).expect("other");
        let other = load_ca(other.path()).expect("other ca");
        assert!(matches!(
            Ca::from_pem(ca.cert_pem.clone(), other.key_pem),
            Err(PkiError::KeyMismatch)
        ));
    }

    #[test]
    fn pki_load_ca_detects_missing_and_mismatched_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = load_ca(tmp.path()).expect_err("empty dir");
        assert!(err.to_string().contains("certs init"), "{err}");

        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        init(&a, &[], &[]).expect("a");
        init(&b, &[], &[]).expect("b");
        let ca_a = load_ca(&a).expect("load a");
        let ca_b = load_ca(&b).expect("load b");
        let err = issue(
            &ca_a.cert_pem,
            &ca_b.key_pem,
            Role::Operator,
            "x",
            &[],
            Validity::leaf_default(),
        )
        .expect_err("mismatch");
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");
    }

    #[test]
    fn pki_role_round_trips() {
        for r in Role::ALL {
            assert_eq!(Role::from_ou(r.ou()), Some(r));
            assert_eq!(r.as_str().parse::<Role>().expect("parse"), r);
        }
        assert_eq!(Role::from_ou("rollout"), None);
    }
}
