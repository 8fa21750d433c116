//! LZ4 block compression against a dictionary prepared once.
//!
//! lz4_flex's `compress_into_with_dict` builds the dictionary's hash table
//! afresh at every call: it allocates and zeroes an 8 KiB table and hashes
//! every third position of the dictionary (about 850 for dictionary 1).
//! For a journal entry of a few hundred bytes that was half the cost of
//! compressing it, and compressing was a sixth of the engine's side of a
//! busy SQLite store. lz4_flex has no way to keep a prepared table, so this
//! module does the same compression with the table built once per
//! dictionary and copied at each call.
//!
//! The output is lz4_flex's, byte for byte (a property test compares the
//! two on random inputs), so the format does not depend on this code:
//! lz4_flex (or any LZ4) decompresses it, and the journal's golden entries
//! stay what they are. Safe Rust only, like the rest of the crate.

use std::cell::RefCell;

use lz4_flex::block::{compress_into_with_dict, get_maximum_output_size};

/// Entries in the hash table (4096 16-bit positions: lz4_flex's table
/// for inputs that, with their dictionary, are under 64 KiB).
const TABLE_LEN: usize = 4096;
/// The shortest match LZ4 encodes.
const MINMATCH: usize = 4;
/// No match starts in the last 12 bytes of the input.
const MFLIMIT: usize = 12;
/// A match ends at least this far before the end of the input (the last 5
/// bytes are literals).
const END_OFFSET: usize = 5 + 1;
/// Inputs shorter than this are all literals.
const MIN_LENGTH: usize = MFLIMIT + 1;
/// The farthest back a match may reach.
const MAX_DISTANCE: usize = u16::MAX as usize;
/// After 2^5 positions without a match, the search skips ahead faster.
const SKIP_BITS: u32 = 5;

/// A dictionary and the hash table of its positions.
pub(super) struct Dictionary {
    bytes: &'static [u8],
    table: Box<[u16; TABLE_LEN]>,
}

/// The four bytes at `at`, as LZ4 hashes and compares them. One bounds
/// check and one load: byte by byte, each index was checked on its own,
/// and that was two fifths of compressing an entry.
fn read4(b: &[u8], at: usize) -> u32 {
    let mut four = [0u8; 4];
    four.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(four)
}

/// The table slot of four bytes (lz4_flex's `HashTable4KU16`).
fn slot(four: u32) -> usize {
    (four.wrapping_mul(2_654_435_761) >> 20) as usize
}

impl Dictionary {
    /// Prepares `bytes` (at most 64 KiB, LZ4's window) for compressing
    /// against: the table holds a position of every third byte, as
    /// lz4_flex fills it. One shorter than a match is no dictionary (as
    /// in lz4_flex).
    pub(super) fn new(bytes: &'static [u8]) -> Self {
        let bytes = if bytes.len() < MINMATCH {
            &[][..]
        } else {
            bytes
        };
        // A dictionary of 64 KiB or more would have positions past 16
        // bits: `compress` hands every input to lz4_flex then (the table
        // is not read).
        let mut table = Box::new([0u16; TABLE_LEN]);
        let mut i = 0;
        while i + 8 <= bytes.len() {
            table[slot(read4(bytes, i))] = i as u16;
            i += 3;
        }
        Dictionary { bytes, table }
    }

    /// Appends the LZ4 block of `input`, compressed against this
    /// dictionary, to `out`.
    pub(super) fn compress(&self, input: &[u8], out: &mut Vec<u8>) {
        let base = self.bytes.len();
        if base + input.len() >= MAX_DISTANCE {
            // Positions past 16 bits: lz4_flex's own, with its wider table
            // (rare: an entry of tens of kilobytes).
            self.with_lz4_flex(input, out);
            return;
        }
        out.reserve(get_maximum_output_size(input.len()));
        if input.len() < MIN_LENGTH {
            last_literals(out, input);
            return;
        }
        let done = STAMPS.try_with(|stamps| {
            let Ok(mut stamps) = stamps.try_borrow_mut() else {
                return false;
            };
            let stamps = stamps.get_or_insert_with(|| {
                Box::new(Stamps {
                    generation: 0,
                    table: [0; TABLE_LEN],
                })
            });
            let table = Overlay {
                stamp: stamps.next_stamp(),
                own: &mut stamps.table,
                dict: &self.table,
            };
            self.blocks(input, out, table);
            true
        });
        if done != Ok(true) {
            // The thread is exiting: lz4_flex's own.
            self.with_lz4_flex(input, out);
        }
    }

