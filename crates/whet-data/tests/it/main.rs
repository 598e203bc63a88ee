//! The one integration-test binary of whet-data.

mod atomic;
mod common;
mod dedup;
mod errors;
mod mapping;
mod pii;
mod preference;
mod read;
mod split;
