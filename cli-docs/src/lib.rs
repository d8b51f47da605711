//! Shell completions and man pages generated from the clap definition of the
//! binary (`BIN completions SHELL`, `BIN man --out DIR`).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Writes the completion script of `cmd` for `shell` to `out`. The script is
/// rendered first, so a closed pipe is an error here rather than a panic.
pub fn write_completions(
    shell: Shell,
    mut cmd: clap::Command,
    out: &mut dyn Write,
) -> io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// Writes one man page per command into `dir` (created if missing): `NAME.1`
/// for the binary and `NAME-SUB[-SUB...].1` for every visible subcommand.
/// Returns the files written, the binary's own page first.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fn walk(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
        let subs: Vec<clap::Command> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .cloned()
            .collect();
        written.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
        for sub in subs {
            walk(sub, dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    walk(cmd, dir, &mut written)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("tool")
            .version("1.0")
            .about("A tool.")
            .subcommand(
                clap::Command::new("group")
                    .about("A group.")
                    .subcommand(clap::Command::new("leaf").about("A leaf.")),
            )
            .subcommand(clap::Command::new("hidden").hide(true))
    }

    #[test]
    fn one_page_per_visible_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write_man_pages(sample(), dir.path()).expect("pages");
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert_eq!(names, ["tool.1", "tool-group.1", "tool-group-leaf.1"]);
        let page = std::fs::read_to_string(dir.path().join("tool-group-leaf.1")).expect("read");
        assert!(page.contains("A leaf."), "{page}");
    }

    #[test]
    fn completions_name_the_subcommands() {
        let mut out = Vec::new();
        write_completions(Shell::Bash, sample(), &mut out).expect("write");
        let script = String::from_utf8(out).expect("utf-8");
        assert!(
            script.contains("group") && script.contains("leaf"),
            "{script}"
        );
    }
}
