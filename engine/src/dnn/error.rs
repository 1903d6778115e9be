//! Typed errors of the DNN plane; the gateway maps each kind once to an HTTP
//! status and a gRPC code, the way Triton does.
use thiserror::Error;

/// What went wrong, in the categories Triton's protocol distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input from the client (HTTP 400, gRPC INVALID_ARGUMENT).
    InvalidArg,
    /// Unknown model or version (HTTP 404, gRPC NOT_FOUND).
    NotFound,
    /// Not loaded, queue full, timed out (HTTP 503, gRPC UNAVAILABLE).
    Unavailable,
    /// A feature this server does not offer (HTTP 501, gRPC UNIMPLEMENTED).
    Unsupported,
    /// A failure inside the server or a backend (HTTP 500, gRPC INTERNAL).
    Internal,
    /// Larger than a configured bound (HTTP 413, gRPC RESOURCE_EXHAUSTED).
    TooLarge,
}

#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct DnnError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DnnError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArg, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, message)
    }
}

pub type Result<T> = std::result::Result<T, DnnError>;
