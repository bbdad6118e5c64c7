//! The CLIP BPE tokenizer, with OpenAI's vocabulary built in (through `instant-clip-tokenizer`, which
//! bundles it), so nothing is downloaded.
//!
//! Long prompts: a prompt is cut into chunks of 75 tokens; each chunk is wrapped in start/end-of-text and
//! padded to 77, the text encoder encodes each chunk on its own and the results are concatenated along the
//! sequence (A1111's and kohya's long-prompt rule; a prompt of ≤ 75 tokens gives exactly the ids of
//! transformers' `CLIPTokenizer` with `padding="max_length"`). Chunks past `max_chunks` are dropped and
//! reported in [`Tokens::dropped`] so the caller can warn.

use crate::fsutil::admit;
use crate::model::checkpoint::Family;
use candle_core::{Device, Tensor};
use instant_clip_tokenizer::{Token, Tokenizer};
use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The text encoder's window: start-of-text, 75 tokens, end-of-text.
pub const WINDOW: usize = 77;
/// Prompt tokens per window.
pub const CHUNK: usize = WINDOW - 2;
/// More characters than any token of the vocabulary covers (its longest entries are about 20).
const MAX_TOKEN_CHARS: usize = 64;
/// Longer runs without whitespace are cut here before BPE, whose cost grows with the square of a word's length.
const MAX_WORD_CHARS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read the tokenizer file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a CLIP tokenizer vocabulary: {detail}", path.display())]
    NotClip { path: PathBuf, detail: String },
}

/// A prompt as token ids: whole windows of [`WINDOW`] ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// Prompt tokens beyond `max_chunks` windows that were left out.
    pub dropped: usize,
}

impl Tokens {
    pub fn chunks(&self) -> usize {
        self.ids.len() / WINDOW
    }
}

#[derive(Clone)]
pub struct ClipTokenizer {
    bpe: Arc<Tokenizer>,
    pad: u32,
}

impl ClipTokenizer {
    /// OpenAI's CLIP vocabulary, shared by SD 1.x and SD 2.x. SD 1.x pads with end-of-text (49407), SD 2.x
    /// (open_clip) with id 0 (`!`).
    pub fn bundled(family: Family) -> Self {
        static BUNDLED: OnceLock<Arc<Tokenizer>> = OnceLock::new();
        let bpe = BUNDLED.get_or_init(|| Arc::new(Tokenizer::new())).clone();
        let pad = match family {
            Family::Sd1 => bpe.end_of_text().to_u16() as u32,
            Family::Sd2 => 0,
        };
        ClipTokenizer { bpe, pad }
    }

