//! The codes file: a fixed 256-byte header, then the sections of one code kind, memory-mapped.
//!
//! Header (little-endian): magic `ILIASCOD`, version u32, kind u32 (1 = SQ8, 2 = PQ, 4 = progressive), dim u64,
//! rows u64, subquantizers u32, bits per code u32, then the store fingerprint (u32 length and up
//! to 128 bytes of text), then from byte 176 one u64 checksum per section (version 2: the
//! store's fast hash, `store::checksum`, over blocks of 1 MiB). The sections follow in a fixed
//! order whose sizes follow from the header, so a file of any other size is truncated or
//! foreign and is refused before mapping; [`CodesFile::verify`] compares the checksums, on
//! several threads, before a search uses the codes (a damaged codes body otherwise gives
//! plausible scores and a recall near 0). Open-time verification was chosen over hashing
//! during the scan: the scan of one chunk touches rows of several sections in ways that differ
//! per kind, while a whole-file pass from the page cache costs a few percent of an sq8 search
//! (README, "Quantized search").
//! Files are written beside their final name and renamed into place once complete and synced:
//! a reader never sees a half-written file.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"ILIASCOD";
pub const VERSION: u32 = 2;
/// The kind code of progressive codes (3 was their first layout, with every stage in panels).
const PROGRESSIVE: u32 = 4;
/// Where the section checksums start in the header, and the bytes of one checksum block.
const CHECKSUMS_AT: usize = 176;
const MAX_SECTIONS: usize = 4;
pub const SECTION_BLOCK: usize = 1 << 20;
pub const HEADER_BYTES: usize = 256;
const MAX_FINGERPRINT: usize = 128;

/// What kind of codes a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One int8 code per dimension with a per-row scale.
    Sq8,
    /// `m` subquantizers of `2^bits` centroids each (bits: 8, or 4 for fast-scan).
    Pq { m: usize, bits: u32 },
    /// Rotated int8 codes in `stages` dimension blocks (the first `depth` dimensions) of rows
    /// numbered per shard in `blocks` blocks of 128 (`progressive`).
    Progressive { stages: usize, depth: usize, blocks: usize },
}

impl Kind {
    pub fn name(self) -> String {
        match self {
            Kind::Sq8 => "sq8".into(),
            Kind::Pq { m, bits: 8 } => format!("pq{m}"),
            Kind::Pq { m, bits } => format!("pq{m}x{bits}"),
            Kind::Progressive { .. } => "progressive".into(),
        }
    }

    /// Parses `sq8`, `pq<M>` or `pq<M>x4`.
    pub fn parse(text: &str) -> Result<Kind> {
        let pq = || {
            let rest = text.strip_prefix("pq")?;
            let (m, bits) = match rest.split_once('x') {
                Some((m, b)) => (m.parse().ok()?, b.parse().ok()?),
                None => (rest.parse().ok()?, 8),
            };
            (m > 0 && (bits == 8 || bits == 4)).then_some(Kind::Pq { m, bits })
        };
        match text {
            "sq8" => Ok(Kind::Sq8),
            _ => pq().ok_or_else(|| {
                Error::invalid(format!(
                    "codes: unknown kind {text:?} (expected sq8, pq<M> or pq<M>x4, e.g. pq96x4)"
                ))
            }),
        }
    }
}

/// Everything the header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub dim: usize,
    pub rows: usize,
    /// Identifies the store the codes were built from (its content, not its path).
    pub fingerprint: String,
    /// One checksum per section (`store::checksum` over blocks of [`SECTION_BLOCK`] bytes),
    /// filled in by [`CodesWriter::finish`]; empty before.
    pub checksums: Vec<u64>,
}

