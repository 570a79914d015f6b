//! A disk that loses power: an in-memory file system, mounted through FUSE, that keeps two
//! copies of every file's contents, what programs wrote and what an `fsync` made durable.
//! [`LossyDisk::cut`] is the power cut: every write not yet synced is forgotten, as a disk's
//! cache forgets it, and the file system comes back as the synced copies left it.
//!
//! Names (create, rename, unlink, mkdir) are kept at once, as a journaling file system with
//! ordered metadata mostly does; only file contents are lost. That is the harder half for an
//! agent: a file renamed into place whose contents were never synced comes back empty.
//!
//! Mounting needs root and `/dev/fuse` (the kernel's FUSE device; `fuser` mounts with
//! mount(2) directly as root, no `fusermount`). This is test harness only: nothing here is
//! fast, and it holds everything in memory.

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

enum Node {
    File {
        /// What programs wrote.
        data: Vec<u8>,
        /// What the last fsync made durable: what a power cut leaves.
        durable: Vec<u8>,
        perm: u16,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
        perm: u16,
    },
}

/// What the disk has done, to show a power cut discarded something.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskStats {
    pub fsyncs: u64,
    pub cuts: u64,
    /// Files whose contents a cut set back to their last synced copy.
    pub files_rolled_back: u64,
    /// Bytes written and never synced that cuts threw away (counted as the differing
    /// length plus the differing bytes of each file rolled back).
    pub bytes_lost: u64,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    stats: DiskStats,
}

