use std::fmt;
use std::path::PathBuf;

/// Every error fla reports, each with the context a person needs to act on it.
#[derive(Debug)]
pub enum Error {
    /// A tensor has the wrong shape.
    Shape {
        name: String,
        expected: String,
        got: Vec<usize>,
    },
    /// A tensor that the operation needs was not given.
    Missing { name: String, why: String },
    /// A tensor holds NaN or infinity.
    NonFinite {
        name: String,
        index: Vec<usize>,
        value: f64,
    },
    /// A value is outside what the operation accepts.
    Invalid(String),
    /// A file could not be read or written.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file was read but is not what it should be.
    Format { path: PathBuf, message: String },
    /// The GPU back end cannot run: no driver, no NVRTC, an unsupported GPU, a failed launch.
    Device(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn dims(d: &[usize]) -> String {
    let s: Vec<String> = d.iter().map(|x| x.to_string()).collect();
    format!("[{}]", s.join(", "))
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape {
                name,
                expected,
                got,
            } => {
                write!(
                    f,
                    "tensor `{name}` has shape {}, expected {expected}",
                    dims(got)
                )
            }
            Error::Missing { name, why } => write!(f, "tensor `{name}` is missing: {why}"),
            Error::NonFinite { name, index, value } => {
                write!(
                    f,
                    "tensor `{name}` holds a non-finite value {value} at {}",
                    dims(index)
                )
            }
            Error::Invalid(msg) => f.write_str(msg),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Format { path, message } => write!(f, "{}: {message}", path.display()),
            Error::Device(msg) => write!(f, "CUDA: {msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
