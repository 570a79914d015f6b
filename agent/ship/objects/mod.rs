//! Shipping to an object destination (S3): blocks gathered into hourly objects of JSON
//! lines, each object fixed in the spool before its upload starts, uploaded in one PUT or in
//! parts, then recorded delivered.
//!
//! [`plan`] decides which blocks make an object and when it closes; [`encode`] turns them
//! into compressed parts; this driver leases blocks, records the object (its route, first
//! and last block, key, and as the upload goes its upload id and each part's ETag and MD5),
//! uploads, and tells the spool. One object is in upload at a time, so at most one part is
//! in memory. After a crash the recorded object is uploaded first: encoded again, parts whose
//! MD5 matches the recorded one are not sent again, and the object lands on the same key.
//! A multipart upload whose parts no longer match (blocks evicted meanwhile) is aborted and
//! started again under the same key.
//!
//! It must never record blocks delivered before S3 answered the object's last call (PUT, or
//! CompleteMultipartUpload) with success, and never put one record in two objects.

pub(crate) mod encode;
#[cfg(feature = "parquet")]
pub(crate) mod parquet;
pub(crate) mod plan;

use crate::backoff::Backoff;
use crate::logging::Repeated;
use crate::sink::call::Failure;
use crate::sink::s3::layout::KeyFields;
use crate::sink::s3::S3Sink;
use crate::spool::placement::Placement;
use crate::spool::store::{Upload, UploadChange, UploadedPart};
use crate::spool::{BlockMeta, SpoolError, SpoolHandle};
use bytes::Bytes;
use encode::ObjectEncoder;
use plan::{Planned, Planner};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::stats::ShipperStats;

/// Blocks leased per spool call while planning.
const LEASE_PAGE: usize = 1024;
/// Block bodies read per spool call while encoding (uncompressed bytes, about): small beside
/// the part being filled, which is what an object in upload holds in memory.
const READ_BYTES: u64 = 256 << 10;

/// Failed calls on a multipart upload between checks that S3 still knows it.
const CHECK_UPLOAD_EVERY: u32 = 3;

/// How often, outside the upload windows, the clock is looked at again.
const WINDOW_CHECK: Duration = Duration::from_secs(5);

/// Why an upload did not finish.
enum Stop {
    /// The shipper is told to stop.
    Asked,
    Spool(SpoolError),
    /// The recorded parts are not what the records encode to now: start the upload again.
    Restart,
    /// The object cannot be built (a record body that does not decode, a lost thread).
    Failed(String),
}

impl From<SpoolError> for Stop {
    fn from(e: SpoolError) -> Stop {
        Stop::Spool(e)
    }
}

/// The driver of one object destination.
#[derive(Clone)]
pub(crate) struct ObjectShipper {
    sink: Arc<crate::sink::Sink>,
    spool: SpoolHandle,
    dest: Arc<str>,
    routes: Arc<[String]>,
    placed_routes: Arc<[String]>,
    gateway: Arc<str>,
    stats: Arc<ShipperStats>,
}

impl ObjectShipper {
    pub(crate) fn new(
        name: &str,
        sink: Arc<crate::sink::Sink>,
        spool: SpoolHandle,
        gateway: Arc<str>,
        spec: &super::ShipperSpec,
        stats: Arc<ShipperStats>,
    ) -> ObjectShipper {
        ObjectShipper {
            sink,
            spool,
            dest: name.into(),
            routes: spec.routes.clone().into(),
            placed_routes: spec.placed_routes.clone().into(),
            gateway,
            stats,
        }
    }

    fn s3(&self) -> &S3Sink {
        match &*self.sink {
            crate::sink::Sink::S3(s) => s,
            _ => unreachable!("an object shipper is only built for an S3 destination"),
        }
    }

