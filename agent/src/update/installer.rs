//! Installing releases on disk: fetching artifacts into the cache by digest,
//! verifying them, unpacking them safely into a release directory, and
//! switching a service's `current` link.
//!
//! What lands where (see [`crate::layout`]):
//!
//! ```text
//! cache/<hex>.part                 download in progress; resumed from its length
//! cache/<hex>                      verified artifact (renamed from .part once the digest matches)
//! services/<svc>/releases/.<id>.tmp     unpack in progress; removed on any error
//! services/<svc>/releases/.<id>.digest  digest the release was unpacked from
//! services/<svc>/releases/<id>          staged release (renamed from .<id>.tmp)
//! services/<svc>/.current.tmp.*         new link, renamed over `current`
//! services/<svc>/current -> releases/<id>
//! ```
//!
//! The temporary and marker names start with `.` on purpose: release ids may
//! contain `.` (`v1.tmp` is a valid id) but never start with one, so no
//! bookkeeping file can be mistaken for a release, and cleaning up after a crash
//! never deletes a real release.
//!
//! Crash safety: every step ends in a rename(2) followed by an fsync of the
//! parent directory, and the digest marker is made durable before the release
//! directory appears. After a crash there is either a complete release with its
//! marker, or leftovers that [`Installer::clean_partial`] removes; a `.part`
//! download is kept and resumed.
//!
//! Archives are treated as hostile even after their digest is verified: the
//! extractor writes every file itself and refuses absolute paths, `..`, writing
//! through links, links that point outside the release, devices, fifos,
//! setuid/setgid files, and archives over [`ArchiveLimits`].

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use flate2::bufread::MultiGzDecoder;
use futures::StreamExt;
use futures::stream::BoxStream;
use sha2::{Digest as _, Sha256};
use tracing::{debug, info, warn};

use crate::layout::Layout;
use crate::release::{Digest, InvalidDefinition, ServiceDefinition, validate_name};

const GIB: u64 = 1 << 30;

/// Buffer size for hashing, reading and copying file contents: large enough
/// that a 200 MiB release costs hundreds of system calls, not thousands.
const COPY_BUF: usize = 256 * 1024;

/// Room per entry for tar headers, long-name records and padding when bounding
/// the decompressed stream (see [`Budget`]).
const ENTRY_OVERHEAD: u64 = 4096;

/// Room for the end-of-archive blocks and record padding after the last entry.
const TRAILER_SLACK: u64 = 1 << 20;

/// Limits against hostile archives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Largest artifact (compressed) the agent downloads: bounds the cache's
    /// disk use and the time spent on the wire.
    pub max_artifact_bytes: u64,
    /// Largest total size of the regular files an artifact may unpack to:
    /// stops decompression bombs before they fill the disk.
    pub max_unpacked_bytes: u64,
    /// Most entries an archive may hold: stops inode exhaustion.
    pub max_entries: u64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            max_artifact_bytes: GIB,
            max_unpacked_bytes: 4 * GIB,
            max_entries: 200_000,
        }
    }
}

/// Where artifacts come from (real: gRPC stream from the coordinator; fake:
/// [`MemorySource`] in tests).
pub trait ArtifactSource: Send + Sync + 'static {
    /// Stream the artifact's bytes starting at `offset` (resume of a .part file).
    fn fetch(&self, digest: Digest, offset: u64) -> BoxStream<'static, Result<Bytes, FetchError>>;
}

/// Why an [`ArtifactSource`] could not deliver an artifact.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The source cannot be reached now; retrying later may work.
    #[error("artifact source unavailable: {0}")]
    Unavailable(String),
    /// The source does not have the artifact.
    #[error("artifact not found at the source: {0}")]
    NotFound(String),
    /// Anything else the source reports.
    #[error("{0}")]
    Other(String),
}

/// Size of the chunks [`MemorySource`] streams in: small, so that limits are
/// crossed in the middle of a stream in tests.
const MEMORY_CHUNK: usize = 16 * 1024;

/// An in-memory [`ArtifactSource`] for tests (also usable by other crates'
/// tests). It records every fetch and can simulate a dropped connection.
#[derive(Debug, Default)]
pub struct MemorySource {
    /// Artifacts by the digest they are served under.
    artifacts: Mutex<HashMap<Digest, MemoryArtifact>>,
}

#[derive(Debug, Default)]
struct MemoryArtifact {
    /// Bytes served for the digest (need not match it; see [`MemorySource::insert_as`]).
    data: Bytes,
    /// Offset of every fetch, in order; how tests see fetches and resumes.
    offsets: Vec<u64>,
    /// The next fetch stops after this many bytes with `Unavailable`.
    interrupt_after: Option<u64>,
}

impl MemorySource {
    /// Serves `data` under its own sha256 digest, which is returned.
    pub fn insert(&self, data: Vec<u8>) -> Digest {
        let digest = digest_of(&data);
        self.insert_as(digest, data);
        digest
    }

    /// Serves `data` under `digest` even if they do not match: a source that
    /// corrupts or swaps content.
    pub fn insert_as(&self, digest: Digest, data: Vec<u8>) {
        self.lock().entry(digest).or_default().data = Bytes::from(data);
    }

    /// The next fetch of `digest` delivers at most `bytes` bytes and then fails
    /// with [`FetchError::Unavailable`], like a connection dropped mid-transfer.
    pub fn interrupt_once_after(&self, digest: Digest, bytes: u64) {
        self.lock().entry(digest).or_default().interrupt_after = Some(bytes);
    }

    /// How many times `digest` was fetched.
    pub fn fetch_count(&self, digest: Digest) -> usize {
        self.lock().get(&digest).map_or(0, |a| a.offsets.len())
    }

    /// The offset of every fetch of `digest`, in order.
    pub fn fetch_offsets(&self, digest: Digest) -> Vec<u64> {
        self.lock()
            .get(&digest)
            .map(|a| a.offsets.clone())
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Digest, MemoryArtifact>> {
        self.artifacts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl ArtifactSource for MemorySource {
    fn fetch(&self, digest: Digest, offset: u64) -> BoxStream<'static, Result<Bytes, FetchError>> {
        let mut artifacts = self.lock();
        let Some(artifact) = artifacts.get_mut(&digest) else {
            let err = FetchError::NotFound(digest.to_string());
            return futures::stream::iter([Err(err)]).boxed();
        };
        artifact.offsets.push(offset);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(artifact.data.len());
        let mut rest = artifact.data.slice(start..);
        let interrupt = artifact.interrupt_after.take();
        if let Some(n) = interrupt {
            rest.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        }
        let mut items = Vec::new();
        while !rest.is_empty() {
            let n = rest.len().min(MEMORY_CHUNK);
            items.push(Ok(rest.split_to(n)));
        }
        if interrupt.is_some() {
            items.push(Err(FetchError::Unavailable(
                "connection dropped mid-transfer (simulated)".to_owned(),
            )));
        }
        futures::stream::iter(items).boxed()
    }
}

/// Everything that can go wrong while installing a release. Each message names
/// the cause and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Signed releases are required and this one carries no signature.
    #[error(
        "release {release} of service {service} is unsigned, but this agent only accepts releases signed by its trusted_keys; sign the artifact with `rollout release sign` and put the signature in the spec's [artifact] signature"
    )]
    Unsigned {
        /// Service.
        service: String,
        /// Release.
        release: String,
    },
    /// The signature does not verify.
    #[error(
        "release {release} of service {service} has a bad signature: {reason}; sign it with a key listed in the agent's trusted_keys"
    )]
    BadSignature {
        /// Service.
        service: String,
        /// Release.
        release: String,
        /// Why.
        reason: String,
    },
    /// A configured trusted key does not parse.
    #[error(
        "trusted key {key:?} is not a base64 ed25519 public key ({reason}); use the .pub file written by `rollout release keygen`"
    )]
    BadTrustedKey {
        /// The key as configured.
        key: String,
        /// Why.
        reason: String,
    },
    /// The artifact is over [`ArchiveLimits::max_artifact_bytes`].
    #[error(
        "artifact {digest} is larger than the agent's limit of {limit} bytes (at least {size} \
         bytes); publish a smaller artifact or raise max_artifact_bytes in the agent config"
    )]
    TooLarge {
        /// The artifact.
        digest: Digest,
        /// Its announced size, or the bytes received when the limit was passed.
        size: u64,
        /// The limit it broke.
        limit: u64,
    },
    /// The source sent more bytes than the release announced.
    #[error(
        "artifact {digest} is larger than the {announced} bytes its release announces; the \
         source serves different content than the release describes — re-publish the release \
         with the artifact's real size and digest"
    )]
    LargerThanAnnounced {
        /// The artifact.
        digest: Digest,
        /// Size given in the release.
        announced: u64,
    },
    /// The downloaded bytes do not hash to the release's digest.
    #[error(
        "artifact digest mismatch: expected {expected}, got {actual}; the artifact was changed \
         or corrupted in transit — re-publish the release with the right digest"
    )]
    DigestMismatch {
        /// Digest named by the release.
        expected: Digest,
        /// Digest of the bytes received.
        actual: Digest,
    },
    /// The artifact source failed; the partial download is kept for resuming.
    #[error(
        "fetching artifact {digest} failed: {source}; the partial download is kept and resumes \
         on the next attempt — check the connection to the coordinator"
    )]
    Fetch {
        /// The artifact.
        digest: Digest,
        /// What the source reported.
        source: FetchError,
    },
    /// The disk under the data directory is full.
    #[error(
        "no space left on device while trying to {context}; free disk space in the agent's data \
         directory (old releases under services/*/releases, artifacts under cache/) and retry"
    )]
    NoSpace {
        /// What the agent was doing.
        context: String,
    },
    /// Any other file-system failure.
    #[error("failed to {context}: {source}; check that the agent can write to its data directory")]
    Io {
        /// What the agent was doing, with the path.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The archive tries something a release must not do.
    #[error("archive entry {entry:?} is unsafe: {reason}")]
    Unsafe {
        /// The offending entry's path as written in the archive.
        entry: String,
        /// What is wrong with it and how to fix the artifact.
        reason: String,
    },
    /// The artifact is not a readable tar.gz.
    #[error(
        "artifact is not a valid tar.gz archive: {reason}; rebuild it (e.g. with `tar -czf`) \
         and publish it as a new release"
    )]
    Corrupt {
        /// What the decoder reported.
        reason: String,
    },
    /// A release id was reused for different content.
    #[error(
        "release {release} of service {service} is already staged with digest {staged}, not \
         {requested}; release ids are immutable — publish a new release id instead of reusing \
         {release}"
    )]
    ReleaseConflict {
        /// The service.
        service: String,
        /// The reused release id.
        release: String,
        /// Digest the staged release was unpacked from.
        staged: Digest,
        /// Digest now requested.
        requested: Digest,
    },
    /// A release directory exists without the marker staging writes.
    #[error(
        "release {release} of service {service} exists at {} but was not staged by the agent \
         (its digest marker is missing); if it is not the current release, remove that \
         directory and stage again", path.display()
    )]
    Unmarked {
        /// The service.
        service: String,
        /// The release id.
        release: String,
        /// The directory found.
        path: PathBuf,
    },
    /// `current` cannot point at a release that is not staged.
    #[error(
        "release {release} of service {service} is not staged; stage it before switching \
         `current` to it"
    )]
    NotStaged {
        /// The service.
        service: String,
        /// The release id.
        release: String,
    },
    /// Retention must not delete the running release.
    #[error(
        "release {release} of service {service} is what `current` points to; switch or clear \
         `current` before removing it"
    )]
    InUse {
        /// The service.
        service: String,
        /// The release id.
        release: String,
    },
    /// A service or release name that cannot be used as a directory name.
    #[error(transparent)]
    InvalidName(#[from] InvalidDefinition),
}

