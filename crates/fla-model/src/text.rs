//! Text for language models: tokenizers (the built-in byte-level one, or a tokenizer.json
//! through Hugging Face's `tokenizers`), BPE training, and the training and validation
//! token streams of a set of text files.

use std::path::{Path, PathBuf};

use fla_tensor::{Error, Result};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::rng::Rng;
use crate::train::{Batch, Task};

/// The token that separates documents in a BPE vocabulary this crate trains.
pub const END_OF_TEXT: &str = "<|endoftext|>";

pub enum Tokenizer {
    /// One token per byte (vocabulary 256); any text round-trips.
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

fn tok_err(path: &Path) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::Format {
        path: path.into(),
        message: format!("tokenizer: {e}"),
    }
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        if !path.exists() {
            return Err(Error::Io {
                path: path.into(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such tokenizer file"),
            });
        }
        let t = tokenizers::Tokenizer::from_file(path).map_err(tok_err(path))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// The model directory's tokenizer.json if there is one, else the byte-level tokenizer.
    pub fn for_model(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if path.exists() {
            Tokenizer::from_file(&path)
        } else {
            Ok(Tokenizer::Bytes)
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<usize>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(usize::from).collect()),
            Tokenizer::Hf(t) => Ok(t
                .encode(text, false)
                .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?
                .get_ids()
                .iter()
                .map(|&i| i as usize)
                .collect()),
        }
    }

    /// Text of `ids`; bytes that do not form UTF-8 (a cut multi-byte character) show as �.
    pub fn decode(&self, ids: &[usize]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i.min(255) as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Hf(t) => {
                let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                t.decode(&ids, false)
                    .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))
            }
        }
    }

    /// Checks every id the tokenizer makes fits the model's vocabulary.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        if self.vocab_size() > vocab_size {
            return Err(Error::Invalid(format!(
                "the tokenizer has {} tokens but the model's vocab_size is {vocab_size}",
                self.vocab_size()
            )));
        }
        Ok(())
    }
}

/// Fits a byte-level BPE tokenizer of `vocab_size` tokens on `files` and writes it to
/// `output` (tokenizer.json), atomically.
pub fn train_bpe(files: &[PathBuf], vocab_size: usize, output: &Path) -> Result<()> {
    for f in files {
        if !f.exists() {
            return Err(Error::Io {
                path: f.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such text file"),
            });
        }
    }
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    // No prefix space, so that decode(encode(text)) == text.
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    let names: Vec<String> = files
        .iter()
        .map(|f| f.to_string_lossy().into_owned())
        .collect();
    tok.train_from_files(&mut trainer, names)
        .map_err(tok_err(output))?;
    let json = tok.to_string(true).map_err(tok_err(output))?;
    fla_tensor::write_atomic(output, json.as_bytes())
}

/// The tokens of text files, split into training and validation parts (the last
/// `val_fraction` of each file is validation).
pub struct Corpus {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    /// UTF-8 bytes of the validation text, for bits per byte.
    pub val_bytes: usize,
}

impl Corpus {
    pub fn load(files: &[PathBuf], tok: &Tokenizer, val_fraction: f64) -> Result<Corpus> {
        let mut c = Corpus {
            train: Vec::new(),
            val: Vec::new(),
            val_bytes: 0,
        };
        for f in files {
            let text = std::fs::read_to_string(f).map_err(|source| Error::Io {
                path: f.clone(),
                source,
            })?;
            let mut cut = ((text.len() as f64) * (1.0 - val_fraction)) as usize;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            c.train.extend(tok.encode(&text[..cut])?);
            c.val.extend(tok.encode(&text[cut..])?);
            c.val_bytes += text.len() - cut;
        }
        Ok(c)
    }
}

/// Language-model batches: windows of `seq_len + 1` tokens at random offsets of a stream;
/// the target of each position is the next token.
#[derive(Clone)]
pub struct TextTask<'a> {
    pub tokens: &'a [usize],
    pub seq_len: usize,
    pub batch_size: usize,
}

