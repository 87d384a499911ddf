//! API errors as AWS's rest-json services send them: the status from the service model,
//! `x-amzn-ErrorType` naming the modeled exception, and a JSON body with `Message`.
//! The official SDKs map exactly these to their typed error variants.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// A refused request, as AWS sends it: HTTP status, error code, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status the service model gives the exception.
    pub status: StatusCode,
    /// Modeled exception name, sent in `x-amzn-ErrorType`; the SDKs map it to a variant.
    pub code: &'static str,
    /// Sent as the body's `Message`.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 InvalidArgumentException: a parameter is out of range or malformed.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidArgumentException", message)
    }

    /// 404 ResourceNotFoundException with its own message.
    pub fn resource_not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
    }

    /// 404 ResourceNotFoundException: no stream by that name or ARN.
    pub fn stream_not_found() -> Self {
        Self::resource_not_found("The requested stream is not found or not active.")
    }

    /// 404 ResourceNotFoundException as GetClip says it for a range without fragments.
    pub fn no_fragments_for_clip() -> Self {
        Self::resource_not_found("No fragments found in the stream for the clip request.")
    }

    /// 400 ResourceInUseException: CreateStream of a name that exists.
    pub fn resource_in_use(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "ResourceInUseException", message)
    }

    /// 400 ClientLimitExceededException: a quota was exceeded (a throttle).
    pub fn client_limit_exceeded(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "ClientLimitExceededException",
            message,
        )
    }

    /// 400 NoDataRetentionException: GetClip on a stream that retains nothing.
    pub fn no_data_retention() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "NoDataRetentionException",
            "The stream does not retain data: its DataRetentionInHours is 0.",
        )
    }

    /// 400 UnsupportedStreamMediaTypeException: GetClip on a stream that is not H.264.
    pub fn unsupported_media_type(media_type: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "UnsupportedStreamMediaTypeException",
            format!("The media type {media_type} of the stream is not supported for clips."),
        )
    }

    /// 400 InvalidCodecPrivateDataException: codec private data that cannot make one clip.
    pub fn invalid_codec_private_data(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidCodecPrivateDataException",
            message,
        )
    }

    /// 400 MissingCodecPrivateDataException: a fragment without codec private data.
    pub fn missing_codec_private_data() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MissingCodecPrivateDataException",
            "No codec private data was found in at least one of tracks of the video stream.",
        )
    }

    /// 400 InvalidMediaFrameException: a frame that does not parse.
    pub fn invalid_media_frame() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidMediaFrameException",
            "One or more frames in the requested clip could not be parsed based on the specified codec.",
        )
    }

    /// IAM refused the caller this action on this stream (HTTP 401, per the model).
    pub fn not_authorized(action: &str, arn: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "NotAuthorizedException",
            format!("User is not authorized to perform: kinesisvideo:{action} on resource: {arn}"),
        )
    }

    /// Temporary credentials that ran out (403), as any AWS service answers them.
    pub fn expired_token() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "ExpiredTokenException",
            "The security token included in the request is expired",
        )
    }

    /// 500 InternalFailure: the service failed; a client retries.
    pub fn internal_failure() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailure",
            "The request processing has failed because of an unknown error, exception or failure.",
        )
    }

    /// 400 SerializationException: a body that is not the operation's JSON.
    pub fn serialization(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "SerializationException", message)
    }

    /// 404 UnknownOperationException: a path or method no operation answers.
    pub fn unknown_operation() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "The requested operation is not supported by this endpoint.",
        )
    }

    /// 403 MissingAuthenticationTokenException: a request without SigV4 `Authorization`.
    pub fn missing_authentication_token() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        )
    }

    /// 403 UnrecognizedClientException: an access key id the emulator does not know.
    pub fn unrecognized_client() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    }

    /// 403 InvalidSignatureException: a signature that is wrong, stale or mis-scoped.
    pub fn invalid_signature(message: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "InvalidSignatureException", message)
    }

    /// 400 IncompleteSignatureException: an `Authorization` or `X-Amz-Date` that does not parse.
    pub fn incomplete_signature(message: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "IncompleteSignatureException",
            message,
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "Message": self.message }).to_string();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        let error_type = format!(
            "{}:http://internal.amazon.com/coral/com.amazonaws.kinesisvideo/",
            self.code
        );
        if let Ok(value) = HeaderValue::from_str(&error_type) {
            headers.insert("x-amzn-errortype", value);
        }
        response
    }
}
