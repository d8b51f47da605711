//! Artifacts by digest on the coordinator's disk: uploads are hashed while
//! written to a temporary file and renamed into place only when complete, and
//! served to agents in chunks (never loaded whole). Chunks pass through a
//! byte-bounded cache shared by every download, and a chunk missing from it
//! is read by one download while the others wanting it wait: agents staging
//! one release together cost one read of the file, not one per agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

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
#[derive(Clone)]
pub struct Artifacts {
    dir: PathBuf,
    /// Largest upload accepted.
    pub max_bytes: u64,
    /// Chunks recently served, by (digest, index); `None`: no cache.
    chunks: Option<Arc<ChunkCache>>,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("chunk_cache", &self.chunks.as_ref().map(|c| c.weight()))
            .finish()
    }
}

type ChunkCache = quick_cache::sync::Cache<(String, u64), Bytes, ChunkWeight>;

/// A cached chunk weighs its bytes (at least 1: an empty chunk is the end).
#[derive(Clone)]
struct ChunkWeight;

impl quick_cache::Weighter<(String, u64), Bytes> for ChunkWeight {
    fn weight(&self, _key: &(String, u64), val: &Bytes) -> u64 {
        (val.len() as u64).max(1)
    }
}

/// One chunk of a download.
#[derive(Debug)]
pub struct Chunk {
    /// The chunk's bytes (shared with the cache).
    pub data: Bytes,
    /// Bytes this download read from disk for it (0: found in the cache).
    pub read_from_disk: usize,
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
    /// Artifacts under `dir`, without a chunk cache.
    pub fn new(dir: PathBuf, max_bytes: u64) -> Artifacts {
        Artifacts {
            dir,
            max_bytes,
            chunks: None,
        }
    }

    /// Shares chunks among downloads through a cache of up to `bytes`
    /// (0: none; every download reads the file itself).
    pub fn with_chunk_cache(mut self, bytes: u64) -> Artifacts {
        let per_chunk = rollout_proto::ARTIFACT_CHUNK_BYTES as u64;
        // Downloads of one release stream it from start to end, a little
        // apart: recency matters, not frequency. One shard, so that the whole
        // budget is one window over the file, half of it for chunks read but
        // not yet read again by the other downloads (the default keeps 3 %
        // for them, and a download a few chunks behind read them again).
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity((bytes / per_chunk).max(1) as usize)
            .weight_capacity(bytes)
            .shards(1)
            .hot_allocation(0.5)
            .build();
        self.chunks = match options {
            Ok(o) if bytes > 0 => Some(Arc::new(ChunkCache::with_options(
                o,
                ChunkWeight,
                Default::default(),
                Default::default(),
            ))),
            _ => None,
        };
        self
    }

    /// Chunk `index` (of [`rollout_proto::ARTIFACT_CHUNK_BYTES`] each; the
    /// last is shorter, past the end empty) of the artifact `digest`, open
    /// as `file`: from the cache, or read from `file` by this caller (once
    /// for every caller wanting it at the same time).
    pub async fn chunk(
        &self,
        digest: &str,
        file: &mut tokio::fs::File,
        index: u64,
    ) -> Result<Chunk, ArtifactError> {
        let size = rollout_proto::ARTIFACT_CHUNK_BYTES;
        let read = AtomicBool::new(false);
        let from_disk = async {
            read.store(true, Ordering::Relaxed);
            file.seek(std::io::SeekFrom::Start(index * size as u64))
                .await
                .map_err(io("seek"))?;
            read_chunk(file, size)
                .await
                .map(Bytes::from)
                .map_err(io(format!("read artifact {digest}")))
        };
        let data = match &self.chunks {
            Some(cache) => {
                cache
                    .get_or_insert_async(&(digest.to_string(), index), from_disk)
                    .await?
            }
            None => from_disk.await?,
        };
        let read_from_disk = if read.load(Ordering::Relaxed) {
            data.len()
        } else {
            0
        };
        Ok(Chunk {
            data,
            read_from_disk,
        })
    }