/// Wraps an I/O error with what was being done; a full disk gets its own
/// variant because its fix is different.
fn io_err(context: impl Into<String>, source: io::Error) -> InstallError {
    match source.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => InstallError::NoSpace {
            context: context.into(),
        },
        _ => InstallError::Io {
            context: context.into(),
            source,
        },
    }
}

fn unsafe_entry(entry: &str, reason: impl Into<String>) -> InstallError {
    InstallError::Unsafe {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

/// Result of [`Installer::stage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// The release directory, `services/<svc>/releases/<id>`.
    pub path: PathBuf,
    /// The release was already staged from the same digest; nothing was
    /// fetched or unpacked.
    pub already_present: bool,
}

/// What [`unpack_tar_gz`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Regular files created, hard links included.
    pub files: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
}

/// Source of unique names for temporary `current` links.
static LINK_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Fetches, verifies, unpacks and activates releases under one data directory.
pub struct Installer {
    /// Where the cache and the releases live.
    layout: Layout,
    /// Bounds on artifacts and archives.
    limits: ArchiveLimits,
    /// Where missing artifacts are fetched from.
    source: Arc<dyn ArtifactSource>,
    /// One lock per digest, so two services staging the same artifact never
    /// write the same `.part` at once. Never pruned: an agent sees few digests.
    fetch_locks: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Release-signing keys this agent trusts; when any is set, a release
    /// must carry an ed25519 signature over its digest string by one of them.
    trusted_keys: Vec<ed25519_dalek::VerifyingKey>,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer")
            .field("layout", &self.layout)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Installer {
    /// An installer for `layout`, fetching from `source`.
    pub fn new(layout: Layout, limits: ArchiveLimits, source: Arc<dyn ArtifactSource>) -> Self {
        Installer {
            layout,
            limits,
            source,
            fetch_locks: Mutex::new(HashMap::new()),
            trusted_keys: Vec::new(),
        }
    }

    /// Requires releases signed by one of `keys` (base64 ed25519 public keys).
    pub fn with_trusted_keys(mut self, keys: &[String]) -> Result<Self, InstallError> {
        for k in keys {
            self.trusted_keys.push(parse_public_key(k)?);
        }
        Ok(self)
    }

    /// Checks the release's signature before anything is fetched or unpacked.
    fn check_signature(&self, def: &ServiceDefinition) -> Result<(), InstallError> {
        if self.trusted_keys.is_empty() {
            return Ok(());
        }
        let unsigned = || InstallError::Unsigned {
            service: def.service.clone(),
            release: def.release.clone(),
        };
        let sig_b64 = def.artifact.signature.as_deref().ok_or_else(unsigned)?;
        let bad = |reason: String| InstallError::BadSignature {
            service: def.service.clone(),
            release: def.release.clone(),
            reason,
        };
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sig_b64.trim())
            .map_err(|e| bad(format!("not base64: {e}")))?;
        let sig = ed25519_dalek::Signature::from_slice(&raw)
            .map_err(|e| bad(format!("not an ed25519 signature: {e}")))?;
        let msg = def.artifact.digest.to_string();
        if self
            .trusted_keys
            .iter()
            .any(|k| k.verify_strict(msg.as_bytes(), &sig).is_ok())
        {
            Ok(())
        } else {
            Err(bad(format!(
                "it does not verify for {msg} with any of the {} trusted keys",
                self.trusted_keys.len()
            )))
        }
    }

    /// The data directory layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The archive limits in force.
    pub fn limits(&self) -> ArchiveLimits {
        self.limits
    }

