//! `cargo xtask image`: the agent's container image, built with buildah
//! from `scratch` (no registry, no Docker engine, no base image).
//!
//! The root filesystem holds `nodeward` and `nodeward-cni` in
//! `/usr/local/bin`, exactly the shared libraries they load (from `ldd`,
//! the dynamic loader at its own path), copied from the host's Debian
//! packages, a root-only `/etc/passwd` and `/etc/group`, `/etc/nsswitch.conf`
//! (files, then DNS), `/tmp`, and the SBOM at [`SBOM_IN_IMAGE`]. No shell.
//!
//! The SBOM (`sbom.rs`) lists the crates linked into the agent and the
//! Debian packages its libraries come from.
//!
//! buildah keeps its storage under `target/image/buildah` (vfs driver),
//! never the system's. Output: `nodeward-<version>[-dev].tar` (a
//! docker-archive, reference `nodeward:latest`, as `deploy/` uses) and
//! `nodeward-<version>[-dev].cdx.json` beside it, in `target/image` or `--out`.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::sbom::{Metadata, now_secs, rfc3339, sbom};

/// Where the image carries its own SBOM.
const SBOM_IN_IMAGE: &str = "usr/share/doc/nodeward/sbom.cdx.json";
/// The binaries the image ships, from `agent/Cargo.toml`'s `[[bin]]`s.
const BINARIES: &[&str] = &["nodeward", "nodeward-cni"];
/// The reference inside the archive: the one `deploy/daemonset.yaml` uses.
const ARCHIVE_REFERENCE: &str = "nodeward:latest";
/// buildah's working container, by name, so a run interrupted before its
/// cleanup is removed by the next one.
const CONTAINER: &str = "nodeward-image-build";

/// `cargo xtask image [--dev] [--out DIR]`.
/// Returns the archive's path.
pub fn image(dev: bool, out: Option<PathBuf>) -> Result<PathBuf> {
    let meta = Metadata::load()?;
    let profile = if dev { "debug" } else { "release" };
    let tag = if dev {
        format!("{}-dev", meta.version)
    } else {
        meta.version.clone()
    };

    let started = Instant::now();
    let mut build = super::cargo();
    build.args(["build", "--locked"]);
    if !dev {
        build.arg("--release");
    }
    build.args(["--package", "nodeward", "--bins"]);
    super::run(&mut build).context("building the agent's binaries")?;
    let compiled = started.elapsed();
    let started = Instant::now();

    let bins: Vec<PathBuf> = BINARIES.iter().map(|b| meta.target_dir.join(profile).join(b)).collect();
    for bin in &bins {
        if !bin.is_file() {
            bail!("cargo build left no {}", bin.display());
        }
    }
    let libs = shared_libraries(&bins)?;

    let out = match out {
        Some(dir) => std::path::absolute(&dir).with_context(|| format!("resolving --out {}", dir.display()))?,
        None => meta.target_dir.join("image"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let archive = out.join(format!("nodeward-{tag}.tar"));
    let sbom_path = out.join(format!("nodeward-{tag}.cdx.json"));
    if archive.to_string_lossy().contains(':') {
        bail!(
            "{}: buildah's docker-archive: transport cannot take a path with ':'",
            archive.display()
        );
    }

    let sbom = sbom(&meta, &libs)?;
    let sbom_text = serde_json::to_string_pretty(&sbom).context("serialising the SBOM")? + "\n";
    std::fs::write(&sbom_path, &sbom_text).with_context(|| format!("writing the SBOM {}", sbom_path.display()))?;

    let revision = git_revision();
    let buildah = Buildah::new(&meta.target_dir.join("image/buildah"))?;
    buildah.assemble(&Assembly {
        bins: &bins,
        libs: &libs,
        sbom: &sbom_text,
        labels: &labels(&meta, profile, revision.as_deref()),
        image: &format!("nodeward:{tag}"),
        archive: &archive,
    })?;

    println!(
        "image built in {:.1} s (after {:.1} s of cargo build): {} crates and {} Debian packages in the SBOM",
        started.elapsed().as_secs_f64(),
        compiled.as_secs_f64(),
        sbom["components"].as_array().map_or(0, |c| c
            .iter()
            .filter(|c| c["purl"].as_str().is_some_and(|p| p.starts_with("pkg:cargo/")))
            .count()),
        libs.iter().map(|l| &l.package).collect::<BTreeSet<_>>().len(),
    );
    println!(
        "image: {} ({ARCHIVE_REFERENCE}, also tagged nodeward:{tag} in the build storage)",
        archive.display()
    );
    println!("sbom:  {} (in the image: /{SBOM_IN_IMAGE})", sbom_path.display());
    Ok(archive)
}

/// The OCI labels.
fn labels(meta: &Metadata, profile: &str, revision: Option<&str>) -> Vec<(String, String)> {
    let mut labels = vec![
        ("org.opencontainers.image.title", "nodeward".to_string()),
        (
            "org.opencontainers.image.description",
            "Per-node sidecarless service-mesh agent and its chained CNI plugin".to_string(),
        ),
        ("org.opencontainers.image.licenses", "Apache-2.0".to_string()),
        ("org.opencontainers.image.version", meta.version.clone()),
        ("org.opencontainers.image.created", rfc3339(now_secs())),
        ("io.nodeward.build-profile", profile.to_string()),
    ];
    if let Some(rev) = revision {
        labels.push(("org.opencontainers.image.revision", rev.to_string()));
    }
    if let Some(url) = &meta.repository {
        labels.push(("org.opencontainers.image.source", url.clone()));
    }
    labels.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn git_revision() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(super::root())
        .output()
        .ok()?;
    let rev = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !rev.is_empty()).then_some(rev)
}

// --- the shared libraries -------------------------------------------------

/// A shared library a binary loads, and the Debian package it comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Library {
    /// Where the loader finds it (as `ldd` prints it); the image's path too.
    pub(crate) path: PathBuf,
    pub(crate) package: String,
    pub(crate) version: String,
    pub(crate) arch: String,
}

