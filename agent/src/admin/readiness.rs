//! Readiness as a list of named checks: each module that readiness depends
//! on registers one, then reports into it (or is polled at each probe).
//! `/healthz/ready` answers 200 only when every check is ready, and lists
//! each problem as `check: problem` otherwise.

#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

/// A reported check: the module sets its problems when they change.
#[derive(Clone, Debug, Default)]
pub(crate) struct Check(Arc<Mutex<Vec<String>>>);

impl Check {
    /// Replaces the check's problems; empty means ready.
    pub(crate) fn set(&self, problems: Vec<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = problems;
    }

    /// Marks the check ready.
    pub(crate) fn ready(&self) {
        self.set(Vec::new());
    }

    fn problems(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

type Poll = Box<dyn Fn() -> Vec<String> + Send + Sync>;

enum Source {
    Reported(Check),
    Polled(Poll),
}

/// The checks readiness is made of.
#[derive(Default)]
pub(crate) struct Readiness {
    checks: Mutex<Vec<(&'static str, Source)>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.lock().iter().map(|(n, _)| *n).collect();
        f.debug_struct("Readiness").field("checks", &names).finish()
    }
}

impl Readiness {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, Source)>> {
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a check that starts not ready with `pending` (fail closed:
    /// a module that never reports keeps the agent unready).
    pub(crate) fn register(&self, name: &'static str, pending: &str) -> Check {
        let check = Check::default();
        check.set(vec![pending.to_string()]);
        self.lock().push((name, Source::Reported(check.clone())));
        check
    }

    /// Registers a check computed at each probe.
    pub(crate) fn register_polled(&self, name: &'static str, poll: impl Fn() -> Vec<String> + Send + Sync + 'static) {
        self.lock().push((name, Source::Polled(Box::new(poll))));
    }

    /// Every problem, as `check: problem`; empty when ready.
    pub(crate) fn problems(&self) -> Vec<String> {
        let checks = self.lock();
        let mut out = Vec::new();
        for (name, source) in checks.iter() {
            let problems = match source {
                Source::Reported(c) => c.problems(),
                Source::Polled(f) => f(),
            };
            out.extend(problems.into_iter().map(|p| format!("{name}: {p}")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_is_and_each_problem_is_named() {
        let r = Readiness::default();
        let config = r.register("config", "not loaded yet");
        r.register_polled("ca", Vec::new);
        assert_eq!(r.problems(), vec!["config: not loaded yet"]);
        config.set(vec!["file a.yaml rejected: bad".into()]);
        assert_eq!(r.problems(), vec!["config: file a.yaml rejected: bad"]);
        config.ready();
        assert!(r.problems().is_empty());
    }
}