    /// Ensures `cache/<hex>` holds the verified artifact and returns its path.
    ///
    /// A valid cached copy is returned without fetching (an invalid one is
    /// deleted and fetched again). Otherwise the artifact is downloaded to
    /// `cache/<hex>.part`, resuming an existing `.part`, hashed as it arrives,
    /// refused past `max_artifact_bytes` or past `announced_size` (0 =
    /// unknown), fsynced, verified, and renamed into place. On a digest
    /// mismatch the `.part` is deleted; on a fetch error it is kept.
    pub async fn ensure_artifact(
        &self,
        digest: Digest,
        announced_size: u64,
    ) -> Result<PathBuf, InstallError> {
        let limit = self.limits.max_artifact_bytes;
        if announced_size > limit {
            return Err(InstallError::TooLarge {
                digest,
                size: announced_size,
                limit,
            });
        }
        let max_len = if announced_size > 0 {
            announced_size
        } else {
            limit
        };
        let lock = self.fetch_lock(digest);
        let _guard = lock.lock().await;

        let cache_dir = self.layout.cache_dir();
        let hex = digest.hex();
        let final_path = self.layout.cached_artifact(&hex);
        let part_path = cache_dir.join(format!("{hex}.part"));

        let prepared = {
            let (cache_dir, final_path, part_path) =
                (cache_dir.clone(), final_path.clone(), part_path.clone());
            blocking("prepare the artifact cache", move || {
                prepare_download(&cache_dir, &final_path, &part_path, digest, max_len)
            })
            .await?
        };
        let (hasher, offset) = match prepared {
            Prepared::Cached => {
                debug!(%digest, "artifact already cached");
                return Ok(final_path);
            }
            Prepared::Download { hasher, offset } => (hasher, offset),
        };

        let part_ctx = || format!("write artifact download {}", part_path.display());
        let file = {
            let (part_path, ctx) = (part_path.clone(), part_ctx());
            blocking("open the artifact download", move || {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&part_path)
                    .map_err(|e| io_err(ctx, e))
            })
            .await?
        };
        let mut part = PartWriter {
            state: Some((file, hasher)),
        };
        if offset > 0 {
            info!(%digest, offset, "resuming artifact download");
        } else {
            info!(%digest, announced_size, "downloading artifact");
        }
        let mut stream = self.source.fetch(digest, offset);
        let mut received = offset;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(source) => {
                    // Keep what arrived for the next attempt; its content is
                    // re-hashed from disk then, so a short write is harmless.
                    warn!(%digest, received, error = %source, "artifact download interrupted");
                    return Err(InstallError::Fetch { digest, source });
                }
            };
            received = received.saturating_add(chunk.len() as u64);
            if received > max_len {
                drop(part);
                remove_file_if_exists(&part_path)?;
                return Err(if announced_size > 0 {
                    InstallError::LargerThanAnnounced {
                        digest,
                        announced: announced_size,
                    }
                } else {
                    InstallError::TooLarge {
                        digest,
                        size: received,
                        limit,
                    }
                });
            }
            part.append(chunk)
                .await
                .map_err(|e| io_err(part_ctx(), e))?;
        }
        let hasher = part.finish().await.map_err(|e| io_err(part_ctx(), e))?;

        let actual = Digest(hasher.finalize().into());
        if actual != digest {
            warn!(expected = %digest, %actual, received, "artifact digest mismatch; discarding download");
            remove_file_if_exists(&part_path)?;
            return Err(InstallError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        if announced_size > 0 && received != announced_size {
            warn!(%digest, received, announced_size, "artifact size differs from the announced size; digest matches, accepting");
        }
        {
            let (part_path, final_path) = (part_path.clone(), final_path.clone());
            blocking("store the verified artifact", move || {
                fs::rename(&part_path, &final_path).map_err(|e| {
                    io_err(format!("rename {} into the cache", part_path.display()), e)
                })?;
                fsync_dir(&cache_dir)
            })
            .await?;
        }
        info!(%digest, bytes = received, "artifact verified and cached");
        Ok(final_path)
    }

    /// Stages a release: fetches and verifies its artifact, unpacks it into
    /// `releases/.<id>.tmp`, fsyncs everything and renames it to
    /// `releases/<id>`.
    ///
    /// A release already staged from the same digest is returned with
    /// `already_present` and nothing fetched; one staged from another digest is
    /// a [`InstallError::ReleaseConflict`]. On any error the temporary
    /// directory is removed and nothing else (other releases, `current`) is
    /// touched. Callers run one operation per service at a time; stages of
    /// different services may share an artifact safely.
    pub async fn stage(&self, def: &ServiceDefinition) -> Result<Staged, InstallError> {
        validate_name("service", &def.service)?;
        validate_name("release", &def.release)?;
        self.check_signature(def)?;
        let (service, release, digest) = (&def.service, &def.release, def.artifact.digest);
        let path = self.layout.release_dir(service, release);
        let marker = marker_path(&self.layout, service, release);

        let existing = {
            let (path, marker) = (path.clone(), marker.clone());
            blocking("check for a staged release", move || {
                existing_release(&path, &marker)
            })
            .await?
        };
        match existing {
            Existing::Absent => {}
            Existing::Staged(staged) if staged == digest => {
                debug!(%service, %release, %digest, "release already staged");
                return Ok(Staged {
                    path,
                    already_present: true,
                });
            }
            Existing::Staged(staged) => {
                return Err(InstallError::ReleaseConflict {
                    service: service.clone(),
                    release: release.clone(),
                    staged,
                    requested: digest,
                });
            }
            Existing::Unmarked => {
                return Err(InstallError::Unmarked {
                    service: service.clone(),
                    release: release.clone(),
                    path,
                });
            }
        }

        let artifact = self.ensure_artifact(digest, def.artifact.size).await?;
        let job = UnpackJob {
            artifact,
            releases_dir: self.layout.releases_dir(service),
            tmp: staging_dir(&self.layout, service, release),
            marker,
            path: path.clone(),
            digest,
            limits: self.limits,
        };
        let stats = blocking("unpack the release", move || job.run()).await?;
        info!(%service, %release, %digest, files = stats.files, bytes = stats.bytes, "release staged");
        Ok(Staged {
            path,
            already_present: false,
        })
    }

    /// Atomically points `services/<svc>/current` at `releases/<id>`: a new
    /// relative link is created beside it and renamed over it, then the
    /// service directory is fsynced.
    pub fn switch_current(&self, service: &str, release: &str) -> Result<(), InstallError> {
        validate_name("service", service)?;
        validate_name("release", release)?;
        if !self.is_staged(service, release) {
            return Err(InstallError::NotStaged {
                service: service.to_owned(),
                release: release.to_owned(),
            });
        }
        let service_dir = self.layout.service_dir(service);
        let current = self.layout.current_link(service);
        let tmp = service_dir.join(format!(
            ".current.tmp.{}.{}",
            std::process::id(),
            LINK_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        remove_file_if_exists(&tmp)?;
        let target = Path::new("releases").join(release);
        std::os::unix::fs::symlink(&target, &tmp)
            .map_err(|e| io_err(format!("create link {}", tmp.display()), e))?;
        if let Err(e) = fs::rename(&tmp, &current) {
            if let Err(cleanup) = fs::remove_file(&tmp) {
                warn!(path = %tmp.display(), error = %cleanup, "could not remove temporary link");
            }
            return Err(io_err(
                format!("replace {} with a link to {release}", current.display()),
                e,
            ));
        }
        fsync_dir(&service_dir)?;
        info!(%service, %release, "switched current");
        Ok(())
    }

    /// Removes `current` (rolling a service's first release back to nothing).
    /// Idempotent.
    pub fn clear_current(&self, service: &str) -> Result<(), InstallError> {
        validate_name("service", service)?;
        let current = self.layout.current_link(service);
        match fs::remove_file(&current) {
            Ok(()) => {
                fsync_dir(&self.layout.service_dir(service))?;
                info!(%service, "cleared current");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", current.display()), e)),
        }
    }

    /// The release `current` points to, if any.
    pub fn read_current(&self, service: &str) -> Result<Option<String>, InstallError> {
        validate_name("service", service)?;
        let current = self.layout.current_link(service);
        match fs::read_link(&current) {
            Ok(target) => Ok(target
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(
                format!(
                    "read the link {} (if it is not a symlink, remove it)",
                    current.display()
                ),
                e,
            )),
        }
    }

    /// Whether `releases/<id>` is fully staged (directory and digest marker).
    pub fn is_staged(&self, service: &str, release: &str) -> bool {
        if validate_name("service", service).is_err() || validate_name("release", release).is_err()
        {
            return false;
        }
        let dir_ok = fs::symlink_metadata(self.layout.release_dir(service, release))
            .is_ok_and(|m| m.file_type().is_dir());
        dir_ok && marker_path(&self.layout, service, release).is_file()
    }

    /// The digest a staged release was unpacked from.
    pub fn staged_digest(
        &self,
        service: &str,
        release: &str,
    ) -> Result<Option<Digest>, InstallError> {
        validate_name("service", service)?;
        validate_name("release", release)?;
        match existing_release(
            &self.layout.release_dir(service, release),
            &marker_path(&self.layout, service, release),
        )? {
            Existing::Staged(digest) => Ok(Some(digest)),
            Existing::Absent | Existing::Unmarked => Ok(None),
        }
    }

    /// Ids of the fully staged releases of a service, sorted by name.
    pub fn staged_releases(&self, service: &str) -> Result<Vec<String>, InstallError> {
        validate_name("service", service)?;
        let dir = self.layout.releases_dir(service);
        let mut out = Vec::new();
        for name in list_dir(&dir)? {
            if let Some(name) = name.to_str()
                && self.is_staged(service, name)
            {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes an unpacked release (retention). Idempotent; refuses the
    /// release `current` points to; leaves the artifact cache alone.
    pub fn remove_release(&self, service: &str, release: &str) -> Result<(), InstallError> {
        validate_name("service", service)?;
        validate_name("release", release)?;
        if self.read_current(service)?.as_deref() == Some(release) {
            return Err(InstallError::InUse {
                service: service.to_owned(),
                release: release.to_owned(),
            });
        }
        let releases_dir = self.layout.releases_dir(service);
        let dir = self.layout.release_dir(service, release);
        let trash = staging_dir(&self.layout, service, release);
        // Rename first, so a crash mid-delete never leaves a half-deleted
        // directory that still looks staged; clean_partial removes the rest.
        let present = match fs::symlink_metadata(&dir) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(format!("inspect {}", dir.display()), e)),
        };
        if present {
            remove_path(&trash)?;
            fs::rename(&dir, &trash)
                .map_err(|e| io_err(format!("move {} aside", dir.display()), e))?;
        }
        let marker = marker_path(&self.layout, service, release);
        remove_file_if_exists(&marker)?;
        if present || releases_dir.exists() {
            fsync_dir(&releases_dir)?;
        }
        remove_path(&trash)?;
        if present {
            info!(%service, %release, "removed release");
        }
        Ok(())
    }

    /// Removes leftovers of interrupted staging and switching: `releases/.*.tmp`,
    /// digest markers without a release, and temporary `current` links.
    /// Partial downloads in the cache are kept for resuming. Called at agent
    /// start.
    pub fn clean_partial(&self, service: &str) -> Result<(), InstallError> {
        validate_name("service", service)?;
        let releases_dir = self.layout.releases_dir(service);
        let mut removed_any = false;
        for name in list_dir(&releases_dir)? {
            let Some(name) = name.to_str() else { continue };
            let Some(hidden) = name.strip_prefix('.') else {
                continue;
            };
            let stale = if hidden.ends_with(".tmp") {
                true
            } else if let Some(release) = hidden.strip_suffix(".digest") {
                !fs::symlink_metadata(releases_dir.join(release)).is_ok_and(|m| m.is_dir())
            } else {
                false
            };
            if stale {
                debug!(%service, leftover = name, "removing leftover of interrupted staging");
                remove_path(&releases_dir.join(name))?;
                removed_any = true;
            }
        }
        if removed_any {
            fsync_dir(&releases_dir)?;
        }
        let service_dir = self.layout.service_dir(service);
        let mut removed_link = false;
        for name in list_dir(&service_dir)? {
            if name.as_bytes().starts_with(b".current.tmp") {
                remove_path(&service_dir.join(&name))?;
                removed_link = true;
            }
        }
        if removed_link {
            fsync_dir(&service_dir)?;
        }
        Ok(())
    }

    fn fetch_lock(&self, digest: Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .fetch_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(locks.entry(digest).or_default())
    }
}

/// A download's `.part` file and the hash of everything in it. Each chunk is
/// written and hashed on a blocking thread, straight from the received
/// buffer: the runtime thread neither copies nor hashes 256 KiB at a time.
struct PartWriter {
    /// `None` only while a chunk is on the blocking thread, or after that
    /// thread's task was lost (a failed write puts the file back).
    state: Option<(File, Sha256)>,
}

impl PartWriter {
    async fn append(&mut self, chunk: Bytes) -> io::Result<()> {
        self.on_blocking_thread(move |file, hasher| {
            file.write_all(&chunk)?;
            hasher.update(&chunk);
            Ok(())
        })
        .await
    }

    /// Fsyncs the file and returns the hash of its content.
    async fn finish(mut self) -> io::Result<Sha256> {
        self.on_blocking_thread(|file, _| file.sync_all()).await?;
        self.state
            .take()
            .map(|(_, hasher)| hasher)
            .ok_or_else(|| io::Error::other("the download file was lost"))
    }

    async fn on_blocking_thread(
        &mut self,
        f: impl FnOnce(&mut File, &mut Sha256) -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        let (mut file, mut hasher) = self
            .state
            .take()
            .ok_or_else(|| io::Error::other("an earlier write of the download was lost"))?;
        let (file, hasher, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut file, &mut hasher);
            (file, hasher, result)
        })
        .await
        .map_err(|e| io::Error::other(format!("background task failed: {e}")))?;
        self.state = Some((file, hasher));
        result
    }
}

/// `releases/.<id>.tmp`: where a release is unpacked before its rename.
fn staging_dir(layout: &Layout, service: &str, release: &str) -> PathBuf {
    layout.releases_dir(service).join(format!(".{release}.tmp"))
}

/// `releases/.<id>.digest`: the digest a staged release was unpacked from.
fn marker_path(layout: &Layout, service: &str, release: &str) -> PathBuf {
    layout
        .releases_dir(service)
        .join(format!(".{release}.digest"))
}

/// Runs blocking file-system work off the async threads.
async fn blocking<T, F>(what: &str, f: F) -> Result<T, InstallError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, InstallError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(InstallError::Io {
            context: what.to_owned(),
            source: io::Error::other(format!("background task failed: {e}")),
        }),
    }
}

enum Prepared {
    /// `cache/<hex>` is present and valid.
    Cached,
    /// Download from `offset`; `hasher` has already seen the `.part` bytes.
    Download { hasher: Sha256, offset: u64 },
}

fn prepare_download(
    cache_dir: &Path,
    final_path: &Path,
    part_path: &Path,
    digest: Digest,
    max_len: u64,
) -> Result<Prepared, InstallError> {
    fs::create_dir_all(cache_dir)
        .map_err(|e| io_err(format!("create {}", cache_dir.display()), e))?;
    if final_path.exists() {
        let actual = sha256_file(final_path)
            .map_err(|e| io_err(format!("hash {}", final_path.display()), e))?;
        if actual == digest {
            return Ok(Prepared::Cached);
        }
        warn!(expected = %digest, %actual, "cached artifact is corrupt; fetching it again");
        remove_file_if_exists(final_path)?;
    }
    let mut hasher = Sha256::new();
    let offset = match File::open(part_path) {
        Ok(file) => {
            let len = hash_into(file, &mut hasher)
                .map_err(|e| io_err(format!("hash {}", part_path.display()), e))?;
            if len > max_len {
                warn!(%digest, len, max_len, "partial download is over the size limit; starting over");
                remove_file_if_exists(part_path)?;
                hasher = Sha256::new();
                0
            } else {
                len
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err(format!("open {}", part_path.display()), e)),
    };
    Ok(Prepared::Download { hasher, offset })
}

/// What is at a release's path before staging.
enum Existing {
    Absent,
    Staged(Digest),
    Unmarked,
}

fn existing_release(dir: &Path, marker: &Path) -> Result<Existing, InstallError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(io_err(format!("inspect {}", dir.display()), e)),
        Ok(m) if !m.file_type().is_dir() => return Ok(Existing::Unmarked),
        Ok(_) => {}
    }
    match fs::read_to_string(marker) {
        Ok(text) => match text.trim().parse::<Digest>() {
            Ok(digest) => Ok(Existing::Staged(digest)),
            Err(e) => {
                warn!(marker = %marker.display(), error = %e, "unreadable digest marker");
                Ok(Existing::Unmarked)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Existing::Unmarked),
        Err(e) => Err(io_err(format!("read {}", marker.display()), e)),
    }
}

/// The blocking half of [`Installer::stage`].
struct UnpackJob {
    artifact: PathBuf,
    releases_dir: PathBuf,
    tmp: PathBuf,
    marker: PathBuf,
    path: PathBuf,
    digest: Digest,
    limits: ArchiveLimits,
}

