//! GPT-2's byte alphabet: the 256 characters byte-level BPE tokenizers spell bytes with.
//!
//! A table, not a tokenizer: it lives here, in the one crate below both of its readers
//! (`whet-tokenize`'s fast encoder and `whet-model`'s GGUF tokenizer import), so that it exists
//! once.

/// GPT-2's byte-to-unicode table (`bytes_to_unicode` in transformers / tokenizers): printable
/// bytes map to themselves, the rest, in byte order, to U+0100...
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + extra).expect("U+0100..U+0143 are chars");
            extra += 1;
            c
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let mut all: Vec<char> = t.to_vec();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 256);
    }
}