    /// A CLIP-style vocabulary from transformers' `vocab.json` and `merges.txt` (ids 0-511 the byte
    /// characters alone and with `</w>`, then one id per merge, then start- and end-of-text).
    pub fn from_files(vocab: &Path, merges: &Path, pad_id: u32) -> Result<Self, TokenizerError> {
        let io = |path: &Path, source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let not_clip = |detail: String| TokenizerError::NotClip {
            path: vocab.to_path_buf(),
            detail,
        };
        let text = admit::read_text(vocab, admit::JSON).map_err(|e| io(vocab, e))?;
        let table: HashMap<String, u32> =
            serde_json::from_str(&text).map_err(|e| not_clip(e.to_string()))?;
        // 256 byte characters, the same with `</w>`, and the two special tokens come before any merge.
        let size = u16::try_from(table.len())
            .ok()
            .filter(|&n| n >= 514)
            .ok_or_else(|| {
                not_clip(format!(
                    "a CLIP vocabulary has 514 to 65535 entries, this one {}",
                    table.len()
                ))
            })?;
        let file = admit::open_regular(merges, admit::JSON).map_err(|e| io(merges, e))?;
        let bpe = Tokenizer::with_vocabulary(BufReader::new(file), size).map_err(|e| {
            TokenizerError::NotClip {
                path: merges.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
        let expect = |name: &str, id: Token| match table.get(name) {
            Some(&v) if v == id.to_u16() as u32 => Ok(()),
            found => Err(not_clip(format!(
                "`{name}` has id {found:?}; the merges put it at {}",
                id.to_u16()
            ))),
        };
        expect("<|startoftext|>", bpe.start_of_text())?;
        expect("<|endoftext|>", bpe.end_of_text())?;
        Ok(ClipTokenizer {
            bpe: Arc::new(bpe),
            pad: pad_id,
        })
    }

    pub fn bos(&self) -> u32 {
        self.bpe.start_of_text().to_u16() as u32
    }

    pub fn eos(&self) -> u32 {
        self.bpe.end_of_text().to_u16() as u32
    }

    pub fn pad(&self) -> u32 {
        self.pad
    }

    /// The prompt's tokens without start/end-of-text or padding. Lower-cases, like CLIP.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut tokens = Vec::new();
        self.bpe.encode(text, &mut tokens);
        tokens.into_iter().map(|t| t.to_u16() as u32).collect()
    }

    /// The prompt in windows of 77 (at least one, at most `max_chunks`).
    pub fn tokenize(&self, text: &str, max_chunks: usize) -> Tokens {
        let wanted = max_chunks.max(1) * CHUNK;
        let tokens = self.encode(&usable_prefix(text, wanted));
        let kept = tokens.len().min(wanted);
        let mut ids = Vec::new();
        for chunk in tokens[..kept].chunks(CHUNK) {
            ids.extend(self.window(chunk));
        }
        if ids.is_empty() {
            ids = self.window(&[]);
        }
        Tokens {
            ids,
            dropped: tokens.len() - kept,
        }
    }

    /// Several prompts as one `[B, n·77]` u32 tensor; shorter prompts get empty windows (start, end, padding)
    /// so every row has as many windows as the longest.
    pub fn tokenize_batch(
        &self,
        texts: &[&str],
        max_chunks: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Vec<Tokens>)> {
        let tokens: Vec<Tokens> = texts.iter().map(|t| self.tokenize(t, max_chunks)).collect();
        let chunks = tokens.iter().map(Tokens::chunks).max().unwrap_or(1);
        let empty = self.window(&[]);
        let mut rows: Vec<u32> = Vec::with_capacity(tokens.len() * chunks * WINDOW);
        for t in &tokens {
            rows.extend(&t.ids);
            (t.chunks()..chunks).for_each(|_| rows.extend(&empty));
        }
        Ok((
            Tensor::from_vec(rows, (tokens.len(), chunks * WINDOW), device)?,
            tokens,
        ))
    }

    fn window(&self, chunk: &[u32]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(WINDOW);
        ids.push(self.bos());
        ids.extend(chunk);
        ids.push(self.eos());
        ids.resize(WINDOW, self.pad);
        ids
    }
}

/// The part of `text` that can give its first `tokens` tokens, found in one pass: every token covers at most
/// [`MAX_TOKEN_CHARS`] characters, so text is cut at the first whitespace after `tokens` times that many
/// characters (a whole word is kept: BPE merges depend on all of it), and runs without whitespace longer than
/// [`MAX_WORD_CHARS`] are cut short (a 10 MB one-word caption would otherwise take minutes). Whatever is cut is
/// past what the text encoder reads.
fn usable_prefix(text: &str, tokens: usize) -> std::borrow::Cow<'_, str> {
    let budget = tokens.saturating_mul(MAX_TOKEN_CHARS);
    let (mut seen, mut run) = (0usize, 0usize);
    let mut out: Option<String> = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if seen > budget {
                let kept = out.unwrap_or_else(|| text[..i].to_owned());
                return kept.into();
            }
            run = 0;
        } else {
            run += 1;
            seen += 1;
            if run > MAX_WORD_CHARS {
                // Start copying at the first dropped character; skip the rest of the run.
                out.get_or_insert_with(|| text[..i].to_owned());
                continue;
            }
        }
        if let Some(out) = &mut out {
            out.push(c);
        }
    }
    match out {
        Some(s) => s.into(),
        None => text.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_before_bpe_without_changing_what_is_kept() {
        let tok = ClipTokenizer::bundled(Family::Sd1);
        let words = "a photo of a cat sitting on a red chair, ".repeat(400);
        let full = tok.encode(&words);
        let cut = tok.tokenize(&words, 3);
        assert_eq!(cut.ids.len(), 3 * WINDOW);
        assert_eq!(cut.ids[1..76], full[..75]);
        assert!(cut.dropped > 0);
        // A 10 MB word: linear time, and the window holds what a short version of it gives.
        let start = std::time::Instant::now();
        let huge = tok.tokenize(&"x".repeat(10 << 20), 1);
        assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
        assert_eq!(
            huge.ids[..76],
            tok.tokenize(&"x".repeat(MAX_WORD_CHARS), 1).ids[..76]
        );
        assert_eq!(usable_prefix("a b", 10), "a b");
    }
}
