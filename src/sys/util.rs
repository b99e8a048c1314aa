//! Small helpers shared by the stages: hashing and atomic file writes.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

/// Hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex sha256 and size of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// A small input file kiln refuses before reading it (not a regular file, too large). The CLI
/// maps it to exit status 2, like every other bad-input error.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {problem}", path.display())]
pub struct InputFileError {
    pub what: String,
    pub path: std::path::PathBuf,
    pub problem: String,
}

/// Reads a small input file whole: it must be a regular file (after symlinks) no larger than
/// `max` bytes. Guards every read of a key, certificate, checksum list, signature or recipe
/// against `/dev/zero`, FIFOs and multi-gigabyte files, which would otherwise be read until
/// memory runs out. `what` names the input in the error ("signing key", "SHA256SUMS").
pub fn read_small(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    let refuse = |problem: String| InputFileError {
        what: what.to_string(),
        path: path.to_path_buf(),
        problem,
    };
    // Checked before open: opening a FIFO for reading blocks until a writer comes.
    let meta = fs::metadata(path).with_context(|| format!("opening {what} {}", path.display()))?;
    if !meta.is_file() {
        return Err(refuse(format!(
            "is not a regular file (it is a {}); point kiln at a regular file",
            file_kind(&meta)
        ))
        .into());
    }
    if meta.len() > max {
        return Err(refuse(format!(
            "is {} bytes, more than the {max} bytes such a file can be; is it the right file?",
            meta.len()
        ))
        .into());
    }
    let f = File::open(path).with_context(|| format!("opening {what} {}", path.display()))?;
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // `take` holds even if the path was swapped or the file grew after the metadata call.
    f.take(max + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    if buf.len() as u64 > max {
        return Err(refuse(format!("grew past {max} bytes while being read")).into());
    }
    Ok(buf)
}

/// [`read_small`] for text: the bytes must be UTF-8.
pub fn read_small_string(path: &Path, max: u64, what: &str) -> Result<String> {
    let bytes = read_small(path, max, what)?;
    String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{what} {} is not UTF-8 text", path.display()))
}

/// Whether `e` (from [`read_small`] or any I/O) says the file does not exist.
pub fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::NotFound)
    })
}

/// A short name for a file's type, for error messages.
pub fn file_kind(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// An output path kiln refuses to write (a directory, a block device, a socket): writing it
/// atomically would replace it with a regular file. The CLI maps it to exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{}: is a {kind}; {fix}", path.display())]
pub struct OutputFileError {
    pub path: std::path::PathBuf,
    pub kind: &'static str,
    pub fix: &'static str,
}

/// Refuses to replace an existing `path` that is neither a regular file nor a symlink (a
/// symlink itself is replaced, its target left alone).
fn check_replaceable(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.is_file() && !m.file_type().is_symlink() => Err(OutputFileError {
            path: path.to_path_buf(),
            kind: file_kind(&m),
            fix: "kiln writes files by replacing them atomically and will not replace this; \
                  give a file path",
        }
        .into()),
        _ => Ok(()),
    }
}

/// Writes a user-named output (`-o/--out`): a missing path or a regular file is written
/// atomically (as [`write_atomic_mode`]); a character device or a named pipe (`/dev/stdout`,
/// `/dev/null`, `>(…)` in bash) is written in place, as the shell's `>` would, and keeps being
/// what it is; anything else (a directory, a block device, a socket) is an
/// [`OutputFileError`]. Symlinks are followed.
pub fn write_output(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match fs::metadata(path) {
        Ok(m) if m.file_type().is_char_device() || m.file_type().is_fifo() => {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {} for writing", path.display()))?;
            f.write_all(bytes)
                .and_then(|_| f.flush())
                .with_context(|| format!("writing {}", path.display()))
        }
        Ok(m) if !m.is_file() => Err(OutputFileError {
            path: path.to_path_buf(),
            kind: file_kind(&m),
            fix: "give a file path (it is written atomically), a character device or a pipe \
                  such as /dev/stdout, or leave the option out to print",
        }
        .into()),
        _ => write_atomic_mode(path, bytes, mode),
    }
}

