//! A directory of Kubernetes YAML as the config source.
//!
//! Polled (every 200 ms by default) rather than watched with inotify: polling
//! works the same on ConfigMap volumes (atomic symlink swaps), bind mounts and
//! network filesystems, and a stat per file is cheap. Only files whose
//! (inode, size, mtime) changed are read again. Documents are independent:
//! an invalid one is rejected alone, its object keeping its last good
//! version (if it had one), and the file's other documents stand. A file
//! whose YAML does not parse keeps its last good objects in force; at start
//! it has none, so `nodeward run` refuses to start ([`DirSource::start`])
//! rather than run without them. Each error is logged once.
//!
//! A panic never ends the polling: one in the parser rejects that file like
//! a syntax error; one anywhere else in a poll is logged with its message and
//! the poll starts over from the files' last good objects (the published
//! state keeps running meanwhile).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Assembler;
use super::objects::{Object, ObjectId, ParseError, Parsed, parse_file};
use crate::state::{Snapshot, Store};

/// Largest config file read; a bigger one is rejected, not loaded.
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

#[derive(Debug, Default)]
struct FileState {
    fingerprint: Option<Fingerprint>,
    /// Objects in force: the current version's valid ones, and the last
    /// good version of each it rejects (all of the last good version when
    /// the current one does not parse).
    objects: Vec<Object>,
    /// The errors of the current version: its own when it does not parse
    /// (then `unparseable`), else one per rejected document.
    errors: Vec<String>,
    /// The current version does not parse (or cannot be read) at all.
    unparseable: bool,
}

/// Reads one file's text into objects; [`parse_file`] except in tests.
type Parser = fn(&Path, &str) -> Result<Parsed, ParseError>;

/// Why `nodeward run` does not start on a config directory.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// Files that cannot be read or parsed at all: with no last good
    /// version, running would enforce none of their objects (a STRICT
    /// policy among them would be absent, traffic PERMISSIVE).
    #[error("config files that do not parse, so none of their objects would be enforced: {}", .0.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>().join("; "))]
    Unparseable(Vec<(PathBuf, String)>),
}

/// The directory source: its files' last good contents.
#[derive(Debug)]
pub(crate) struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Builds snapshots from the files' objects, as for every source.
    assembler: Assembler,
    parser: Parser,
    /// Set by a panicking poll: the next poll publishes even if no file changed.
    republish: bool,
    /// Where each poll's rejected files and reloads are reported.
    status: Option<std::sync::Arc<crate::admin::ConfigStatus>>,
}

