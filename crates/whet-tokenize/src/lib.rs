//! whet-tokenize