impl UnpackJob {
    fn run(self) -> Result<UnpackStats, InstallError> {
        fs::create_dir_all(&self.releases_dir)
            .map_err(|e| io_err(format!("create {}", self.releases_dir.display()), e))?;
        remove_path(&self.tmp)?;
        let mut marker_tmp = self.marker.clone().into_os_string();
        marker_tmp.push(".tmp");
        let marker_tmp = PathBuf::from(marker_tmp);
        // Removes the partial release on every way out, panics included,
        // until the final rename succeeds.
        let mut cleanup = RemoveOnDrop(vec![
            self.tmp.clone(),
            marker_tmp.clone(),
            self.marker.clone(),
        ]);
        DirBuilder::new()
            .mode(0o755)
            .create(&self.tmp)
            .map_err(|e| io_err(format!("create {}", self.tmp.display()), e))?;
        let stats = unpack_tar_gz(&self.artifact, &self.tmp, &self.limits)?;

        // The marker is durable before the release appears, so a release
        // directory without a marker is never ours.
        write_synced(&marker_tmp, format!("{}\n", self.digest).as_bytes())?;
        fs::rename(&marker_tmp, &self.marker)
            .map_err(|e| io_err(format!("rename {}", marker_tmp.display()), e))?;
        fsync_dir(&self.releases_dir)?;
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| io_err(format!("rename {} into place", self.tmp.display()), e))?;
        cleanup.0.clear();
        fsync_dir(&self.releases_dir)?;
        Ok(stats)
    }
}

/// Removes its paths when dropped (unless emptied first).
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            if let Err(e) = remove_path(path) {
                warn!(path = %path.display(), error = %e, "could not remove partial staging");
            }
        }
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), InstallError> {
    let ctx = || format!("write {}", path.display());
    let mut file = File::create(path).map_err(|e| io_err(ctx(), e))?;
    file.write_all(data).map_err(|e| io_err(ctx(), e))?;
    file.sync_all().map_err(|e| io_err(ctx(), e))
}

fn fsync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(format!("fsync {}", dir.display()), e))
}

fn remove_file_if_exists(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("remove {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Removes a file, link or directory tree; a missing path is fine.
fn remove_path(path: &Path) -> Result<(), InstallError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("remove {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Names in a directory; a missing directory has none.
fn list_dir(dir: &Path) -> Result<Vec<std::ffi::OsString>, InstallError> {
    let ctx = || format!("list {}", dir.display());
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(ctx(), e)),
    };
    entries
        .map(|entry| entry.map(|e| e.file_name()).map_err(|e| io_err(ctx(), e)))
        .collect()
}

fn digest_of(data: &[u8]) -> Digest {
    Digest(Sha256::digest(data).into())
}

/// Feeds everything `reader` yields into `hasher`; returns the byte count.
fn hash_into(mut reader: impl Read, hasher: &mut Sha256) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Parses a base64 ed25519 public key (the `.pub` file of `rollout release keygen`).
pub fn parse_public_key(k: &str) -> Result<ed25519_dalek::VerifyingKey, InstallError> {
    use base64::Engine as _;
    let bad = |reason: String| InstallError::BadTrustedKey {
        key: k.to_string(),
        reason,
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(k.trim())
        .map_err(|e| bad(e.to_string()))?;
    let bytes: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| bad(format!("{} bytes, want 32", raw.len())))?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
}

/// sha256 of a file, streaming.
pub fn sha256_file(path: &Path) -> io::Result<Digest> {
    let mut hasher = Sha256::new();
    hash_into(File::open(path)?, &mut hasher)?;
    Ok(Digest(hasher.finalize().into()))
}

/// Unpacks a tar.gz into `dest`, an existing empty directory, refusing
/// anything unsafe (see the module docs), and fsyncs every file and directory
/// it creates. Used by [`Installer::stage`]; public for fuzzing and tests.
///
/// On error, `dest` may hold part of the archive; the caller removes it.
pub fn unpack_tar_gz(
    archive: &Path,
    dest: &Path,
    limits: &ArchiveLimits,
) -> Result<UnpackStats, InstallError> {
    let file = File::open(archive)
        .map_err(|e| io_err(format!("open artifact {}", archive.display()), e))?;
    let budget = limits
        .max_unpacked_bytes
        .saturating_add(limits.max_entries.saturating_mul(ENTRY_OVERHEAD))
        .saturating_add(TRAILER_SLACK);
    let exceeded = Rc::new(Cell::new(false));
    let reader = Budget {
        // Multi-member: `cat a.gz b.gz` is a valid gzip file, and reading only
        // the first member would silently drop the rest of the archive.
        inner: MultiGzDecoder::new(BufReader::with_capacity(COPY_BUF, file)),
        remaining: budget,
        exceeded: Rc::clone(&exceeded),
    };
    let mut tar = tar::Archive::new(reader);
    let mut unpacker = Unpacker {
        dest,
        limits,
        budget,
        exceeded,
        stats: UnpackStats::default(),
        entries: 0,
        last_entry: String::new(),
        dirs: vec![dest.to_path_buf()],
        buf: vec![0u8; COPY_BUF],
    };
    for entry in tar.entries().map_err(|e| unpacker.read_failure(e))? {
        let mut entry = entry.map_err(|e| unpacker.read_failure(e))?;
        unpacker.entry(&mut entry)?;
    }
    // Read past the end-of-archive blocks so the gzip trailer (CRC and
    // length) is checked too: a cut-off artifact fails here instead of
    // passing for a shorter archive.
    let mut rest = tar.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| unpacker.read_failure(e))?;
    unpacker.sync_dirs()?;
    Ok(unpacker.stats)
}

/// Caps the decompressed stream as a whole, so data the extractor never
/// writes (long-name records, the bodies of directory entries, trailing
/// padding) cannot be used to burn CPU or memory without limit.
struct Budget<R> {
    inner: R,
    remaining: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let len = n as u64;
        if len > self.remaining {
            self.exceeded.set(true);
            return Err(io::Error::other("decompressed size limit reached"));
        }
        self.remaining -= len;
        Ok(n)
    }
}

/// State of one extraction.
struct Unpacker<'a> {
    dest: &'a Path,
    limits: &'a ArchiveLimits,
    /// Cap of the whole decompressed stream, for messages.
    budget: u64,
    /// Set by [`Budget`] when the cap is hit.
    exceeded: Rc<Cell<bool>>,
    stats: UnpackStats,
    entries: u64,
    /// Path of the entry being processed, for error messages.
    last_entry: String,
    /// Directories created (and `dest`), to fsync at the end.
    dirs: Vec<PathBuf>,
    buf: Vec<u8>,
}

const ABSOLUTE: &str = "absolute path; rebuild the artifact with relative paths inside the release";
const LEAVES: &str = "path leaves the release directory; rebuild the artifact with relative paths inside the release";

