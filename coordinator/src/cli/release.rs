//! `rollout release keygen` and `rollout release sign`: ed25519 release
//! signing. The signature covers the artifact's digest string
//! (`sha256:<hex>`), so agents check it before fetching or unpacking a byte.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::Signer as _;

use super::CliError;
use crate::artifacts::sha256_file;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Writes `release-signing.key` (mode 0600) and `release-signing.pub` into
/// `dir`; refuses to overwrite. Returns the public key.
pub fn keygen(dir: &Path) -> Result<String, CliError> {
    std::fs::create_dir_all(dir).map_err(|error| CliError::Read {
        path: dir.display().to_string(),
        error,
    })?;
    let key_path = dir.join("release-signing.key");
    let pub_path = dir.join("release-signing.pub");
    for p in [&key_path, &pub_path] {
        if p.exists() {
            return Err(CliError::Invalid(format!(
                "{} already exists; keep the existing key or choose another --out",
                p.display()
            )));
        }
    }
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let public = b64(key.verifying_key().as_bytes());
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let write = |p: &PathBuf, mode: u32, text: &str| -> Result<(), CliError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .map_err(|error| CliError::Read {
                path: p.display().to_string(),
                error,
            })?;
        writeln!(f, "{text}")?;
        f.sync_all()?;
        Ok(())
    };
    write(&key_path, 0o600, &b64(key.as_bytes()))?;
    write(&pub_path, 0o644, &public)?;
    Ok(public)
}

/// Signs the digest of `artifact` with the key file; returns (digest, signature).
pub fn sign(key_file: &Path, artifact: &Path) -> Result<(String, String), CliError> {
    let text = std::fs::read_to_string(key_file).map_err(|error| CliError::Read {
        path: key_file.display().to_string(),
        error,
    })?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| {
            CliError::Invalid(format!(
                "{}: not a key from `rollout release keygen` ({e})",
                key_file.display()
            ))
        })?;
    let bytes: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
        CliError::Invalid(format!(
            "{}: not a key from `rollout release keygen` ({} bytes, want 32)",
            key_file.display(),
            raw.len()
        ))
    })?;
    let key = ed25519_dalek::SigningKey::from_bytes(&bytes);
    let digest = sha256_file(artifact).map_err(|error| CliError::Read {
        path: artifact.display().to_string(),
        error,
    })?;
    Ok((digest.clone(), b64(&key.sign(digest.as_bytes()).to_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier as _;

    #[test]
    fn keygen_then_sign_verifies_with_the_public_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let public = keygen(dir.path()).expect("keygen");
        assert!(keygen(dir.path()).is_err(), "overwrote an existing key");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("release-signing.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let art = dir.path().join("a.tar.gz");
        std::fs::write(&art, b"artifact").expect("write");
        let (digest, sig) = sign(&dir.path().join("release-signing.key"), &art).expect("sign");
        let pk: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(public)
            .expect("b64")
            .try_into()
            .expect("32");
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).expect("key");
        let sig: [u8; 64] = base64::engine::general_purpose::STANDARD
            .decode(sig)
            .expect("b64")
            .try_into()
            .expect("64");
        vk.verify(
            digest.as_bytes(),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .expect("verifies");
    }
}
