//! What the kernel says about this process and the spool's disk: resident memory, CPU time,
//! open files, free space. Linux `/proc` and `statvfs`; elsewhere the figures are absent.
//!
//! No page size or clock tick is assumed (Raspberry Pi 5 kernels use 16 KiB pages): memory is
//! read in kB, CPU time from `getrusage`. Only `/proc/self` is read (the service runs with
//! `ProcSubset=pid`). Reading never fails loudly: a missing figure is left out of the scrape.

use std::path::Path;

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProcessFigures {
    pub(crate) resident_bytes: Option<u64>,
    pub(crate) virtual_bytes: Option<u64>,
    pub(crate) cpu_seconds: Option<f64>,
    pub(crate) open_fds: Option<u64>,
    pub(crate) max_fds: Option<u64>,
}

/// Reads the figures. Memory comes from `/proc/self/status` (kB, so no page-size arithmetic),
/// CPU time from `getrusage`: both also hold under qemu-user, whose `/proc/self/stat` is a stub.
// The libc types are 32-bit on armv7 and 64-bit on aarch64/x86-64: the casts are needed there.
#[allow(clippy::unnecessary_cast)]
pub(crate) fn read() -> ProcessFigures {
    let mut f = ProcessFigures::default();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kb = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|v| v * 1024)
        };
        f.resident_bytes = kb("VmRSS:");
        f.virtual_bytes = kb("VmSize:");
    }
    // SAFETY: getrusage fills the zeroed struct we pass and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        f.cpu_seconds = Some(secs(usage.ru_utime) + secs(usage.ru_stime));
    }
    f.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        f.max_fds = Some(limit.rlim_cur as u64);
    }
    f
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
#[allow(clippy::unnecessary_cast)] // 32-bit fields on armv7
pub(crate) fn disk_free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct from a NUL-terminated path we own.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Size of the spool file and its write-ahead log.
pub(crate) fn spool_file_bytes(path: &Path) -> Option<u64> {
    let main = std::fs::metadata(path).ok()?.len();
    let wal = std::fs::metadata(format!("{}-wal", path.display()))
        .map(|m| m.len())
        .unwrap_or(0);
    Some(main + wal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_this_process_are_plausible() {
        let f = read();
        let rss = f.resident_bytes.expect("rss");
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
        assert!(f.open_fds.expect("fds") >= 3);
        assert!(f.cpu_seconds.expect("cpu") >= 0.0);
        assert!(disk_free_bytes(Path::new("/tmp/x")).is_some());
    }
}
