//! Cron firings become queued triggers. tokio-cron-scheduler fires each stream's
//! schedule; the callback only enqueues the stream's name (never blocking the scheduler);
//! the daemon's runner does the work.

use crate::domain::EpochMs;
use crate::error::{Error, Result};
use std::collections::HashMap;
use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler};
use uuid::Uuid;

pub struct Scheduler {
    inner: JobScheduler,
    jobs: HashMap<String, Uuid>,
}

impl Scheduler {
    /// Registers `(stream, cron)` pairs in `offset`'s time zone and starts firing into `tx`.
    pub async fn start(
        streams: &[(String, String)],
        offset: chrono::FixedOffset,
        tx: mpsc::Sender<String>,
    ) -> Result<Scheduler> {
        let scheduler_error =
            |e: tokio_cron_scheduler::JobSchedulerError| Error::Usage(format!("scheduler: {e}"));
        let inner = JobScheduler::new().await.map_err(scheduler_error)?;
        let mut jobs = HashMap::new();
        for (stream, cron) in streams {
            let label = stream.clone();
            let tx = tx.clone();
            let job = Job::new_async_tz(cron.as_str(), offset, move |_, _| {
                let label = label.clone();
                let tx = tx.clone();
                Box::pin(async move {
                    // A full queue means this stream is already waiting: the firing
                    // would be coalesced anyway.
                    if tx.try_send(label.clone()).is_err() {
                        tracing::debug!(stream = %label, "firing dropped: queue full or closed");
                    }
                })
            })
            .map_err(|e| Error::Usage(format!("schedule {cron:?} of stream {stream}: {e}")))?;
            let id = inner.add(job).await.map_err(scheduler_error)?;
            jobs.insert(stream.clone(), id);
        }
        inner.start().await.map_err(scheduler_error)?;
        Ok(Scheduler { inner, jobs })
    }

    /// When the stream's schedule fires next.
    pub async fn next_firing(&mut self, stream: &str) -> Option<EpochMs> {
        let id = *self.jobs.get(stream)?;
        self.inner
            .next_tick_for_job(id)
            .await
            .ok()
            .flatten()
            .map(|t| t.timestamp_millis())
    }

    pub async fn stop(mut self) {
        if let Err(error) = self.inner.shutdown().await {
            tracing::warn!(%error, "scheduler did not stop cleanly");
        }
    }
}