/// The union of `ldd`'s libraries of every binary, the loader included,
/// each with its owning package (`dpkg -S`) and version (`dpkg-query`).
fn shared_libraries(bins: &[PathBuf]) -> Result<Vec<Library>> {
    let mut paths = BTreeSet::new();
    for bin in bins {
        let out = Command::new("ldd")
            .arg(bin)
            .output()
            .with_context(|| format!("ldd {}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("not a dynamic executable") {
            continue;
        }
        if !out.status.success() {
            bail!(
                "ldd {} failed: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in text.lines() {
            let line = line.trim();
            if line.contains("not found") {
                bail!("ldd {}: a library is missing: {line}", bin.display());
            }
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, or the
            // loader, `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no path.
            let path = line.split_once("=>").map_or(line, |(_, p)| p).trim();
            let path = path.split(" (").next().unwrap_or(path).trim();
            if path.starts_with('/') {
                paths.insert(PathBuf::from(path));
            }
        }
    }
    paths.into_iter().map(|p| owning_package(&p)).collect()
}

fn owning_package(path: &Path) -> Result<Library> {
    // dpkg knows a file by the path its package ships it at; on a
    // merged-/usr system that may be the path before or after /lib's link.
    let canonical = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?;
    let owner = [path, canonical.as_path()].into_iter().find_map(|p| {
        let out = Command::new("dpkg").arg("-S").arg(p).output().ok()?;
        if !out.status.success() {
            return None;
        }
        // `libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6` (diversions aside).
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("diversion "))
            .find_map(|l| l.split_once(": ").map(|(pkg, _)| pkg.trim().to_string()))
    });
    let Some(owner) = owner else {
        bail!("dpkg -S {}: no Debian package owns it", path.display());
    };
    let query = |field: &str| -> Result<String> {
        let out = Command::new("dpkg-query")
            .args(["-W", &format!("-f=${{{field}}}"), &owner])
            .output()
            .with_context(|| format!("dpkg-query {owner}"))?;
        let value = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || value.is_empty() {
            bail!(
                "dpkg-query -W -f '${{{field}}}' {owner} (owner of {}) failed",
                path.display()
            );
        }
        Ok(value)
    };
    Ok(Library {
        path: path.to_path_buf(),
        package: owner.split(':').next().unwrap_or(&owner).to_string(),
        version: query("Version")?,
        arch: query("Architecture")?,
    })
}

// --- buildah --------------------------------------------------------------

/// What goes into the image.
struct Assembly<'a> {
    bins: &'a [PathBuf],
    libs: &'a [Library],
    sbom: &'a str,
    labels: &'a [(String, String)],
    /// The name it is committed under in the build storage.
    image: &'a str,
    archive: &'a Path,
}

/// buildah on a private store (vfs under `target/image/buildah`).
struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
}

/// Removes the working container when the build ends, however it ends.
struct Container<'a> {
    buildah: &'a Buildah,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.buildah.run("removing the working container", &["rm", CONTAINER]) {
            eprintln!("warning: {e:#}");
        }
    }
}