impl DirSource {
    /// A source for `dir`; nothing is read until [`DirSource::refresh`].
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        DirSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            assembler: Assembler::default(),
            parser: parse_file,
            republish: false,
            status: None,
        }
    }

    /// Sets the trust domain, its aliases and Istio's root namespace.
    pub(crate) fn with_assembler(mut self, assembler: Assembler) -> Self {
        self.assembler = assembler;
        self
    }

    /// Reports each poll's rejected files and reloads to `status`
    /// (readiness, metrics, `/config_dump`).
    pub(crate) fn with_status(mut self, status: std::sync::Arc<crate::admin::ConfigStatus>) -> Self {
        self.status = Some(status);
        self
    }

    /// Re-reads changed files. Returns true when the objects changed.
    pub(crate) fn refresh(&mut self) -> bool {
        let listing = match list_files(&self.dir) {
            Ok(l) => l,
            Err(e) => {
                // An unreadable directory keeps the last good state.
                tracing::error!(dir = %self.dir.display(), "cannot read config directory: {e}");
                return false;
            }
        };
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|p, _| listing.iter().any(|(q, _)| q == p));
        if self.files.len() != before {
            changed = true;
        }
        for (path, fp) in listing {
            let state = self.files.entry(path.clone()).or_default();
            if state.fingerprint == Some(fp) {
                continue;
            }
            state.fingerprint = Some(fp);
            match read_and_parse(&path, fp.size, self.parser) {
                Ok(parsed) => {
                    let was_bad = !state.errors.is_empty();
                    let errors: Vec<String> = parsed.rejected.iter().map(|r| r.error.to_string()).collect();
                    for e in &errors {
                        tracing::error!(file = %path.display(), "rejected config document, keeping its object's last good version if any: {e}");
                    }
                    if was_bad && errors.is_empty() {
                        tracing::info!(file = %path.display(), "config file is valid again");
                    }
                    let objects = in_force(parsed, &state.objects);
                    state.errors = errors;
                    state.unparseable = false;
                    if state.objects != objects {
                        state.objects = objects;
                        changed = true;
                    }
                }
                Err(message) => {
                    tracing::error!(file = %path.display(), "rejected config file, keeping its last good version: {message}");
                    state.errors = vec![message];
                    state.unparseable = true;
                }
            }
        }
        changed
    }

    /// The first read, for `nodeward run`: a file that cannot be parsed at
    /// all has no last good version to run with, so the agent must not
    /// start (documents that are merely invalid are rejected alone, as at
    /// any time). The first poll of [`DirSource::run`] publishes what was read.
    pub(crate) fn start(&mut self) -> Result<(), DirError> {
        self.refresh();
        self.republish = true;
        let bad: Vec<(PathBuf, String)> = self
            .files
            .iter()
            .filter(|(_, s)| s.unparseable)
            .flat_map(|(p, s)| s.errors.iter().map(|e| (p.clone(), e.clone())))
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(DirError::Unparseable(bad))
        }
    }

    /// What the current versions reject, with the file: a whole file that
    /// does not parse, or each invalid document of one that does.
    pub(crate) fn errors(&self) -> Vec<(PathBuf, String)> {
        self.files
            .iter()
            .flat_map(|(p, s)| s.errors.iter().map(|e| (p.clone(), e.clone())))
            .collect()
    }

    /// Whether the current version of `file` does not parse at all (its
    /// errors reject the whole file, not documents of it).
    pub(crate) fn unparseable(&self, file: &Path) -> bool {
        self.files.get(file).is_some_and(|s| s.unparseable)
    }

    /// Builds a snapshot of all files' last good objects. A pod or namespace
    /// defined twice: the file sorting last wins, with a warning.
    pub(crate) fn snapshot(&mut self) -> Snapshot {
        let objects = self
            .files
            .iter()
            .flat_map(|(path, state)| state.objects.iter().map(move |o| (path.display(), o)));
        self.assembler.snapshot(objects)
    }

    /// One poll: re-reads changed files and returns the snapshot to publish
    /// if anything changed.
    fn poll(&mut self) -> Option<Snapshot> {
        let changed = self.refresh();
        (changed || std::mem::take(&mut self.republish)).then(|| self.snapshot())
    }

    /// [`DirSource::poll`], surviving a panic: it is logged with its message
    /// and every file is read again at the next poll (their last good objects
    /// kept) and published, so a half-done poll cannot leave a change
    /// unpublished. The
    /// store keeps the last published state meanwhile.
    fn poll_supervised(&mut self) -> Option<Snapshot> {
        self.supervise(Self::poll)
    }

    /// Runs one poll `step` as [`DirSource::poll_supervised`] describes.
    fn supervise(&mut self, step: impl FnOnce(&mut Self) -> Option<Snapshot>) -> Option<Snapshot> {
        match catch_panic(|| step(self)) {
            Ok(snap) => snap,
            Err(message) => {
                tracing::error!(
                    dir = %self.dir.display(),
                    "config refresh panicked, the last good config stays in force and the directory is read again: {message}"
                );
                for state in self.files.values_mut() {
                    state.fingerprint = None;
                }
                self.republish = true;
                None
            }
        }
    }

    /// Polls the directory until cancelled, publishing each change. Never
    /// ends on a panic (see [`DirSource::poll_supervised`]).
    pub(crate) async fn run(mut self, store: Store, interval: Duration, cancel: CancellationToken) {
        loop {
            let joined = tokio::task::spawn_blocking(move || {
                let snap = self.poll_supervised();
                (snap, self)
            })
            .await;
            let (snap, source) = match joined {
                Ok(done) => done,
                Err(e) => {
                    // Only a cancelled runtime gets here: the poll catches its panics.
                    tracing::error!("config refresh task stopped: {e}");
                    return;
                }
            };
            self = source;
            if let Some(status) = &self.status {
                status.report(self.errors(), snap.is_some());
            }
            if let Some(snap) = snap {
                tracing::info!(
                    pods = snap.pods.len(),
                    namespaces = snap.namespaces.len(),
                    "config applied"
                );
                store.publish(snap);
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

fn list_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, Fingerprint)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // ConfigMap volumes keep versions in hidden `..data` directories.
        if name.starts_with('.') {
            continue;
        }
        if !(name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json")) {
            continue;
        }
        let path = entry.path();
        // Follow symlinks, as ConfigMap volumes use them.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        out.push((
            path,
            Fingerprint {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            },
        ));
    }
    Ok(out)
}

