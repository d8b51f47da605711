//! Property-based fuzzing of the archive extractor: whatever the bytes or the
//! entries, unpacking never panics, never writes outside the destination, and
//! either succeeds or returns an error.
//!
//! Quick run (part of the test suite): `cargo test -p rollout-agent --test fuzz_archive`.
//! Longer run: `PROPTEST_CASES=20000 cargo test -p rollout-agent --test fuzz_archive`.

use std::path::Path;

use proptest::prelude::*;
use rollout_agent::update::installer::{ArchiveLimits, unpack_tar_gz};

fn limits() -> ArchiveLimits {
    ArchiveLimits {
        max_artifact_bytes: 1 << 20,
        max_unpacked_bytes: 1 << 20,
        max_entries: 64,
    }
}

/// Everything under `root` except `dest` (the sentinel area must stay as it was).
fn outside(root: &Path, dest: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.starts_with(dest) {
                continue;
            }
            v.push(p.display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    v.sort();
    v
}

fn name_part() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("/".to_string()),
        Just("/etc".to_string()),
        "[a-z]{1,6}",
    ]
}

/// (kind, path parts, link target parts, mode, data).
type Entry = (u8, Vec<String>, Vec<String>, u32, Vec<u8>);

fn entry() -> impl Strategy<Value = Entry> {
    (
        0u8..6,
        prop::collection::vec(name_part(), 1..4),
        prop::collection::vec(name_part(), 0..4),
        prop_oneof![
            Just(0o644u32),
            Just(0o755),
            Just(0o4755),
            Just(0o2755),
            Just(0o777)
        ],
        prop::collection::vec(any::<u8>(), 0..64),
    )
}

fn build(entries: &[Entry]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (kind, path, target, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        let name = path.join("/");
        let bytes = name.as_bytes();
        let gnu = h.as_gnu_mut().expect("gnu header");
        let n = bytes.len().min(gnu.name.len());
        gnu.name[..n].copy_from_slice(&bytes[..n]);
        h.set_mode(*mode);
        let t = match kind {
            0 => tar::EntryType::Regular,
            1 => tar::EntryType::Directory,
            2 => tar::EntryType::Symlink,
            3 => tar::EntryType::Link,
            4 => tar::EntryType::Fifo,
            _ => tar::EntryType::Char,
        };
        h.set_entry_type(t);
        if matches!(t, tar::EntryType::Symlink | tar::EntryType::Link) {
            let link = target.join("/");
            let lb = link.as_bytes();
            let gnu = h.as_gnu_mut().expect("gnu header");
            let n = lb.len().min(gnu.linkname.len());
            gnu.linkname[..n].copy_from_slice(&lb[..n]);
        }
        let body: &[u8] = if t == tar::EntryType::Regular {
            data
        } else {
            &[]
        };
        h.set_size(body.len() as u64);
        h.set_cksum();
        tar.append(&h, body).expect("append");
    }
    tar.into_inner().and_then(|g| g.finish()).expect("finish")
}

fn check(bytes: &[u8]) {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::write(root.path().join("sentinel"), b"keep").expect("sentinel");
    let archive = root.path().join("a.tar.gz");
    std::fs::write(&archive, bytes).expect("archive");
    let dest = root.path().join("dest");
    let before = outside(root.path(), &dest);
    let _ = unpack_tar_gz(&archive, &dest, &limits());
    let after = outside(root.path(), &dest);
    assert_eq!(before, after, "something was written outside the release");
    assert_eq!(
        std::fs::read(root.path().join("sentinel")).expect("sentinel"),
        b"keep"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn hostile_entries_never_escape(entries in prop::collection::vec(entry(), 1..8)) {
        check(&build(&entries));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        check(&bytes);
    }

    #[test]
    fn corrupted_archives_never_escape(entries in prop::collection::vec(entry(), 1..4), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = build(&entries);
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= b;
        }
        check(&bytes);
    }
}