impl Buildah {
    fn new(dir: &Path) -> Result<Self> {
        let (root, runroot) = (dir.join("root"), dir.join("run"));
        for d in [&root, &runroot] {
            std::fs::create_dir_all(d).with_context(|| format!("creating buildah storage {}", d.display()))?;
        }
        Ok(Self { root, runroot })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    /// Runs one buildah step; returns its standard output, trimmed.
    fn run(&self, step: &str, args: &[&str]) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args);
        let out = cmd
            .output()
            .with_context(|| format!("{step}: starting buildah (is it installed?)"))?;
        if !out.status.success() {
            bail!(
                "{step}: buildah {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn assemble(&self, a: &Assembly) -> Result<()> {
        // A container left by an interrupted run would hold the name.
        let _ = self.run("removing a stale working container", &["rm", CONTAINER]);
        self.run("buildah from scratch", &["from", "--name", CONTAINER, "scratch"])?;
        let container = Container { buildah: self };

        let mount = PathBuf::from(self.run("buildah mount", &["mount", CONTAINER])?);
        populate(&mount, a).with_context(|| format!("filling the image's root {}", mount.display()))?;

        let mut config: Vec<String> = [
            "config",
            "--entrypoint",
            r#"["/usr/local/bin/nodeward"]"#,
            "--workingdir",
            "/",
            "--env",
            "PATH=/usr/local/bin",
            "--user",
            "0:0",
            "--os",
            "linux",
            "--arch",
            "amd64",
        ]
        .map(String::from)
        .to_vec();
        for (k, v) in a.labels {
            config.extend(["--label".to_string(), format!("{k}={v}")]);
        }
        config.push(CONTAINER.to_string());
        self.run("buildah config", &config.iter().map(String::as_str).collect::<Vec<_>>())?;

        self.run(
            "buildah commit",
            &["commit", "--quiet", "--format", "docker", CONTAINER, a.image],
        )?;
        self.run("buildah tag", &["tag", a.image, ARCHIVE_REFERENCE])?;

        // Written aside, then renamed: a re-run replaces the archive whole.
        let partial = a.archive.with_extension("tar.partial");
        let _ = std::fs::remove_file(&partial);
        let dest = format!("docker-archive:{}:{ARCHIVE_REFERENCE}", partial.display());
        let pushed = self
            .run(
                &format!("buildah push to {}", a.archive.display()),
                &["push", "--quiet", a.image, &dest],
            )
            .and_then(|_| {
                std::fs::rename(&partial, a.archive)
                    .with_context(|| format!("renaming {} to {}", partial.display(), a.archive.display()))
            });
        if pushed.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        pushed?;

        drop(container);
        // The previous run's image, now untagged, in the private store.
        if let Err(e) = self.run("pruning untagged images", &["rmi", "--prune"]) {
            eprintln!("warning: {e:#}");
        }
        Ok(())
    }
}

/// The image's root filesystem, into buildah's mount of `scratch`.
fn populate(root: &Path, a: &Assembly) -> Result<()> {
    let dir = |rel: &str, mode: u32| -> Result<()> {
        let d = root.join(rel);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", d.display()))
    };
    let file = |rel: &str, text: &str, mode: u32| -> Result<()> {
        let f = root.join(rel);
        std::fs::write(&f, text).with_context(|| format!("writing {}", f.display()))?;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", f.display()))
    };
    // Copies the file's content (through links) and its mode.
    let copy = |from: &Path, rel: &Path| -> Result<()> {
        let to = root.join(rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        Ok(())
    };

    for d in ["etc", "usr", "usr/local", "usr/local/bin", "usr/share/doc/nodeward"] {
        dir(d, 0o755)?;
    }
    dir("tmp", 0o1777)?;
    for bin in a.bins {
        let name = bin.file_name().context("a binary without a name")?;
        copy(bin, &Path::new("usr/local/bin").join(name))?;
        let to = root.join("usr/local/bin").join(name);
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod 755 {}", to.display()))?;
    }
    for lib in a.libs {
        copy(&lib.path, lib.path.strip_prefix("/").unwrap_or(&lib.path))?;
    }
    file("etc/passwd", "root:x:0:0:root:/root:/sbin/nologin\n", 0o644)?;
    file("etc/group", "root:x:0:\n", 0o644)?;
    // glibc's default without one tries DNS before /etc/hosts.
    file(
        "etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files dns\n",
        0o644,
    )?;
    file(SBOM_IN_IMAGE, a.sbom, 0o644)?;
    Ok(())
}
