//! Where things live under the agent's data directory.
//!
//! ```text
//! <data>/state/                                  sled: services, releases, history
//! <data>/services/<svc>/releases/<release-id>/   unpacked, read-only once complete
//! <data>/services/<svc>/current -> releases/<id> switched by rename(2) of a new link
//! <data>/services/<svc>/logs/<release-id>.log    stdout/stderr of the service and hooks
//! <data>/cache/<sha256-hex>                      verified artifacts; partial downloads as .part
//! ```

use std::path::{Path, PathBuf};

/// Paths under one data directory. Names passed in are validated release and
/// service names (see [`crate::release::validate_name`]).
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A layout rooted at `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Layout {
            root: data_dir.into(),
        }
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sled database.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Verified artifacts by digest.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// A verified artifact.
    pub fn cached_artifact(&self, digest_hex: &str) -> PathBuf {
        self.cache_dir().join(digest_hex)
    }

    /// Everything of one service.
    pub fn service_dir(&self, service: &str) -> PathBuf {
        self.root.join("services").join(service)
    }

    /// Unpacked releases of one service.
    pub fn releases_dir(&self, service: &str) -> PathBuf {
        self.service_dir(service).join("releases")
    }

    /// One unpacked release.
    pub fn release_dir(&self, service: &str, release: &str) -> PathBuf {
        self.releases_dir(service).join(release)
    }

    /// The `current` symlink of a service.
    pub fn current_link(&self, service: &str) -> PathBuf {
        self.service_dir(service).join("current")
    }

    /// Output of the service process and its hooks, one file per release.
    pub fn log_file(&self, service: &str, release: &str) -> PathBuf {
        self.service_dir(service)
            .join("logs")
            .join(format!("{release}.log"))
    }
}
