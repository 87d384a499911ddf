//! The state every request shares: the streams, the request log, the clock and the
//! pseudo-random source of the faults. Both `server` (which builds it and serves HTTP) and
//! `api` (which answers the operations) use it; it uses neither, so the imports point one
//! way: server → api → state.

use crate::config::{EmulatorConfig, StreamSpec};
use crate::error::ApiError;
use crate::log::RequestRecord;
use crate::sigv4::Credentials;
use crate::stream::StreamState;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// State shared by every request.
pub struct Shared {
    /// `http://127.0.0.1:PORT`: this server.
    pub base_url: String,
    /// What GetDataEndpoint answers for every API: this server, or a TLS front a test
    /// put before it ([`crate::Emulator::set_data_endpoint`]).
    pub(crate) data_endpoint: Mutex<String>,
    /// The configured seed; ListFragments derives each listing's order from it.
    pub seed: u64,
    /// What a request's SigV4 signature is checked against.
    pub(crate) credentials: Credentials,
    /// Region reported in the ARNs of streams created later.
    region: String,
    /// Account id reported in the ARNs of streams created later.
    account_id: String,
    /// Every stream, by name.
    streams: Mutex<HashMap<String, StreamState>>,
    /// Every request served so far, oldest first.
    log: Mutex<Vec<RequestRecord>>,
    /// xorshift state behind the failure and reset rates.
    rng: Mutex<u64>,
    /// Where the emulator's clock stands when a test has stopped it; `None`: the wall clock.
    frozen_ms: Mutex<Option<i64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The host's clock, epoch milliseconds: what SDK clients sign their requests with.
pub(crate) fn wall_clock_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Shared {
    /// The URL GetDataEndpoint answers.
    pub(crate) fn data_endpoint(&self) -> String {
        lock(&self.data_endpoint).clone()
    }

    /// Answer `url` from now on.
    pub(crate) fn set_data_endpoint(&self, url: String) {
        *lock(&self.data_endpoint) = url;
    }

    /// State for `config`'s credentials and seed, with no streams yet.
    pub(crate) fn new(config: &EmulatorConfig, base_url: String) -> Self {
        Shared {
            data_endpoint: Mutex::new(base_url.clone()),
            base_url,
            seed: config.seed,
            credentials: Credentials {
                access_key_id: config.access_key_id.clone(),
                secret_access_key: config.secret_access_key.clone(),
            },
            region: config.region.clone(),
            account_id: config.account_id.clone(),
            streams: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            // xorshift never leaves an all-zero state, so the seed is made odd.
            rng: Mutex::new(config.seed | 1),
            frozen_ms: Mutex::new(None),
        }
    }

    /// The streams by name; hold the guard briefly (every request takes it).
    pub fn lock_streams(&self) -> MutexGuard<'_, HashMap<String, StreamState>> {
        lock(&self.streams)
    }

    /// The emulated service's clock, epoch milliseconds: the wall clock unless a test has
    /// stopped it. Fragments appear, expire and are listed by this clock.
    pub fn now_ms(&self) -> i64 {
        lock(&self.frozen_ms).unwrap_or_else(wall_clock_ms)
    }

    /// Stops the clock at its current reading and returns it.
    pub(crate) fn freeze_clock(&self) -> i64 {
        *lock(&self.frozen_ms).get_or_insert_with(wall_clock_ms)
    }

    /// Moves the clock on by `by_ms`, stopping it first if it runs; returns the new reading.
    pub(crate) fn advance_clock(&self, by_ms: i64) -> i64 {
        let mut frozen = lock(&self.frozen_ms);
        let now = frozen.unwrap_or_else(wall_clock_ms) + by_ms;
        *frozen = Some(now);
        now
    }

    /// Appends a served request to the log.
    pub(crate) fn record(&self, record: RequestRecord) {
        lock(&self.log).push(record);
    }

    /// A copy of the request log, oldest first.
    pub(crate) fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.log).clone()
    }

    /// Empties the request log.
    pub(crate) fn clear_requests(&self) {
        lock(&self.log).clear();
    }

    fn random(&self) -> f64 {
        let mut state = lock(&self.rng);
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Creates a stream from `spec` at the current clock; returns its ARN. A name in use is
    /// ResourceInUseException, an invalid spec InvalidArgumentException.
    pub fn add_stream(&self, spec: StreamSpec) -> Result<String, ApiError> {
        spec.validate().map_err(ApiError::invalid_argument)?;
        let now = self.now_ms();
        let mut streams = self.lock_streams();
        if streams.contains_key(&spec.name) {
            return Err(ApiError::resource_in_use(format!(
                "The stream {} already exists.",
                spec.name
            )));
        }
        let name = spec.name.clone();
        let mut stream = StreamState::new(spec, &self.region, &self.account_id, now);
        stream.advance(now);
        let arn = stream.arn.clone();
        streams.insert(name, stream);
        Ok(arn)
    }

    /// Fails a data-plane request when the stream's failure faults say so.
    pub fn inject_internal_failure(&self, name: &str) -> Result<(), ApiError> {
        let roll = self.random();
        let mut streams = self.lock_streams();
        let Some(stream) = streams.get_mut(name) else {
            return Ok(());
        };
        if stream.faults.expired_tokens_next > 0 {
            stream.faults.expired_tokens_next -= 1;
            return Err(ApiError::expired_token());
        }
        if stream.faults.internal_failures_next > 0 {
            stream.faults.internal_failures_next -= 1;
            return Err(ApiError::internal_failure());
        }
        if roll < stream.faults.internal_failure_rate {
            return Err(ApiError::internal_failure());
        }
        Ok(())
    }

    /// Whether this GetClip body is to stall part-way.
    pub fn take_stall(&self, name: &str) -> bool {
        let mut streams = self.lock_streams();
        match streams.get_mut(name) {
            Some(stream) if stream.faults.stalls_next > 0 => {
                stream.faults.stalls_next -= 1;
                true
            }
            _ => false,
        }
    }

    /// Whether this GetClip body is to be cut off.
    pub fn take_reset(&self, name: &str) -> bool {
        let roll = self.random();
        let mut streams = self.lock_streams();
        let Some(stream) = streams.get_mut(name) else {
            return false;
        };
        if stream.faults.resets_next > 0 {
            stream.faults.resets_next -= 1;
            return true;
        }
        roll < stream.faults.reset_rate
    }
}
