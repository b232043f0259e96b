//! Configuration hot reload: files are re-read every `--config-poll-ms`; a changed, valid set
//! replaces the running one, unless it would drop a domain or all of a domain's descriptors.
//!
//! Those two are what a deleted file and a file read while half-written look like (a file cut
//! after its `domain:` line parses as a domain without limits), and serving no limits is the worst
//! outcome of either; so the last good configuration stays, with a WARN. Removing a domain on
//! purpose takes a restart. Files should be replaced atomically (write, then rename), as
//! Kubernetes does for ConfigMap volumes.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;

pub struct Reloader {
    pub paths: Vec<PathBuf>,
    pub config: Arc<RwLock<Arc<Config>>>,
    pub metrics: Arc<Metrics>,
    /// What was last acted on (the files' bytes, or an error's text), so each change is
    /// applied or logged once.
    pub last_sig: Vec<u8>,
}

/// Why `new` is not taken in place of `old`, if it drops what `old` has.
pub fn shrinks(old: &Config, new: &Config) -> Option<String> {
    let new_names = new.domain_names();
    let mut lost = Vec::new();
    for d in old.domain_names() {
        if !new_names.contains(&d) {
            lost.push(format!("domain `{d}` is gone"));
        } else if old.has_descriptors(&d) && !new.has_descriptors(&d) {
            lost.push(format!("domain `{d}` has no descriptors any more"));
        }
    }
    (!lost.is_empty()).then(|| lost.join(", "))
}

impl Reloader {
    pub async fn run(mut self, poll: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = tokio::time::sleep(poll) => {}
            }
            let paths = self.paths.clone();
            if let Ok(loaded) = tokio::task::spawn_blocking(move || Config::load(&paths)).await {
                self.apply(loaded);
            }
        }
    }

    fn apply(&mut self, loaded: Result<(Config, Vec<u8>), String>) {
        let (new, sig) = match loaded {
            Ok(l) => l,
            Err(e) => {
                // A bad file: logged once per distinct error; the old configuration stays.
                if self.seen(e.clone().into_bytes()) {
                    self.metrics.reload(false);
                    crate::error!("configuration not reloaded, keeping the previous one: {e}");
                }
                return;
            }
        };
        if !self.seen(sig) {
            return;
        }
        let current = match self.config.read() {
            Ok(c) => Arc::clone(&c),
            Err(_) => return,
        };
        if let Some(why) = shrinks(&current, &new) {
            self.metrics.reload(false);
            crate::warn!(
                "configuration not reloaded, keeping the previous one: {why} (a deleted or half-written file? replace files by write + rename; restart to remove a domain)"
            );
            return;
        }
        for w in &new.warnings {
            crate::warn!("configuration: {w}");
        }
        let names = new.domain_names().join(", ");
        if let Ok(mut w) = self.config.write() {
            *w = Arc::new(new);
        }
        self.metrics.reload(true);
        crate::info!("configuration reloaded: domains [{names}]");
    }

    /// True the first time `sig` is seen in a row.
    fn seen(&mut self, sig: Vec<u8>) -> bool {
        if sig == self.last_sig {
            return false;
        }
        self.last_sig = sig;
        true
    }
}
