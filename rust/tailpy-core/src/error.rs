//! The data plane's errors; each maps onto one class of Python's `tailpy.errors`.

use std::fmt;

/// An error whose message is one sentence saying what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A malformed key (Python: `InvalidKeyError`).
    InvalidKey(String),
    /// A privilege is missing, e.g. CAP_NET_ADMIN (Python: `PermissionDeniedError`).
    PermissionDenied(String),
    /// A TUN or socket failure, or an unknown peer (Python: `DeviceError`).
    Device(String),
    /// A malformed address, prefix or endpoint (Python: `ConfigError`).
    Config(String),
    /// A TCP connection through the userspace network stack could not be opened: refused (RST),
    /// timed out, or no source address (Python: `DialError`).
    Dial(String),
}

impl Error {
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidKey(m)
            | Error::PermissionDenied(m)
            | Error::Device(m)
            | Error::Config(m)
            | Error::Dial(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Error {}

impl From<crate::keys::KeyError> for Error {
    fn from(e: crate::keys::KeyError) -> Self {
        Error::InvalidKey(e.0)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
