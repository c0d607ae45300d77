//! Labels every blob containerd creates while the image is imported, the moment it is created,
//! so that a registry mirror on the nodes (Spegel) advertises it to the other nodes.
//!
//! **Why at creation.** Spegel (v0.7) learns about new blobs from containerd's `/content/create`
//! events only: for each one it reads the blob's `containerd.io/distribution.source.<registry>`
//! label, retrying for about 0.65 s, and advertises the blob if the label is there; a label set
//! later (containerd publishes no event for it) is only seen when Spegel restarts and lists the
//! store. A pull through the CRI labels its blobs right after writing them; `ctr images import`
//! never does (spegel#1096): an imported image's tag is advertised, its manifest and layers are
//! not, and a pull of it on another node fails. So while `ctr images import` runs, a `ctr events`
//! subscription labels each blob created in the namespace (one `ctr content label`, ~10 ms),
//! well inside Spegel's retries. A blob created by someone else in the same moment gets the
//! label too; it only says where the blob can also be found.
//!
//! The import's own `labels` of the image (`import::label_content`) still merge the label into
//! every blob afterwards; what this adds is the timing. The subscription ends when it has seen the
//! temporary image name's deletion (`/images/delete`), which the loader makes after the import:
//! containerd delivers a subscriber's events in order, so every creation before it was seen.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::Duration;

use enbi_core::reference::registry_and_repository;
use serde_json::Value;

use super::containerd::{Ctr, CtrError, quote};

const CREATED: &str = "/content/create";
const DELETED: &str = "/images/delete";
/// How long to wait for the marker event before giving up on late creations.
const MARKER_TIMEOUT: Duration = Duration::from_secs(5);

/// A running subscription that labels blobs as they are created.
pub struct LabelOnCreate {
    events: Child,
    /// The number of blobs labelled, sent once the marker was seen or the events ended.
    done: Receiver<usize>,
    reader: JoinHandle<()>,
}

impl LabelOnCreate {
    /// Subscribes to blob creations in `ctr`'s namespace, labelling each with `tag`'s
    /// distribution source, until an image named `<marker>@…` is deleted.
    pub fn start(ctr: &Ctr, tag: &str, marker: &str) -> Result<Self, CtrError> {
        let (registry, repository) = registry_and_repository(tag);
        let labels = BTreeMap::from([(
            format!("containerd.io/distribution.source.{registry}"),
            repository,
        )]);
        let namespace = format!("namespace=={}", quote(&ctr.namespace));
        let mut events = ctr.spawn_events(&[
            format!("topic=={},{namespace}", quote(CREATED)),
            format!("topic=={},{namespace}", quote(DELETED)),
        ])?;
        let stdout = events.stdout.take();
        let (send, done) = mpsc::channel();
        let (ctr, marker) = (ctr.clone(), format!("{marker}@"));
        let reader = std::thread::spawn(move || {
            let mut labelling = vec![];
            for line in stdout.into_iter().flat_map(|s| BufReader::new(s).lines()) {
                let Ok(line) = line else { break };
                match parse_event(&line) {
                    Some((CREATED, event)) => {
                        let Some(digest) = event["digest"].as_str().map(str::to_owned) else {
                            continue;
                        };
                        let (ctr, labels) = (ctr.clone(), labels.clone());
                        labelling.push(std::thread::spawn(move || {
                            ctr.label_content(&digest, &labels).is_ok()
                        }));
                    }
                    Some((DELETED, event))
                        if event["name"]
                            .as_str()
                            .is_some_and(|n| n.starts_with(&marker)) =>
                    {
                        break;
                    }
                    _ => {}
                }
            }
            let labelled = labelling
                .into_iter()
                .filter_map(|t| t.join().ok())
                .filter(|ok| *ok)
                .count();
            let _ = send.send(labelled);
        });
        Ok(Self {
            events,
            done,
            reader,
        })
    }

    /// Ends the subscription: after the marker when `marked` (the temporary name was deleted),
    /// else at once. Returns the number of blobs labelled.
    pub fn stop(mut self, marked: bool) -> usize {
        let wait = if marked {
            MARKER_TIMEOUT
        } else {
            Duration::ZERO
        };
        let early = self.done.recv_timeout(wait).ok();
        let _ = self.events.kill();
        let _ = self.events.wait();
        let _ = self.reader.join();
        early.or_else(|| self.done.try_recv().ok()).unwrap_or(0)
    }
}

/// A line of `ctr events`: `<timestamp> <namespace> <topic> <event as JSON>`.
fn parse_event(line: &str) -> Option<(&str, Value)> {
    let (head, json) = line.split_at(line.find('{')?);
    let topic = head.split_whitespace().last()?;
    Some((topic, serde_json::from_str(json).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ctr_events_lines() {
        let line = r#"2026-01-02 03:04:05.678 +0000 UTC k8s.io /content/create {"digest":"sha256:ab","size":206}"#;
        let (topic, event) = parse_event(line).expect("an event");
        assert_eq!(topic, CREATED);
        assert_eq!(event["digest"], "sha256:ab");
        let line = r#"2026-01-02 03:04:05 +0000 UTC k8s.io /images/delete {"name":"enbi-import-1-2@sha256:ab"}"#;
        assert_eq!(parse_event(line).map(|e| e.0), Some(DELETED));
        assert_eq!(parse_event("no event"), None);
    }
}