impl Header {
    /// Sizes in bytes of the sections that follow the header, in file order.
    pub fn sections(&self) -> Option<Vec<usize>> {
        let padded = self.rows.checked_next_multiple_of(32)?;
        match self.kind {
            // codes in panels of 32 rows `[panel][d/4][32][4]`, then scales, then offsets
            Kind::Sq8 => Some(vec![
                padded.checked_mul(self.dim.div_ceil(4) * 4)?,
                padded * 4,
                padded * 4,
            ]),
            // centroids `[m][2^bits][dim/m]` float32, then the codes
            Kind::Pq { m, bits } => {
                let centroids = m.checked_mul(1 << bits)?.checked_mul(self.dim / m)?.checked_mul(4)?;
                let codes = match bits {
                    8 => self.rows.checked_mul(m)?,
                    // blocks of 32 rows: per subquantizer 16 bytes of two nibbles
                    _ => (padded / 32).checked_mul(m.checked_next_multiple_of(2)? * 16)?,
                };
                Some(vec![centroids, codes])
            }
            Kind::Progressive { stages, depth, blocks } => {
                super::progressive::sections(self.dim, stages, depth, blocks)
            }
        }
    }

    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        let (kind, m, bits, blocks) = match self.kind {
            Kind::Sq8 => (1u32, 0u32, 8u32, 0u32),
            Kind::Pq { m, bits } => (2, m as u32, bits, 0),
            Kind::Progressive { stages, depth, blocks } => (PROGRESSIVE, stages as u32, depth as u32, blocks as u32),
        };
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&kind.to_le_bytes());
        h[16..24].copy_from_slice(&(self.dim as u64).to_le_bytes());
        h[24..32].copy_from_slice(&(self.rows as u64).to_le_bytes());
        h[32..36].copy_from_slice(&m.to_le_bytes());
        h[36..40].copy_from_slice(&bits.to_le_bytes());
        let fp = self.fingerprint.as_bytes();
        h[40..44].copy_from_slice(&(fp.len() as u32).to_le_bytes());
        h[44..44 + fp.len()].copy_from_slice(fp);
        h[172..176].copy_from_slice(&blocks.to_le_bytes());
        for (i, c) in self.checksums.iter().enumerate().take(MAX_SECTIONS) {
            h[CHECKSUMS_AT + 8 * i..CHECKSUMS_AT + 8 * i + 8].copy_from_slice(&c.to_le_bytes());
        }
        h
    }

    fn decode(path: &Path, h: &[u8]) -> Result<Header> {
        let bad = |m: String| Error::format(path, m);
        if h.len() < HEADER_BYTES || &h[..8] != MAGIC {
            return Err(bad("not an ilias codes file (missing the ILIASCOD magic)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap()) as usize;
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "codes format version {version} is not supported (this is version {VERSION}): rebuild with `ilias index build`"
            )));
        }
        let (dim, rows, m, bits) = (u64_at(16), u64_at(24), u32_at(32) as usize, u32_at(36));
        let kind = match u32_at(12) {
            1 => Kind::Sq8,
            2 if m > 0 && (bits == 8 || bits == 4) && dim % m == 0 => Kind::Pq { m, bits },
            3 => {
                return Err(bad(
                    "progressive codes of an older layout: rebuild them with `ilias index build --codes progressive`"
                        .into(),
                ))
            }
            PROGRESSIVE if (1..=super::progressive::MAX_STAGES).contains(&m) && bits > 0 && bits as usize <= dim => {
                Kind::Progressive {
                    stages: m,
                    depth: bits as usize,
                    blocks: u32_at(172) as usize,
                }
            }
            k => return Err(bad(format!("unknown code kind {k} (m = {m}, bits = {bits})"))),
        };
        let len = u32_at(40) as usize;
        if dim == 0 || len > MAX_FINGERPRINT {
            return Err(bad("corrupt header".into()));
        }
        let fingerprint = String::from_utf8(h[44..44 + len].to_vec()).map_err(|_| bad("corrupt fingerprint".into()))?;
        let mut header = Header {
            kind,
            dim,
            rows,
            fingerprint,
            checksums: Vec::new(),
        };
        let sections = header.sections().map_or(0, |s| s.len()).min(MAX_SECTIONS);
        header.checksums = (0..sections).map(|i| u64_at(CHECKSUMS_AT + 8 * i) as u64).collect();
        Ok(header)
    }
}

/// A codes file opened for reading: its header and its sections, validated and mapped.
pub struct CodesFile {
    pub path: PathBuf,
    pub header: Header,
    map: Mmap,
    bounds: Vec<(usize, usize)>,
}

