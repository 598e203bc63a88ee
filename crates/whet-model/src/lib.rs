//! whet-model
