//! Thin safe wrappers over the Linux calls kiln makes through libc: the crate's only `unsafe`.

#![allow(unsafe_code)]

use anyhow::{Context, Result};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Atomically swaps two paths (Linux `renameat2(RENAME_EXCHANGE)`).
pub fn rename_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them like open(2).
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The first IPv4 address of a network interface.
pub fn interface_ipv4(name: &str) -> Result<Ipv4Addr> {
    let mut found = None;
    // SAFETY: getifaddrs hands out a list that stays valid until freeifaddrs, which is
    // called once after the walk; every pointer is checked for null before it is read.
    unsafe {
        let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifap) != 0 {
            return Err(std::io::Error::last_os_error()).context("listing network interfaces");
        }
        let mut p = ifap;
        while !p.is_null() {
            let ifa = &*p;
            if !ifa.ifa_addr.is_null()
                && (*ifa.ifa_addr).sa_family as i32 == libc::AF_INET
                && std::ffi::CStr::from_ptr(ifa.ifa_name).to_str() == Ok(name)
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                found = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                break;
            }
            p = ifa.ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    found.with_context(|| {
        format!("network interface {name:?} has no IPv4 address (see `ip -4 addr`)")
    })
}

/// Free bytes on the file system holding `path` (statvfs), if it can be asked.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path; `st` is a plain C struct filled by statvfs.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Raises the calling thread's nice value to at least `nice` (Linux: per thread; the processes
/// and threads it starts inherit it). Lowering it again would need CAP_SYS_NICE, so it is never
/// lowered; a failure only costs scheduling order and is logged.
pub fn lower_thread_priority(nice: i32) {
    // SAFETY: plain syscalls on the calling thread's own id.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() == 0 && now >= nice {
            return;
        }
        if libc::setpriority(libc::PRIO_PROCESS, tid, nice) != 0 {
            tracing::debug!(err = %std::io::Error::last_os_error(), "setpriority");
        }
    }
}

/// The calling thread's nice value.
#[cfg(test)]
pub fn thread_nice() -> i32 {
    // SAFETY: plain syscall on the calling thread's own id.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
}

// BLKGETSIZE64 = _IOR(0x12, 114, u64). Architectures differ in where the direction bits sit.
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const IOC_READ: u64 = 2 << 29;
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const IOC_READ: u64 = 2 << 30;
const BLKGETSIZE64: u64 = IOC_READ | (8 << 16) | (0x12 << 8) | 114;

/// Size in bytes of an open block device (`BLKGETSIZE64`).
pub fn block_device_size(f: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// Drops an open file's clean cached pages (`posix_fadvise(DONTNEED)`): later reads come from
/// the device. Returns the error number on failure.
pub fn drop_cached_pages(f: &File) -> std::result::Result<(), i32> {
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc)
    }
}

/// CPU seconds (user + system) used so far by this process and its waited-for children.
pub fn cpu_seconds_self_and_children() -> f64 {
    let get = |who| {
        // SAFETY: getrusage fills a plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is valid for writes for the call.
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    get(libc::RUSAGE_SELF) + get(libc::RUSAGE_CHILDREN)
}

/// Clock ticks per second (the unit of /proc/<pid>/stat's times).
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Raises the soft limit on open file descriptors to the hard limit (a server's clients each
/// hold some); returns the (soft, hard) limits now in force.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one plain C struct valid for the call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // An unlimited hard limit still stops at the kernel's nr_open (1 Mi by default).
        let target = rl.rlim_max.min(1 << 20);
        if rl.rlim_cur < target {
            let want = libc::rlimit {
                rlim_cur: target,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            rl.rlim_cur = target;
        }
    }
    Ok((rl.rlim_cur, rl.rlim_max))
}

/// The soft limit on open file descriptors.
pub fn fd_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one plain C struct valid for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    rl.rlim_cur
}

/// Sends SIGTERM to a process (a child of ours).
pub fn terminate(pid: u32) {
    // SAFETY: plain syscall; a wrong pid fails with ESRCH.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        let (soft, hard) = raise_fd_limit().unwrap();
        assert_eq!(soft, hard.min(1 << 20));
        assert_eq!(fd_limit(), soft);
    }

    #[test]
    fn blkgetsize64_number() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
    }
}