/// Writes `bytes` to `path` through a temp file in the same directory, fsynced, then renamed;
/// the file ends up 0644.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// Like [`write_atomic`] with an explicit `mode`. The temp file is 0600 from creation until the
/// content is written and the final mode set, so private content is never readable by others.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    check_replaceable(path)?;
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    // Explicit chmod: the create mode is subject to the umask.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// fsyncs a file or directory by path.
pub fn sync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// Copies `src` to `dst` (created or truncated), leaving holes where `src` has all-zero
/// 1 MiB blocks, so sparse disk images stay sparse. Returns the size.
pub fn copy_sparse(src: &Path, dst: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut r = fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let len = r.metadata()?.len();
    let mut w = fs::File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..n])
            .with_context(|| format!("reading {}", src.display()))?;
        if buf[..n].iter().all(|b| *b == 0) {
            w.seek(SeekFrom::Current(n as i64))?;
        } else {
            w.write_all(&buf[..n])
                .with_context(|| format!("writing {}", dst.display()))?;
        }
        pos += n as u64;
    }
    w.set_len(len)
        .with_context(|| format!("sizing {}", dst.display()))?;
    Ok(len)
}

/// Points the symlink `link` at `target`, atomically: a temp link beside it (`.tmp-link-*`) is
/// renamed over it, so readers never see it missing.
pub fn symlink_atomic(target: &str, link: &Path) -> Result<()> {
    let dir = link.parent().context("symlink has no parent directory")?;
    let name = link.file_name().context("symlink has no name")?;
    let tmp = dir.join(format!(".tmp-link-{}", name.to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    fs::rename(&tmp, link).with_context(|| format!("updating {}", link.display()))?;
    sync_path(dir)
}

/// Environment variable of the fault-test hook (see [`test_pause`]).
pub const PAUSE_ENV: &str = "KILN_TEST_PAUSE_AT";

/// Fault-test hook: when `KILN_TEST_PAUSE_AT` equals `point` (a stage name such as `compose`,
/// or `sign`, `publish`, `latest`, `nodes`), prints `kiln: paused at <point>` on stderr and
/// sleeps until killed, so a test can SIGKILL kiln at a known point of a build. Unset, it does
/// nothing.
pub fn test_pause(point: &str) {
    if std::env::var_os(PAUSE_ENV).is_some_and(|v| v == point) {
        eprintln!("kiln: paused at {point} ({PAUSE_ENV})");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Whether an I/O error in `err`'s chain (or a tool's stderr quoted in it) says the disk is full.
pub fn is_disk_full(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|e| e.raw_os_error() == Some(libc::ENOSPC))
            || e.to_string().contains("No space left on device")
    })
}

/// Human-readable byte count (MB/GB, decimal, one decimal place).
pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.1} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1} MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} kB", f / 1e3)
    } else {
        format!("{n} B")
    }
}

/// Takes the exclusive lock on `<dir>/.kiln.lock` (creating both), waiting while another
/// process holds it; `waiting` is logged once if it has to wait. The lock lasts as long as the
/// returned file.
pub fn lock_dir(dir: &Path, waiting: &str) -> Result<fs::File> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    lock_file(&dir.join(".kiln.lock"), waiting)
}

/// Takes an exclusive lock on the file `p` (created if absent), waiting, with a message, while
/// another process holds it. Released when the returned file is dropped.
pub fn lock_file(p: &Path, waiting: &str) -> Result<fs::File> {
    let f = open_lock(p)?;
    if f.try_lock().is_err() {
        tracing::warn!("waiting for {} ({waiting})", p.display());
        f.lock()
            .with_context(|| format!("locking {}", p.display()))?;
    }
    Ok(f)
}

/// Takes the exclusive lock on the file `p` (created if absent) if no other process holds it;
/// `None` when one does.
pub fn try_lock_file(p: &Path) -> Result<Option<fs::File>> {
    let f = open_lock(p)?;
    Ok(f.try_lock().is_ok().then_some(f))
}

fn open_lock(p: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .with_context(|| format!("opening {}", p.display()))
}

