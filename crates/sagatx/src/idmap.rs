//! Hash maps keyed by [`ExecutionId`], with a hasher made for them.
//!
//! The engine looks executions up by id several times per transition (its
//! drivers, its waiters, the memory store). The standard SipHash costs
//! more there than the rest of the lookup; an id is already 128 mostly
//! random bits, so a keyed fold of its two halves spreads it as well. The
//! key is drawn at random per map, so ids chosen to collide (through
//! idempotency keys, say) cannot be aimed at a bucket.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use sagatx_core::ExecutionId;

pub(crate) type IdMap<V> = HashMap<ExecutionId, V, IdHash>;

pub(crate) fn id_map<V>() -> IdMap<V> {
    HashMap::with_hasher(IdHash::new())
}

/// Builds [`IdHasher`]s with a random key.
#[derive(Clone)]
pub(crate) struct IdHash {
    k0: u64,
    k1: u64,
}

impl IdHash {
    pub(crate) fn new() -> Self {
        // The standard library's per-map random keys, taken through the
        // one stable way they are exposed.
        let k0 = std::collections::hash_map::RandomState::new().hash_one(0u64);
        let k1 = std::collections::hash_map::RandomState::new().hash_one(1u64);
        IdHash { k0, k1: k1 | 1 }
    }
}

impl Default for IdHash {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher {
            state: self.k0,
            k1: self.k1,
        }
    }
}

/// Folds what it is given (a UUID's bytes, as `Uuid`'s `Hash` writes them)
/// with a keyed multiply.
pub(crate) struct IdHasher {
    state: u64,
    k1: u64,
}

fn fold(a: u64, b: u64) -> u64 {
    let m = (a as u128).wrapping_mul(b as u128);
    (m as u64) ^ ((m >> 64) as u64)
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.state = fold(self.state ^ u64::from_le_bytes(word), self.k1);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.state = fold(self.state ^ n, self.k1);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids that differ in any one byte land in different buckets of a small
    /// table (the low bits of the hash), and a map works as a map. The keys
    /// are fixed, so the counts do not vary from run to run: 256 ids thrown
    /// at random into 256 buckets fill about 162 of them. A hasher that
    /// ignored a byte would put the 16 ids that differ only there into one
    /// bucket, which the second count catches for the last byte.
    #[test]
    fn ids_spread_and_the_map_works() {
        let b = IdHash {
            k0: 0x243F_6A88_85A3_08D3,
            k1: 0x1319_8A2E_0370_7345,
        };
        let base = [7u8; 16];
        let mut buckets = std::collections::HashSet::new();
        for i in 0..16 {
            for v in 0..16u8 {
                let mut bytes = base;
                bytes[i] = v;
                let id = ExecutionId(uuid::Uuid::from_bytes(bytes));
                buckets.insert(b.hash_one(id) & 0xff);
            }
        }
        assert!(
            buckets.len() > 150,
            "only {} of 256 buckets used",
            buckets.len()
        );
        let mut m = id_map();
        let ids: Vec<ExecutionId> = (0..1000u128)
            .map(|n| ExecutionId(uuid::Uuid::from_u128(n)))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            m.insert(*id, i);
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(m.get(id), Some(&i));
        }
        assert_eq!(m.len(), 1000);
    }
}
