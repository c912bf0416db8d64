//! The agent's SBOM (CycloneDX 1.5 JSON), for `cargo xtask image`: the
//! crates linked into `nodeward` — the resolve graph of `cargo metadata`
//! walked from it over normal dependency edges only, kept to the crates
//! `cargo tree -p nodeward` resolves (metadata unifies features over the
//! whole workspace) — with their licenses and Cargo.lock's SHA-256, and the
//! Debian packages the image's shared libraries come from, with versions.
//! Proc-macro crates, and what only they depend on, are listed with scope
//! `excluded`: they run in the compiler, nothing of them is in the binary.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::image::Library;

/// The platform the agent is built for.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// What the SBOM needs from `cargo metadata` and Cargo.lock.
pub(crate) struct Metadata {
    pub(crate) version: String,
    pub(crate) repository: Option<String>,
    pub(crate) target_dir: PathBuf,
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
    pub(crate) fn load() -> Result<Self> {
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

pub(crate) fn sbom(meta: &Metadata, libs: &[Library]) -> Result<Value> {
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
pub(crate) fn now_secs() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// `YYYY-MM-DDTHH:MM:SSZ` (days to civil date: Howard Hinnant's algorithm).
pub(crate) fn rfc3339(secs: u64) -> String {
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
