//! Artifacts by digest on the coordinator's disk: uploads are hashed while
//! written to a temporary file and renamed into place only when complete, and
//! served to agents in chunks straight from the file (never loaded whole, so
//! many agents fetching at once cost one buffer each).

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Artifact store failures.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Disk I/O failed.
    #[error("artifact store: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The upload does not match the digest the operator gave.
    #[error(
        "artifact digest mismatch: the spec says {expected} but the uploaded file is {actual}; fix the digest in the spec or upload the right file"
    )]
    Mismatch {
        /// Digest claimed.
        expected: String,
        /// Digest computed.
        actual: String,
    },
    /// The digest is malformed.
    #[error("{0:?} is not a digest; write it as sha256:<64 hex digits>")]
    BadDigest(String),
    /// Not present.
    #[error(
        "artifact {0} is not on the coordinator; upload it with `rollout deploy` (which uploads the spec's artifact)"
    )]
    Missing(String),
    /// Too large.
    #[error("artifact upload exceeds the coordinator's limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
}

/// The artifact directory.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
    /// Largest upload accepted.
    pub max_bytes: u64,
}

/// Checks `sha256:<64 hex>` and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, ArtifactError> {
    let hex_part = digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| ArtifactError::BadDigest(digest.to_string()))?;
    Ok(hex_part)
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let context = context.into();
    move |source| ArtifactError::Io { context, source }
}

/// An upload in progress.
#[derive(Debug)]
pub struct Upload {
    file: tokio::fs::File,
    tmp: PathBuf,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

impl Upload {
    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ArtifactError> {
        self.size += data.len() as u64;
        if self.size > self.limit {
            let _ = tokio::fs::remove_file(&self.tmp).await;
            return Err(ArtifactError::TooLarge { limit: self.limit });
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(io(format!("write {}", self.tmp.display())))
    }
}

impl Artifacts {
    /// Artifacts under `dir`.
    pub fn new(dir: PathBuf, max_bytes: u64) -> Artifacts {
        Artifacts { dir, max_bytes }
    }

    /// Path of a stored artifact.
    pub fn path(&self, digest: &str) -> Result<PathBuf, ArtifactError> {
        Ok(self.dir.join(digest_hex(digest)?))
    }

    /// Whether the artifact is stored.
    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Starts an upload.
    pub async fn begin(&self) -> Result<Upload, ArtifactError> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(io(format!("create {}", self.dir.display())))?;
        let tmp = self.dir.join(format!(
            ".upload-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io(format!("create {}", tmp.display())))?;
        Ok(Upload {
            file,
            tmp,
            hasher: Sha256::new(),
            size: 0,
            limit: self.max_bytes,
        })
    }

    /// Finishes an upload: verifies the expected digest (if any), fsyncs and
    /// renames into place. Returns (digest, size).
    pub async fn finish(
        &self,
        mut up: Upload,
        expected: Option<&str>,
    ) -> Result<(String, u64), ArtifactError> {
        let digest = format!("sha256:{}", hex::encode(up.hasher.finalize_reset()));
        if let Some(exp) = expected.filter(|e| !e.is_empty())
            && exp != digest
        {
            let _ = tokio::fs::remove_file(&up.tmp).await;
            return Err(ArtifactError::Mismatch {
                expected: exp.to_string(),
                actual: digest,
            });
        }
        up.file.sync_all().await.map_err(io("fsync upload"))?;
        let dest = self.path(&digest)?;
        tokio::fs::rename(&up.tmp, &dest)
            .await
            .map_err(io(format!("rename to {}", dest.display())))?;
        Ok((digest, up.size))
    }

    /// Opens a stored artifact at `offset` for streaming.
    pub async fn open(&self, digest: &str, offset: u64) -> Result<tokio::fs::File, ArtifactError> {
        let p = self.path(digest)?;
        let mut f = match tokio::fs::File::open(&p).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArtifactError::Missing(digest.to_string()));
            }
            Err(e) => return Err(io(format!("open {}", p.display()))(e)),
        };
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io("seek"))?;
        Ok(f)
    }

    /// Size of a stored artifact.
    pub async fn size(&self, digest: &str) -> Result<u64, ArtifactError> {
        let p = self.path(digest)?;
        tokio::fs::metadata(&p)
            .await
            .map(|m| m.len())
            .map_err(|_| ArtifactError::Missing(digest.to_string()))
    }
}

/// Reads up to `n` bytes (less only at end of file).
pub async fn read_chunk(f: &mut tokio::fs::File, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        let r = f.read(&mut buf[filled..]).await?;
        if r == 0 {
            break;
        }
        filled += r;
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Hashes a local file (the CLI checks a spec's digest before uploading).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}