impl Unpacker<'_> {
    /// Maps an error from reading the archive stream.
    fn read_failure(&self, e: io::Error) -> InstallError {
        if self.exceeded.get() {
            let entry = if self.last_entry.is_empty() {
                "(archive)"
            } else {
                &self.last_entry
            };
            return unsafe_entry(
                entry,
                format!(
                    "the archive decompresses to more than {} bytes (max_unpacked_bytes plus \
                     room for tar headers); publish a smaller artifact or raise \
                     max_unpacked_bytes in the agent config",
                    self.budget
                ),
            );
        }
        let reason = if self.last_entry.is_empty() {
            e.to_string()
        } else {
            format!("{e} (at or after entry {:?})", self.last_entry)
        };
        InstallError::Corrupt { reason }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), InstallError> {
        use tar::EntryType as T;

        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        self.last_entry.clone_from(&name);
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(unsafe_entry(
                &name,
                format!(
                    "the archive has more than {} entries, the agent's max_entries; pack fewer \
                     files or raise max_entries in the agent config",
                    self.limits.max_entries
                ),
            ));
        }
        let kind = entry.header().entry_type();
        match kind {
            // Attributes for the entries that follow; nothing to write.
            T::XGlobalHeader => return Ok(()),
            T::Char | T::Block => {
                return Err(unsafe_entry(
                    &name,
                    "device files are not allowed in a release; remove them from the artifact",
                ));
            }
            T::Fifo => {
                return Err(unsafe_entry(
                    &name,
                    "named pipes (fifos) are not allowed in a release; remove them from the \
                     artifact",
                ));
            }
            T::GNUSparse => {
                return Err(unsafe_entry(
                    &name,
                    "sparse files are not supported; rebuild the artifact without --sparse",
                ));
            }
            T::Regular | T::Continuous | T::Directory | T::Symlink | T::Link => {}
            other => {
                return Err(unsafe_entry(
                    &name,
                    format!(
                        "entry type {other:?} is not supported; a release may hold only files, \
                         directories and links"
                    ),
                ));
            }
        }
        let rel = safe_path(&raw).map_err(|reason| unsafe_entry(&name, reason))?;
        if rel.as_os_str().is_empty() {
            if kind == T::Directory {
                // The archive's root (`./`): `dest` itself.
                return Ok(());
            }
            return Err(unsafe_entry(
                &name,
                "the entry has no file name; rebuild the artifact",
            ));
        }
        self.prepare_parents(&name, &rel)?;
        let target = self.dest.join(&rel);
        match kind {
            T::Directory => self.directory(&name, &target, entry),
            T::Symlink => self.symlink(&name, &rel, &target, entry),
            T::Link => self.hard_link(&name, &target, entry),
            _ => self.file(&name, &target, entry),
        }
    }

    /// Makes every parent of `rel` a real directory inside `dest`, creating
    /// missing ones; refuses to go through a symlink or a file.
    fn prepare_parents(&mut self, name: &str, rel: &Path) -> Result<(), InstallError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut dir = self.dest.to_path_buf();
        let mut shown = PathBuf::new();
        for component in parent.components() {
            dir.push(component);
            shown.push(component);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) => {
                    let what = if m.file_type().is_symlink() {
                        "a symlink"
                    } else {
                        "not a directory"
                    };
                    return Err(unsafe_entry(
                        name,
                        format!(
                            "its parent {:?} is {what}, and nothing is written through a link \
                             or into a file; put the entry at its real path in the artifact",
                            shown.display()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.create_dir(&dir, 0o755)?,
                Err(e) => return Err(io_err(format!("inspect {}", dir.display()), e)),
            }
        }
        Ok(())
    }

    fn create_dir(&mut self, dir: &Path, mode: u32) -> Result<(), InstallError> {
        let ctx = || format!("create directory {}", dir.display());
        DirBuilder::new()
            .mode(mode)
            .create(dir)
            .map_err(|e| io_err(ctx(), e))?;
        // Explicitly, because the process umask applied to the line above.
        fs::set_permissions(dir, Permissions::from_mode(mode)).map_err(|e| io_err(ctx(), e))?;
        self.dirs.push(dir.to_path_buf());
        Ok(())
    }

    /// Refuses to replace anything already extracted.
    fn ensure_absent(&self, name: &str, target: &Path) -> Result<(), InstallError> {
        match fs::symlink_metadata(target) {
            Ok(_) => Err(unsafe_entry(
                name,
                "the path is already in the archive (duplicate entry), and entries never \
                 replace each other; rebuild the artifact without duplicates",
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("inspect {}", target.display()), e)),
        }
    }

    fn mode<R: Read>(&self, name: &str, entry: &tar::Entry<'_, R>) -> Result<u32, InstallError> {
        entry.header().mode().map_err(|e| InstallError::Corrupt {
            reason: format!("entry {name:?} has an unreadable mode: {e}"),
        })
    }

    fn directory<R: Read>(
        &mut self,
        name: &str,
        target: &Path,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(), InstallError> {
        // The owner keeps full access so the rest of the archive, and later
        // the retention cleanup, can write and delete inside it.
        let mode = (self.mode(name, entry)? & 0o777) | 0o700;
        match fs::symlink_metadata(target) {
            Ok(m) if m.file_type().is_dir() => {
                fs::set_permissions(target, Permissions::from_mode(mode))
                    .map_err(|e| io_err(format!("set the mode of {}", target.display()), e))
            }
            Ok(_) => self.ensure_absent(name, target),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.create_dir(target, mode),
            Err(e) => Err(io_err(format!("inspect {}", target.display()), e)),
        }
    }

    fn file<R: Read>(
        &mut self,
        name: &str,
        target: &Path,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), InstallError> {
        let mode = self.mode(name, entry)?;
        if mode & 0o6000 != 0 {
            return Err(unsafe_entry(
                name,
                format!(
                    "setuid/setgid bit set (mode {:o}); a release must not carry files that \
                     raise privileges — clear the bit when building the artifact",
                    mode & 0o7777
                ),
            ));
        }
        self.ensure_absent(name, target)?;
        let ctx = || format!("write {}", target.display());
        // create_new: O_EXCL, which also refuses to follow a symlink.
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map_err(|e| io_err(ctx(), e))?;
        let mut copied = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_failure(e)),
            };
            self.stats.bytes = self.stats.bytes.saturating_add(n as u64);
            if self.stats.bytes > self.limits.max_unpacked_bytes {
                return Err(unsafe_entry(
                    name,
                    format!(
                        "the archive unpacks to more than {} bytes, the agent's \
                         max_unpacked_bytes; publish a smaller artifact or raise \
                         max_unpacked_bytes in the agent config",
                        self.limits.max_unpacked_bytes
                    ),
                ));
            }
            out.write_all(&self.buf[..n])
                .map_err(|e| io_err(ctx(), e))?;
            copied += n as u64;
        }
        if copied != entry.size() {
            return Err(InstallError::Corrupt {
                reason: format!(
                    "entry {name:?} is cut short: {copied} of {} bytes",
                    entry.size()
                ),
            });
        }
        out.set_permissions(Permissions::from_mode(mode & 0o777))
            .map_err(|e| io_err(ctx(), e))?;
        out.sync_all().map_err(|e| io_err(ctx(), e))?;
        self.stats.files += 1;
        Ok(())
    }

    fn symlink<R: Read>(
        &mut self,
        name: &str,
        rel: &Path,
        target: &Path,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(), InstallError> {
        let link = link_target(name, entry)?;
        let depth = rel.components().count().saturating_sub(1);
        check_symlink_target(&link, depth).map_err(|reason| unsafe_entry(name, reason))?;
        self.ensure_absent(name, target)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(&link), target)
            .map_err(|e| io_err(format!("create link {}", target.display()), e))
    }

    fn hard_link<R: Read>(
        &mut self,
        name: &str,
        target: &Path,
        entry: &tar::Entry<'_, R>,
    ) -> Result<(), InstallError> {
        let link = link_target(name, entry)?;
        let shown = String::from_utf8_lossy(&link);
        let not_a_file = || {
            unsafe_entry(
                name,
                format!(
                    "hard link target {shown:?} is not a regular file extracted earlier from \
                     this archive; a hard link may only name such a file"
                ),
            )
        };
        let source_rel = safe_path(&link).map_err(|reason| {
            unsafe_entry(name, format!("hard link target {shown:?}: {reason}"))
        })?;
        if source_rel.as_os_str().is_empty() {
            return Err(not_a_file());
        }
        // Every step to the source must be a real directory, and the source
        // itself a regular file: never a link, never outside `dest`.
        let mut source = self.dest.to_path_buf();
        let count = source_rel.components().count();
        for (i, component) in source_rel.components().enumerate() {
            source.push(component);
            let Ok(m) = fs::symlink_metadata(&source) else {
                return Err(not_a_file());
            };
            let ok = if i + 1 == count {
                m.file_type().is_file()
            } else {
                m.file_type().is_dir()
            };
            if !ok {
                return Err(not_a_file());
            }
        }
        self.ensure_absent(name, target)?;
        fs::hard_link(&source, target)
            .map_err(|e| io_err(format!("create hard link {}", target.display()), e))?;
        self.stats.files += 1;
        Ok(())
    }

    fn sync_dirs(&self) -> Result<(), InstallError> {
        // Deepest (latest created) first, `dest` last.
        self.dirs.iter().rev().try_for_each(|dir| fsync_dir(dir))
    }
}

fn link_target<R: Read>(name: &str, entry: &tar::Entry<'_, R>) -> Result<Vec<u8>, InstallError> {
    match entry.link_name_bytes() {
        Some(link) => Ok(link.into_owned()),
        None => Err(InstallError::Corrupt {
            reason: format!("link entry {name:?} has no target"),
        }),
    }
}

/// The entry path as a relative path of normal components (`.` dropped), or
/// why it is unsafe. Empty for the archive root.
fn safe_path(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.contains(&0) {
        return Err("the path contains a NUL byte; rebuild the artifact".to_owned());
    }
    let mut out = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(ABSOLUTE.to_owned()),
            Component::ParentDir => return Err(LEAVES.to_owned()),
        }
    }
    Ok(out)
}

