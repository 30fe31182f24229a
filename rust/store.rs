//! Reading the vector store: `.npy` headers, validated memory-mapped shards.
//!
//! A shard is a standard `.npy` file holding a C-order `(rows, dim)` matrix of little-endian
//! float16 or float32. Before a shard is mapped its header is parsed and checked against the
//! file size, so that a truncated or foreign file is an error naming the file, never a read past
//! the end of a mapping. Python writes the shards (python/ilias/store.py); this side only reads.
//!
//! Integrity on the search path: sha256 over a 205 GB store costs more than the search itself,
//! and reading the store twice (verify, then search) is not an option. So each shard also
//! carries a fast checksum of our own ([`block_hash`], non-cryptographic, 64 bits: it catches
//! damage, not an adversary) over blocks of [`CHECK_ROWS`] rows aligned to the shard's first
//! row. The shard checksum is the wrapping sum of its block hashes, so threads that see the
//! blocks in any order add them up to the same value, and exact search hashes every tile while
//! it is hot in cache (search.rs) and compares at the end.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// Element type of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::F32 => "float32",
        }
    }
}

/// What a `.npy` header says about the array that follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// The `descr` field, e.g. `<f2`.
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Offset of the first data byte.
    pub data_offset: usize,
}

/// Parses the header at the start of a `.npy` file (format versions 1, 2 and 3).
pub fn parse_npy_header(bytes: &[u8]) -> std::result::Result<NpyHeader, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (missing the \\x93NUMPY magic)".into());
    }
    let major = bytes[6];
    let (len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| "truncated .npy header".to_string())?;
    let text = std::str::from_utf8(&bytes[start..end]).map_err(|_| "header is not text".to_string())?;
    let descr = dict_value(text, "descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"').to_string();
    let fortran_order = match dict_value(text, "fortran_order")?.as_str() {
        "True" => true,
        "False" => false,
        other => return Err(format!("bad fortran_order value {other:?}")),
    };
    let shape_text = dict_value(text, "shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("bad shape {shape_text:?}"))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_text:?}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(NpyHeader {
        descr,
        fortran_order,
        shape,
        data_offset: end,
    })
}

/// The raw text of `key`'s value in the header's Python dict literal.
fn dict_value(text: &str, key: &str) -> std::result::Result<String, String> {
    let pat_single = format!("'{key}':");
    let pat_double = format!("\"{key}\":");
    let pos = text
        .find(&pat_single)
        .map(|p| p + pat_single.len())
        .or_else(|| text.find(&pat_double).map(|p| p + pat_double.len()))
        .ok_or_else(|| format!("header has no '{key}' field"))?;
    let rest = text[pos..].trim_start();
    let value = if rest.starts_with('(') {
        let close = rest.find(')').ok_or_else(|| format!("bad '{key}' field"))?;
        &rest[..=close]
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        &rest[..end]
    };
    Ok(value.trim().to_string())
}

/// Rows per checksum block of a shard. Exact search hashes one tile of rows at a time, so its
/// tiles are exactly these blocks (search.rs: `TILE_ROWS`, and `chunks` cuts shards only at
/// multiples of it).
pub const CHECK_ROWS: usize = 128;

/// Independent accumulator lanes of [`block_hash`] (eight u64 words, one 64-byte stripe, per
/// step: enough independent multiplies to keep the multiplier busy, and the loop vectorizes).
const LANES: usize = 8;
const KEYS: [u64; LANES] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x85eb_ca77_c2b2_ae63,
    0x27d4_eb2f_1656_67c5,
    0xd6e8_feb8_6659_fd93,
    0xff51_afd7_ed55_8ccd,
    0xc4ce_b9fe_1a85_ec53,
];
/// Stripes between two scrambles of the lanes (1 KiB): their order matters across segments.
const SEGMENT: usize = 16;

