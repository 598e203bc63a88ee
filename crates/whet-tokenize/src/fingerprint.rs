//! A stable, dependency-free 128-bit FNV-1a hash for cache keys.

/// FNV-1a, 128-bit. Stable across platforms, runs and Rust versions (unlike `std`'s
/// `DefaultHasher`), which is what a cache key on disk needs.
#[derive(Debug, Clone)]
pub struct Fnv128(u128);

const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
const PRIME: u128 = 0x0000000001000000000000000000013B;

impl Default for Fnv128 {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv128 {
    pub fn new() -> Self {
        Fnv128(OFFSET)
    }

    fn raw(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= b as u128;
            h = h.wrapping_mul(PRIME);
        }
        self.0 = h;
    }

    /// Hash a byte string, length-prefixed so that concatenations cannot collide
    /// (`"ab" + "c"` differs from `"a" + "bc"`).
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.raw(&(bytes.len() as u64).to_le_bytes());
        self.raw(bytes);
    }

    pub fn u64(&mut self, v: u64) {
        self.raw(&v.to_le_bytes());
    }

    pub fn u128(&mut self, v: u128) {
        self.raw(&v.to_le_bytes());
    }

    pub fn finish(&self) -> u128 {
        self.0
    }

    /// 32 lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_length_prefix() {
        // FNV-1a 128 of the empty input is the offset basis.
        assert_eq!(Fnv128::new().hex(), "6c62272e07bb014262b821756295c58d");
        // Reference value of FNV-1a-128("a") (raw, no length prefix).
        let mut h = Fnv128::new();
        h.raw(b"a");
        assert_eq!(h.hex(), "d228cb696f1a8caf78912b704e4a8964");
        let mut a = Fnv128::new();
        a.bytes(b"ab");
        a.bytes(b"c");
        let mut b = Fnv128::new();
        b.bytes(b"a");
        b.bytes(b"bc");
        assert_ne!(a.finish(), b.finish());
    }
}
