//! The view the agent's tasks share. The watch task alone changes it: it
//! applies the servers' events to a working copy of its own and, after
//! each, publishes an immutable snapshot with its lookups built. A
//! connection takes one snapshot (an atomic load, no lock) and decides
//! everything from it; a later event never changes a snapshot that is in
//! use, and no reader waits for the watch task or the watch task for one.
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::view::View;

pub struct SharedView(ArcSwap<View>);

impl Default for SharedView {
    fn default() -> SharedView {
        SharedView::new(View::default())
    }
}

impl SharedView {
    pub fn new(view: View) -> SharedView {
        view.prepare();
        SharedView(ArcSwap::from_pointee(view))
    }

    /// The current view, as one consistent snapshot.
    pub fn load(&self) -> Arc<View> {
        self.0.load_full()
    }

    /// Publishes `working` (less any half-received snapshot) as the
    /// current view, its lookups built before any reader sees it.
    pub fn publish(&self, working: &mut View) {
        let partial = working.partial.take();
        let next = working.clone();
        working.partial = partial;
        next.prepare();
        self.0.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::proto;

    fn vip_event(index: u64, service: &str, vip: &str) -> proto::WatchEvent {
        use proto::{change::Change, watch_event::Event};
        proto::WatchEvent {
            index,
            event: Some(Event::Changes(proto::ChangeSet {
                changes: vec![proto::Change {
                    change: Some(Change::VipAssigned(proto::ServiceVip {
                        service: service.into(),
                        vip: vip.into(),
                    })),
                }],
            })),
        }
    }

    #[test]
    fn a_snapshot_in_use_never_changes() {
        let shared = SharedView::default();
        let mut working = View::default();
        working.apply(vip_event(1, "api", "240.0.0.1")).unwrap();
        shared.publish(&mut working);
        let held = shared.load();
        let vip = "240.0.0.1".parse().unwrap();
        assert_eq!(held.service_by_vip(vip), Some("api"));

        // The next event moves the VIP: the held snapshot still answers as
        // it did, a new load sees the change, with its lookups rebuilt.
        working.apply(vip_event(2, "web", "240.0.0.1")).unwrap();
        working.apply(vip_event(3, "api", "240.0.0.2")).unwrap();
        assert_eq!(held.service_by_vip(vip), Some("api"));
        assert_eq!(shared.load().index, 1, "not published yet");
        shared.publish(&mut working);
        let now = shared.load();
        assert_eq!(now.index, 3);
        assert_eq!(now.service_by_vip(vip), Some("web"));
        assert_eq!(
            now.service_by_vip("240.0.0.2".parse().unwrap()),
            Some("api")
        );
        assert_eq!(held.service_by_vip(vip), Some("api"));
    }
}
