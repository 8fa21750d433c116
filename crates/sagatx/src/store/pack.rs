//! The SQLite journal's entries, compressed.
//!
//! An execution's state is JSON (`Execution::to_raw`, the format of
//! docs/journal-format.md), and every transition rewrites it: about 625
//! bytes for a three-step saga, most of them keys and enum names that
//! every entry repeats. Compressed with LZ4 against a dictionary of those
//! fragments built into the binary (`state-dict-1.txt`), it takes about a
//! fifth of that, so five times as many rows fit in a page and a batch of
//! transitions rewrites far fewer pages.
//!
//! An entry is one of:
//! - the JSON itself (it starts with `{`: entries written before schema 6,
//!   or ones that compression would not shrink);
//! - `0x01` (schema 6), a length (u32, little-endian), then an LZ4 block
//!   compressed against dictionary 1 that holds the JSON with the value of
//!   its `"id"` cut out (`"id":""`): the row's `id` column holds it
//!   already, in 16 bytes, and its 36 characters are the part of an entry
//!   that compresses least;
//! - `0x02` (schema 7, what is written now): the same, but the JSON's
//!   times are written as milliseconds after the execution's creation
//!   (`Execution::to_raw_relative`), which the row's `created_at` column
//!   holds: thirteen digits that differ from entry to entry become a digit
//!   or two (`"created_at_ms":0`), about 15 % of a compressed entry.
//!
//! The length is that of the block's content. The dictionary is part of
//! the format: it never changes (a test pins it); a better one would get
//! its own tag.

use std::borrow::Cow;

use lz4_flex::block::decompress_into_with_dict;
use sagatx_core::{DecodeError, Execution};

use super::lz4::Dictionary;
use uuid::Uuid;

/// Dictionary 1: the fragments every entry repeats.
const DICT_1: &[u8] = include_bytes!("state-dict-1.txt");
/// Dictionary 1 prepared for compressing against (super::lz4).
static DICT_1_PREPARED: std::sync::LazyLock<Dictionary> =
    std::sync::LazyLock::new(|| Dictionary::new(DICT_1));
/// The first byte of an entry compressed against [`DICT_1`], its times
/// as they are.
pub(super) const LZ4_DICT_1: u8 = 0x01;
/// The first byte of an entry compressed against [`DICT_1`], its times
/// written after the row's `created_at`.
const LZ4_DICT_1_RELATIVE: u8 = 0x02;
/// A compressed entry that claims to be larger than this is refused, so
/// that a damaged length cannot make a read allocate gigabytes; an entry
/// larger than this (which takes hundreds of step results near the 1 MiB
/// payload limit) is stored as JSON, so that it always reads back.
pub(super) const MAX_ENTRY_BYTES: usize = 256 << 20;

/// The compression buffer a thread keeps between writes at most.
const KEPT_BYTES: usize = 64 << 10;

/// Where the id's value starts: right after `"id":"` near the start (the
/// encoder writes `{"format_version":N,"id":"…"` first).
fn id_at(json: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b",\"id\":\"";
    let head = &json[..json.len().min(40)];
    head.windows(KEY.len())
        .position(|w| w == KEY)
        .map(|i| i + KEY.len())
}

/// The stored form of `ex`, to go in a row whose `created_at` column is
/// `ex.created_at_ms`: compressed with its times after that when this is
/// smaller, its JSON otherwise.
pub(crate) fn pack(ex: &Execution) -> Result<Vec<u8>, DecodeError> {
    pack_within(ex, MAX_ENTRY_BYTES)
}

/// [`pack`], compressing only entries of at most `max` bytes.
fn pack_within(ex: &Execution, max: usize) -> Result<Vec<u8>, DecodeError> {
    // Written without the id's value: no id to write, find and cut.
    let relative = ex.to_raw_relative_without_id(ex.created_at_ms)?;
    match compress_cut(&relative, ID_BYTES, LZ4_DICT_1_RELATIVE, max) {
        Some(packed) => Ok(packed),
        // Rare (an entry of incompressible results, or a huge one): the
        // format's own JSON, which needs no column to be read.
        None => ex.to_raw(),
    }
}