/// Single-quotes `s` for POSIX shells.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.,:/=@%+".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The number of CPUs this process may use (at least 1).
pub fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Maps `f` over `items` on up to `threads` threads, each with its own state made by `init`
/// (a compressor, a buffer); the threads take the items in order from a shared counter, so
/// the slow ones do not hold up the rest. The results are in the order of `items`, whatever the
/// threads do. A panic in `f` is raised again in the caller.
pub fn par_map<T, S, R>(
    items: &[T],
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &T) -> R + Sync,
) -> Vec<R>
where
    T: Sync,
    R: Send,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let threads = threads.clamp(1, items.len().max(1));
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut state = init();
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(&mut state, item)));
                    }
                    mine
                })
            })
            .collect();
        let mut all = Vec::with_capacity(items.len());
        for h in handles {
            match h.join() {
                Ok(v) => all.extend(v),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all
    });
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_nice() -> i32 {
        crate::sys::os::thread_nice()
    }

    #[test]
    fn read_small_refuses_devices_and_big_files() {
        let e = read_small(Path::new("/dev/zero"), 1024, "signing key").unwrap_err();
        assert!(format!("{e:#}").contains("character device"), "{e:#}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, vec![b'a'; 2000]).unwrap();
        let e = read_small(&p, 1024, "SHA256SUMS").unwrap_err();
        assert!(
            format!("{e:#}").contains("more than the 1024 bytes"),
            "{e:#}"
        );
        assert_eq!(read_small(&p, 2000, "x").unwrap().len(), 2000);
        let e = read_small(dir.path(), 1024, "x").unwrap_err();
        assert!(format!("{e:#}").contains("directory"), "{e:#}");
    }

    #[test]
    fn outputs_are_never_replaced_when_not_regular_files() {
        use std::os::unix::fs::FileTypeExt;
        let d = tempfile::tempdir().unwrap();
        // A directory (and, with a socket, anything but a file or symlink) is not replaced.
        let sub = d.path().join("sub");
        fs::create_dir(&sub).unwrap();
        for w in [write_atomic(&sub, b"x"), write_output(&sub, b"x", 0o644)] {
            let e = w.unwrap_err();
            assert!(e.downcast_ref::<OutputFileError>().is_some(), "{e:#}");
        }
        assert!(sub.is_dir());
        let sock = d.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(write_atomic(&sock, b"x").is_err());
        assert!(fs::metadata(&sock).unwrap().file_type().is_socket());
        // A character device is written in place by write_output.
        write_output(Path::new("/dev/null"), b"x", 0o644).unwrap();
        assert!(fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
        // Regular files and new paths are written atomically with the mode.
        let f = d.path().join("f");
        write_output(&f, b"one", 0o600).unwrap();
        write_output(&f, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"two");
    }

    #[test]
    fn par_map_keeps_order_and_state_per_thread() {
        let items: Vec<u64> = (0..1000).collect();
        for threads in [0, 1, 3, 64] {
            // Each thread counts the items it took; the results stay in input order.
            let out = par_map(
                &items,
                threads,
                || 0u64,
                |seen, x| {
                    *seen += 1;
                    (*x * 2, *seen)
                },
            );
            assert_eq!(
                out.iter().map(|r| r.0).collect::<Vec<_>>(),
                items.iter().map(|x| x * 2).collect::<Vec<_>>()
            );
            let firsts = out.iter().filter(|r| r.1 == 1).count();
            assert!(
                firsts >= 1 && firsts <= threads.max(1),
                "{threads}: {firsts} thread states"
            );
        }
        assert!(par_map(&[] as &[u8], 4, || (), |_, x| *x).is_empty());
    }

    #[test]
    #[should_panic(expected = "item 7")]
    fn par_map_raises_a_panic_again() {
        let items: Vec<u32> = (0..20).collect();
        par_map(
            &items,
            2,
            || (),
            |_, x| {
                if *x == 7 {
                    panic!("item 7");
                }
                *x
            },
        );
    }

    #[test]
    fn priority_lowered_for_this_thread_only() {
        let before = thread_nice();
        let (inner, child) = std::thread::spawn(|| {
            crate::sys::os::lower_thread_priority(10);
            crate::sys::os::lower_thread_priority(5); // never raised back
            let child = std::thread::spawn(thread_nice).join().unwrap();
            (thread_nice(), child)
        })
        .join()
        .unwrap();
        assert_eq!(inner, before.max(10));
        assert_eq!(child, before.max(10), "threads it starts inherit it");
        assert_eq!(thread_nice(), before, "the calling thread is untouched");
    }
}
