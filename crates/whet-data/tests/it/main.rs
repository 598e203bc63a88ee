//! The one integration-test binary of whet-data.

mod atomic;
mod common;
mod dedup;
mod errors;
mod mapping;
mod pii;
mod read;
mod split;