    /// The artifact `digest`, open as `file`, from `offset` to its end, in
    /// chunks shared with the other downloads (see [`Artifacts::chunk`]); a
    /// download resumed mid-chunk starts with the rest of that chunk. No
    /// chunk is empty.
    pub fn download(
        &self,
        digest: String,
        mut file: tokio::fs::File,
        offset: u64,
    ) -> impl futures::Stream<Item = Result<Chunk, ArtifactError>> + Send + 'static {
        let artifacts = self.clone();
        let per_chunk = rollout_proto::ARTIFACT_CHUNK_BYTES as u64;
        let mut index = offset / per_chunk;
        let mut skip = (offset % per_chunk) as usize;
        async_stream::try_stream! {
            loop {
                let chunk = artifacts.chunk(&digest, &mut file, index).await?;
                let last = (chunk.data.len() as u64) < per_chunk;
                let data = chunk.data.slice(skip.min(chunk.data.len())..);
                skip = 0;
                index += 1;
                if !data.is_empty() {
                    yield Chunk {
                        data,
                        read_from_disk: chunk.read_from_disk,
                    };
                }
                if last {
                    break;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    const CHUNK: usize = rollout_proto::ARTIFACT_CHUNK_BYTES;

    /// Stores `len` bytes of a pattern; (artifacts, digest, bytes).
    async fn stored(dir: &Path, len: usize, cache: u64) -> (Artifacts, String, Vec<u8>) {
        let a = Artifacts::new(dir.to_path_buf(), 1 << 30).with_chunk_cache(cache);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut up = a.begin().await.expect("begin");
        up.write(&data).await.expect("write");
        let (digest, _) = a.finish(up, None).await.expect("finish");
        (a, digest, data)
    }

    /// One download from `offset`: (bytes, bytes it read from disk).
    async fn download(a: &Artifacts, digest: &str, offset: u64) -> (Vec<u8>, usize) {
        let file = a.open(digest, offset).await.expect("open");
        let mut chunks = std::pin::pin!(a.download(digest.to_string(), file, offset));
        let (mut out, mut read) = (Vec::new(), 0);
        while let Some(c) = chunks.next().await {
            let c = c.expect("chunk");
            assert!(!c.data.is_empty());
            out.extend_from_slice(&c.data);
            read += c.read_from_disk;
        }
        (out, read)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn downloads_at_the_same_time_read_the_file_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 5 * CHUNK + 123;
        let (a, digest, data) = stored(dir.path(), len, 64 << 20).await;
        let runs: Vec<_> = (0..8)
            .map(|_| {
                let (a, digest) = (a.clone(), digest.clone());
                tokio::spawn(async move { download(&a, &digest, 0).await })
            })
            .collect();
        let mut read = 0;
        for r in runs {
            let (got, n) = r.await.expect("task");
            assert!(got == data, "a download differs from the artifact");
            read += n;
        }
        assert_eq!(
            read, len,
            "8 downloads read {read} bytes of a {len}-byte file"
        );
    }

    #[tokio::test]
    async fn a_download_behind_another_by_less_than_half_the_cache_reads_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chunks = 32u64;
        // A cache of 8 chunks; the second download 3 chunks behind.
        let (a, digest, _) = stored(dir.path(), chunks as usize * CHUNK, 8 * CHUNK as u64).await;
        let mut lead = a.open(&digest, 0).await.expect("open");
        let mut lag = a.open(&digest, 0).await.expect("open");
        let (mut lead_read, mut lag_read) = (0, 0);
        for i in 0..chunks + 3 {
            if i < chunks {
                lead_read += a
                    .chunk(&digest, &mut lead, i)
                    .await
                    .expect("lead")
                    .read_from_disk;
            }
            if i >= 3 {
                lag_read += a
                    .chunk(&digest, &mut lag, i - 3)
                    .await
                    .expect("lag")
                    .read_from_disk;
            }
        }
        assert_eq!(lead_read, chunks as usize * CHUNK);
        assert_eq!(
            lag_read, 0,
            "the download behind read {lag_read} bytes again"
        );
    }

    #[tokio::test]
    async fn without_a_cache_each_download_reads_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 2 * CHUNK + 1;
        let (a, digest, data) = stored(dir.path(), len, 0).await;
        for _ in 0..3 {
            assert_eq!(download(&a, &digest, 0).await, (data.clone(), len));
        }
    }

    #[tokio::test]
    async fn a_resumed_download_gets_exactly_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 3 * CHUNK;
        let (a, digest, data) = stored(dir.path(), len, 64 << 20).await;
        for offset in [0, 1, CHUNK - 1, CHUNK, CHUNK + 17, len - 1, len] {
            let (got, _) = download(&a, &digest, offset as u64).await;
            assert!(got == data[offset..], "from {offset}: {} bytes", got.len());
        }
        // An empty artifact is an empty download.
        let (a, digest, _) = stored(dir.path(), 0, 64 << 20).await;
        assert_eq!(download(&a, &digest, 0).await, (Vec::new(), 0));
    }
}
