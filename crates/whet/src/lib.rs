//! whet