    /// Ships until `stop` turns true; a run that ends on its own is started again after a
    /// backoff.
    pub(crate) async fn supervise(self, stop: watch::Receiver<bool>) {
        let (name, stats) = (self.dest.clone(), self.stats.clone());
        super::supervise(&name, &stats, stop, move |stop| self.clone().run(stop)).await
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        // One block per route and commit, whatever the keys: objects do not group by key.
        self.spool.placements().set(
            &self.placed_routes,
            Some(&Placement {
                label: self.gateway.to_string(),
                starts: crate::sink::call::one_bucket(),
            }),
        );
        let config = self.s3().config().clone();
        let mut planner = Planner::new(
            config.max_object_bytes,
            config.max_object_age.as_millis() as u64,
        );
        let mut commits = self.spool.commits();
        // The object in upload when the agent stopped goes first, with its recorded key.
        let resumed = match self.spool.upload_of(self.dest.clone()).await {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(destination = %self.dest, error = %e, "object shipper stops: spool unavailable");
                return;
            }
        };
        let skip = resumed
            .as_ref()
            .map(|u| (u.route.clone(), u.first_block, u.last_block));
        if let Some(u) = resumed {
            if !self
                .wait_for_window(&config.upload_windows, &mut stop)
                .await
            {
                return;
            }
            tracing::info!(destination = %self.dest, key = %u.key, parts_uploaded = u.parts.len(), "resuming the upload of an object fixed before the agent stopped");
            match self.upload(u, &mut stop).await {
                Ok(()) => {}
                Err(e) => return self.stopped(e),
            }
        }
        let mut after = 0i64;
        loop {
            if *stop.borrow() {
                return;
            }
            // Gather until an object closes.
            while !planner.has_closed() {
                let metas = match self
                    .spool
                    .lease(self.dest.clone(), self.routes.clone(), after, LEASE_PAGE)
                    .await
                {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!(destination = %self.dest, error = %e, "object shipper stops: spool unavailable");
                        return;
                    }
                };
                let full = metas.len() == LEASE_PAGE;
                for m in &metas {
                    after = after.max(m.id);
                    let resumed_here = skip.as_ref().is_some_and(|(route, first, last)| {
                        *route == m.route && (*first..=*last).contains(&m.id)
                    });
                    if !resumed_here {
                        planner.add(m);
                    }
                }
                if !full {
                    break;
                }
            }
            planner.close_due(crate::clock::now_ms());
            if let Some(object) = planner.pop() {
                if !self
                    .wait_for_window(&config.upload_windows, &mut stop)
                    .await
                {
                    return;
                }
                let upload = self.fix(&object);
                if let Err(e) = self
                    .spool
                    .change_upload(self.dest.clone(), UploadChange::Begin(upload.clone()))
                    .await
                {
                    tracing::error!(destination = %self.dest, error = %e, "object shipper stops: spool unavailable");
                    return;
                }
                match self.upload(upload, &mut stop).await {
                    Ok(()) => continue,
                    Err(e) => return self.stopped(e),
                }
            }
            let until = planner
                .next_due()
                .map(|due| Duration::from_millis(due.saturating_sub(crate::clock::now_ms())));
            tokio::select! {
                changed = commits.changed() => if changed.is_err() { return },
                _ = async {
                    match until {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Says why a run ends.
    fn stopped(&self, why: Stop) {
        match why {
            Stop::Asked => {}
            Stop::Spool(e) => {
                tracing::error!(destination = %self.dest, error = %e, "object shipper stops: spool unavailable")
            }
            Stop::Failed(e) => {
                tracing::error!(destination = %self.dest, error = %e, "cannot build the object; shipping stops and starts again")
            }
            Stop::Restart => unreachable!("upload() starts again within"),
        }
    }

    /// The object's key and record, fixed before its upload.
    fn fix(&self, o: &Planned) -> Upload {
        let config = self.s3().config();
        let key = config.key_template.render(&KeyFields {
            prefix: &config.prefix,
            route: &o.route,
            gateway: &self.gateway,
            hour_ms: o.hour_ms,
            first_seq: o.first_seq,
            last_seq: o.last_seq,
            ext: config.ext(),
        });
        Upload {
            destination: self.dest.to_string(),
            route: o.route.clone(),
            key,
            first_block: o.first_block,
            last_block: o.last_block,
            upload_id: None,
            parts: Vec::new(),
        }
    }

    /// Outside the upload windows, waits for the next one; false if told to stop meanwhile.
    async fn wait_for_window(
        &self,
        windows: &[crate::sink::s3::UploadWindow],
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut said = false;
        loop {
            if windows.is_empty() || windows.iter().any(|w| w.contains(local_minute())) {
                return !*stop.borrow();
            }
            if !said {
                tracing::info!(destination = %self.dest, "outside the upload windows; objects wait in the spool");
                said = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(WINDOW_CHECK) => {}
                _ = stop.changed() => return false,
            }
        }
    }

    /// The blocks of the object still owed, in id order (metadata).
    async fn members(&self, u: &Upload) -> Result<Vec<BlockMeta>, SpoolError> {
        let route: Arc<[String]> = Arc::from(vec![u.route.clone()]);
        let mut out = Vec::new();
        let mut after = u.first_block - 1;
        loop {
            let page = self
                .spool
                .lease(self.dest.clone(), route.clone(), after, LEASE_PAGE)
                .await?;
            let full = page.len() == LEASE_PAGE;
            for m in page {
                if m.id > u.last_block {
                    return Ok(out);
                }
                after = m.id;
                out.push(m);
            }
            if !full {
                return Ok(out);
            }
        }
    }

    /// Uploads a fixed object (again, if it was begun before), then records its blocks
    /// delivered and its row gone.
    async fn upload(&self, mut u: Upload, stop: &mut watch::Receiver<bool>) -> Result<(), Stop> {
        loop {
            let mut read: Vec<i64> = Vec::new();
            let r = self.try_upload(&mut u, &mut read, stop).await;
            match r {
                Ok(summary) => {
                    if !read.is_empty() {
                        self.spool.delivered(self.dest.clone(), read)?;
                    }
                    self.spool.end_upload(self.dest.clone())?;
                    if let Some(s) = summary {
                        self.uploaded(&u, s);
                    }
                    return Ok(());
                }
                Err(Stop::Restart) => {
                    let _ = self.spool.release(self.dest.clone(), read);
                    if let Some(id) = u.upload_id.take() {
                        self.retry(stop, "AbortMultipartUpload", || {
                            self.s3().abort_multipart(&u.key, &id)
                        })
                        .await?;
                    }
                    u.parts.clear();
                    self.spool
                        .change_upload(self.dest.clone(), UploadChange::UploadId(None))
                        .await?;
                    tracing::warn!(destination = %self.dest, key = %u.key, "the object's records changed since its upload began (evicted from a full spool, or a completed upload was lost); uploading it again under the same key");
                }
                Err(e) => {
                    let _ = self.spool.release(self.dest.clone(), read);
                    return Err(e);
                }
            }
        }
    }

    /// One pass over the object: encode, send what is not sent yet, complete. `read` gets the
    /// ids of the blocks read (in flight from then on). `None`: no records left to upload.
    async fn try_upload(
        &self,
        u: &mut Upload,
        read: &mut Vec<i64>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<Summary>, Stop> {
        let config = self.s3().config().clone();
        let members = self.members(u).await?;
        let mut encoder = Some(
            ObjectEncoder::new(
                config.format,
                config.compression,
                config.compression_level,
                config.part_bytes as usize,
                &self.gateway,
            )
            .map_err(|e| Stop::Failed(e.to_string()))?,
        );
        let mut summary = Summary::default();
        let mut parts_sent = 0usize;
        let mut i = 0;
        while i < members.len() {
            let mut ids = Vec::new();
            let mut bytes = 0u64;
            while i < members.len() && (ids.is_empty() || bytes < READ_BYTES) {
                ids.push(members[i].id);
                bytes += u64::from(members[i].raw_bytes);
                i += 1;
            }
            let bodies = self.spool.read(self.dest.clone(), ids).await?;
            let gateway = self.gateway.clone();
            let mut enc = encoder.take().expect("present between steps");
            // Compression on a blocking thread; the part (if one filled) comes back.
            let (enc, parts, done) = tokio::task::spawn_blocking(move || {
                let mut parts = Vec::new();
                let mut done = Vec::new();
                for (m, body) in &bodies {
                    match enc.add(&gateway, m.id, body, m.records, m.version) {
                        Ok(Some(p)) => parts.push(p),
                        Ok(None) => {}
                        Err(e) => return Err(e),
                    }
                    done.push((m.id, m.records, m.created_ms));
                }
                Ok((enc, parts, done))
            })
            .await
            .map_err(|e| Stop::Failed(e.to_string()))?
            .map_err(|e| Stop::Failed(e.to_string()))?;
            encoder = Some(enc);
            for (id, records, created_ms) in done {
                read.push(id);
                summary.records += u64::from(records);
                summary.blocks.push((created_ms, records));
            }
            for part in parts {
                parts_sent += 1;
                summary.bytes += part.len() as u64;
                self.send_part(u, parts_sent, part, stop).await?;
            }
        }
        let enc = encoder.take().expect("present");
        summary.line_bytes = enc.line_bytes;
        if enc.records == 0 {
            // Nothing left of it (evicted, or delivered before a crash lost the row).
            if let Some(id) = u.upload_id.take() {
                self.retry(stop, "AbortMultipartUpload", || {
                    self.s3().abort_multipart(&u.key, &id)
                })
                .await?;
            }
            return Ok(None);
        }
        let last = enc.finish().map_err(|e| Stop::Failed(e.to_string()))?;
        summary.bytes += last.len() as u64;
        if parts_sent == 0 {
            if u.upload_id.is_some() {
                // Begun as a multipart upload, now one part: its records changed.
                return Err(Stop::Restart);
            }
            let body = Bytes::from(last);
            self.retry(stop, "PutObject", || {
                self.s3().put_object(&u.key, body.clone())
            })
            .await?;
            summary.parts = 1;
        } else {
            parts_sent += 1;
            self.send_part(u, parts_sent, last, stop).await?;
            if u.parts.len() != parts_sent {
                return Err(Stop::Restart);
            }
            let id = u.upload_id.clone().expect("parts were sent");
            let etags: Vec<String> = u.parts.iter().map(|p| p.etag.clone()).collect();
            match self
                .retry_until(stop, "CompleteMultipartUpload", Some((&u.key, &id)), || {
                    self.s3().complete_multipart(&u.key, &id, &etags)
                })
                .await?
            {
                Ok(()) => {}
                // Completed before a crash (or aborted): upload it whole again.
                Err(_) => return Err(Stop::Restart),
            }
            summary.parts = parts_sent as u64;
        }
        Ok(Some(summary))
    }

    /// Sends part `number` unless the recorded one has the same bytes; records it.
    async fn send_part(
        &self,
        u: &mut Upload,
        number: usize,
        part: Vec<u8>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Stop> {
        let md5 = S3Sink::part_md5(&part);
        if let Some(recorded) = u.parts.get(number - 1) {
            return if recorded.md5 == md5 {
                Ok(())
            } else {
                Err(Stop::Restart)
            };
        }
        let id = match &u.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = self
                    .retry(stop, "CreateMultipartUpload", || {
                        self.s3().create_multipart(&u.key)
                    })
                    .await?;
                self.spool
                    .change_upload(self.dest.clone(), UploadChange::UploadId(Some(id.clone())))
                    .await?;
                u.upload_id = Some(id.clone());
                id
            }
        };
        let body = Bytes::from(part);
        let outcome = self
            .retry_until(stop, "UploadPart", Some((&u.key, &id)), || {
                self.s3().upload_part(&u.key, &id, number, body.clone())
            })
            .await?;
        let etag = match outcome {
            Ok(etag) => etag,
            // The upload is gone (completed or aborted before a crash): start again.
            Err(_) => return Err(Stop::Restart),
        };
        let part = UploadedPart { etag, md5 };
        self.spool
            .change_upload(self.dest.clone(), UploadChange::Part(part.clone()))
            .await?;
        u.parts.push(part);
        Ok(())
    }

    /// Runs an S3 call until it succeeds, with backoff; `Stop::Asked` if told to stop first.
    async fn retry<T, F, Fut>(
        &self,
        stop: &mut watch::Receiver<bool>,
        what: &str,
        call: F,
    ) -> Result<T, Stop>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        match self.retry_until(stop, what, None, call).await? {
            Ok(v) => Ok(v),
            // NoSuchUpload where it is not expected: the upload was lost; begin again.
            Err(_) => Err(Stop::Restart),
        }
    }

    /// Runs an S3 call until it succeeds or S3 says the upload does not exist (`Err`), with
    /// backoff; `Stop::Asked` if told to stop first. A call on an `upload` (key, id) that
    /// keeps failing asks S3 whether the upload still exists, every few failures: stores that
    /// answer a forgotten upload with another error would otherwise be retried forever.
    async fn retry_until<T, F, Fut>(
        &self,
        stop: &mut watch::Receiver<bool>,
        what: &str,
        upload: Option<(&str, &str)>,
        call: F,
    ) -> Result<Result<T, Failure>, Stop>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let mut failing = Repeated::new(Duration::from_secs(30));
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                return Err(Stop::Asked);
            }
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            let r = tokio::select! {
                r = call() => r,
                _ = stop.changed() => return Err(Stop::Asked),
            };
            match r {
                Ok(v) => {
                    if self.stats.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(destination = %self.dest, "S3 accepts again");
                    }
                    return Ok(Ok(v));
                }
                Err(f) if f.code == "NoSuchUpload" => return Ok(Err(f)),
                Err(f) => {
                    failures += 1;
                    if let (Some((key, id)), true) = (upload, failures % CHECK_UPLOAD_EVERY == 0) {
                        if let Ok(false) = self.s3().upload_exists(key, id).await {
                            tracing::warn!(destination = %self.dest, key, call = what, code = %f.code, "S3 no longer knows the multipart upload (it answered its calls with errors)");
                            return Ok(Err(Failure::new(
                                f.kind,
                                "NoSuchUpload",
                                "the upload is gone",
                            )));
                        }
                    }
                    self.stats.call_failures.fetch_add(1, Ordering::Relaxed);
                    self.stats.count_error(&f.code, 1);
                    self.stats.failing.store(true, Ordering::Relaxed);
                    self.stats
                        .set_last_error(format!("{what}: {}: {}", f.code, f.message));
                    let delay = backoff.next_delay();
                    if let Some(repeats) = failing.should_log() {
                        tracing::warn!(destination = %self.dest, call = what, code = %f.code, message = %f.message, repeats, retry_in_ms = delay.as_millis() as u64, "S3 call failed; the object waits in the spool and is sent again");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => return Err(Stop::Asked),
                    }
                }
            }
        }
    }

    fn uploaded(&self, u: &Upload, s: Summary) {
        let stats = &self.stats;
        stats.entries_accepted.fetch_add(1, Ordering::Relaxed);
        stats
            .records_accepted
            .fetch_add(s.records, Ordering::Relaxed);
        stats.bytes_accepted.fetch_add(s.bytes, Ordering::Relaxed);
        stats
            .raw_bytes_accepted
            .fetch_add(s.line_bytes, Ordering::Relaxed);
        let now = crate::clock::now_ms();
        stats.last_success_ms.store(now, Ordering::Relaxed);
        for (created_ms, records) in &s.blocks {
            stats.end_to_end_latency.record_n(
                Duration::from_millis(now.saturating_sub(*created_ms)),
                u64::from(*records),
            );
        }
        tracing::info!(destination = %self.dest, key = %u.key, records = s.records, bytes = s.bytes, parts = s.parts, "object uploaded");
    }
}

/// What one object's upload did.
#[derive(Debug, Default)]
struct Summary {
    records: u64,
    bytes: u64,
    line_bytes: u64,
    parts: u64,
    /// Receive time and records of each block: the records' time to S3.
    blocks: Vec<(u64, u32)>,
}

/// Minutes after local midnight now (the upload windows are in local time, as operators
/// set them for their site's metered hours).
fn local_minute() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives on this stack frame.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if ok {
        (tm.tm_hour * 60 + tm.tm_min) as u32
    } else {
        ((now / 60) % (24 * 60)) as u32
    }
}