/// A symlink target is relative: some leading `..` (no more than the link's
/// depth inside the release), then only names. Resolved from the link's real
/// parent directory, it therefore stays inside the release.
fn check_symlink_target(target: &[u8], depth: usize) -> Result<(), String> {
    let shown = String::from_utf8_lossy(target);
    if target.is_empty() {
        return Err("the symlink has an empty target; rebuild the artifact".to_owned());
    }
    if target.contains(&0) {
        return Err(format!(
            "symlink target {shown:?} contains a NUL byte; rebuild the artifact"
        ));
    }
    let mut ups = 0usize;
    let mut seen_name = false;
    for component in Path::new(OsStr::from_bytes(target)).components() {
        match component {
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "symlink target {shown:?} is absolute, so it points outside the release; \
                     make it relative to the link's directory"
                ));
            }
            Component::ParentDir if seen_name => {
                return Err(format!(
                    "symlink target {shown:?} has `..` after a name; write it as leading `..` \
                     followed by names only"
                ));
            }
            Component::ParentDir => ups += 1,
            Component::CurDir => {}
            Component::Normal(_) => seen_name = true,
        }
    }
    if ups > depth {
        return Err(format!(
            "symlink target {shown:?} points outside the release directory; a link may only \
             point at paths inside the release"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    use flate2::Compression;
    use flate2::write::GzEncoder;
    use tar::{EntryType, Header};
    use tempfile::TempDir;

    use super::*;
    use crate::release::{Artifact, Hooks, RestartPolicy, Supervision, Thresholds};

    // ---- archive building -------------------------------------------------

    /// Builds a tar.gz entry by entry, writing names and link targets straight
    /// into the header so hostile paths (`..`, absolute) can be expressed.
    struct Archive(tar::Builder<GzEncoder<Vec<u8>>>);

    impl Archive {
        fn new() -> Self {
            Archive(tar::Builder::new(GzEncoder::new(
                Vec::new(),
                Compression::fast(),
            )))
        }

        fn raw(mut self, name: &str, ty: EntryType, mode: u32, link: &str, data: &[u8]) -> Self {
            let mut header = Header::new_gnu();
            {
                let old = header.as_old_mut();
                assert!(
                    name.len() < 100 && link.len() < 100,
                    "test names fit the header"
                );
                old.name[..name.len()].copy_from_slice(name.as_bytes());
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            header.set_entry_type(ty);
            header.set_mode(mode);
            header.set_size(data.len() as u64);
            header.set_mtime(1_700_000_000);
            header.set_cksum();
            self.0.append(&header, data).expect("append entry");
            self
        }

        fn file(self, name: &str, data: &[u8]) -> Self {
            self.raw(name, EntryType::Regular, 0o644, "", data)
        }

        fn file_mode(self, name: &str, mode: u32, data: &[u8]) -> Self {
            self.raw(name, EntryType::Regular, mode, "", data)
        }

        fn dir(self, name: &str) -> Self {
            self.raw(name, EntryType::Directory, 0o755, "", b"")
        }

        fn symlink(self, name: &str, target: &str) -> Self {
            self.raw(name, EntryType::Symlink, 0o777, target, b"")
        }

        fn hard_link(self, name: &str, target: &str) -> Self {
            self.raw(name, EntryType::Link, 0o644, target, b"")
        }

        fn finish(self) -> Vec<u8> {
            self.0
                .into_inner()
                .expect("finish tar")
                .finish()
                .expect("finish gzip")
        }
    }

    fn good_archive() -> Vec<u8> {
        Archive::new()
            .dir("./")
            .dir("./bin/")
            .file_mode("./bin/app", 0o755, b"#!/bin/sh\necho hello\n")
            .file("etc/config.toml", b"port = 8080\n")
            .file("a/b/c/deep.txt", b"deep")
            .dir("empty/")
            .symlink("bin/config", "../etc/config.toml")
            .symlink("current-config", "etc/./config.toml")
            .hard_link("app-copy", "bin/app")
            .finish()
    }

    // ---- fixture ----------------------------------------------------------

    struct Fixture {
        /// Keeps the temporary directory alive.
        _tmp: TempDir,
        /// The temporary directory; the data dir is `root/data`.
        root: PathBuf,
        layout: Layout,
        source: Arc<MemorySource>,
        installer: Installer,
    }

    fn fixture(limits: ArchiveLimits) -> Fixture {
        let tmp = TempDir::new().expect("tempdir");
        let root = tmp.path().to_path_buf();
        let layout = Layout::new(root.join("data"));
        let source = Arc::new(MemorySource::default());
        let installer = Installer::new(layout.clone(), limits, source.clone());
        Fixture {
            _tmp: tmp,
            root,
            layout,
            source,
            installer,
        }
    }

    fn def(release: &str, digest: Digest, size: u64) -> ServiceDefinition {
        ServiceDefinition {
            service: "web".to_owned(),
            release: release.to_owned(),
            artifact: Artifact {
                digest,
                size,
                signature: None,
            },
            supervision: Supervision::Exec {
                argv: vec!["bin/app".to_owned()],
                restart: RestartPolicy::OnFailure,
                stop_timeout: Duration::from_secs(1),
            },
            env: BTreeMap::new(),
            hooks: Hooks::default(),
            health_checks: Vec::new(),
            thresholds: Thresholds::default(),
            min_healthy_time: Duration::ZERO,
            healthy_deadline: Duration::from_secs(10),
            commit_deadline: Duration::from_secs(10),
            run_as: None,
        }
    }

    impl Fixture {
        async fn stage_bytes(&self, release: &str, data: Vec<u8>) -> Result<Staged, InstallError> {
            let size = data.len() as u64;
            let digest = self.source.insert(data);
            self.installer.stage(&def(release, digest, size)).await
        }

        /// Every path under the temporary directory, relative to it.
        fn tree(&self) -> BTreeSet<PathBuf> {
            let mut out = BTreeSet::new();
            let mut stack = vec![self.root.clone()];
            while let Some(dir) = stack.pop() {
                for entry in fs::read_dir(&dir).expect("read_dir") {
                    let path = entry.expect("dir entry").path();
                    if fs::symlink_metadata(&path).expect("stat").is_dir() {
                        stack.push(path.clone());
                    }
                    out.insert(path.strip_prefix(&self.root).expect("prefix").to_path_buf());
                }
            }
            out
        }

        fn releases_listing(&self) -> BTreeSet<String> {
            list_dir(&self.layout.releases_dir("web"))
                .expect("list releases")
                .into_iter()
                .map(|n| n.to_string_lossy().into_owned())
                .collect()
        }
    }

    /// Stages `archive` as release `bad` next to a committed release `good`
    /// and checks the refusal left everything as it was: no `bad` release, no
    /// temporary directory, `good` and `current` intact, and nothing new
    /// anywhere except the artifact cache.
    async fn assert_refused(archive: Vec<u8>, limits: ArchiveLimits) -> InstallError {
        let fx = fixture(limits);
        fx.stage_bytes("good", good_archive())
            .await
            .expect("stage good");
        fx.installer.switch_current("web", "good").expect("switch");
        fs::create_dir(fx.root.join("outside")).expect("outside dir");
        let before = fx.tree();

        let err = fx
            .stage_bytes("bad", archive)
            .await
            .expect_err("hostile archive must be refused");

        let after = fx.tree();
        let new: Vec<_> = after
            .difference(&before)
            .filter(|p| !p.starts_with("data/cache"))
            .collect();
        assert!(new.is_empty(), "refusal left new paths behind: {new:?}");
        assert!(!fx.installer.is_staged("web", "bad"));
        assert_eq!(
            fx.releases_listing(),
            BTreeSet::from(["good".to_owned(), ".good.digest".to_owned()])
        );
        assert_eq!(
            fx.installer.read_current("web").expect("read current"),
            Some("good".to_owned())
        );
        assert_eq!(
            fs::read(fx.layout.release_dir("web", "good").join("bin/app")).expect("good intact"),
            b"#!/bin/sh\necho hello\n"
        );
        err
    }

    fn expect_unsafe(err: InstallError, entry: &str, reason_contains: &str) {
        match &err {
            InstallError::Unsafe { entry: e, reason } => {
                assert_eq!(e, entry, "wrong entry blamed: {err}");
                assert!(
                    reason.contains(reason_contains),
                    "reason {reason:?} lacks {reason_contains:?}"
                );
            }
            other => panic!("expected Unsafe for {entry:?}, got {other:?}"),
        }
    }

    fn small_limits() -> ArchiveLimits {
        ArchiveLimits {
            max_artifact_bytes: 1 << 20,
            max_unpacked_bytes: 1 << 20,
            max_entries: 50,
        }
    }

    // ---- staging ----------------------------------------------------------

    #[tokio::test]
    async fn good_archive_stages_files_dirs_links_and_hard_links() {
        let fx = fixture(ArchiveLimits::default());
        let staged = fx.stage_bytes("v1", good_archive()).await.expect("stage");
        assert!(!staged.already_present);
        let dir = fx.layout.release_dir("web", "v1");
        assert_eq!(staged.path, dir);
        assert!(fx.installer.is_staged("web", "v1"));

        assert_eq!(
            fs::read(dir.join("bin/app")).expect("app"),
            b"#!/bin/sh\necho hello\n"
        );
        assert_eq!(
            fs::metadata(dir.join("bin/app")).expect("app").mode() & 0o777,
            0o755
        );
        assert_eq!(fs::read(dir.join("a/b/c/deep.txt")).expect("deep"), b"deep");
        assert!(dir.join("empty").is_dir());
        assert_eq!(
            fs::read_link(dir.join("bin/config")).expect("link"),
            Path::new("../etc/config.toml")
        );
        assert_eq!(
            fs::read(dir.join("bin/config")).expect("through link"),
            b"port = 8080\n"
        );
        assert_eq!(
            fs::read(dir.join("current-config")).expect("through link"),
            b"port = 8080\n"
        );
        let app = fs::metadata(dir.join("bin/app")).expect("app");
        let copy = fs::metadata(dir.join("app-copy")).expect("hard link");
        assert_eq!(app.ino(), copy.ino(), "hard link shares the inode");
        assert_eq!(
            fx.releases_listing(),
            BTreeSet::from(["v1".to_owned(), ".v1.digest".to_owned()])
        );
    }

    #[tokio::test]
    async fn unpack_reports_what_it_wrote() {
        let tmp = TempDir::new().expect("tempdir");
        let archive = tmp.path().join("a.tar.gz");
        fs::write(&archive, good_archive()).expect("write");
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).expect("dest");
        let stats = unpack_tar_gz(&archive, &dest, &ArchiveLimits::default()).expect("unpack");
        assert_eq!(stats.files, 4, "three files and one hard link");
        assert_eq!(stats.bytes, 21 + 12 + 4);
    }

    #[tokio::test]
    async fn staging_the_same_release_twice_fetches_once_and_reports_already_present() {
        let fx = fixture(ArchiveLimits::default());
        let data = good_archive();
        let digest = fx.source.insert(data.clone());
        let d = def("v1", digest, data.len() as u64);
        assert!(!fx.installer.stage(&d).await.expect("first").already_present);
        let again = fx.installer.stage(&d).await.expect("second");
        assert!(again.already_present);
        assert_eq!(again.path, fx.layout.release_dir("web", "v1"));
        assert_eq!(fx.source.fetch_count(digest), 1);
        assert_eq!(
            fx.installer.staged_digest("web", "v1").expect("digest"),
            Some(digest)
        );
    }

    #[tokio::test]
    async fn a_second_release_from_the_cached_artifact_is_not_fetched_again() {
        let fx = fixture(ArchiveLimits::default());
        let data = good_archive();
        let digest = fx.source.insert(data.clone());
        fx.installer.stage(&def("v1", digest, 0)).await.expect("v1");
        fx.installer.stage(&def("v2", digest, 0)).await.expect("v2");
        assert_eq!(fx.source.fetch_count(digest), 1);
        assert_eq!(
            fx.installer.staged_releases("web").expect("list"),
            vec!["v1".to_owned(), "v2".to_owned()]
        );
    }

    #[tokio::test]
    async fn reusing_a_release_id_with_another_digest_is_refused() {
        let fx = fixture(ArchiveLimits::default());
        fx.stage_bytes("v1", good_archive()).await.expect("v1");
        let other = Archive::new().file("x", b"other").finish();
        let err = fx.stage_bytes("v1", other).await.expect_err("conflict");
        assert!(
            matches!(err, InstallError::ReleaseConflict { .. }),
            "got {err:?}"
        );
        assert!(
            err.to_string().contains("publish a new release id"),
            "{err}"
        );
        assert_eq!(
            fs::read(fx.layout.release_dir("web", "v1").join("bin/app")).expect("intact"),
            b"#!/bin/sh\necho hello\n"
        );
    }

    #[tokio::test]
    async fn a_release_directory_without_marker_is_not_taken_as_staged() {
        let fx = fixture(ArchiveLimits::default());
        fs::create_dir_all(fx.layout.release_dir("web", "v1")).expect("mkdir");
        assert!(!fx.installer.is_staged("web", "v1"));
        let err = fx
            .stage_bytes("v1", good_archive())
            .await
            .expect_err("unmarked");
        assert!(matches!(err, InstallError::Unmarked { .. }), "got {err:?}");
    }

    #[tokio::test]
    async fn digest_mismatch_is_refused_and_leaves_releases_and_current_untouched() {
        let fx = fixture(ArchiveLimits::default());
        fx.stage_bytes("good", good_archive()).await.expect("good");
        fx.installer.switch_current("web", "good").expect("switch");

        let claimed = digest_of(b"what the release promised");
        fx.source.insert_as(claimed, good_archive());
        let err = fx
            .installer
            .stage(&def("bad", claimed, 0))
            .await
            .expect_err("mismatch");
        match &err {
            InstallError::DigestMismatch { expected, actual } => {
                assert_eq!(*expected, claimed);
                assert_eq!(*actual, digest_of(&good_archive()));
            }
            other => panic!("expected DigestMismatch, got {other:?}"),
        }
        assert!(err.to_string().contains("re-publish the release"), "{err}");
        assert_eq!(
            fx.releases_listing(),
            BTreeSet::from(["good".to_owned(), ".good.digest".to_owned()])
        );
        let cache = list_dir(&fx.layout.cache_dir()).expect("cache");
        assert!(
            !cache
                .iter()
                .any(|n| n.to_string_lossy().starts_with(&claimed.hex())),
            "nothing cached under the claimed digest: {cache:?}"
        );
        assert_eq!(
            fx.installer.read_current("web").expect("current"),
            Some("good".to_owned())
        );
    }

    // ---- hostile archives -------------------------------------------------

    #[tokio::test]
    async fn absolute_path_is_refused() {
        let target = std::env::temp_dir().join("rollout-installer-test-absolute-pwned");
        let name = target.to_string_lossy().into_owned();
        let err = assert_refused(
            Archive::new().file(&name, b"pwned").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, &name, "absolute path");
        assert!(!target.exists());
    }

    #[tokio::test]
    async fn parent_dir_path_is_refused() {
        // From releases/.bad.tmp, five `..` reach the temporary root.
        let err = assert_refused(
            Archive::new()
                .file("ok.txt", b"fine")
                .file("../../../../../outside/pwned", b"pwned")
                .finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(
            err,
            "../../../../../outside/pwned",
            "path leaves the release directory",
        );
    }

    #[tokio::test]
    async fn dot_dot_in_the_middle_of_a_path_is_refused() {
        let err = assert_refused(
            Archive::new().file("a/../../x", b"pwned").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "a/../../x", "leaves the release directory");
    }

    #[tokio::test]
    async fn symlink_with_absolute_target_is_refused() {
        let err = assert_refused(
            Archive::new().symlink("etc-link", "/etc").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "etc-link", "is absolute");
    }

    #[tokio::test]
    async fn symlink_escaping_with_dot_dot_is_refused() {
        let err = assert_refused(
            Archive::new()
                .symlink("a/inside", "../b")
                .symlink("a/escape", "../../outside")
                .finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "a/escape", "points outside the release");
    }

    #[tokio::test]
    async fn symlink_with_dot_dot_after_a_name_is_refused() {
        let err = assert_refused(
            Archive::new().symlink("l", "sub/../../x").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "l", "`..` after a name");
    }

    #[tokio::test]
    async fn writing_through_a_symlink_is_refused() {
        let err = assert_refused(
            Archive::new()
                .dir("sub/")
                .symlink("link", "sub")
                .file("link/x", b"through the link")
                .finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "link/x", "is a symlink");
    }

    #[tokio::test]
    async fn a_file_replacing_an_earlier_symlink_is_refused() {
        let err = assert_refused(
            Archive::new()
                .symlink("config", "data")
                .file("config", b"replaced")
                .finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "config", "duplicate entry");
    }

    #[tokio::test]
    async fn hard_link_to_an_absolute_path_is_refused() {
        let err = assert_refused(
            Archive::new().hard_link("passwd", "/etc/passwd").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "passwd", "absolute path");
    }

    #[tokio::test]
    async fn hard_link_leaving_the_release_is_refused() {
        let err = assert_refused(
            Archive::new().hard_link("x", "../outside").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "x", "leaves the release directory");
    }

    #[tokio::test]
    async fn hard_link_to_a_symlink_or_missing_file_is_refused() {
        let err = assert_refused(
            Archive::new()
                .symlink("s", "t")
                .hard_link("h", "s")
                .finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "h", "not a regular file");
        let err = assert_refused(
            Archive::new().hard_link("h", "missing").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "h", "not a regular file");
    }

    #[tokio::test]
    async fn character_device_is_refused() {
        let err = assert_refused(
            Archive::new()
                .raw("dev/null", EntryType::Char, 0o666, "", b"")
                .finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "dev/null", "device files");
    }

    #[tokio::test]
    async fn block_device_is_refused() {
        let err = assert_refused(
            Archive::new()
                .raw("sda", EntryType::Block, 0o660, "", b"")
                .finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "sda", "device files");
    }

    #[tokio::test]
    async fn fifo_is_refused() {
        let err = assert_refused(
            Archive::new()
                .raw("pipe", EntryType::Fifo, 0o644, "", b"")
                .finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "pipe", "fifos");
    }

    #[tokio::test]
    async fn setuid_and_setgid_files_are_refused() {
        let err = assert_refused(
            Archive::new().file_mode("bin/su", 0o4755, b"x").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "bin/su", "setuid/setgid");
        let err = assert_refused(
            Archive::new().file_mode("bin/sg", 0o2755, b"x").finish(),
            ArchiveLimits::default(),
        )
        .await;
        expect_unsafe(err, "bin/sg", "setuid/setgid");
    }

    #[tokio::test]
    async fn too_many_entries_are_refused() {
        let mut archive = Archive::new();
        for i in 0..60 {
            archive = archive.file(&format!("f{i}"), b"x");
        }
        let err = assert_refused(archive.finish(), small_limits()).await;
        expect_unsafe(err, "f50", "more than 50 entries");
    }

    #[tokio::test]
    async fn decompression_bomb_is_refused() {
        let zeros = vec![0u8; 10 << 20];
        let archive = Archive::new().file("bomb", &zeros).finish();
        assert!(archive.len() < 1 << 20, "the bomb compresses well");
        let err = assert_refused(archive, small_limits()).await;
        expect_unsafe(err, "bomb", "unpacks to more than 1048576 bytes");
    }

    #[test]
    fn decompression_bomb_stops_at_the_limit_not_after() {
        let tmp = TempDir::new().expect("tempdir");
        let archive = tmp.path().join("bomb.tar.gz");
        fs::write(
            &archive,
            Archive::new().file("bomb", &vec![0u8; 10 << 20]).finish(),
        )
        .expect("write");
        let dest = tmp.path().join("dest");
        fs::create_dir(&dest).expect("dest");
        let err = unpack_tar_gz(&archive, &dest, &small_limits()).expect_err("bomb");
        expect_unsafe(err, "bomb", "unpacks to more than");
        let written = fs::metadata(dest.join("bomb")).expect("partial").len();
        assert!(written <= 1 << 20, "wrote {written} bytes past the limit");
    }

    #[tokio::test]
    async fn data_hidden_in_directory_entries_counts_against_the_limit() {
        // tar skips a directory's body, but it still has to be decompressed.
        let err = assert_refused(
            Archive::new()
                .raw("d/", EntryType::Directory, 0o755, "", &vec![0u8; 10 << 20])
                .finish(),
            ArchiveLimits {
                max_entries: 10,
                ..small_limits()
            },
        )
        .await;
        expect_unsafe(err, "d/", "decompresses to more than");
    }

    #[tokio::test]
    async fn truncated_gzip_is_corrupt() {
        let mut data = Archive::new()
            .file(
                "a",
                &(0..200_000u32)
                    .map(|i| (i * 7 % 251) as u8)
                    .collect::<Vec<_>>(),
            )
            .file("b", b"b")
            .finish();
        data.truncate(data.len() / 2);
        let err = assert_refused(data, ArchiveLimits::default()).await;
        assert!(matches!(err, InstallError::Corrupt { .. }), "got {err:?}");
        assert!(err.to_string().contains("not a valid tar.gz"), "{err}");
    }

    #[tokio::test]
    async fn an_archive_split_over_two_gzip_members_unpacks_completely() {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in [("first", &b"1"[..]), ("second", &b"2"[..])] {
            let mut header = Header::new_gnu();
            header.set_path(name).expect("path");
            header.set_size(1);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append(&header, data).expect("append");
        }
        let plain = builder.into_inner().expect("finish");
        let gz = |part: &[u8]| {
            let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
            enc.write_all(part).expect("compress");
            enc.finish().expect("finish")
        };
        let mut data = gz(&plain[..1024]);
        data.extend(gz(&plain[1024..]));
        let fx = fixture(ArchiveLimits::default());
        let staged = fx.stage_bytes("v1", data).await.expect("stage");
        assert_eq!(fs::read(staged.path.join("second")).expect("second"), b"2");
    }

    #[tokio::test]
    async fn missing_gzip_trailer_is_corrupt() {
        let mut data = good_archive();
        data.truncate(data.len() - 4);
        let err = assert_refused(data, ArchiveLimits::default()).await;
        assert!(matches!(err, InstallError::Corrupt { .. }), "got {err:?}");
    }

    #[tokio::test]
    async fn garbage_bytes_are_corrupt() {
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 256) as u8).collect();
        let err = assert_refused(garbage, ArchiveLimits::default()).await;
        assert!(matches!(err, InstallError::Corrupt { .. }), "got {err:?}");
    }

    #[tokio::test]
    async fn plain_tar_without_gzip_is_corrupt() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = Header::new_gnu();
        header.set_path("a").expect("path");
        header.set_size(1);
        header.set_cksum();
        builder.append(&header, &b"a"[..]).expect("append");
        let plain = builder.into_inner().expect("finish");
        let err = assert_refused(plain, ArchiveLimits::default()).await;
        assert!(matches!(err, InstallError::Corrupt { .. }), "got {err:?}");
    }

    // ---- artifacts --------------------------------------------------------

    #[tokio::test]
    async fn announced_size_over_the_limit_is_refused_without_fetching() {
        let fx = fixture(small_limits());
        let digest = fx.source.insert(vec![1u8; 100]);
        let err = fx
            .installer
            .ensure_artifact(digest, (1 << 20) + 1)
            .await
            .expect_err("too large");
        assert!(matches!(err, InstallError::TooLarge { .. }), "got {err:?}");
        assert!(err.to_string().contains("max_artifact_bytes"), "{err}");
        assert_eq!(fx.source.fetch_count(digest), 0);
    }

    #[tokio::test]
    async fn stream_longer_than_the_limit_is_refused_and_discarded() {
        let fx = fixture(small_limits());
        let digest = fx.source.insert(vec![1u8; 3 << 20]);
        let err = fx
            .installer
            .ensure_artifact(digest, 0)
            .await
            .expect_err("too large");
        match err {
            InstallError::TooLarge { size, limit, .. } => {
                assert_eq!(limit, 1 << 20);
                assert!(size > limit && size <= limit + MEMORY_CHUNK as u64);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert!(list_dir(&fx.layout.cache_dir()).expect("cache").is_empty());
    }

    #[tokio::test]
    async fn stream_longer_than_announced_is_refused() {
        let fx = fixture(ArchiveLimits::default());
        let digest = fx.source.insert(vec![1u8; 100_000]);
        let err = fx
            .installer
            .ensure_artifact(digest, 1_000)
            .await
            .expect_err("longer than announced");
        assert!(
            matches!(
                err,
                InstallError::LargerThanAnnounced {
                    announced: 1_000,
                    ..
                }
            ),
            "got {err:?}"
        );
        assert!(list_dir(&fx.layout.cache_dir()).expect("cache").is_empty());
    }

    #[tokio::test]
    async fn interrupted_download_resumes_from_the_part_file() {
        let fx = fixture(ArchiveLimits::default());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let digest = fx.source.insert(data.clone());
        fx.source.interrupt_once_after(digest, 20_000);

        let err = fx
            .installer
            .ensure_artifact(digest, data.len() as u64)
            .await
            .expect_err("interrupted");
        assert!(matches!(err, InstallError::Fetch { .. }), "got {err:?}");
        let part = fx.layout.cache_dir().join(format!("{}.part", digest.hex()));
        assert_eq!(fs::metadata(&part).expect("part kept").len(), 20_000);

        let path = fx
            .installer
            .ensure_artifact(digest, data.len() as u64)
            .await
            .expect("resumed");
        assert_eq!(fx.source.fetch_offsets(digest), vec![0, 20_000]);
        assert_eq!(fs::read(&path).expect("artifact"), data);
        assert!(!part.exists());
        assert_eq!(sha256_file(&path).expect("hash"), digest);
    }

    #[tokio::test]
    async fn a_corrupt_part_file_is_discarded_after_the_digest_check() {
        let fx = fixture(ArchiveLimits::default());
        let data = vec![7u8; 50_000];
        let digest = fx.source.insert(data.clone());
        fs::create_dir_all(fx.layout.cache_dir()).expect("cache");
        let part = fx.layout.cache_dir().join(format!("{}.part", digest.hex()));
        fs::write(&part, vec![9u8; 10_000]).expect("bad part");

        let err = fx
            .installer
            .ensure_artifact(digest, 0)
            .await
            .expect_err("mismatch");
        assert!(
            matches!(err, InstallError::DigestMismatch { .. }),
            "got {err:?}"
        );
        assert!(!part.exists());
        let path = fx
            .installer
            .ensure_artifact(digest, 0)
            .await
            .expect("refetch");
        assert_eq!(fs::read(path).expect("artifact"), data);
        assert_eq!(fx.source.fetch_offsets(digest), vec![10_000, 0]);
    }

    #[tokio::test]
    async fn cached_artifact_is_reused_and_a_corrupted_one_refetched() {
        let fx = fixture(ArchiveLimits::default());
        let data = vec![3u8; 40_000];
        let digest = fx.source.insert(data.clone());
        let path = fx
            .installer
            .ensure_artifact(digest, 0)
            .await
            .expect("fetch");
        fx.installer
            .ensure_artifact(digest, 0)
            .await
            .expect("cached");
        assert_eq!(fx.source.fetch_count(digest), 1);

        fs::write(&path, b"bit rot").expect("corrupt the cache");
        let again = fx
            .installer
            .ensure_artifact(digest, 0)
            .await
            .expect("refetch");
        assert_eq!(fx.source.fetch_count(digest), 2);
        assert_eq!(fs::read(again).expect("artifact"), data);
    }

    #[tokio::test]
    async fn unknown_artifact_is_a_fetch_error() {
        let fx = fixture(ArchiveLimits::default());
        let err = fx
            .installer
            .ensure_artifact(digest_of(b"nobody has this"), 0)
            .await
            .expect_err("not found");
        assert!(
            matches!(
                err,
                InstallError::Fetch {
                    source: FetchError::NotFound(_),
                    ..
                }
            ),
            "got {err:?}"
        );
    }

    // ---- current ----------------------------------------------------------

    fn temp_links(fx: &Fixture) -> Vec<String> {
        list_dir(&fx.layout.service_dir("web"))
            .expect("service dir")
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".current"))
            .collect()
    }

    #[tokio::test]
    async fn switch_current_replaces_the_link_and_leaves_no_temp_link() {
        let fx = fixture(ArchiveLimits::default());
        fx.stage_bytes("v1", good_archive()).await.expect("v1");
        let v2 = Archive::new().file("bin/app", b"v2").finish();
        fx.stage_bytes("v2", v2).await.expect("v2");
        assert_eq!(fx.installer.read_current("web").expect("none"), None);

        fx.installer.switch_current("web", "v1").expect("switch v1");
        assert_eq!(
            fx.installer.read_current("web").expect("current"),
            Some("v1".to_owned())
        );
        fx.installer.switch_current("web", "v2").expect("switch v2");
        let current = fx.layout.current_link("web");
        assert_eq!(
            fs::read_link(&current).expect("link"),
            Path::new("releases/v2")
        );
        assert_eq!(
            fs::read(current.join("bin/app")).expect("through current"),
            b"v2"
        );
        assert_eq!(
            fx.installer.read_current("web").expect("current"),
            Some("v2".to_owned())
        );
        assert!(temp_links(&fx).is_empty(), "left {:?}", temp_links(&fx));
    }

    #[tokio::test]
    async fn switching_to_an_unstaged_release_is_refused() {
        let fx = fixture(ArchiveLimits::default());
        fx.stage_bytes("v1", good_archive()).await.expect("v1");
        fx.installer.switch_current("web", "v1").expect("switch");
        let err = fx
            .installer
            .switch_current("web", "v9")
            .expect_err("not staged");
        assert!(matches!(err, InstallError::NotStaged { .. }), "got {err:?}");
        assert_eq!(
            fx.installer.read_current("web").expect("current"),
            Some("v1".to_owned())
        );
        assert!(fx.installer.switch_current("web", "../v1").is_err());
    }

    #[tokio::test]
    async fn clear_current_is_idempotent() {
        let fx = fixture(ArchiveLimits::default());
        fx.stage_bytes("v1", good_archive()).await.expect("v1");
        fx.installer.switch_current("web", "v1").expect("switch");
        fx.installer.clear_current("web").expect("clear");
        assert_eq!(fx.installer.read_current("web").expect("read"), None);
        fx.installer.clear_current("web").expect("clear again");
        assert!(fx.installer.is_staged("web", "v1"), "release kept");
    }

    // ---- retention and cleanup --------------------------------------------

    #[tokio::test]
    async fn remove_release_deletes_it_keeps_the_cache_and_refuses_current() {
        let fx = fixture(ArchiveLimits::default());
        let data = good_archive();
        let digest = fx.source.insert(data);
        fx.installer.stage(&def("v1", digest, 0)).await.expect("v1");
        fx.installer.stage(&def("v2", digest, 0)).await.expect("v2");
        fx.installer.switch_current("web", "v2").expect("switch");

        let err = fx
            .installer
            .remove_release("web", "v2")
            .expect_err("current");
        assert!(matches!(err, InstallError::InUse { .. }), "got {err:?}");

        fx.installer.remove_release("web", "v1").expect("remove");
        fx.installer
            .remove_release("web", "v1")
            .expect("idempotent");
        assert!(!fx.installer.is_staged("web", "v1"));
        assert_eq!(
            fx.releases_listing(),
            BTreeSet::from(["v2".to_owned(), ".v2.digest".to_owned()])
        );
        assert!(fx.layout.cached_artifact(&digest.hex()).is_file());
        // Staging it again unpacks from the cache.
        fx.installer
            .stage(&def("v1", digest, 0))
            .await
            .expect("restage");
        assert_eq!(fx.source.fetch_count(digest), 1);
    }

    #[tokio::test]
    async fn clean_partial_removes_leftovers_and_keeps_releases_and_downloads() {
        let fx = fixture(ArchiveLimits::default());
        fx.stage_bytes("v1", good_archive()).await.expect("v1");
        fx.installer.switch_current("web", "v1").expect("switch");
        let releases = fx.layout.releases_dir("web");
        fs::create_dir_all(releases.join(".v2.tmp/bin")).expect("tmp dir");
        fs::write(releases.join(".v2.tmp/bin/app"), b"half").expect("tmp file");
        fs::write(releases.join(".v3.digest.tmp"), b"sha256:").expect("marker tmp");
        fs::write(releases.join(".v4.digest"), b"orphan").expect("orphan marker");
        std::os::unix::fs::symlink(
            "releases/v1",
            fx.layout.service_dir("web").join(".current.tmp.1.2"),
        )
        .expect("temp link");
        let part = fx
            .layout
            .cache_dir()
            .join(format!("{}.part", "ab".repeat(32)));
        fs::write(&part, b"resume me").expect("part");

        fx.installer.clean_partial("web").expect("clean");

        assert_eq!(
            fx.releases_listing(),
            BTreeSet::from(["v1".to_owned(), ".v1.digest".to_owned()])
        );
        assert!(temp_links(&fx).is_empty());
        assert!(part.exists(), "partial downloads are kept for resuming");
        assert_eq!(
            fx.installer.read_current("web").expect("current"),
            Some("v1".to_owned())
        );
        fx.installer
            .clean_partial("nothing-here")
            .expect("no service dir");
    }

    #[tokio::test]
    async fn a_release_named_like_a_temp_dir_survives_cleanup() {
        let fx = fixture(ArchiveLimits::default());
        fx.stage_bytes("v1.tmp", good_archive())
            .await
            .expect("stage");
        fx.installer.clean_partial("web").expect("clean");
        assert!(fx.installer.is_staged("web", "v1.tmp"));
    }

    #[test]
    fn symlink_targets_are_checked_against_the_link_depth() {
        assert!(check_symlink_target(b"x", 0).is_ok());
        assert!(check_symlink_target(b"./x/y", 0).is_ok());
        assert!(check_symlink_target(b"..", 1).is_ok());
        assert!(check_symlink_target(b"../../a/b", 2).is_ok());
        assert!(check_symlink_target(b"..", 0).is_err());
        assert!(check_symlink_target(b"../../a", 1).is_err());
        assert!(check_symlink_target(b"a/../b", 3).is_err());
        assert!(check_symlink_target(b"/abs", 3).is_err());
        assert!(check_symlink_target(b"", 3).is_err());
    }

    #[test]
    fn error_messages_name_the_cause_and_the_fix() {
        let err = unsafe_entry("../../etc/passwd", LEAVES);
        assert_eq!(
            err.to_string(),
            "archive entry \"../../etc/passwd\" is unsafe: path leaves the release directory; \
             rebuild the artifact with relative paths inside the release"
        );
        let full = io_err("write x", io::Error::from(io::ErrorKind::StorageFull));
        assert!(matches!(full, InstallError::NoSpace { .. }));
        assert!(full.to_string().contains("free disk space"), "{full}");
    }
}

