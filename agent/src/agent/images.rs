//! Image garbage collection, carried out (the rule is [`crate::core::images`]): every
//! pull of an absent image is recorded; after a commit and at each reconcile, recorded
//! images no committed state uses are removed once their grace has passed.
//!
//! Best effort throughout: a record that cannot be written keeps its image (never the
//! other way round), an image a container uses stays and is tried again at the next
//! reconcile, and nothing here fails an apply. Nothing is collected while a bundle is in
//! flight or held back by its schedule (its images were pulled before it waits).

use std::collections::{BTreeMap, BTreeSet};

use crate::store::StoreError;

use super::*;
use crate::core::images;

impl<E: Engine> Agent<E> {
    /// The records of pulled images; a damaged `images.json` is forgotten (the images it
    /// named are then kept for ever: the safe direction), other errors give `None`.
    fn pulled_images(&self) -> Option<BTreeMap<String, images::Pulled>> {
        match self.store.pulled_images() {
            Ok(records) => Some(records),
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::warn!("forgetting the record of pulled images (the images it named are kept): {e}");
                let empty = BTreeMap::new();
                self.store.save_pulled_images(&empty).ok().map(|()| empty)
            }
            Err(e) => {
                tracing::warn!("cannot read the record of pulled images (none is removed): {e}");
                None
            }
        }
    }

    /// Records that the agent pulled `reference`, which was not on the device before.
    pub(super) fn record_pull(&self, reference: &str) {
        let Some(mut records) = self.pulled_images() else { return };
        images::record_pull(&mut records, reference, self.clock.now());
        if let Err(e) = self.store.save_pulled_images(&records) {
            tracing::warn!(image = reference, "cannot record the pull (the image will be kept): {e}");
        }
    }

    /// Removes the images the agent pulled that no committed state has used for
    /// `engine.image_gc_grace_secs`.
    pub(super) async fn collect_images(&mut self) {
        let Some(grace) = self.cfg.image_gc_grace_secs else { return };
        let at_rest =
            self.machine.state().is_rest() && self.held.is_none() && self.pending_rollback.is_none();
        let Some(current) = self.current.as_ref().filter(|_| at_rest) else { return };
        let Some(mut records) = self.pulled_images().filter(|r| !r.is_empty()) else { return };
        let used: BTreeSet<String> =
            current.state.containers.iter().map(|c| c.image.pull_reference()).collect();
        let before = records.clone();
        for reference in images::due(&mut records, &used, self.clock.now(), grace) {
            match self.engine.remove_image(&reference).await {
                Ok(true) => {
                    tracing::info!(image = reference, "removed an image no committed bundle uses");
                    records.remove(&reference);
                }
                Ok(false) => {
                    tracing::debug!(image = reference, "image still used by a container: kept for now")
                }
                Err(e) => {
                    tracing::warn!(image = reference, "cannot remove the image (tried again later): {e}");
                    break;
                }
            }
        }
        if records != before {
            if let Err(e) = self.store.save_pulled_images(&records) {
                tracing::warn!("cannot save the pulled images: {e}");
            }
        }
    }
}
