//! What the kernel says about this process and the spool's disk: resident memory, CPU time,
//! open files, free space. Linux `/proc` and `statvfs`; elsewhere the figures are absent.
//!
//! Page size and clock ticks come from `sysconf`, never assumed (Raspberry Pi 5 kernels use
//! 16 KiB pages). Only `/proc/self` is read (the service runs with `ProcSubset=pid`). Reading
//! never fails loudly: a missing figure is left out of the scrape.

use std::path::Path;

#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessFigures {
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf reads a system constant; no pointers are involved.
    let v = unsafe { libc::sysconf(name) };
    (v > 0).then_some(v as u64)
}

// The libc types are 32-bit on armv7 and 64-bit on aarch64/x86-64: the casts are needed there.
#[allow(clippy::unnecessary_cast)]
pub fn read() -> ProcessFigures {
    let mut f = ProcessFigures::default();
    let page = sysconf(libc::_SC_PAGESIZE);
    let ticks = sysconf(libc::_SC_CLK_TCK);
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name, which is in parentheses and may hold spaces.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // rest[0] is field 3 (state): field N is fields[N - 3].
            let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
            if let (Some(utime), Some(stime), Some(t)) = (field(14), field(15), ticks) {
                f.cpu_seconds = Some((utime + stime) as f64 / t as f64);
            }
            f.virtual_bytes = field(23);
            f.resident_bytes = field(24).zip(page).map(|(pages, size)| pages * size);
        }
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
pub fn disk_free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct from a NUL-terminated path we own.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Size of the spool file and its write-ahead log.
pub fn spool_file_bytes(path: &Path) -> Option<u64> {
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