impl State {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match self.nodes.get(&ino)? {
            Node::File { data, perm, .. } => (FileType::RegularFile, data.len() as u64, *perm, 1),
            Node::Dir { entries, perm } => (FileType::Directory, entries.len() as u64, *perm, 2),
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        match self.nodes.get(&parent) {
            Some(Node::Dir { entries, .. }) => entries.get(name).copied().ok_or(Errno::ENOENT),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn add(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, Errno> {
        if self.child(parent, name).is_ok() {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, node);
        if let Some(Node::Dir { entries, .. }) = self.nodes.get_mut(&parent) {
            entries.insert(name.to_os_string(), ino);
            Ok(ino)
        } else {
            Err(Errno::ENOTDIR)
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut Vec<u8>, Errno> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File { data, .. }) => Ok(data),
            Some(_) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    /// The power cut: contents go back to their synced copies; files no name reaches are
    /// gone.
    fn cut(&mut self) {
        self.stats.cuts += 1;
        let mut reachable = vec![INodeNo::ROOT.0];
        let mut seen = std::collections::HashSet::new();
        while let Some(ino) = reachable.pop() {
            if seen.insert(ino) {
                if let Some(Node::Dir { entries, .. }) = self.nodes.get(&ino) {
                    reachable.extend(entries.values().copied());
                }
            }
        }
        self.nodes.retain(|ino, _| seen.contains(ino));
        for node in self.nodes.values_mut() {
            if let Node::File { data, durable, .. } = node {
                if data != durable {
                    self.stats.files_rolled_back += 1;
                    let common = data.len().min(durable.len());
                    let differing = data[..common]
                        .iter()
                        .zip(&durable[..common])
                        .filter(|(a, b)| a != b)
                        .count();
                    self.stats.bytes_lost +=
                        (data.len().abs_diff(durable.len()) + differing) as u64;
                    data.clone_from(durable);
                }
            }
        }
    }
}

fn answer(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// The file system the kernel talks to; the state outlives each mount.
struct LossyFs {
    state: Arc<Mutex<State>>,
}

const TTL: Duration = Duration::ZERO;
const GENERATION: Generation = Generation(0);

impl LossyFs {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn reply_entry(&self, result: Result<u64, Errno>, reply: ReplyEntry) {
        match result.and_then(|ino| self.with(|s| s.attr(ino)).ok_or(Errno::ENOENT)) {
            Ok(attr) => reply.entry(&TTL, &attr, GENERATION),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.with(|s| s.child(parent.0, name));
        self.reply_entry(found, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.with(|s| s.attr(ino.0)) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.with(|s| {
            if let Some(size) = size {
                s.file(ino.0)?.resize(size as usize, 0);
            }
            if let Some(mode) = mode {
                match s.nodes.get_mut(&ino.0) {
                    Some(Node::File { perm, .. } | Node::Dir { perm, .. }) => {
                        *perm = (mode & 0o7777) as u16
                    }
                    None => return Err(Errno::ENOENT),
                }
            }
            s.attr(ino.0).ok_or(Errno::ENOENT)
        });
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.with(|s| {
            s.add(
                parent.0,
                name,
                Node::Dir {
                    entries: BTreeMap::new(),
                    perm: (mode & !umask & 0o7777) as u16,
                },
            )
        });
        self.reply_entry(made, reply);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let made = self.with(|s| {
            let ino = s.add(
                parent.0,
                name,
                Node::File {
                    data: Vec::new(),
                    durable: Vec::new(),
                    perm: (mode & !umask & 0o7777) as u16,
                },
            )?;
            s.attr(ino).ok_or(Errno::ENOENT)
        });
        match made {
            Ok(attr) => reply.created(&TTL, &attr, GENERATION, FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        // The node stays while the disk is up (an open file outlives its name); a cut
        // removes what no name reaches.
        let result = self.with(|s| match s.nodes.get_mut(&parent.0) {
            Some(Node::Dir { entries, .. }) => {
                entries.remove(name).map(|_| ()).ok_or(Errno::ENOENT)
            }
            _ => Err(Errno::ENOTDIR),
        });
        answer(reply, result);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.with(|s| {
            let ino = s.child(parent.0, name)?;
            match s.nodes.get(&ino) {
                Some(Node::Dir { entries, .. }) if entries.is_empty() => {}
                Some(Node::Dir { .. }) => return Err(Errno::ENOTEMPTY),
                _ => return Err(Errno::ENOTDIR),
            }
            if let Some(Node::Dir { entries, .. }) = s.nodes.get_mut(&parent.0) {
                entries.remove(name);
            }
            Ok(())
        });
        answer(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.with(|s| {
            let ino = s.child(parent.0, name)?;
            if !matches!(s.nodes.get(&newparent.0), Some(Node::Dir { .. })) {
                return Err(Errno::ENOTDIR);
            }
            if let Some(Node::Dir { entries, .. }) = s.nodes.get_mut(&parent.0) {
                entries.remove(name);
            }
            if let Some(Node::Dir { entries, .. }) = s.nodes.get_mut(&newparent.0) {
                entries.insert(newname.to_os_string(), ino);
            }
            Ok(())
        });
        answer(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.with(|s| s.nodes.contains_key(&ino.0)) {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.with(|s| {
            let data = s.file(ino.0)?;
            let start = (offset as usize).min(data.len());
            let end = (start + size as usize).min(data.len());
            Ok::<_, Errno>(data[start..end].to_vec())
        });
        match result {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.with(|s| {
            let data = s.file(ino.0)?;
            let end = offset as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[offset as usize..end].copy_from_slice(bytes);
            Ok::<_, Errno>(())
        });
        match result {
            Ok(()) => reply.written(bytes.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a sync.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.with(|s| {
            s.stats.fsyncs += 1;
            if let Some(Node::File { data, durable, .. }) = s.nodes.get_mut(&ino.0) {
                durable.clone_from(data);
            }
        });
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.with(|s| s.nodes.get(&ino.0).map(|n| matches!(n, Node::Dir { .. }))) {
            Some(true) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(false) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = self.with(|s| match s.nodes.get(&ino.0) {
            Some(Node::Dir { entries, .. }) => {
                let mut all = vec![
                    (ino.0, FileType::Directory, OsString::from(".")),
                    (ino.0, FileType::Directory, OsString::from("..")),
                ];
                for (name, child) in entries {
                    let kind = match s.nodes.get(child) {
                        Some(Node::Dir { .. }) => FileType::Directory,
                        _ => FileType::RegularFile,
                    };
                    all.push((*child, kind, name.clone()));
                }
                Ok(all)
            }
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        });
        match listing {
            Ok(all) => {
                for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.with(|s| s.stats.fsyncs += 1);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 1 GiB, nearly all of it free: room is not what this disk tests.
        let used = self.with(|s| {
            s.nodes
                .values()
                .map(|n| match n {
                    Node::File { data, .. } => data.len() as u64,
                    Node::Dir { .. } => 0,
                })
                .sum::<u64>()
        });
        let blocks = (1u64 << 30) / 4096;
        let free = blocks.saturating_sub(used.div_ceil(4096));
        reply.statfs(blocks, free, free, 1 << 20, 1 << 20, 4096, 255, 4096);
    }
}

/// A mounted [`LossyFs`] at `path`, unmounted on drop.
pub struct LossyDisk {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    session: Option<BackgroundSession>,
}

impl LossyDisk {
    /// Whether this machine can mount one: root, and the kernel's FUSE device.
    pub fn available() -> bool {
        crate::support::is_root() && Path::new("/dev/fuse").exists()
    }

    /// An empty disk mounted at `path` (created if missing).
    pub fn mount(path: &Path) -> LossyDisk {
        std::fs::create_dir_all(path).unwrap();
        let mut nodes = HashMap::new();
        nodes.insert(
            INodeNo::ROOT.0,
            Node::Dir {
                entries: BTreeMap::new(),
                perm: 0o755,
            },
        );
        let mut disk = LossyDisk {
            path: path.to_path_buf(),
            state: Arc::new(Mutex::new(State {
                nodes,
                next_ino: INodeNo::ROOT.0 + 1,
                stats: DiskStats::default(),
            })),
            session: None,
        };
        disk.attach();
        disk
    }

    fn attach(&mut self) {
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("edgeship-lossy".into())];
        let fs = LossyFs {
            state: self.state.clone(),
        };
        self.session = Some(
            fuser::spawn_mount(fs, &self.path, &config).unwrap_or_else(|e| {
                panic!("mounting the lossy disk at {}: {e}", self.path.display())
            }),
        );
    }

    fn detach(&mut self) {
        if let Some(session) = self.session.take() {
            session
                .umount_and_join()
                .unwrap_or_else(|e| panic!("unmounting {}: {e}", self.path.display()));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The power cut: unmounted (every program using it must be gone: kill them first),
    /// every unsynced write forgotten, mounted again.
    pub fn cut(&mut self) {
        self.detach();
        self.state.lock().unwrap().cut();
        self.attach();
    }

    pub fn stats(&self) -> DiskStats {
        self.state.lock().unwrap().stats
    }
}

impl Drop for LossyDisk {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}