impl CodesFile {
    pub fn open(path: &Path) -> Result<CodesFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        let mut head = vec![0u8; HEADER_BYTES.min(len)];
        file.read_exact_at(&mut head, 0).map_err(|e| Error::io(path, e))?;
        if len < HEADER_BYTES {
            return Err(Error::format(
                path,
                format!("{len} bytes: truncated (the header alone is {HEADER_BYTES})"),
            ));
        }
        let header = Header::decode(path, &head)?;
        let sections = header
            .sections()
            .ok_or_else(|| Error::format(path, "impossible sizes in the header"))?;
        let expected = HEADER_BYTES + sections.iter().sum::<usize>();
        if len != expected {
            return Err(Error::format(
                path,
                format!(
                    "file size {len} bytes disagrees with its header ({} of {} rows x {} dims needs {expected}): truncated or corrupt",
                    header.kind.name(),
                    header.rows,
                    header.dim
                ),
            ));
        }
        // SAFETY: read-only mapping of a file that writers only ever replace by renaming.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut bounds = Vec::new();
        let mut at = HEADER_BYTES;
        for s in sections {
            bounds.push((at, at + s));
            at += s;
        }
        Ok(CodesFile {
            path: path.to_path_buf(),
            header,
            map,
            bounds,
        })
    }

    /// Checks every section against its checksum in the header, on `threads` threads (0: all
    /// cores): a damaged file is an error naming it and the section. It reads a window at a time
    /// and drops each from the resident set once read, so the memory of checking codes larger
    /// than memory stays bounded.
    pub fn verify(&self, threads: usize) -> Result<()> {
        for (i, &want) in self.header.checksums.iter().enumerate() {
            let (a, b) = self.bounds[i];
            if section_checksum(&self.map, a, b - a, threads)? != want {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "checksum mismatch in section {i} of {}: the file changed since it was built; rebuild with `ilias index build`",
                        self.bounds.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Drops the pages of bytes `lo..hi` of section `i` from this process's resident set (they
    /// stay in the page cache): a pass over codes larger than memory keeps its memory bounded.
    pub fn release(&self, i: usize, lo: usize, hi: usize) {
        let (a, b) = self.bounds[i];
        crate::store::drop_pages(&self.map, a + lo, (a + hi).min(b));
    }

    /// Section `i` as bytes.
    pub fn bytes(&self, i: usize) -> &[u8] {
        let (a, b) = self.bounds[i];
        &self.map[a..b]
    }

    /// Section `i` as 4-byte values (every such section starts 4-byte aligned).
    pub fn words<T: Word>(&self, i: usize) -> &[T] {
        let bytes = self.bytes(i);
        // SAFETY: `T` is a plain 4-byte number type valid for any bits; the start is aligned
        // (page-aligned mapping, header and preceding sections multiples of 4: asserted).
        let (head, words, tail) = unsafe { bytes.align_to::<T>() };
        assert!(head.is_empty() && tail.is_empty(), "misaligned section {i}");
        words
    }
}

/// Element types a section can be read as.
pub trait Word: Copy {}
impl Word for f32 {}
impl Word for i32 {}

/// Writes a codes file: sections are filled at their offsets (by several threads if need be),
/// then `finish` syncs and renames it into place. Dropped unfinished, it removes its partial file.
pub struct CodesWriter {
    file: File,
    partial: PathBuf,
    path: PathBuf,
    offsets: Vec<usize>,
    header: Header,
    done: bool,
}

impl CodesWriter {
    pub fn create(path: &Path, header: &Header) -> Result<CodesWriter> {
        let sections = header
            .sections()
            .ok_or_else(|| Error::invalid("codes: sizes overflow"))?;
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".partial");
        let partial = path.with_file_name(name);
        // readable too: `finish` maps it to checksum the sections
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| Error::io(&partial, e))?;
        let total = HEADER_BYTES + sections.iter().sum::<usize>();
        file.write_all(&header.encode()).map_err(|e| Error::io(&partial, e))?;
        file.set_len(total as u64).map_err(|e| Error::io(&partial, e))?;
        let mut offsets = Vec::new();
        let mut at = HEADER_BYTES;
        for s in sections {
            offsets.push(at);
            at += s;
        }
        Ok(CodesWriter {
            file,
            partial,
            path: path.to_path_buf(),
            offsets,
            header: header.clone(),
            done: false,
        })
    }

    /// Writes `bytes` at byte `offset` of section `i`.
    pub fn write(&self, i: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, (self.offsets[i] + offset) as u64)
            .map_err(|e| Error::io(&self.partial, e))
    }

    /// Checksums the sections (on `threads` threads: the file was just written, it is in the
    /// page cache), writes them into the header, syncs and renames the file into place.
    pub fn finish(mut self, threads: usize) -> Result<()> {
        // SAFETY: a read-only mapping of the partial file that only this writer writes, and
        // it has finished writing the sections.
        let map = unsafe { Mmap::map(&self.file) }.map_err(|e| Error::io(&self.partial, e))?;
        let mut header = self.header.clone();
        header.checksums = self
            .offsets
            .iter()
            .zip(header.sections().unwrap_or_default())
            .map(|(&at, len)| section_checksum(&map, at, len, threads))
            .collect::<Result<_>>()?;
        drop(map);
        self.file
            .write_all_at(&header.encode(), 0)
            .map_err(|e| Error::io(&self.partial, e))?;
        self.file.sync_all().map_err(|e| Error::io(&self.partial, e))?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        self.done = true;
        Ok(())
    }
}