/// Runs `f`, turning a panic into its message.
pub(super) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic without a message".to_string())
    })
}

/// The objects a new version of a file puts in force: its valid ones, and
/// for each document it rejects, the last good version (`before`) of the
/// object it names, unless a valid document names it too. A rejected
/// document that does not name itself could be any object of the file, so
/// every object of the last good version that is not redefined stays.
fn in_force(parsed: Parsed, before: &[Object]) -> Vec<Object> {
    let valid: std::collections::HashSet<ObjectId> = parsed.objects.iter().map(Object::id).collect();
    let anonymous = parsed.rejected.iter().any(|r| r.id.is_none());
    let rejected: std::collections::HashSet<&ObjectId> = parsed.rejected.iter().filter_map(|r| r.id.as_ref()).collect();
    let mut objects = parsed.objects;
    objects.extend(
        before
            .iter()
            .filter(|o| {
                let id = o.id();
                !valid.contains(&id) && (anonymous || rejected.contains(&id))
            })
            .cloned(),
    );
    objects
}

fn read_and_parse(path: &Path, size: u64, parser: Parser) -> Result<Parsed, String> {
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "{}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // A panicking parser rejects the file like a syntax error would.
    catch_panic(|| parser(path, &text))
        .map_err(|message| format!("{}: parser panicked: {message}", path.display()))?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeward-dir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";

    #[test]
    fn a_broken_file_keeps_its_last_good_objects() {
        let dir = tmpdir("lastgood");
        write(&dir, "ns.yaml", NS);
        let mut src = DirSource::new(&dir);
        assert!(src.refresh());
        assert!(src.snapshot().namespaces.contains_key("shop"));

        // Different size, so the fingerprint changes even within one mtime tick.
        write(&dir, "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: [broken\n");
        assert!(!src.refresh(), "a rejected file changes nothing");
        assert!(src.snapshot().namespaces.contains_key("shop"));
        let errors = src.errors();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].1.contains("ns.yaml"), "{}", errors[0].1);

        std::fs::remove_file(dir.join("ns.yaml")).unwrap();
        assert!(src.refresh());
        assert!(src.snapshot().namespaces.is_empty());
        assert!(src.errors().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";

    fn pod(ip: &str) -> String {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop}}\nstatus: {{podIP: {ip}}}\n")
    }

    #[test]
    fn an_invalid_document_hides_no_other_and_keeps_its_own_last_good_version() {
        let dir = tmpdir("perdoc");
        // At start: the invalid pod has no last good version; the policy stands.
        write(&dir, "mesh.yaml", &format!("{STRICT}---\n{}", pod("nope")));
        let mut src = DirSource::new(&dir);
        assert!(src.start().is_ok(), "an invalid document does not stop the start");
        let snap = src.snapshot();
        assert_eq!(snap.peer_authentications.len(), 1);
        assert!(snap.pods.is_empty());
        let errors = src.errors();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].1.contains("document 2") && errors[0].1.contains("shop/web"),
            "{errors:?}"
        );
        assert!(!src.unparseable(&dir.join("mesh.yaml")));

        write(&dir, "mesh.yaml", &format!("{STRICT}---\n{}", pod("10.1.1.1")));
        assert!(src.refresh());
        assert!(src.errors().is_empty());
        // The pod turns invalid again and the policy goes: the pod keeps its
        // last good version, the removal applies.
        write(&dir, "mesh.yaml", &pod("10.1.1.300"));
        assert!(src.refresh());
        let snap = src.snapshot();
        assert!(snap.peer_authentications.is_empty());
        assert_eq!(
            snap.pods["shop/web"].ips,
            vec!["10.1.1.1".parse::<std::net::IpAddr>().unwrap()]
        );
        // A document that does not name itself could be any: nothing of the
        // last good version that is not redefined goes.
        write(
            &dir,
            "mesh.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {namespace: shop}\n",
        );
        src.refresh();
        assert!(src.snapshot().pods.contains_key("shop/web"));
        // Broken YAML: the whole last good version stays.
        write(&dir, "mesh.yaml", "apiVersion: v1\nkind: [\n");
        assert!(!src.refresh());
        assert!(src.snapshot().pods.contains_key("shop/web"));
        assert!(src.unparseable(&dir.join("mesh.yaml")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_policy_losing_its_namespace_or_misspelt_keeps_its_last_good_version() {
        let dir = tmpdir("policy-typo");
        let shop = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
        write(&dir, "mesh.yaml", shop);
        let mut src = DirSource::new(&dir);
        assert!(src.start().is_ok());
        assert_eq!(src.snapshot().peer_authentications.len(), 1);
        // The `namespace:` line deleted: it could be the object of any
        // namespace, so shop's STRICT stays in force.
        write(&dir, "mesh.yaml", &shop.replace(", namespace: shop", ""));
        src.refresh();
        assert_eq!(src.snapshot().peer_authentications.len(), 1, "{:?}", src.errors());
        assert_eq!(src.errors().len(), 1);
        // A misspelt kind or version: rejected (not skipped as a kind the
        // agent does not use), and the last good version stays.
        for typo in [
            shop.replace("PeerAuthentication", "PeerAuthenticaton"),
            shop.replace("security.istio.io/v1", "security.istio.io/v1beta"),
            shop.replace("security.istio.io/v1", "v1"),
        ] {
            write(&dir, "mesh.yaml", &typo);
            src.refresh();
            assert_eq!(src.snapshot().peer_authentications.len(), 1, "{typo}");
            let errors = src.errors();
            assert!(
                errors.len() == 1 && errors[0].1.contains("not a policy the agent reads"),
                "{typo}: {errors:?}"
            );
        }
        // Istio's own L7 kind is left alone, not rejected.
        write(
            &dir,
            "mesh.yaml",
            &format!(
                "{shop}---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\n"
            ),
        );
        src.refresh();
        assert!(src.errors().is_empty(), "{:?}", src.errors());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_that_does_not_parse_at_start_refuses_the_start_naming_it_and_its_line() {
        let dir = tmpdir("badstart");
        write(&dir, "ns.yaml", NS);
        write(
            &dir,
            "mesh.yaml",
            &format!("{STRICT}---\napiVersion: v1\nkind: Pod: x\nmetadata: {{name: a}}\n"),
        );
        let mut src = DirSource::new(&dir);
        let err = src.start().expect_err("the start is refused").to_string();
        assert!(err.contains("mesh.yaml: document 2 (line 7)"), "{err}");
        assert!(!err.contains("ns.yaml"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn panicking_parser(_: &Path, _: &str) -> Result<Parsed, ParseError> {
        panic!("parser bug on purpose")
    }

    #[test]
    fn a_panicking_parser_rejects_the_file_and_keeps_its_last_good_objects() {
        let dir = tmpdir("parserpanic");
        write(&dir, "ns.yaml", NS);
        let mut src = DirSource::new(&dir);
        assert!(src.refresh());
        src.parser = panicking_parser;
        write(
            &dir,
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop2}\n",
        );
        assert!(!src.refresh(), "a file whose parser panicked changes nothing");
        assert!(src.snapshot().namespaces.contains_key("shop"));
        let errors = src.errors();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].1.contains("ns.yaml: parser panicked: parser bug on purpose"),
            "{}",
            errors[0].1
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_poll_that_panics_is_reported_and_the_next_poll_publishes_what_it_missed() {
        let dir = tmpdir("pollpanic");
        write(&dir, "ns.yaml", NS);
        let mut src = DirSource::new(&dir);
        // The panic strikes after the files were read, before their snapshot.
        let published = src.supervise(|s| {
            s.refresh();
            panic!("snapshot bug on purpose")
        });
        assert!(published.is_none());
        let snap = src
            .poll_supervised()
            .expect("the next poll reads the files again and publishes");
        assert!(snap.namespaces.contains_key("shop"));
        assert!(src.poll_supervised().is_none(), "then only changes publish again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn panic_messages_are_kept() {
        assert_eq!(catch_panic(|| panic!("static")), Err::<(), _>("static".to_string()));
        assert_eq!(
            catch_panic(|| panic!("formatted {}", 7)),
            Err::<(), _>("formatted 7".to_string())
        );
        assert_eq!(catch_panic(|| 5), Ok(5));
    }

    fn panics_on_bad_yaml(path: &Path, text: &str) -> Result<Parsed, ParseError> {
        if path.ends_with("bad.yaml") {
            panic!("parser bug on purpose");
        }
        parse_file(path, text)
    }

    async fn wait_for_namespace(store: &Store, name: &str) -> bool {
        for _ in 0..500 {
            if store.current().namespaces.contains_key(name) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn the_polling_task_outlives_a_panicking_parser() {
        let dir = tmpdir("runpanic");
        write(&dir, "bad.yaml", NS);
        write(&dir, "ns.yaml", NS);
        let mut src = DirSource::new(&dir);
        src.parser = panics_on_bad_yaml;
        let store = Store::new();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(src.run(store.clone(), Duration::from_millis(10), cancel.clone()));
        assert!(
            wait_for_namespace(&store, "shop").await,
            "the good file was not applied"
        );
        write(
            &dir,
            "web.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: web}\n",
        );
        assert!(
            wait_for_namespace(&store, "web").await,
            "a later change was not applied"
        );
        cancel.cancel();
        task.await.expect("the polling task ends cleanly when cancelled");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn snapshots_carry_the_trust_domain_and_its_aliases() {
        let dir = tmpdir("trust");
        write(&dir, "ns.yaml", NS);
        let mut src = DirSource::new(&dir).with_assembler(Assembler::new(
            "istio-system",
            "example.org",
            &["old.org".into(), " ".into()],
        ));
        src.refresh();
        let snap = src.snapshot();
        assert_eq!(snap.trust_domains.local, "example.org");
        assert_eq!(snap.trust_domains.aliases, vec!["old.org".to_string()]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ignores_hidden_and_non_yaml_files() {
        let dir = tmpdir("hidden");
        write(&dir, ".hidden.yaml", "garbage: [");
        write(&dir, "README.txt", "not yaml");
        write(&dir, "ns.yml", NS);
        let mut src = DirSource::new(&dir);
        src.refresh();
        assert!(src.errors().is_empty());
        assert_eq!(src.snapshot().namespaces.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