    /// [`Dictionary::compress`] of an input of at least [`MIN_LENGTH`]
    /// bytes whose positions, after the dictionary's, fit 16 bits.
    fn blocks(&self, input: &[u8], out: &mut Vec<u8>, mut table: Overlay<'_>) {
        // Positions count from the dictionary's start: the input follows
        // it at `base`.
        let base = self.bytes.len();
        let end_check = input.len() - MFLIMIT;
        let mut literal_start = 0;
        let mut cur = 0;
        if base == 0 {
            // No dictionary: a block may not start with a match (it would
            // be at distance 0).
            table.put(slot(read4(input, 0)), 0);
            cur = 1;
        }
        loop {
            // Find a four-byte match, skipping ahead faster the longer none
            // is found.
            let mut misses = 1usize << SKIP_BITS;
            let mut next = cur;
            let (mut candidate, from_dict, offset) = loop {
                let step = misses >> SKIP_BITS;
                misses += 1;
                cur = next;
                next += step;
                if cur > end_check {
                    last_literals(out, &input[literal_start..]);
                    return;
                }
                let four = read4(input, cur);
                let h = slot(four);
                let c = table.get(h);
                table.put(h, base + cur);
                let distance = base + cur - c;
                if distance > MAX_DISTANCE {
                    continue;
                }
                let (at, from_dict) = if c >= base {
                    (c - base, false)
                } else {
                    (c, true)
                };
                let source = if from_dict { self.bytes } else { input };
                if read4(source, at) == four {
                    break (at, from_dict, distance as u16);
                }
            };
            let source = if from_dict { self.bytes } else { input };
            // Extend the match backwards over the pending literals.
            while candidate > 0 && cur > literal_start && input[cur - 1] == source[candidate - 1] {
                cur -= 1;
                candidate -= 1;
            }
            let literals = cur - literal_start;
            cur += MINMATCH;
            candidate += MINMATCH;
            // And forwards, within the input's end and the source's.
            let limit = input
                .len()
                .saturating_sub(cur + END_OFFSET)
                .min(source.len() - candidate);
            let extra = common_prefix(&input[cur..cur + limit], &source[candidate..]);
            cur += extra;
            let h = slot(read4(input, cur - 2));
            table.put(h, base + cur - 2);

            out.push((literals.min(15) << 4 | extra.min(15)) as u8);
            if literals >= 15 {
                length(out, literals - 15);
            }
            out.extend_from_slice(&input[literal_start..literal_start + literals]);
            out.extend_from_slice(&offset.to_le_bytes());
            if extra >= 15 {
                length(out, extra - 15);
            }
            literal_start = cur;
        }
    }
}

impl Dictionary {
    /// [`Dictionary::compress`] by lz4_flex (which prepares the dictionary
    /// again).
    fn with_lz4_flex(&self, input: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + get_maximum_output_size(input.len()), 0);
        match compress_into_with_dict(input, &mut out[start..], self.bytes) {
            Ok(n) => out.truncate(start + n),
            // Cannot happen: the room is what lz4_flex asks for. An empty
            // block would not decompress to the input, so the caller's
            // length check would keep the input as it is.
            Err(_) => out.truncate(start),
        }
    }
}

/// A thread's own hash table, reused by every compression on the thread:
/// an entry is this call's when it carries the call's generation in its
/// high 16 bits, the dictionary's otherwise. This saves copying the
/// dictionary's 8 KiB table at every call (3 % of the engine's side of a
/// busy SQLite store).
struct Stamps {
    generation: u32,
    table: [u32; TABLE_LEN],
}

impl Stamps {
    /// The stamp of the next call (cleared once in 65,535 calls, when the
    /// generation wraps).
    fn next_stamp(&mut self) -> u32 {
        self.generation = (self.generation + 1) & 0xFFFF;
        if self.generation == 0 {
            self.table.fill(0);
            self.generation = 1;
        }
        self.generation << 16
    }
}

thread_local! {
    static STAMPS: RefCell<Option<Box<Stamps>>> = const { RefCell::new(None) };
}

/// The hash table one compression sees: its own entries over the
/// dictionary's.
struct Overlay<'a> {
    stamp: u32,
    own: &'a mut [u32; TABLE_LEN],
    dict: &'a [u16; TABLE_LEN],
}

impl Overlay<'_> {
    fn get(&self, slot: usize) -> usize {
        let e = self.own[slot];
        if e & 0xFFFF_0000 == self.stamp {
            (e & 0xFFFF) as usize
        } else {
            usize::from(self.dict[slot])
        }
    }

    fn put(&mut self, slot: usize, position: usize) {
        self.own[slot] = self.stamp | position as u32;
    }
}

