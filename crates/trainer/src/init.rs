//! `qadapt-train init`: a random-initialised model directory in the hub layout for any config — the
//! tiny test sizes and the real Bunny-3B / Q-Adapt shapes alike. The parameter list comes from the
//! model definition itself (a weightless source records what `Bunny::new` asks for), and tensors are
//! generated one at a time straight into the shards.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use models::bunny::dims_from_config;
use models::loader::ShapeOnly;
use models::train_source::init_tensor;
use models::Bunny;
use qadapt_core::template::{SCORE_ANSWER_PREFIX, SCORE_QUESTION, SYSTEM};
use qadapt_core::tokenizer::END_OF_TEXT;
use qadapt_core::{BunnyConfig, ModelType};
use rand::SeedableRng;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::files::{copy_tokenizers, write_dir_atomic};
use crate::shards::write_sharded;

/// Options of `init`.
pub struct InitOptions {
    pub config: PathBuf,
    pub out: PathBuf,
    pub seed: u64,
    pub tokenizer: Option<PathBuf>,
    pub data: Vec<PathBuf>,
    pub bpe_vocab: usize,
    pub dtype: DType,
    pub shard_bytes: usize,
}

fn texts_of(data: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    for f in data {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?)
                .with_context(|| format!("{}: invalid JSON", f.display()))?;
        for row in v.as_array().with_context(|| format!("{}: not a JSON list", f.display()))? {
            for turn in row["conversations"].as_array().into_iter().flatten() {
                if let Some(s) = turn["value"].as_str() {
                    texts.push(s.replace("<image>", ""));
                }
            }
        }
    }
    // The template's fixed text, often enough to earn whole-word merges.
    for _ in 0..50 {
        texts.push(format!(
            "{SYSTEM} USER: {SCORE_QUESTION} ASSISTANT: {SCORE_ANSWER_PREFIX} excellent good fair poor bad"
        ));
    }
    Ok(texts)
}

fn train_bpe(texts: &[String], vocab: usize, dir: &Path) -> anyhow::Result<u32> {
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train(&mut trainer, texts.iter()).map_err(|e| anyhow::anyhow!("training the BPE tokenizer: {e}"))?;
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
    tok.token_to_id(END_OF_TEXT).context("trained tokenizer lacks <|endoftext|>")
}

/// The Q-Former's WordPiece vocabulary (`qformer/vocab.txt`) from the training texts, built here
/// rather than by `tokenizers`' WordPiece trainer, whose ids (and, at ties, merges) follow a HashMap's
/// per-process order: two `init`s of the same data would give different tokenizers and so different
/// training runs. BERT's normalizer (lower case, accents stripped) and pre-tokenizer split the texts;
/// the vocabulary is the five specials, every character seen (alone and as a `##` continuation, in
/// code-point order), then whole words by frequency (ties in byte order) up to 2000 entries.
fn train_wordpiece(texts: &[String], dir: &Path) -> anyhow::Result<usize> {
    use std::collections::{BTreeMap, BTreeSet};
    use tokenizers::{NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    const VOCAB: usize = 2000;
    let normalizer = BertNormalizer::new(true, true, None, true);
    let mut words: BTreeMap<String, usize> = BTreeMap::new();
    for t in texts {
        let mut n = NormalizedString::from(t.as_str());
        normalizer.normalize(&mut n).map_err(|e| anyhow::anyhow!("normalizing {t:?}: {e}"))?;
        let mut pre = PreTokenizedString::from(n);
        BertPreTokenizer.pre_tokenize(&mut pre).map_err(|e| anyhow::anyhow!("splitting {t:?}: {e}"))?;
        for (w, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *words.entry(w.to_string()).or_default() += 1;
        }
    }
    let chars: BTreeSet<char> = words.keys().flat_map(|w| w.chars()).collect();
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from).to_vec();
    vocab.extend(chars.iter().map(|c| c.to_string()));
    vocab.extend(chars.iter().map(|c| format!("##{c}")));
    let mut by_count: Vec<(&String, &usize)> = words.iter().filter(|(w, _)| w.chars().count() > 1).collect();
    by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let room = VOCAB.saturating_sub(vocab.len());
    vocab.extend(by_count.into_iter().take(room).map(|(w, _)| w.clone()));
    let q = dir.join("qformer");
    std::fs::create_dir_all(&q)?;
    let lines: String = vocab.iter().map(|t| format!("{t}\n")).collect();
    std::fs::write(q.join("vocab.txt"), lines)?;
    Ok(vocab.len())
}

