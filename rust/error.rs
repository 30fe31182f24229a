//! The one error type of the core. The binding layer (python.rs) maps each variant once to a
//! Python exception; nothing in the core panics on user input, and a panic of a worker thread
//! comes back as [`Error::Internal`] (see `parallel`).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A file was read but is not what it should be (bad header, wrong size, wrong dtype).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// An argument is out of range or inconsistent with the data.
    #[error("{0}")]
    Invalid(String),
    /// The caller asked the work to stop (Ctrl-C).
    #[error("interrupted")]
    Cancelled,
    /// Something that cannot happen did (a worker thread panicked): a bug of ilias-core, not a
    /// problem of the input.
    #[error("internal error, a bug of ilias-core (please report it): {0}")]
    Internal(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn format(path: &Path, message: impl Into<String>) -> Error {
        Error::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::Invalid(message.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
