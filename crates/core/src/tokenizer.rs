//! The two tokenizers of a Q-Adapt directory.
//!
//! - The LLM's GPT-2 byte-level BPE: `tokenizer.json` when the directory has one, otherwise built from
//!   `vocab.json` + `merges.txt` (+ `added_tokens.json`), the layout the real Bunny repository ships.
//! - The Q-Former's BERT WordPiece: `qformer/tokenizer.json` or `qformer/vocab.txt`, uncased with
//!   accents stripped, `[DEC]` added, truncated from the left (DESIGN §2, §7.2).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::{AddedToken, Tokenizer};

use crate::{Error, Result};

/// The end-of-text token of phi-2 (bos = eos = pad).
pub const END_OF_TEXT: &str = "<|endoftext|>";

fn tok_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Tokenizer { path: path.to_path_buf(), msg: msg.to_string() }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| tok_err(path, "path is not valid UTF-8"))
}

/// The LLM tokenizer (no BOS is added: phi-2 prompts start with plain text).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    source: PathBuf,
}

impl TextTokenizer {
    /// Loads from a model directory: `tokenizer.json`, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.exists() {
            let inner = Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?;
            return Ok(Self { inner, source: json });
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        if !vocab.exists() || !merges.exists() {
            return Err(tok_err(dir, "no tokenizer.json, and no vocab.json + merges.txt pair either"));
        }
        Self::from_bpe_files(&vocab, &merges, &dir.join("added_tokens.json"))
    }

    /// GPT-2 byte-level BPE as `GPT2Tokenizer` builds it from its files.
    pub fn from_bpe_files(vocab: &Path, merges: &Path, added: &Path) -> Result<Self> {
        let bpe = BPE::from_file(path_str(vocab)?, path_str(merges)?)
            .build()
            .map_err(|e| tok_err(vocab, format!("cannot build BPE from vocab.json + merges.txt: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if inner.token_to_id(END_OF_TEXT).is_some() {
            inner.add_special_tokens([AddedToken::from(END_OF_TEXT, true)]).map_err(|e| tok_err(vocab, e))?;
        }
        if added.exists() {
            let text = std::fs::read_to_string(added).map_err(|e| Error::io(added, e))?;
            let map: BTreeMap<String, u32> =
                serde_json::from_str(&text).map_err(|e| tok_err(added, format!("invalid JSON: {e}")))?;
            let mut by_id: Vec<(u32, String)> = map.into_iter().map(|(t, i)| (i, t)).collect();
            by_id.sort();
            for (id, content) in by_id {
                if inner.token_to_id(&content) == Some(id) && content != END_OF_TEXT {
                    continue;
                }
                let special = content == END_OF_TEXT;
                inner.add_tokens([AddedToken::from(content.clone(), special)]).map_err(|e| tok_err(added, e))?;
                let got = inner.token_to_id(&content);
                if got != Some(id) {
                    return Err(tok_err(added, format!("added token {content:?} should have id {id}, got {got:?}: ids must follow the vocabulary without gaps")));
                }
            }
        }
        Ok(Self { inner, source: vocab.to_path_buf() })
    }

    /// Token ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens skipped, ids outside the tokenizer (padded vocab rows) dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let size = self.vocab_size() as u32;
        let known: Vec<u32> = ids.iter().copied().filter(|&i| i < size).collect();
        self.inner.decode(&known, true).map_err(|e| tok_err(&self.source, e))
    }

    /// Id of a token string, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the tokenizer knows (smaller than the model's padded `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` object, e.g. to save it as `tokenizer.json`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// The Q-Former's BERT WordPiece tokenizer with `[CLS] … [SEP]` and left truncation.
#[derive(Clone)]
pub struct QFormerTokenizer {
    inner: Tokenizer,
    source: PathBuf,
}

impl QFormerTokenizer {
    /// Loads `qformer/tokenizer.json` or `qformer/vocab.txt` under a model directory.
    pub fn from_dir(model_dir: &Path, max_length: usize) -> Result<Self> {
        let dir = model_dir.join("qformer");
        let json = dir.join("tokenizer.json");
        let (mut inner, source) = if json.exists() {
            (Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?, json)
        } else {
            let vocab = dir.join("vocab.txt");
            if !vocab.exists() {
                return Err(tok_err(
                    &dir,
                    "Q-Adapt needs the Q-Former tokenizer: no qformer/tokenizer.json or qformer/vocab.txt",
                ));
            }
            (Self::wordpiece_from_vocab(&vocab)?, vocab)
        };
        if inner.token_to_id("[DEC]").is_none() {
            inner.add_special_tokens([AddedToken::from("[DEC]", true)]).map_err(|e| tok_err(&source, e))?;
        }
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Left,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| tok_err(&source, e))?;
        inner.with_padding(None);
        Ok(Self { inner, source })
    }

    fn wordpiece_from_vocab(vocab: &Path) -> Result<Tokenizer> {
        let wp = WordPiece::from_file(path_str(vocab)?)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut inner = Tokenizer::new(wp);
        // bert-base-uncased: clean text, split CJK, lower-case, strip accents (implied by lowercase).
        inner.with_normalizer(Some(BertNormalizer::new(true, true, None, true))).map_err(|e| tok_err(vocab, e))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| tok_err(vocab, format!("vocabulary lacks {t}")));
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        inner.with_post_processor(Some(BertProcessing::new(("[SEP]".into(), sep), ("[CLS]".into(), cls))));
        inner.with_decoder(Some(WordPieceDecoder::default()));
        for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] {
            if inner.token_to_id(t).is_some() {
                inner.add_special_tokens([AddedToken::from(t, true)]).map_err(|e| tok_err(vocab, e))?;
            }
        }
        Ok(inner)
    }

    /// `[CLS] text [SEP]` ids, left-truncated to the configured maximum length.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