/// The splitmix64 finalizer: every input bit reaches every output bit.
#[inline]
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A fast 64-bit hash of one block of bytes, the `index`-th of its sequence (so that equal
/// blocks at different places hash differently). Eight lanes take one u64 word each per
/// 64-byte stripe: the word, keyed by its lane and its stripe's place in the segment, is
/// multiplied half by half (32 x 32 -> 64 bits) into its lane, and the raw word is added to the
/// neighbouring lane, so a changed word always changes a lane; every 1 KiB the lanes are
/// scrambled by a multiply-xorshift, and at the end they are finalized, mixed with the
/// length and the index into one value. About 1 instruction per byte, from cache. The same
/// integer code is compiled for AVX2 where the CPU has it (the same bits, wider vectors).
pub fn block_hash(bytes: &[u8], index: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { block_hash_avx2(bytes, index) };
    }
    block_hash_portable(bytes, index)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_hash_avx2(bytes: &[u8], index: u64) -> u64 {
    block_hash_portable(bytes, index)
}

#[inline(always)]
fn block_hash_portable(bytes: &[u8], index: u64) -> u64 {
    let mut acc = KEYS.map(|k| k ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let stripes = bytes.chunks_exact(64);
    let tail = stripes.remainder();
    for (n, stripe) in stripes.enumerate() {
        let salt = ((n % SEGMENT) as u64).wrapping_mul(0xa076_1d64_78bd_642f);
        let mut words = [0u64; LANES];
        for (w, b) in words.iter_mut().zip(stripe.chunks_exact(8)) {
            *w = u64::from_le_bytes(b.try_into().unwrap());
        }
        for l in 0..LANES {
            let x = words[l] ^ KEYS[l] ^ salt;
            acc[l] = acc[l].wrapping_add((x & 0xffff_ffff).wrapping_mul(x >> 32));
            acc[l ^ 1] = acc[l ^ 1].wrapping_add(words[l]);
        }
        if n % SEGMENT == SEGMENT - 1 {
            for (a, k) in acc.iter_mut().zip(KEYS) {
                *a = (*a ^ (*a >> 47) ^ k).wrapping_mul(0x9e37_79b1);
            }
        }
    }
    // the last, partial stripe: zero-padded (the length below tells the padding apart)
    let mut last = [0u8; 64];
    last[..tail.len()].copy_from_slice(tail);
    for (l, b) in last.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(b.try_into().unwrap());
        acc[l] = mix64(acc[l] ^ w ^ KEYS[l]);
    }
    let mut h = mix64(index ^ (bytes.len() as u64).wrapping_mul(0xff51_afd7_ed55_8ccd));
    for a in acc {
        h = mix64(h.rotate_left(23) ^ a);
    }
    h
}

/// The checksum of `bytes` cut into blocks of `block` bytes (the last one shorter): the wrapping
/// sum of their [`block_hash`]es, computed on up to `threads` threads (0: all cores).
pub fn checksum(bytes: &[u8], block: usize, threads: usize) -> Result<u64> {
    checksum_from(bytes, block, 0, threads)
}

/// The part of a [`checksum`] that the blocks of `bytes` contribute when they are blocks
/// `first..` of a longer sequence: the checksum of a whole is the wrapping sum of its parts'.
pub fn checksum_from(bytes: &[u8], block: usize, first: u64, threads: usize) -> Result<u64> {
    let block = block.max(1);
    let blocks = bytes.len().div_ceil(block);
    let threads = crate::parallel::resolve_threads(threads)?.min(blocks.max(1));
    let per = blocks.div_ceil(threads).max(1);
    let parts = crate::parallel::map(0..threads, |t| {
        let sum = (t * per..((t + 1) * per).min(blocks)).fold(0u64, |sum, b| {
            let piece = &bytes[b * block..((b + 1) * block).min(bytes.len())];
            sum.wrapping_add(block_hash(piece, first + b as u64))
        });
        Ok(sum)
    })?;
    Ok(parts.into_iter().fold(0u64, u64::wrapping_add))
}

/// One memory-mapped, validated `(rows, dim)` shard.
pub struct Shard {
    pub path: PathBuf,
    pub dtype: DType,
    pub rows: usize,
    pub dim: usize,
    /// The checksum its store's manifest records ([`Shard::checksum`]), when it records one:
    /// exact search compares it with what it read.
    pub expected: Option<u64>,
    map: Mmap,
    offset: usize,
}

impl Shard {
    /// Opens and validates a shard; `expect_dim` (when given) must match its second axis.
    pub fn open(path: &Path, expect_dim: Option<usize>) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        if file_len == 0 {
            return Err(Error::format(path, "file is empty"));
        }
        // SAFETY: the mapping is read-only and the store's writers never modify a shard in place
        // (they write a new file and rename it). A concurrent truncation by another program
        // would be a user error that no reader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = parse_npy_header(&map).map_err(|m| Error::format(path, m))?;
        let dtype = match header.descr.as_str() {
            "<f2" => DType::F16,
            "<f4" => DType::F32,
            other => {
                return Err(Error::format(
                    path,
                    format!("dtype '{other}' is not supported (expected little-endian float16 '<f2' or float32 '<f4')"),
                ))
            }
        };
        if header.fortran_order {
            return Err(Error::format(path, "array is in Fortran order (expected C order)"));
        }
        let (rows, dim) = match header.shape[..] {
            [r, d] => (r, d),
            _ => {
                return Err(Error::format(
                    path,
                    format!("shape {:?} is not 2-D (expected (rows, dim))", header.shape),
                ))
            }
        };
        if dim == 0 {
            return Err(Error::format(path, "dimension is 0"));
        }
        if let Some(d) = expect_dim {
            if d != dim {
                return Err(Error::format(
                    path,
                    format!("dimension {dim} differs from the store's {d}"),
                ));
            }
        }
        let expected = rows
            .checked_mul(dim)
            .and_then(|n| n.checked_mul(dtype.size()))
            .and_then(|n| n.checked_add(header.data_offset));
        if expected != Some(file_len) {
            return Err(Error::format(
                path,
                format!(
                    "file size {file_len} bytes disagrees with its header (shape ({rows}, {dim}) {} needs {} bytes): truncated or corrupt",
                    dtype.name(),
                    expected.map_or("an impossible number of".to_string(), |n| n.to_string())
                ),
            ));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            dtype,
            rows,
            dim,
            expected: None,
            map,
            offset: header.data_offset,
        })
    }

    /// The fast checksum of the data section: blocks of [`CHECK_ROWS`] rows from the first.
    pub fn checksum(&self, threads: usize) -> Result<u64> {
        checksum(self.row_bytes(0, self.rows), self.block_bytes(), threads)
    }

    /// Bytes of one checksum block (the last block of a shard may be shorter).
    pub fn block_bytes(&self) -> usize {
        CHECK_ROWS * self.dim * self.dtype.size()
    }

    /// The error of a shard whose data does not give the checksum its manifest recorded.
    pub fn mismatch(&self) -> Error {
        Error::format(
            &self.path,
            "checksum mismatch: the data changed since it was written; `ilias info --verify` checks the whole store",
        )
    }

    /// The raw little-endian bytes of rows `start..end`.
    pub fn row_bytes(&self, start: usize, end: usize) -> &[u8] {
        &self.map[self.span(start, end)]
    }

    /// Where rows `start..end` lie in the mapping.
    fn span(&self, start: usize, end: usize) -> std::ops::Range<usize> {
        let row = self.dim * self.dtype.size();
        self.offset + start * row..self.offset + end * row
    }

    /// Tells the kernel that rows `start..end` will not be read again soon, so their pages leave
    /// this process's resident set (they stay in the page cache). This keeps the memory of a
    /// search bounded whatever the size of the database.
    pub fn release(&self, start: usize, end: usize) {
        let bytes = self.span(start, end);
        drop_pages(&self.map, bytes.start, bytes.end);
    }

    /// Hints the kernel to read rows `start..end` ahead.
    pub fn prefetch(&self, start: usize, end: usize) {
        if let Some((lo, len)) = self.pages(start, end) {
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, lo, len);
        }
    }

    /// Hints the kernel that rows `start..end` will be read sparsely (no read-ahead).
    pub fn sparse(&self, start: usize, end: usize) {
        if let Some((lo, len)) = self.pages(start, end) {
            let _ = self.map.advise_range(memmap2::Advice::Random, lo, len);
        }
    }

    /// The whole pages (offset, length) of the mapping that hold rows `start..end`.
    fn pages(&self, start: usize, end: usize) -> Option<(usize, usize)> {
        let bytes = self.span(start, end);
        page_span(&self.map, bytes.start, bytes.end)
    }
}