/// The length of an id's value as the JSON holds it (hyphenated).
const ID_BYTES: usize = uuid::fmt::Hyphenated::LENGTH;

/// `json` (the entry of execution `id`) compressed with first byte `tag`;
/// `Err` gives it back when it is over `max` bytes, does not hold the id
/// where the encoder puts it, or would not shrink. What [`pack`] did before
/// the entry was written without its id; kept for the tests, which make
/// entries of every tag with it.
#[cfg(test)]
pub(super) fn compress(
    mut json: Vec<u8>,
    id: Uuid,
    tag: u8,
    max: usize,
) -> Result<Vec<u8>, Vec<u8>> {
    if json.len() > max {
        return Err(json);
    }
    // The id's value is cut only when it is exactly the row's id, so that
    // putting the row's id back gives the entry as it was.
    let mut buf = Uuid::encode_buffer();
    let text = id.hyphenated().encode_lower(&mut buf).as_bytes();
    let Some(at) = id_at(&json).filter(|&at| {
        json.get(at..at + text.len()) == Some(text) && json.get(at + text.len()) == Some(&b'"')
    }) else {
        return Err(json);
    };
    json.drain(at..at + text.len());
    compress_cut(&json, text.len(), tag, max).ok_or_else(|| {
        json.splice(at..at, text.iter().copied());
        json
    })
}

