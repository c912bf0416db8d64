//! `cargo xtask fuzz`: the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer,
//! nightly), each for a fixed time, from the committed seed corpus in
//! `fuzz/corpus/<target>/` plus what earlier runs found
//! (`target/fuzz/corpus/<target>/`, where libFuzzer adds new inputs). A
//! crash fails the run and its input is kept in
//! `target/fuzz/artifacts/<target>/`, named in the error.
//!
//! The targets are built unoptimised (`--dev`): a short run in `cargo xtask
//! test` finds more per minute in a build that takes a third of the time.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::root;

/// Every target, as `fuzz/Cargo.toml` names its `[[bin]]`s.
pub(crate) fn targets() -> Result<Vec<String>> {
    let manifest = root().join("fuzz/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    Ok(bin_names(&text))
}

/// The `name` of each `[[bin]]` table of a Cargo manifest.
fn bin_names(manifest: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name") {
            let v = v.trim_start().trim_start_matches('=').trim().trim_matches('"');
            names.push(v.to_string());
        }
    }
    names
}

/// Inputs up to this size: above libFuzzer's default of 4 KiB, so that the
/// CNI line bound (16 KiB) and multi-document YAML are reached.
const MAX_LEN: usize = 64 * 1024;

/// Runs each of `only` (every target when empty) for `seconds`, with
/// libFuzzer's `seed` when one is given (a random one otherwise).
pub(crate) fn run(seconds: u64, seed: Option<u64>, only: &[String]) -> Result<()> {
    let all = targets()?;
    for t in only {
        if !all.contains(t) {
            bail!("no fuzz target {t:?}; the targets are {}", all.join(", "));
        }
    }
    let chosen: Vec<&String> = if only.is_empty() {
        all.iter().collect()
    } else {
        only.iter().collect()
    };
    let fuzz_dir = root().join("fuzz");
    println!("== building the fuzz targets (cargo +nightly fuzz build --dev)");
    crate::run(cargo_fuzz(&fuzz_dir).args(["build", "--dev"]))?;
    for t in chosen {
        let corpus = root().join("target/fuzz/corpus").join(t);
        let artifacts = root().join("target/fuzz/artifacts").join(t);
        for d in [&corpus, &artifacts] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        println!("== fuzz {t}, {seconds} s");
        let mut cmd = cargo_fuzz(&fuzz_dir);
        cmd.args(["run", "--dev", t])
            .arg(&corpus)
            .arg(Path::new("corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={MAX_LEN}"));
        if let Some(seed) = seed {
            cmd.arg(format!("-seed={seed}"));
        }
        let status = cmd
            // libFuzzer wants the directory with its trailing slash.
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .status()
            .with_context(|| format!("starting cargo fuzz run {t}"))?;
        if !status.success() {
            bail!(
                "fuzz target {t} failed ({status}); the input that crashed it is in {}",
                artifacts.display()
            );
        }
    }
    Ok(())
}

fn cargo_fuzz(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"]).current_dir(dir);
    cmd
}

#[cfg(test)]
mod tests {
    use super::bin_names;

    #[test]
    fn the_targets_are_the_manifests_bins() {
        let manifest = "[package]\nname = \"nodeward-fuzz\"\n\n[[bin]]\nname = \"a\"\npath = \"x\"\n\n[profile.dev]\n\n[[bin]]\nname = \"b_c\"\n";
        assert_eq!(bin_names(manifest), ["a", "b_c"]);
    }

    #[test]
    fn the_committed_manifest_has_a_seed_corpus_for_every_target() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        let names = bin_names(&manifest);
        assert!(names.len() >= 5, "{names:?}");
        for n in names {
            let seeds = root.join("fuzz/corpus").join(&n);
            let count = std::fs::read_dir(&seeds).map(|d| d.count()).unwrap_or(0);
            assert!(count > 0, "fuzz target {n} has no seed corpus in {}", seeds.display());
            assert!(
                root.join(format!("fuzz/fuzz_targets/{n}.rs")).is_file(),
                "{n} has no source"
            );
        }
    }
}
