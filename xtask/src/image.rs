//! `cargo xtask image`: the agent's container image, built with buildah
//! from `scratch` (no registry, no Docker engine, no base image).
//!
//! The root filesystem holds `nodeward` and `nodeward-cni` in
//! `/usr/local/bin`, exactly the shared libraries they load (from `ldd`,
//! the dynamic loader at its own path), copied from the host's Debian
//! packages, a root-only `/etc/passwd` and `/etc/group`, `/etc/nsswitch.conf`
//! (files, then DNS), `/tmp`, and the SBOM at [`SBOM_IN_IMAGE`]. No shell.
//!
//! The SBOM (CycloneDX 1.5 JSON) lists the crates linked into the agent —
//! the resolve graph of `cargo metadata` walked from `nodeward` over normal
//! dependency edges only, kept to the crates `cargo tree -p nodeward`
//! resolves (metadata unifies features over the whole workspace) — with
//! their licenses and Cargo.lock's SHA-256,
//! and the Debian packages the libraries come from with their versions.
//! Proc-macro crates, and what only they depend on, are listed with scope
//! `excluded`: they run in the compiler, nothing of them is in the binary.
//!
//! buildah keeps its storage under `target/image/buildah` (vfs driver),
//! never the system's. Output: `nodeward-<version>[-dev].tar` (a
//! docker-archive, reference `nodeward:latest`, as `deploy/` uses) and
//! `nodeward-<version>[-dev].cdx.json` beside it, in `target/image` or `--out`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Where the image carries its own SBOM.
const SBOM_IN_IMAGE: &str = "usr/share/doc/nodeward/sbom.cdx.json";
/// The binaries the image ships, from `agent/Cargo.toml`'s `[[bin]]`s.
const BINARIES: &[&str] = &["nodeward", "nodeward-cni"];
/// The reference inside the archive: the one `deploy/daemonset.yaml` uses.
const ARCHIVE_REFERENCE: &str = "nodeward:latest";
/// buildah's working container, by name, so a run interrupted before its
/// cleanup is removed by the next one.
const CONTAINER: &str = "nodeward-image-build";
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// `cargo xtask image [--dev] [--out DIR]`.
pub fn image(dev: bool, out: Option<PathBuf>) -> Result<()> {
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
    Ok(())
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
struct Library {
    /// Where the loader finds it (as `ldd` prints it); the image's path too.
    path: PathBuf,
    package: String,
    version: String,
    arch: String,
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

// --- the SBOM -------------------------------------------------------------

/// What the SBOM needs from `cargo metadata` and Cargo.lock.
struct Metadata {
    version: String,
    repository: Option<String>,
    target_dir: PathBuf,
    root_id: String,
    /// Package id → package JSON.
    packages: BTreeMap<String, Value>,
    /// Package id → ids of its normal (linked, not dev, not build) dependencies.
    normal_deps: BTreeMap<String, Vec<String>>,
    /// (name, version, source) → Cargo.lock's SHA-256.
    checksums: BTreeMap<(String, String, String), String>,
    /// (name, version) of what `cargo build -p nodeward` compiles for the
    /// agent's normal dependencies, from `cargo tree`: the resolve graph of
    /// `cargo metadata` unifies features across the whole workspace (the
    /// test bed's features add optional crates the agent does not build).
    built: BTreeSet<(String, String)>,
}

impl Metadata {
    fn load() -> Result<Self> {
        let out = super::cargo()
            .args([
                "metadata",
                "--locked",
                "--format-version",
                "1",
                "--filter-platform",
                TARGET,
            ])
            .current_dir(super::root())
            .output()
            .context("starting cargo metadata")?;
        if !out.status.success() {
            bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata's output")?;
        let packages: BTreeMap<String, Value> = meta["packages"]
            .as_array()
            .context("cargo metadata: no packages")?
            .iter()
            .filter_map(|p| Some((p["id"].as_str()?.to_string(), p.clone())))
            .collect();
        let members: BTreeSet<&str> = meta["workspace_members"]
            .as_array()
            .context("cargo metadata: no workspace_members")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let root_id = members
            .iter()
            .find(|id| packages.get(**id).is_some_and(|p| p["name"] == "nodeward"))
            .context("cargo metadata: no workspace package named nodeward")?
            .to_string();
        let mut normal_deps = BTreeMap::new();
        for node in meta["resolve"]["nodes"]
            .as_array()
            .context("cargo metadata: no resolve graph")?
        {
            let Some(id) = node["id"].as_str() else { continue };
            let deps = node["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .is_some_and(|kinds| kinds.iter().any(|k| k["kind"].is_null()))
                })
                .filter_map(|d| d["pkg"].as_str().map(str::to_string))
                .collect();
            normal_deps.insert(id.to_string(), deps);
        }
        let root = &packages[&root_id];
        let workspace_root = PathBuf::from(
            meta["workspace_root"]
                .as_str()
                .context("cargo metadata: no workspace_root")?,
        );
        let lock = workspace_root.join("Cargo.lock");
        let lock_text = std::fs::read_to_string(&lock).with_context(|| format!("reading {}", lock.display()))?;
        Ok(Self {
            version: root["version"].as_str().context("nodeward has no version")?.to_string(),
            repository: root["repository"].as_str().map(str::to_string),
            target_dir: PathBuf::from(
                meta["target_directory"]
                    .as_str()
                    .context("cargo metadata: no target_directory")?,
            ),
            root_id,
            packages,
            normal_deps,
            checksums: lock_checksums(&lock_text),
            built: built_packages()?,
        })
    }

    /// Every package reachable from `nodeward` over normal edges; with
    /// `through_proc_macros` false, not entering proc-macro crates.
    fn reachable(&self, through_proc_macros: bool) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut queue = VecDeque::from([self.root_id.clone()]);
        while let Some(id) = queue.pop_front() {
            if !seen.insert(id.clone()) {
                continue;
            }
            for dep in self.normal_deps.get(&id).into_iter().flatten() {
                if self.is_built(dep) && (through_proc_macros || !self.is_proc_macro(dep)) {
                    queue.push_back(dep.clone());
                }
            }
        }
        seen.remove(&self.root_id);
        seen
    }

    fn is_built(&self, id: &str) -> bool {
        let p = &self.packages[id];
        let key = |f: &str| p[f].as_str().unwrap_or_default().to_string();
        self.built.contains(&(key("name"), key("version")))
    }

    fn is_proc_macro(&self, id: &str) -> bool {
        self.packages[id]["targets"].as_array().into_iter().flatten().any(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "proc-macro"))
        })
    }

    fn purl(&self, id: &str) -> String {
        let p = &self.packages[id];
        format!(
            "pkg:cargo/{}@{}",
            p["name"].as_str().unwrap_or_default(),
            p["version"].as_str().unwrap_or_default()
        )
    }
}

