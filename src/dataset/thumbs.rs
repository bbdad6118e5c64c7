//! Thumbnail decoding on worker threads. The caller says which images it wants now (the visible ones);
//! requests that scrolled out of view before a worker reached them are dropped, so fast scrolling through
//! thousands of images never builds a backlog.

use super::inspect::{ImageError, thumbnail};
use crossbeam_channel::{Receiver, Sender, unbounded};
use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

/// A decoded thumbnail for the image with caller-chosen `id`.
pub struct Thumb<K> {
    pub id: K,
    pub image: Result<image::RgbaImage, ImageError>,
}

struct Pending<K> {
    wanted: VecDeque<(K, PathBuf)>,
    /// Ids a worker is decoding now; never queued again, so nothing is decoded twice at once.
    in_flight: HashSet<K>,
    shutdown: bool,
}

struct Queue<K> {
    pending: Mutex<Pending<K>>,
    ready: Condvar,
}

/// Thumbnails on worker threads, for images named by ids of type `K` (the GUI uses the image's path, so a
/// result can never land on another image's cell).
pub struct ThumbLoader<K> {
    queue: Arc<Queue<K>>,
    results: Receiver<Thumb<K>>,
}

impl<K: Clone + Eq + Hash + Send + 'static> ThumbLoader<K> {
    /// Starts `threads` workers producing thumbnails whose longer side is `max_side`; `notify` is called after
    /// each one is ready (the GUI passes a repaint request).
    pub fn new(threads: usize, max_side: u32, notify: impl Fn() + Send + Sync + 'static) -> Self {
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                wanted: VecDeque::new(),
                in_flight: HashSet::new(),
                shutdown: false,
            }),
            ready: Condvar::new(),
        });
        let (tx, results) = unbounded();
        let notify = Arc::new(notify);
        for _ in 0..threads.max(1) {
            let (queue, tx, notify) = (queue.clone(), tx.clone(), notify.clone());
            std::thread::spawn(move || worker(&queue, &tx, max_side, &*notify));
        }
        ThumbLoader { queue, results }
    }

    /// Replaces the pending requests with `wanted`, first = most urgent. Ids being decoded are skipped.
    pub fn want(&self, wanted: impl IntoIterator<Item = (K, PathBuf)>) {
        let mut q = self.queue.pending.lock().unwrap();
        let Pending {
            wanted: queue,
            in_flight,
            ..
        } = &mut *q;
        queue.clear();
        queue.extend(wanted.into_iter().filter(|(id, _)| !in_flight.contains(id)));
        if !queue.is_empty() {
            self.queue.ready.notify_all();
        }
    }

    /// Thumbnails finished since the last call.
    pub fn finished(&self) -> impl Iterator<Item = Thumb<K>> + '_ {
        self.results.try_iter()
    }
}

impl<K> Drop for ThumbLoader<K> {
    /// Workers stop after their current image; we do not wait for them (a huge image must not block the UI).
    fn drop(&mut self) {
        self.queue.pending.lock().unwrap().shutdown = true;
        self.queue.ready.notify_all();
    }
}

fn worker<K: Clone + Eq + Hash>(
    queue: &Queue<K>,
    tx: &Sender<Thumb<K>>,
    max_side: u32,
    notify: &(dyn Fn() + Send + Sync),
) {
    loop {
        let (id, path) = {
            let mut q = queue.pending.lock().unwrap();
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(job) = q.wanted.pop_front() {
                    q.in_flight.insert(job.0.clone());
                    break job;
                }
                q = queue.ready.wait(q).unwrap();
            }
        };
        let image = thumbnail(&path, max_side);
        // Send before leaving `in_flight`: the UI reads results before it asks again, so it never re-asks.
        let sent = tx
            .send(Thumb {
                id: id.clone(),
                image,
            })
            .is_ok();
        queue.pending.lock().unwrap().in_flight.remove(&id);
        if !sent {
            return;
        }
        notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_is_wanted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        image::RgbImage::new(300, 100).save(&p).unwrap();
        let loader = ThumbLoader::new(2, 64, || {});
        loader.want([(7, p), (8, dir.path().join("missing.png"))]);
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(
                loader
                    .results
                    .recv_timeout(std::time::Duration::from_secs(10)),
            );
        }
        got.sort_by_key(|t| t.id);
        let img = got[0].image.as_ref().unwrap();
        assert_eq!((got[0].id, img.width(), img.height()), (7, 64, 21));
        assert!(got[1].image.is_err());
    }
}