impl TextTask<'_> {
    pub fn check(&self) -> Result<()> {
        if self.tokens.len() <= self.seq_len + 1 {
            return Err(Error::Invalid(format!(
                "the training text has {} tokens, too few for sequences of {}",
                self.tokens.len(),
                self.seq_len
            )));
        }
        Ok(())
    }
}

/// ids and next-token targets of the window starting at `at`.
pub fn window(tokens: &[usize], at: usize, t: usize) -> (&[usize], Vec<i64>) {
    (
        &tokens[at..at + t],
        tokens[at + 1..at + t + 1]
            .iter()
            .map(|&x| x as i64)
            .collect(),
    )
}

impl Task for TextTask<'_> {
    fn batch(&mut self, rng: &mut Rng) -> Batch {
        let (mut ids, mut targets) = (Vec::new(), Vec::new());
        let span = self.tokens.len() - self.seq_len - 1;
        for _ in 0..self.batch_size {
            let (i, t) = window(self.tokens, rng.below(span + 1), self.seq_len);
            ids.extend_from_slice(i);
            targets.extend(t);
        }
        Batch {
            ids,
            targets,
            b: self.batch_size,
            t: self.seq_len,
        }
    }
}

/// Mean next-token loss over consecutive windows of `seq_len + 1` tokens stepping by
/// `seq_len` (every token after the first is predicted once), at most `max_windows`
/// windows; returns the mean loss in nats and the number of tokens predicted.
pub fn evaluate_lm(
    model: &mut dyn crate::learner::Scorer,
    tokens: &[usize],
    seq_len: usize,
    batch_size: usize,
    max_windows: usize,
) -> Result<(f64, usize)> {
    if tokens.len() < 2 {
        return Err(Error::Invalid(
            "the evaluation text has fewer than 2 tokens".into(),
        ));
    }
    let starts: Vec<usize> = (0..tokens.len() - 1)
        .step_by(seq_len)
        .take(max_windows)
        .collect();
    let (mut nats, mut count) = (0.0, 0usize);
    // Windows of one length batch together; the last, shorter one runs alone.
    let full: Vec<usize> = starts
        .iter()
        .copied()
        .filter(|&s| s + seq_len < tokens.len())
        .collect();
    let mut groups: Vec<(Vec<usize>, usize)> = full
        .chunks(batch_size.max(1))
        .map(|c| (c.to_vec(), seq_len))
        .collect();
    if let Some(&last) = starts.last().filter(|&&s| s + seq_len >= tokens.len()) {
        groups.push((vec![last], tokens.len() - 1 - last));
    }
    for (group, t) in groups {
        let (mut ids, mut targets) = (Vec::new(), Vec::new());
        for &s in &group {
            let (i, tg) = window(tokens, s, t);
            ids.extend_from_slice(i);
            targets.extend(tg);
        }
        let (loss, _) = model.score(&ids, group.len(), t, &targets, false)?;
        nats += loss * targets.len() as f64;
        count += targets.len();
    }
    Ok((nats / count as f64, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_bpe_trains() {
        let t = Tokenizer::Bytes;
        let ids = t.encode("héllo").unwrap();
        assert_eq!(ids.len(), 6);
        assert_eq!(t.decode(&ids).unwrap(), "héllo");
        let dir = std::env::temp_dir().join(format!("fla-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("a.txt");
        std::fs::write(
            &text,
            "the cat sat on the mat. the cat ate the rat. ".repeat(50),
        )
        .unwrap();
        let out = dir.join("tokenizer.json");
        train_bpe(&[text], 300, &out).unwrap();
        let bpe = Tokenizer::from_file(&out).unwrap();
        assert!(bpe.vocab_size() > 256 && bpe.vocab_size() <= 300);
        let ids = bpe.encode("the cat sat on the mat.").unwrap();
        assert!(ids.len() < 10, "{ids:?}");
        assert_eq!(bpe.decode(&ids).unwrap(), "the cat sat on the mat.");
        assert!(bpe.check_fits(256).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