/// `cargo tree -p nodeward -e normal`'s packages: features resolved as
/// `cargo build -p nodeward` resolves them, dev-dependencies left out.
fn built_packages() -> Result<BTreeSet<(String, String)>> {
    let out = super::cargo()
        .args([
            "tree",
            "--locked",
            "--package",
            "nodeward",
            "--edges",
            "normal",
            "--target",
            TARGET,
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(super::root())
        .output()
        .context("starting cargo tree")?;
    if !out.status.success() {
        bail!("cargo tree failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // `aya v0.14.0`, `nodeward-common v0.1.0 (/work/common)`, `... (*)`.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            let version = words.next()?.strip_prefix('v')?;
            Some((name.to_string(), version.to_string()))
        })
        .collect())
}

/// (name, version, source) → checksum, from Cargo.lock's `[[package]]` tables.
fn lock_checksums(lock: &str) -> BTreeMap<(String, String, String), String> {
    let mut sums = BTreeMap::new();
    let mut entry: BTreeMap<&str, String> = BTreeMap::new();
    let mut flush = |entry: &mut BTreeMap<&str, String>| {
        if let (Some(n), Some(v), Some(s), Some(c)) = (
            entry.get("name"),
            entry.get("version"),
            entry.get("source"),
            entry.get("checksum"),
        ) {
            sums.insert((n.clone(), v.clone(), s.clone()), c.clone());
        }
        entry.clear();
    };
    for line in lock.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            flush(&mut entry);
            continue;
        }
        if let Some((key, value)) = line.split_once(" = ")
            && let Some(value) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'))
            && matches!(key, "name" | "version" | "source" | "checksum")
        {
            entry.insert(key, value.to_string());
        }
    }
    flush(&mut entry);
    sums
}