#[cfg(test)]
mod signature_tests {
    use super::*;
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    fn artifact() -> Vec<u8> {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, "a.txt", &b"abc"[..])
            .expect("append");
        tar.into_inner().and_then(|g| g.finish()).expect("finish")
    }

    fn def(digest: Digest, signature: Option<String>) -> ServiceDefinition {
        ServiceDefinition {
            service: "web".into(),
            release: "v1".into(),
            artifact: crate::release::Artifact {
                digest,
                size: 0,
                signature,
            },
            supervision: crate::release::Supervision::Hooks {
                start: None,
                stop: None,
            },
            env: Default::default(),
            hooks: Default::default(),
            health_checks: vec![],
            thresholds: Default::default(),
            min_healthy_time: std::time::Duration::ZERO,
            healthy_deadline: std::time::Duration::from_secs(1),
            commit_deadline: std::time::Duration::from_secs(1),
            run_as: None,
        }
    }

    #[tokio::test]
    async fn only_releases_signed_by_a_trusted_key_are_staged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = Arc::new(MemorySource::default());
        let digest = source.insert(artifact());
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let trusted = b64(key.verifying_key().as_bytes());
        let installer = Installer::new(
            Layout::new(dir.path()),
            ArchiveLimits::default(),
            source.clone(),
        )
        .with_trusted_keys(std::slice::from_ref(&trusted))
        .expect("keys");
        let msg = digest.to_string();

        let err = installer
            .stage(&def(digest, None))
            .await
            .expect_err("unsigned");
        assert!(matches!(err, InstallError::Unsigned { .. }), "{err}");
        let bad = b64(&other.sign(msg.as_bytes()).to_bytes());
        let err = installer
            .stage(&def(digest, Some(bad)))
            .await
            .expect_err("wrong key");
        assert!(matches!(err, InstallError::BadSignature { .. }), "{err}");
        let over_other = b64(&key.sign(b"sha256:something-else").to_bytes());
        let err = installer
            .stage(&def(digest, Some(over_other)))
            .await
            .expect_err("other digest");
        assert!(matches!(err, InstallError::BadSignature { .. }), "{err}");
        let err = installer
            .stage(&def(digest, Some("%%%".into())))
            .await
            .expect_err("garbage");
        assert!(matches!(err, InstallError::BadSignature { .. }), "{err}");
        // Refused before anything was fetched or unpacked.
        assert_eq!(source.fetch_count(digest), 0);
        assert!(!installer.is_staged("web", "v1"));

        let good = b64(&key.sign(msg.as_bytes()).to_bytes());
        installer
            .stage(&def(digest, Some(good)))
            .await
            .expect("signed release stages");
        assert!(installer.is_staged("web", "v1"));
    }

    #[test]
    fn malformed_trusted_keys_are_refused() {
        for k in ["", "not base64!", &b64(&[1u8; 31])] {
            assert!(parse_public_key(k).is_err(), "{k:?} accepted");
        }
    }
}
