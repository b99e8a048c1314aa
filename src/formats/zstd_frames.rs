//! A file as concatenated zstd frames (a valid zstd stream), one per content-defined chunk: the
//! input is cut into chunks by FastCDC, and each chunk is compressed into its own frame (with
//! checksum and content size) by a pool of worker threads, or copied from an earlier file (see
//! [`reuse`](super::reuse)). Chunk boundaries follow the content, so bytes added or changed in
//! the input change only the frames around them. The output depends only on the input and the
//! level and chunk sizes: not on the number of workers, nor on what the earlier files held.

use super::reuse::{Index, Reuse, Stored};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

/// How the frames are written.
#[derive(Debug, Clone)]
pub struct Options {
    /// zstd level of every frame.
    pub level: i32,
    /// FastCDC chunk sizes: minimum, average, maximum.
    pub chunks: (u32, u32, u32),
    /// Compression threads (at least one; the output does not depend on it).
    pub workers: usize,
}

/// Settings that decide the frames' bytes: indexes written with others are not used.
pub fn reuse_params(opts: &Options) -> String {
    let (min, avg, max) = opts.chunks;
    format!(
        "tar.zst fastcdc={min}/{avg}/{max} zstd_level={} checksum",
        opts.level
    )
}

/// Writes `out`, the frames of the file at `input`, copying the earlier frames `reuse` has.
/// Returns the index of the frames written.
pub fn write(input: &Path, out: &Path, opts: &Options, reuse: &mut Reuse) -> Result<Index> {
    let file = fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut index = Index::new(reuse_params(opts));
    let (min, avg, max) = opts.chunks;
    let mut chunks =
        fastcdc::v2020::StreamCDC::new(BufReader::with_capacity(1 << 20, file), min, avg, max);
    let workers = opts.workers.max(1);
    // A pipeline: this thread writes frames in order while a reader thread cuts chunks and
    // `workers` threads hash and compress them (or copy earlier frames).
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(4 * workers);
    let job_rx = std::sync::Mutex::new(job_rx);
    let (res_tx, res_rx) =
        std::sync::mpsc::sync_channel::<Result<(usize, [u8; 32], Stored)>>(4 * workers);
    let reuse = std::sync::Mutex::new(reuse);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
    let mut pos = 0u64;
    std::thread::scope(|s| -> Result<()> {
        let reader_res = res_tx.clone();
        s.spawn(move || {
            let mut n = 0usize;
            for c in chunks.by_ref() {
                if stopped() {
                    return;
                }
                match c {
                    Ok(c) => {
                        if job_tx.send((n, c.data)).is_err() {
                            return;
                        }
                        n += 1;
                    }
                    Err(e) => {
                        let _ = reader_res
                            .send(Err(anyhow::anyhow!("reading {}: {e}", input.display())));
                        return;
                    }
                }
            }
            if n == 0 {
                let _ = job_tx.send((0, Vec::new())); // an empty input is still one (empty) frame
            }
        });
        for _ in 0..workers {
            let res_tx = res_tx.clone();
            let (job_rx, reuse) = (&job_rx, &reuse);
            s.spawn(move || {
                let mut c = match zstd::bulk::Compressor::new(opts.level).and_then(|mut c| {
                    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                    c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))?;
                    Ok(c)
                }) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = res_tx.send(Err(e.into()));
                        return;
                    }
                };
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    let job = job_rx.lock().expect("job queue").recv();
                    let Ok((i, data)) = job else { return };
                    if stopped() {
                        continue; // drain the queue so the reader can finish
                    }
                    let key = *blake3::hash(&data).as_bytes();
                    let earlier = reuse.lock().expect("reuse").get(&key);
                    let frame = match earlier {
                        Some(st) => Ok(st),
                        None => {
                            // One output buffer per worker (no fresh 4 MiB allocation per frame).
                            buf.clear();
                            buf.reserve(zstd::zstd_safe::compress_bound(data.len()));
                            c.compress_to_buffer(&data, &mut buf)
                                .map(|_| Stored::new(buf.clone(), 0))
                                .map_err(anyhow::Error::from)
                        }
                    };
                    if res_tx.send(frame.map(|f| (i, key, f))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(res_tx);
        let mut ahead: BTreeMap<usize, ([u8; 32], Stored)> = BTreeMap::new();
        let mut next = 0usize;
        let mut failed: Option<anyhow::Error> = None;
        for r in res_rx.iter() {
            if failed.is_some() {
                continue;
            }
            let step = r.and_then(|(i, k, f)| {
                ahead.insert(i, (k, f));
                while let Some((k, f)) = ahead.remove(&next) {
                    w.write_all(&f.bytes)
                        .with_context(|| format!("writing {}", out.display()))?;
                    index.push(k, &f, pos);
                    pos += f.bytes.len() as u64;
                    next += 1;
                }
                Ok(())
            });
            if let Err(e) = step {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                failed = Some(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })?;
    w.flush()
        .with_context(|| format!("writing {}", out.display()))?;
    w.get_ref()
        .sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    index.image_size = pos;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kiln's settings for rootfs.tar.zst, with `workers` threads.
    fn opts(workers: usize) -> Options {
        Options {
            level: 3,
            chunks: (1 << 20, 4 << 20, 16 << 20),
            workers,
        }
    }

    /// The frames must not depend on the number of workers (rootfs.tar.zst on the machine's
    /// core count).
    #[test]
    fn zstd_output_does_not_depend_on_worker_count() {
        let d = tempfile::tempdir().unwrap();
        let input = d.path().join("in.tar");
        // 24 MiB of compressible, non-repeating data: several zstd jobs.
        let mut data = Vec::with_capacity(24 << 20);
        let mut x: u32 = 1;
        while data.len() < 24 << 20 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            data.extend_from_slice(format!("line {} {}\n", x >> 16, x % 97).as_bytes());
        }
        fs::write(&input, &data).unwrap();
        let mut outs = Vec::new();
        for w in [1, 2, 3] {
            let o = d.path().join(format!("{w}.zst"));
            write(&input, &o, &opts(w), &mut Reuse::default()).unwrap();
            outs.push(fs::read(&o).unwrap());
        }
        assert_eq!(outs[0], outs[1]);
        assert_eq!(outs[0], outs[2]);
        assert_eq!(zstd::decode_all(outs[0].as_slice()).unwrap(), data);
    }

    /// Frames of an earlier file are copied, the result is the same bytes, and an
    /// insertion in the middle only costs the frames around it.
    #[test]
    fn zstd_frames_reused_byte_identical() {
        let d = tempfile::tempdir().unwrap();
        let mut data = Vec::with_capacity(48 << 20);
        let mut x: u32 = 7;
        while data.len() < 48 << 20 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            data.extend_from_slice(format!("entry {} {}\n", x >> 12, x % 1009).as_bytes());
        }
        let input = d.path().join("in.tar");
        fs::write(&input, &data).unwrap();
        let idx = d.path().join("idx");
        let a = d.path().join("a.zst");
        let index = write(&input, &a, &opts(2), &mut Reuse::default()).unwrap();
        let frames = index_len(&index);
        assert!(frames >= 6, "{frames} frames");
        index.save(&a, &idx.join("a.json")).unwrap();

        let b = d.path().join("b.zst");
        let mut r = Reuse::load(&idx, &reuse_params(&opts(2)));
        write(&input, &b, &opts(2), &mut r).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert_eq!(r.hits(), frames as u64);

        let mut edited = data.clone();
        edited.splice(
            20 << 20..20 << 20,
            b"a new file in the middle".iter().copied(),
        );
        fs::write(&input, &edited).unwrap();
        let c = d.path().join("c.zst");
        let mut r = Reuse::load(&idx, &reuse_params(&opts(2)));
        let ci = write(&input, &c, &opts(2), &mut r).unwrap();
        assert!(
            index_len(&ci) as u64 - r.hits() <= 2,
            "{} of {} frames compressed again",
            index_len(&ci) as u64 - r.hits(),
            index_len(&ci)
        );
        let e = d.path().join("e.zst");
        write(&input, &e, &opts(1), &mut Reuse::default()).unwrap();
        assert_eq!(fs::read(&c).unwrap(), fs::read(&e).unwrap());
        assert_eq!(
            zstd::decode_all(fs::read(&c).unwrap().as_slice()).unwrap(),
            edited
        );
    }

    fn index_len(i: &Index) -> usize {
        serde_json::to_value(i).unwrap()["pieces"]
            .as_array()
            .unwrap()
            .len()
    }
}
