//! The request log tests read to see what the emulator did: which operation, on which
//! stream and range, with what outcome, and whether a clip was cut by a cap.

use serde::{Deserialize, Serialize};

/// One request as the emulator served it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestRecord {
    /// Operation name as in the API (`GetClip`, `ListFragments`, ...).
    pub op: String,
    /// The stream the request named, once it was found.
    pub stream: Option<String>,
    /// `SERVER_TIMESTAMP` or `PRODUCER_TIMESTAMP` where a selector was given.
    pub selector: Option<String>,
    /// Start of the requested range, epoch ms.
    pub start_ms: Option<i64>,
    /// End of the requested range, epoch ms.
    pub end_ms: Option<i64>,
    /// HTTP status of the answer.
    pub status: u16,
    /// Error code for a refused request.
    pub error: Option<String>,
    /// Fragments listed or served.
    pub fragments: usize,
    /// Fragments a GetClip selected before the caps cut it.
    pub fragments_selected: usize,
    /// GetClip served fewer fragments than its range selected (a cap bound).
    pub truncated: bool,
    /// Number of the first fragment served (GetClip, GetMediaForFragmentList).
    pub first_fragment: Option<String>,
    /// Number of the last fragment served (GetClip, GetMediaForFragmentList).
    pub last_fragment: Option<String>,
    /// Size of the response body as planned (a reset body delivers less).
    pub bytes: u64,
    /// The body was cut off on purpose (fault injection).
    pub reset: bool,
}
