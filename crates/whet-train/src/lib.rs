//! whet-train