/// The whole pages (offset, length) of `map` that hold its bytes `start..end`.
fn page_span(map: &Mmap, start: usize, end: usize) -> Option<(usize, usize)> {
    const PAGE: usize = 4096;
    let lo = start / PAGE * PAGE;
    let hi = (end.div_ceil(PAGE) * PAGE).min(map.len());
    (hi > lo).then_some((lo, hi - lo))
}

/// Drops the pages holding bytes `start..end` of `map` from this process's resident set (they
/// stay in the page cache): a pass over files larger than memory keeps its memory bounded.
pub(crate) fn drop_pages(map: &Mmap, start: usize, end: usize) {
    if let Some((lo, len)) = page_span(map, start, end) {
        // SAFETY: only read-only shared file mappings come here: dropping their pages only means
        // that a later access reads them again from the file; no data is lost.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, len) };
    }
}

/// An ordered list of shards (across one or several stores) seen as one matrix whose rows are
/// numbered globally: rows of shard `i` start at `starts[i]`.
pub struct Database {
    pub shards: Vec<Shard>,
    pub starts: Vec<usize>,
    pub rows: usize,
    pub dim: usize,
}

impl Database {
    pub fn new(shards: Vec<Shard>) -> Result<Database> {
        let dim = match shards.first() {
            Some(s) => s.dim,
            None => return Err(Error::invalid("the database has no shards")),
        };
        let mut starts = Vec::with_capacity(shards.len());
        let mut rows = 0usize;
        for s in &shards {
            if s.dim != dim {
                return Err(Error::format(
                    &s.path,
                    format!("dimension {} differs from the first shard's {dim}", s.dim),
                ));
            }
            starts.push(rows);
            rows += s.rows;
        }
        Ok(Database {
            shards,
            starts,
            rows,
            dim,
        })
    }