fn sbom(meta: &Metadata, libs: &[Library]) -> Result<Value> {
    let all = meta.reachable(true);
    let linked = meta.reachable(false);
    let mut components = Vec::new();
    let mut dependencies = Vec::new();
    for id in &all {
        let p = &meta.packages[id];
        let name = p["name"].as_str().context("a package without a name")?;
        let version = p["version"].as_str().context("a package without a version")?;
        let purl = meta.purl(id);
        let mut c = json!({
            "type": "library",
            "bom-ref": purl,
            "name": name,
            "version": version,
            "purl": purl,
            "scope": if linked.contains(id) { "required" } else { "excluded" },
        });
        if let Some(license) = p["license"].as_str() {
            // Old manifests write `MIT/Apache-2.0`, meaning OR.
            c["licenses"] = json!([{ "expression": license.replace('/', " OR ") }]);
        }
        if let Some(source) = p["source"].as_str()
            && let Some(sum) = meta
                .checksums
                .get(&(name.to_string(), version.to_string(), source.to_string()))
        {
            c["hashes"] = json!([{ "alg": "SHA-256", "content": sum }]);
        }
        if let Some(description) = p["description"].as_str() {
            c["description"] = json!(description.trim());
        }
        components.push(c);
        dependencies.push(json!({ "ref": purl, "dependsOn": depends_on(meta, id, &all) }));
    }

    // One component per Debian package, naming the files taken from it.
    let mut debs: BTreeMap<String, (&Library, Vec<String>)> = BTreeMap::new();
    for lib in libs {
        let purl = format!(
            "pkg:deb/debian/{}@{}?arch={}",
            lib.package,
            purl_escape(&lib.version),
            lib.arch
        );
        debs.entry(purl)
            .or_insert((lib, Vec::new()))
            .1
            .push(lib.path.display().to_string());
    }
    for (purl, (lib, files)) in &debs {
        components.push(json!({
            "type": "library",
            "bom-ref": purl,
            "name": lib.package,
            "version": lib.version,
            "purl": purl,
            "scope": "required",
            "properties": files.iter().map(|f| json!({ "name": "nodeward:image:file", "value": f })).collect::<Vec<_>>(),
        }));
        dependencies.push(json!({ "ref": purl, "dependsOn": [] }));
    }

    let root = &meta.packages[&meta.root_id];
    let root_ref = meta.purl(&meta.root_id);
    let mut root_deps = depends_on(meta, &meta.root_id, &all);
    root_deps.extend(debs.keys().cloned());
    dependencies.insert(0, json!({ "ref": root_ref, "dependsOn": root_deps }));

    let mut bom = json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.5.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "timestamp": rfc3339(now_secs()),
            "tools": { "components": [{
                "type": "application",
                "name": "nodeward xtask",
                "version": env!("CARGO_PKG_VERSION"),
            }]},
            "component": {
                "type": "application",
                "bom-ref": root_ref,
                "name": "nodeward",
                "version": meta.version,
                "purl": root_ref,
                "description": root["description"],
                "licenses": [{ "expression": root["license"].as_str().unwrap_or("Apache-2.0") }],
            },
        },
        "components": components,
        "dependencies": dependencies,
    });
    if let Ok(uuid) = std::fs::read_to_string("/proc/sys/kernel/random/uuid") {
        bom["serialNumber"] = json!(format!("urn:uuid:{}", uuid.trim()));
    }
    Ok(bom)
}

fn depends_on(meta: &Metadata, id: &str, within: &BTreeSet<String>) -> Vec<String> {
    let deps: BTreeSet<String> = meta
        .normal_deps
        .get(id)
        .into_iter()
        .flatten()
        .filter(|d| within.contains(*d))
        .map(|d| meta.purl(d))
        .collect();
    deps.into_iter().collect()
}

/// A purl component percent-encoded (Debian versions carry `+` and `~`).
fn purl_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Seconds since the epoch: `SOURCE_DATE_EPOCH` when set (reproducible
/// builds), else now.
fn now_secs() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// `YYYY-MM-DDTHH:MM:SSZ` (days to civil date: Howard Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn debian_versions_are_escaped_in_purls() {
        assert_eq!(purl_escape("2.36-9+deb12u10"), "2.36-9%2Bdeb12u10");
        assert_eq!(purl_escape("1:2.3~rc1"), "1:2.3~rc1");
    }

    #[test]
    fn cargo_lock_checksums_are_read() {
        let lock = r#"version = 4

[[package]]
name = "anyhow"
version = "1.0.0"
source = "registry+https://github.com/rust-lang/crates.io-index"
checksum = "abc"

[[package]]
name = "local"
version = "0.1.0"
dependencies = [
 "anyhow",
]
"#;
        let sums = lock_checksums(lock);
        assert_eq!(sums.len(), 1);
        assert_eq!(
            sums[&(
                "anyhow".to_string(),
                "1.0.0".to_string(),
                "registry+https://github.com/rust-lang/crates.io-index".to_string()
            )],
            "abc"
        );
    }
}