/// `cut`, an entry whose id's value (`cut_bytes` long) is cut out already,
/// compressed with first byte `tag`; `None` when it is over `max` bytes or
/// would not be smaller than the whole entry.
fn compress_cut(cut: &[u8], cut_bytes: usize, tag: u8, max: usize) -> Option<Vec<u8>> {
    if cut.len() + cut_bytes > max {
        return None;
    }
    let len = u32::try_from(cut.len()).ok()?;
    // Compressed into a buffer kept by the thread, then copied out at its
    // size (a fresh buffer would be allocated at the worst case's size).
    thread_local! {
        static OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    OUT.with_borrow_mut(|out| {
        out.clear();
        out.push(tag);
        out.extend_from_slice(&len.to_le_bytes());
        DICT_1_PREPARED.compress(cut, out);
        let packed = (out.len() < cut.len() + cut_bytes).then(|| out.to_vec());
        // A large entry's buffer is not kept: a thread keeps at most
        // `KEPT_BYTES`, however large the entries it once compressed.
        if out.capacity() > KEPT_BYTES {
            *out = Vec::new();
        }
        packed
    })
}

/// The execution stored as `stored` in the row of `id` whose `created_at`
/// column is `created_at`.
pub(crate) fn unpack_execution(
    stored: &[u8],
    id: Uuid,
    created_at: u64,
) -> Result<Execution, DecodeError> {
    let (json, base_ms) = unpack(stored, id, created_at).map_err(DecodeError::Invariant)?;
    Execution::from_raw_relative(&json, base_ms)
}

/// The JSON of the stored entry of execution `id`, and the time its times
/// are written after (0: as they are); `Err` says why a compressed one
/// cannot be read. Anything not compressed is handed on as it is (the JSON
/// decoder reports what is wrong with it).
fn unpack(stored: &[u8], id: Uuid, created_at: u64) -> Result<(Cow<'_, [u8]>, u64), String> {
    let base_ms = match stored.first() {
        Some(&LZ4_DICT_1) => 0,
        Some(&LZ4_DICT_1_RELATIVE) => created_at,
        _ => return Ok((Cow::Borrowed(stored), 0)),
    };
    let len = stored
        .get(1..5)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(|b| u32::from_le_bytes(b) as usize)
        .ok_or("the compressed entry is cut short")?;
    if len > MAX_ENTRY_BYTES {
        return Err(format!(
            "the compressed entry claims {len} bytes, more than an entry can hold"
        ));
    }
    let mut out = vec![0u8; len];
    let got = decompress_into_with_dict(&stored[5..], &mut out, DICT_1)
        .map_err(|e| format!("the compressed entry cannot be decompressed: {e}"))?;
    if got != len {
        return Err(format!(
            "the compressed entry holds {got} bytes, not the {len} it claims"
        ));
    }
    let at = id_at(&out)
        .filter(|&at| out.get(at) == Some(&b'"'))
        .ok_or("the compressed entry has no place for its id")?;
    let mut buf = Uuid::encode_buffer();
    let text = id.hyphenated().encode_lower(&mut buf).as_bytes();
    out.splice(at..at, text.iter().copied());
    Ok((Cow::Owned(out), base_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Uuid = Uuid::from_u128(0x019ac3c1_8f33_7a51_9c1e_3b8f2a7d9e10);
    const ENTRY: &[u8] = br#"{"format_version":1,"id":"019ac3c1-8f33-7a51-9c1e-3b8f2a7d9e10","saga":"order","saga_version":3,"status":"completed","input":{"order_id":7},"steps":[{"name":"reserve","status":"succeeded","attempts":1,"result":{"reservation":"r-1"},"history":[{"p":"a","n":1,"s":1795819178413,"e":1795819178424,"o":"ok"}]},{"name":"charge","status":"succeeded","attempts":2,"result":null,"history":[{"p":"a","n":1,"s":1795819178424,"e":1795819178430,"o":"transient","x":"HTTP 503"},{"p":"a","n":2,"s":1795819178530,"e":1795819178533,"o":"ok"}]}],"committing":true,"created_at_ms":1795819178413,"updated_at_ms":1795819178533,"seq":6}"#;

    fn entry() -> Execution {
        Execution::from_raw(ENTRY).expect("the test's entry is an execution")
    }

    #[test]
    fn an_entry_comes_back_as_it_was_and_much_smaller() {
        let ex = entry();
        let packed = pack(&ex).expect("packs");
        assert_eq!(packed[0], LZ4_DICT_1_RELATIVE);
        assert!(
            packed.len() * 3 < ENTRY.len(),
            "{} bytes from {}",
            packed.len(),
            ENTRY.len()
        );
        let back = unpack_execution(&packed, ID, ex.created_at_ms).expect("unpacks");
        assert_eq!(back, ex);
        // The times are the row's: read with another `created_at`, they
        // move with it.
        let moved = unpack_execution(&packed, ID, ex.created_at_ms + 7).expect("unpacks");
        assert_eq!(moved.updated_at_ms, ex.updated_at_ms + 7);
        assert_eq!(
            moved.steps[1].history[1].started_at_ms,
            ex.steps[1].history[1].started_at_ms + 7
        );
        // Smaller than the same entry with its times as they are (the
        // schema-6 form).
        let absolute = compress(ENTRY.to_vec(), ID, LZ4_DICT_1, MAX_ENTRY_BYTES).expect("packs");
        assert!(
            packed.len() < absolute.len(),
            "{} vs {}",
            packed.len(),
            absolute.len()
        );
        // A schema-6 entry reads back whatever the row's `created_at`.
        assert_eq!(
            unpack_execution(&absolute, ID, 12_345).expect("unpacks"),
            ex
        );
    }

    /// Writing the entry without its id gives the bytes that cutting the
    /// id out of the whole entry gave (what `pack` did before): the stored
    /// format did not change.
    #[test]
    fn an_entry_written_without_its_id_packs_to_the_same_bytes() {
        let mut ex = entry();
        for round in 0..3 {
            let whole = ex.to_raw_relative(ex.created_at_ms).expect("encodes");
            let cut_from_whole =
                compress(whole, ex.id.0, LZ4_DICT_1_RELATIVE, MAX_ENTRY_BYTES).expect("packs");
            assert_eq!(pack(&ex).expect("packs"), cut_from_whole, "round {round}");
            // Another id, and a user whose name needs escaping.
            ex.id = sagatx_core::ExecutionId(Uuid::from_u128(
                0x0193_c7e2_0000_7000_8000_0000_0000_0001 + round,
            ));
            ex.user = Some(format!("\"user\" {round}"));
        }
    }

    #[test]
    fn json_entries_are_read_as_they_are() {
        assert!(matches!(unpack(ENTRY, ID, 99), Ok((Cow::Borrowed(b), 0)) if b == ENTRY));
        assert_eq!(unpack_execution(ENTRY, ID, 99).expect("reads"), entry());
        // Without the row's id in its place, or too small to gain
        // anything: kept as JSON.
        assert_eq!(
            compress(b"{}".to_vec(), ID, LZ4_DICT_1, MAX_ENTRY_BYTES),
            Err(b"{}".to_vec())
        );
        assert_eq!(
            compress(ENTRY.to_vec(), Uuid::nil(), LZ4_DICT_1, MAX_ENTRY_BYTES),
            Err(ENTRY.to_vec())
        );
        let short = br#"{"format_version":1,"id":"019ac3c1-8f33-7a51-9c1e-3b8f2a7d9e1","x":1}"#;
        assert_eq!(
            compress(short.to_vec(), ID, LZ4_DICT_1, MAX_ENTRY_BYTES),
            Err(short.to_vec())
        );
    }

    #[test]
    fn an_entry_that_does_not_compress_is_kept_whole() {
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let noise: String = (0..100_000)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                char::from(
                    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"
                        [(rng >> 58) as usize],
                )
            })
            .collect();
        let mut ex = entry();
        ex.input = std::sync::Arc::new(serde_json::Value::String(noise));
        let packed = pack(&ex).expect("packs");
        assert_eq!(
            packed,
            ex.to_raw().expect("encodes"),
            "kept as JSON, times and all"
        );
        assert_eq!(unpack_execution(&packed, ID, 1).expect("reads"), ex);
        // Larger than a compressed entry may claim to be: kept as JSON, so
        // that it reads back (and one just within the bound compresses).
        let ex = entry();
        let len = ex.to_raw_relative(ex.created_at_ms).expect("encodes").len();
        let big = pack_within(&ex, len - 1).expect("packs");
        assert_eq!(big, ENTRY);
        let within = pack_within(&ex, len).expect("packs");
        assert_eq!(within[0], LZ4_DICT_1_RELATIVE);
        // The thread's buffer, grown past what it keeps and dropped, still
        // serves small ones.
        let small = pack(&ex).expect("packs");
        assert_eq!(
            unpack_execution(&small, ID, ex.created_at_ms).expect("unpacks"),
            ex
        );
    }

    #[test]
    fn a_damaged_entry_is_an_error_never_a_panic_or_a_huge_allocation() {
        let ex = entry();
        let at = ex.created_at_ms;
        let packed = pack(&ex).expect("packs");
        for cut in 0..packed.len() {
            let got = unpack_execution(&packed[..cut], ID, at);
            assert!(got.is_err(), "cut at {cut} must not unpack");
        }
        let mut huge = packed.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&huge, ID, at)
            .expect_err("refused")
            .contains("claims"));
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2_000 {
            let mut bad = packed.clone();
            for _ in 0..3 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = 5 + (rng as usize) % (bad.len() - 5);
                bad[i] ^= (rng >> 32) as u8 | 1;
            }
            // Damaged bytes may still decompress to something (the JSON
            // decoder and the invariant check judge that); they must not
            // panic.
            let _ = unpack_execution(&bad, ID, at);
        }
    }

    /// An entry compressed by the reference LZ4 (lz4 1.9, high compression)
    /// against dictionary 1 reads back: the format is LZ4's, not this
    /// crate's.
    #[test]
    fn an_entry_compressed_by_the_reference_lz4_reads_back() {
        let hex = concat!(
            "01430200000f810107067f015d6f7264657284011f3384010b127b3700105f4c001f37a402017f726573657276652601",
            "1b0336000364095f22722d312239010fa03935383139313738343149060912002f3234bc01035f63686172679c00101f",
            "3231021c0979000a8b002f333085061b1b3253003b35333053003f3533332d021f092d010d3802095b0070736571223a",
            "367d",
        );
        let blob: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let (json, base_ms) = unpack(&blob, ID, 12_345).expect("unpacks");
        assert_eq!((json.as_ref(), base_ms), (ENTRY, 0));
    }

    /// Entries written with dictionary 1 are read with it forever: it must
    /// not change by a byte.
    #[test]
    fn dictionary_1_never_changes() {
        let fnv = DICT_1.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        assert_eq!((DICT_1.len(), fnv), (2546, 0x68ef_c44f_57fd_46ce));
    }
}
