//! The archive as its readers see it (`find`, `export`, `verify`, `serve`,
//! `rebuild-ledger`): the ledger that records what is archived, the destination that
//! holds the objects, and the settings that name them. Readers get this view, never the
//! worker that archives.

use crate::config::Config;
use crate::destination::Destination;
use crate::ledger::Ledger;
use std::sync::Arc;

/// The ledger, the destination and the configuration, shared with whatever else holds
/// them (cloning clones the handles, not the archive).
#[derive(Clone)]
pub struct ArchiveView {
    /// What is archived where: chunks, their fragments and states.
    pub ledger: Arc<dyn Ledger>,
    /// The bucket or directory holding the objects.
    pub destination: Arc<Destination>,
    /// The settings: prefix, streams, page and alarm settings.
    pub config: Arc<Config>,
}

impl ArchiveView {
    /// Closes the ledger's connections.
    pub async fn close(&self) {
        self.ledger.close().await;
    }
}