/// The checksum of bytes `at..at + len` of `map`, a window at a time, each window dropped from
/// the resident set once hashed: a pass over codes larger than memory stays bounded.
fn section_checksum(map: &Mmap, at: usize, len: usize, threads: usize) -> Result<u64> {
    const WINDOW: usize = 64 * SECTION_BLOCK;
    let mut sum = 0u64;
    for lo in (0..len).step_by(WINDOW) {
        let hi = (lo + WINDOW).min(len);
        let first = (lo / SECTION_BLOCK) as u64;
        sum = sum.wrapping_add(crate::store::checksum_from(
            &map[at + lo..at + hi],
            SECTION_BLOCK,
            first,
            threads,
        )?);
        crate::store::drop_pages(map, at + lo, at + hi);
    }
    Ok(sum)
}

impl Drop for CodesWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_name() {
        for t in ["sq8", "pq96", "pq192x4"] {
            assert_eq!(Kind::parse(t).unwrap().name(), t);
        }
        for t in ["sq4", "pq", "pq0", "pq8x3", "pqx4", "pq12x"] {
            assert!(Kind::parse(t).is_err(), "{t}");
        }
    }

    #[test]
    fn round_trip_and_truncation() {
        let dir = std::env::temp_dir().join(format!("ilias-codes-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.codes");
        let header = Header {
            kind: Kind::Pq { m: 4, bits: 4 },
            dim: 8,
            rows: 40,
            fingerprint: "abc123".into(),
            checksums: Vec::new(),
        };
        let w = CodesWriter::create(&path, &header).unwrap();
        w.write(1, 0, &[7u8; 16]).unwrap();
        w.finish(2).unwrap();
        let c = CodesFile::open(&path).unwrap();
        assert_eq!((&c.header.kind, c.header.dim, c.header.rows), (&header.kind, 8, 40));
        assert_eq!(c.header.fingerprint, header.fingerprint);
        assert_eq!(c.header.checksums.len(), 2);
        assert_eq!(c.bytes(1)[..16], [7u8; 16]);
        c.verify(1).unwrap();
        let good = std::fs::read(&path).unwrap();
        // a damaged byte in either section is seen and named
        for at in [HEADER_BYTES + 5, good.len() - 3] {
            let mut bad = good.clone();
            bad[at] ^= 4;
            std::fs::write(&path, &bad).unwrap();
            let e = CodesFile::open(&path).unwrap().verify(2).unwrap_err().to_string();
            assert!(
                e.contains("c.codes") && e.contains("checksum mismatch in section"),
                "{e}"
            );
        }
        // version 1 files (no checksums) and progressive codes of the first layout (kind 3) are
        // refused with the way out
        for (at, value, says) in [
            (8, 1u32, "version 1 is not supported"),
            (12, 3, "older layout: rebuild them with `ilias index build --codes"),
        ] {
            let mut old = good.clone();
            old[at..at + 4].copy_from_slice(&value.to_le_bytes());
            std::fs::write(&path, &old).unwrap();
            let e = CodesFile::open(&path).err().unwrap().to_string();
            assert!(e.contains(says) && e.contains("ilias index build"), "{e}");
        }
        std::fs::write(&path, &good).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let e = CodesFile::open(&path).err().unwrap().to_string();
        assert!(e.contains("truncated") && e.contains("c.codes"), "{e}");
        std::fs::write(&path, b"hello").unwrap();
        assert!(CodesFile::open(&path).err().unwrap().to_string().contains("truncated"));
        // an unfinished writer leaves nothing behind
        drop(CodesWriter::create(&dir.join("d.codes"), &header).unwrap());
        assert!(!dir.join("d.codes.partial").exists() && !dir.join("d.codes").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