    /// The shard holding global row `row`, and the row's index inside it.
    pub fn locate(&self, row: usize) -> (&Shard, usize) {
        let s = self.starts.partition_point(|&start| start <= row) - 1;
        (&self.shards[s], row - self.starts[s])
    }

    /// The raw bytes of global row `row`, and their type.
    pub fn row(&self, row: usize) -> (&[u8], DType) {
        let (shard, r) = self.locate(row);
        (shard.row_bytes(r, r + 1), shard.dtype)
    }

    pub fn open(paths: &[PathBuf], dim: Option<usize>) -> Result<Database> {
        let shards = paths.iter().map(|p| Shard::open(p, dim)).collect::<Result<Vec<_>>>()?;
        Database::new(shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + dict.len() + 1) % 64 != 0 {
            dict.push(' ');
        }
        dict.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        out.extend_from_slice(dict.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ilias-store-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn parses_headers() {
        let h = parse_npy_header(&npy_bytes("<f2", "(3, 4)", &[])).unwrap();
        assert_eq!(h.descr, "<f2");
        assert_eq!(h.shape, vec![3, 4]);
        assert!(!h.fortran_order);
        assert_eq!(h.data_offset % 64, 0);
        let h = parse_npy_header(&npy_bytes("|S12", "(7,)", &[])).unwrap();
        assert_eq!(h.shape, vec![7]);
        assert!(parse_npy_header(b"hello world").is_err());
        assert!(parse_npy_header(&npy_bytes("<f2", "(3, 4)", &[])[..20]).is_err());
    }

    #[test]
    fn validates_shards() {
        let d = tmpdir("validate");
        let good = write(&d, "good.npy", &npy_bytes("<f2", "(2, 3)", &[0u8; 12]));
        let s = Shard::open(&good, Some(3)).unwrap();
        assert_eq!((s.rows, s.dim, s.dtype), (2, 3, DType::F16));
        let short = write(&d, "short.npy", &npy_bytes("<f2", "(2, 3)", &[0u8; 11]));
        let e = Shard::open(&short, None).err().unwrap().to_string();
        assert!(e.contains("short.npy") && e.contains("truncated"), "{e}");
        let f8 = write(&d, "f8.npy", &npy_bytes("<f8", "(2, 3)", &[0u8; 48]));
        assert!(Shard::open(&f8, None).err().unwrap().to_string().contains("'<f2'"));
        assert!(Shard::open(&good, Some(4))
            .err()
            .unwrap()
            .to_string()
            .contains("dimension"));
        let missing = Shard::open(&d.join("nope.npy"), None).err().unwrap();
        assert!(matches!(missing, Error::Io { .. }));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn block_hashes_sum_in_any_order_and_see_every_byte() {
        let data: Vec<u8> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let block = 700;
        let want = checksum(&data, block, 1).unwrap();
        // any thread count, any order of the blocks: the same sum
        for threads in [2, 3, 8] {
            assert_eq!(checksum(&data, block, threads).unwrap(), want);
        }
        let mut order: Vec<usize> = (0..data.len().div_ceil(block)).collect();
        order.reverse();
        order.swap(1, 5);
        let by_hand = order.iter().fold(0u64, |s, &b| {
            s.wrapping_add(block_hash(
                &data[b * block..((b + 1) * block).min(data.len())],
                b as u64,
            ))
        });
        assert_eq!(by_hand, want);
        // one flipped bit anywhere, a zeroed range, swapped stripes, a shorter input: all seen
        for pos in (0..data.len()).step_by(37) {
            for bit in [0, 3, 7] {
                let mut d = data.clone();
                d[pos] ^= 1 << bit;
                assert_ne!(checksum(&d, block, 1).unwrap(), want, "byte {pos} bit {bit}");
            }
        }
        let mut d = data.clone();
        d[100..300].fill(0);
        assert_ne!(checksum(&d, block, 1).unwrap(), want);
        let mut d = data.clone();
        let (a, b) = d.split_at_mut(64);
        a.swap_with_slice(&mut b[..64]);
        assert_ne!(checksum(&d, block, 1).unwrap(), want);
        assert_ne!(checksum(&data[..data.len() - 2], block, 1).unwrap(), want);
        // every path gives the same bits
        for len in [0, 7, 64, 1000, 1030, 5000] {
            assert_eq!(block_hash(&data[..len], 3), block_hash_portable(&data[..len], 3));
        }
        // equal blocks at different places hash differently; the hash is stable across versions
        assert_ne!(block_hash(&[0u8; 64], 0), block_hash(&[0u8; 64], 1));
        // pinned: manifests and codes files record these values, so the hash may never change
        assert_eq!(block_hash(&data[..1000], 3), 0x7867_1b1e_e450_4b27);
        assert_eq!(checksum(&[], block, 4).unwrap(), 0);
    }

    #[test]
    fn a_checksum_is_the_sum_of_its_parts() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let block = 96;
        let whole = checksum(&data, block, 1).unwrap();
        for cut in [block, 5 * block, 50 * block, 104 * block] {
            let first = checksum_from(&data[..cut], block, 0, 2).unwrap();
            let rest = checksum_from(&data[cut..], block, (cut / block) as u64, 3).unwrap();
            assert_eq!(first.wrapping_add(rest), whole, "cut at {cut}");
        }
        // the block numbers count: the same bytes as other blocks give another sum
        assert_ne!(
            checksum_from(&data[block..], block, 0, 1).unwrap(),
            checksum_from(&data[block..], block, 1, 1).unwrap()
        );
    }

    #[test]
    fn a_shard_checksum_sees_a_flipped_data_byte() {
        let d = tmpdir("checksum");
        let data: Vec<u8> = (0..300 * 3 * 2).map(|i| (i % 251) as u8).collect();
        let path = write(&d, "s.npy", &npy_bytes("<f2", "(300, 3)", &data));
        let want = Shard::open(&path, None).unwrap().checksum(1).unwrap();
        assert_eq!(Shard::open(&path, None).unwrap().checksum(2).unwrap(), want);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 1000;
        bytes[at] ^= 0x10;
        let bad = write(&d, "bad.npy", &bytes);
        assert_ne!(Shard::open(&bad, None).unwrap().checksum(1).unwrap(), want);
        std::fs::remove_dir_all(d).unwrap();
    }
}
