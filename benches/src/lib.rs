//! Criterion benches for whet live in `benches/benches/`.