/// Each tensor draws from its own stream, seeded by (seed, key): a tensor's values do not move when
/// another tensor is added or resized (the Q-Former's vocabulary follows the data, for one).
fn tensor_rng(seed: u64, key: &str) -> rand::rngs::StdRng {
    // FNV-1a: fixed across platforms and Rust versions, unlike std's hasher.
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    rand::rngs::StdRng::seed_from_u64(seed ^ h)
}

/// Writes the directory; returns (tensors, parameters, shards).
pub fn run(opts: &InitOptions) -> anyhow::Result<(usize, usize, usize)> {
    let mut config = BunnyConfig::from_file(&opts.config)?;
    let text = std::fs::read_to_string(&opts.config)?;
    let mut raw: serde_json::Value = serde_json::from_str(&text)?;
    let mut entries: Vec<(String, Vec<usize>)> = Vec::new();
    let mut shards = 0;
    let out = opts.out.clone();
    write_dir_atomic(&out, |dir| {
        // Tokenizers first: a trained BPE decides the special ids the config must carry.
        match (&opts.tokenizer, opts.data.is_empty()) {
            (Some(src), _) => {
                anyhow::ensure!(copy_tokenizers(src, dir)?, "--tokenizer {}: no tokenizer files there", src.display());
            }
            (None, false) => {
                let texts = texts_of(&opts.data)?;
                let eos = train_bpe(&texts, opts.bpe_vocab, dir)?;
                for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                    raw[k] = eos.into();
                }
                config.bos_token_id = eos;
                config.eos_token_id = eos;
                if config.model_type == ModelType::QAdapt {
                    let n = train_wordpiece(&texts, dir)?;
                    let q = config.qformer_config.get_or_insert_with(Default::default);
                    q.vocab_size = n + 1;
                    q.dec_token_id = n as u32;
                    raw["qformer_config"]["vocab_size"] = (n + 1).into();
                    raw["qformer_config"]["dec_token_id"] = n.into();
                }
            }
            (None, true) => bail!("init needs --tokenizer DIR or --data FILE.json to train one"),
        }
        let tok = qadapt_core::TextTokenizer::from_dir(dir)?;
        anyhow::ensure!(
            tok.vocab_size() <= config.vocab_size,
            "the tokenizer has {} tokens but the config's vocab_size is {}",
            tok.vocab_size(),
            config.vocab_size
        );
        if config.model_type == ModelType::QAdapt {
            let q = config.qformer_config.clone().unwrap_or_default();
            let qt = qadapt_core::QFormerTokenizer::from_dir(dir, q.max_text_length)?;
            anyhow::ensure!(
                qt.inner().get_vocab_size(true) <= q.vocab_size,
                "the Q-Former tokenizer is larger than qformer_config.vocab_size {}",
                q.vocab_size
            );
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&raw)?)?;

        // Weights: exactly what the model asks for, random, streamed.
        let src = ShapeOnly::new(dims_from_config(&config));
        Bunny::new(&src, config.clone())?;
        entries = src.requested();
        let bar = indicatif::ProgressBar::new(entries.len() as u64);
        shards = write_sharded(dir, &entries, opts.dtype, opts.shard_bytes, |k, s| {
            bar.inc(1);
            Ok(init_tensor(k, s, &mut tensor_rng(opts.seed, k), &Device::Cpu)?)
        })?;
        bar.finish_and_clear();
        Ok(())
    })?;
    let params = entries.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    Ok((entries.len(), params, shards))
}