/// How many bytes `a` and `b` have in common from their starts (at most
/// `a.len()`).
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let mut n = 0;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let x = u64::from_le_bytes([x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]);
        let y = u64::from_le_bytes([y[0], y[1], y[2], y[3], y[4], y[5], y[6], y[7]]);
        if x != y {
            return n + ((x ^ y).trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    n + a[n..]
        .iter()
        .zip(&b[n.min(b.len())..])
        .take_while(|(x, y)| x == y)
        .count()
}

/// The rest of a length that did not fit in its token's four bits.
fn length(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0xFF {
        out.push(0xFF);
        n -= 0xFF;
    }
    out.push(n as u8);
}

/// The last sequence: literals only.
fn last_literals(out: &mut Vec<u8>, literals: &[u8]) {
    out.push((literals.len().min(15) << 4) as u8);
    if literals.len() >= 15 {
        length(out, literals.len() - 15);
    }
    out.extend_from_slice(literals);
}

#[cfg(test)]
mod tests {
    use super::*;
    use lz4_flex::block::decompress_into_with_dict;
    use proptest::prelude::*;

    const DICT_1: &[u8] = include_bytes!("state-dict-1.txt");

    fn reference(input: &[u8], dict: &[u8]) -> Vec<u8> {
        let mut out = vec![0; get_maximum_output_size(input.len())];
        let n = compress_into_with_dict(input, &mut out, dict).expect("room enough");
        out.truncate(n);
        out
    }

    fn ours(d: &Dictionary, input: &[u8]) -> Vec<u8> {
        let mut out = b"head".to_vec();
        d.compress(input, &mut out);
        assert_eq!(&out[..4], b"head", "appends, leaves what was there");
        out.split_off(4)
    }

    fn same_as_lz4_flex(d: &Dictionary, input: &[u8]) {
        let got = ours(d, input);
        assert_eq!(got, reference(input, d.bytes), "input {input:?}");
        let mut back = vec![0; input.len()];
        let n = decompress_into_with_dict(&got, &mut back, d.bytes).expect("decompresses");
        assert_eq!(&back[..n], input);
    }

    /// Bytes of a journal entry's kind: pieces of the dictionary, of the
    /// input so far, and noise.
    fn entry_like(seed: u64, len: usize) -> Vec<u8> {
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            let r = next();
            let n = 1 + (r >> 8) as usize % 40;
            match r % 3 {
                0 => {
                    let at = (r >> 20) as usize % (DICT_1.len() - n);
                    v.extend_from_slice(&DICT_1[at..at + n]);
                }
                1 if v.len() > n => {
                    let at = (r >> 20) as usize % (v.len() - n);
                    v.extend_from_within(at..at + n);
                }
                _ => v.extend((0..n).map(|_| b'0' + (next() % 75) as u8)),
            }
        }
        v.truncate(len);
        v
    }

    #[test]
    fn edge_lengths_match_lz4_flex() {
        let d = Dictionary::new(DICT_1);
        for len in 0..200 {
            same_as_lz4_flex(&d, &entry_like(len as u64 + 7, len));
            same_as_lz4_flex(&d, &vec![b'a'; len]);
            same_as_lz4_flex(&d, &DICT_1[..len]);
        }
        // Long literal runs and long matches (lengths past 15 and 270).
        let noise: Vec<u8> = entry_like(3, 4000).iter().map(|b| b ^ 0x5a).collect();
        same_as_lz4_flex(&d, &noise);
        same_as_lz4_flex(&d, &[DICT_1, DICT_1].concat());
        // Past 16-bit positions: lz4_flex's own path.
        same_as_lz4_flex(&d, &entry_like(11, 70_000));
        same_as_lz4_flex(&d, &entry_like(12, MAX_DISTANCE - DICT_1.len()));
        same_as_lz4_flex(&d, &entry_like(13, MAX_DISTANCE - DICT_1.len() - 1));
    }

    #[test]
    fn a_short_dictionary_matches_lz4_flex() {
        for dict in [&b""[..], b"abc", b"abcdefg", b"abcdefgh", &DICT_1[..100]] {
            let d = Dictionary::new(dict);
            for len in [0, 5, 13, 20, 64, 300] {
                let input: Vec<u8> = entry_like(len as u64, len);
                let got = ours(&d, &input);
                assert_eq!(got, reference(&input, dict));
                let mut back = vec![0; input.len()];
                let n = decompress_into_with_dict(&got, &mut back, dict).expect("decompresses");
                assert_eq!(&back[..n], &input[..]);
            }
        }
    }

    #[test]
    fn the_thread_table_is_cleared_when_its_generation_wraps() {
        let d = Dictionary::new(DICT_1);
        let inputs: Vec<Vec<u8>> = (0..6).map(|i| entry_like(i + 40, 700)).collect();
        same_as_lz4_flex(&d, &inputs[0]);
        STAMPS.with_borrow_mut(|s| {
            let s = s.as_mut().expect("made by the first compression");
            // Entries stamped with generation 1 that a wrapped table,
            // if not cleared, would take for its own.
            s.table.fill(1 << 16 | 7);
            s.generation = 0xFFFD;
        });
        for input in &inputs {
            same_as_lz4_flex(&d, input);
        }
        assert!(STAMPS.with_borrow(|s| s.as_ref().map(|s| s.generation)) < Some(10));
    }

    proptest! {
        #[test]
        fn random_inputs_compress_as_lz4_flex_does(seed in any::<u64>(), len in 0usize..3000) {
            same_as_lz4_flex(&Dictionary::new(DICT_1), &entry_like(seed, len));
        }

        #[test]
        fn random_bytes_compress_as_lz4_flex_does(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            same_as_lz4_flex(&Dictionary::new(DICT_1), &input);
        }
    }
}
