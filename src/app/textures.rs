//! Images on screen: decoded off the UI thread by a `ThumbLoader`, uploaded as textures, kept in a bounded LRU.
//! Textures are keyed by the image's path, never by its place in a grid: a folder opened while another one's
//! thumbnails are still decoding cannot show them in its own cells.

use crate::dataset::thumbs::ThumbLoader;
use egui::{ColorImage, TextureHandle, TextureOptions};
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

pub enum Slot<'a> {
    Ready(&'a TextureHandle),
    Failed(&'a str),
    Loading,
}

pub struct TextureCache {
    loader: ThumbLoader<PathBuf>,
    textures: LruCache<PathBuf, TextureHandle>,
    failed: HashMap<PathBuf, String>,
    name: &'static str,
}

impl TextureCache {
    /// `capacity` textures of at most `max_side` pixels, decoded on `threads` workers.
    pub fn new(
        ctx: &egui::Context,
        name: &'static str,
        threads: usize,
        max_side: u32,
        capacity: usize,
    ) -> Self {
        let repaint = ctx.clone();
        TextureCache {
            loader: ThumbLoader::new(threads, max_side, move || repaint.request_repaint()),
            textures: LruCache::new(NonZeroUsize::new(capacity.max(1)).unwrap()),
            failed: HashMap::new(),
            name,
        }
    }

    /// Uploads what the workers finished since the last frame.
    pub fn poll(&mut self, ctx: &egui::Context) {
        for thumb in self.loader.finished() {
            match thumb.image {
                Ok(img) => {
                    let size = [img.width() as usize, img.height() as usize];
                    let color = ColorImage::from_rgba_unmultiplied(size, img.as_raw());
                    let tex = ctx.load_texture(
                        format!("{}-{}", self.name, thumb.id.display()),
                        color,
                        TextureOptions::LINEAR,
                    );
                    self.textures.put(thumb.id, tex);
                }
                Err(e) => {
                    self.failed.insert(thumb.id, e.0);
                }
            }
        }
    }

    pub fn get(&mut self, path: &Path) -> Slot<'_> {
        if let Some(msg) = self.failed.get(path) {
            return Slot::Failed(msg);
        }
        match self.textures.get(path) {
            Some(t) => Slot::Ready(t),
            None => Slot::Loading,
        }
    }

    /// Asks for the images of `wanted` (most urgent first) that are neither on screen nor known to fail.
    pub fn want(&mut self, wanted: impl IntoIterator<Item = PathBuf>) {
        let missing: Vec<_> = wanted
            .into_iter()
            .filter(|p| !self.textures.contains(p) && !self.failed.contains_key(p))
            .map(|p| (p.clone(), p))
            .collect();
        self.loader.want(missing);
    }

    /// The images whose textures are ready.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.textures.iter().map(|(p, _)| p.as_path())
    }

    pub fn loaded(&self) -> usize {
        self.textures.len()
    }
}
