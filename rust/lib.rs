//! ilias-core: the native core of the ILIAS benchmark toolkit.
//!
//! Pure Rust, usable without Python; the `python` feature adds the binding layer.
//!
//! - [`store`]: `.npy` shards validated and memory-mapped; a database is an ordered list of them.
//! - [`kernels`]: float32 dot-product micro-kernels with run-time SIMD dispatch.
//! - [`topk`]: bounded top-k with the reference's tie order.
//! - [`search`]: the exact search driver (one pass over the database, threads, progress, cancel).
//! - [`quant`]: quantized codes (SQ8, PQ, 4-bit fast-scan) with exact rescoring.
//! - [`metrics`]: AP@k and oracle with the official ILIAS tie semantics, threaded over queries,
//!   and the labelling of returned ids as positives.
//! - [`parallel`]: the threading harness (scoped threads, claims in order, progress and cancel,
//!   a panicked worker as an internal error).

pub mod error;
pub mod kernels;
pub mod metrics;
pub mod parallel;
pub mod quant;
pub mod search;
pub mod store;
pub mod topk;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
