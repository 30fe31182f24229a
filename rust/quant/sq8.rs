//! SQ8 codes: each row quantized with its own scale `s = max|x_i| / 127` to int8 codes `c`
//! (the quantizer of the exact search's int8 pass, stored), scanned with the VNNI kernel.
//!
//! A per-row scale adapts to every vector's range, unlike a per-dimension quantizer trained on
//! a sample, and keeps the codes in the layout the int8 kernel reads directly: panels of 32 rows
//! `[panel][d/4][32][4]`. The approximate score of query `q = t u + f` is `t s (u . c)`.

use std::path::Path;

use super::file::{CodesFile, CodesWriter, Header};
use super::{for_chunks, widen_rows, Candidates, Scan};
use crate::error::Result;
use crate::kernels::int8::{self, Int8Kernel, MR, NR};
use crate::kernels::Simd;
use crate::parallel::Control;
use crate::store::Database;

/// Rows scored together for all queries while their codes stay in L2.
const TILE_PANELS: usize = 4;

pub fn build(db: &Database, header: &Header, path: &Path, threads: usize, control: &Control) -> Result<()> {
    let dim = db.dim;
    let steps = int8::d4(dim);
    let panel_bytes = steps * NR * 4;
    let writer = CodesWriter::create(path, header)?;
    for_chunks(db.rows, threads, control, |lo, hi| {
        let rows = hi - lo;
        let padded = rows.div_ceil(NR) * NR;
        let mut codes = vec![0u8; padded / NR * panel_bytes];
        let (mut scale, mut offset) = (vec![0f32; rows], vec![0i32; rows]);
        let (mut widened, mut row_codes) = (Vec::new(), vec![0i8; steps * 4]);
        widen_rows(db, lo..hi, &mut widened);
        for (r, row) in widened.chunks_exact(dim).enumerate() {
            row_codes.fill(0);
            // a row holding NaN or Inf gets scale 0: it scores 0 here and exactly in rescoring
            if let Some((s, sum)) = int8::encode_row(row, &mut row_codes[..dim]) {
                scale[r] = s;
                offset[r] = 128 * sum;
            }
            let (p, lane) = (r / NR, r % NR);
            let panel = &mut codes[p * panel_bytes..(p + 1) * panel_bytes];
            for (t, quad) in row_codes.chunks_exact(4).enumerate() {
                for (l, &c) in quad.iter().enumerate() {
                    panel[(t * NR + lane) * 4 + l] = c as u8;
                }
            }
        }
        writer.write(0, lo / NR * panel_bytes, &codes)?;
        writer.write(
            1,
            lo * 4,
            &scale.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
        )?;
        writer.write(
            2,
            lo * 4,
            &offset.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
        )
    })?;
    writer.finish(threads)
}

pub struct Sq8Scan<'a> {
    codes: &'a [u8],
    scale: &'a [f32],
    offset: &'a [i32],
    dim: usize,
    queries: int8::Queries,
    nq: usize,
    kernel: Int8Kernel,
}

impl<'a> Sq8Scan<'a> {
    pub fn new(file: &'a CodesFile, queries: &[f32], nq: usize) -> Sq8Scan<'a> {
        let dim = file.header.dim;
        Sq8Scan {
            codes: file.bytes(0),
            scale: file.words(1),
            offset: file.words(2),
            dim,
            queries: int8::quantize_queries(queries, nq, dim, MR),
            nq,
            kernel: Int8Kernel::detect(Simd::detect()).unwrap_or(Int8Kernel::Scalar),
        }
    }
}

impl Scan for Sq8Scan<'_> {
    fn scan(&self, lo: usize, hi: usize, found: &mut Candidates) {
        let steps = int8::d4(self.dim);
        let (panel_bytes, qblock_bytes) = (steps * NR * 4, steps * MR * 4);
        let mut raw = [0i32; MR * NR];
        let mut scores = [0f32; NR];
        let (first_panel, panels) = (lo / NR, (hi - lo).div_ceil(NR));
        for tile in (0..panels).step_by(TILE_PANELS) {
            for qb in 0..self.nq.div_ceil(MR) {
                let qcodes = &self.queries.codes[qb * qblock_bytes..(qb + 1) * qblock_bytes];
                for p in first_panel + tile..first_panel + (tile + TILE_PANELS).min(panels) {
                    let pcodes = &self.codes[p * panel_bytes..(p + 1) * panel_bytes];
                    let pcodes = as_i8(pcodes);
                    self.kernel.block(qcodes, pcodes, steps, &mut raw, NR);
                    let r0 = p * NR;
                    let n = NR.min(hi - r0);
                    for q in qb * MR..((qb + 1) * MR).min(self.nq) {
                        let (i, t) = (q - qb * MR, self.queries.scale[q]);
                        for j in 0..n {
                            scores[j] = (raw[i * NR + j] - self.offset[r0 + j]) as f32 * (t * self.scale[r0 + j]);
                        }
                        found.offer(q, &scores[..n], r0);
                    }
                }
            }
        }
    }
}

/// Bytes as the int8 values they store.
fn as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: u8 and i8 have the same size and alignment and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<i8>(), b.len()) }
}
