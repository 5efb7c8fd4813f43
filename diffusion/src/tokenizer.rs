//! The CLIP byte-pair-encoding tokenizer, read from a diffusers
//! `tokenizer/` folder (`vocab.json`, `merges.txt`, the pad token from
//! `special_tokens_map.json` or `tokenizer_config.json`), and rebuilt from
//! CLIP's published `bpe_simple_vocab_16e6.txt.gz` for tiny checkpoints.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use unicode_normalization::UnicodeNormalization;

use crate::DiffusionError;

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// CLIP's context length.
pub const MAX_TOKENS: usize = 77;

/// A tokenized prompt: exactly [`MAX_TOKENS`] ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// Position of the end-of-text token (the pooled output is read there).
    pub eos_position: usize,
    /// Whether the prompt was cut to fit.
    pub truncated: bool,
}

#[derive(Debug)]
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    pattern: regex::Regex,
    bos: u32,
    eos: u32,
    pad: u32,
    /// Special tokens found in the raw text before anything else, as the
    /// reference tokenizer does (with SD 2.x's `!` pad, `!!` is two pads).
    specials: Vec<(String, u32)>,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// GPT-2's reversible mapping of bytes to printable characters, as
/// `(byte, char)` in the order the vocabulary lists them (printable bytes
/// first).
fn byte_chars_ordered() -> Vec<(u8, char)> {
    let mut bytes: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .map(|(b, c)| {
            (
                b as u8,
                char::from_u32(c).expect("code points below 512 are chars"),
            )
        })
        .collect()
}

/// The same mapping indexed by byte.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    for (b, c) in byte_chars_ordered() {
        table[b as usize] = c;
    }
    table
}

impl ClipTokenizer {
    /// Load a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt`, or
    /// the `tokenizer.json` that transformers 5 writes instead.
    pub fn from_folder(dir: &Path) -> Result<Self, DiffusionError> {
        let pad = pad_token(dir)?;
        let vocab_path = dir.join("vocab.json");
        if !vocab_path.exists() && dir.join("tokenizer.json").exists() {
            let path = dir.join("tokenizer.json");
            let v: serde_json::Value = serde_json::from_slice(&read(&path)?)
                .map_err(|e| DiffusionError::corrupt(&path, e))?;
            let model = &v["model"];
            let vocab: HashMap<String, u32> = serde_json::from_value(model["vocab"].clone())
                .map_err(|e| DiffusionError::corrupt(&path, format!("model.vocab: {e}")))?;
            // Merges are "a b" strings or [a, b] pairs, depending on the writer.
            let merges: Vec<String> = model["merges"]
                .as_array()
                .ok_or_else(|| DiffusionError::corrupt(&path, "model.merges is missing"))?
                .iter()
                .filter_map(|m| match m {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) => {
                        Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                    }
                    _ => None,
                })
                .collect();
            return Self::new(vocab, merges.iter().map(String::as_str), &pad);
        }
        let vocab: HashMap<String, u32> = serde_json::from_slice(&read(&vocab_path)?)
            .map_err(|e| DiffusionError::corrupt(&vocab_path, e))?;
        let merges_path = dir.join("merges.txt");
        let merges = String::from_utf8(read(&merges_path)?)
            .map_err(|e| DiffusionError::corrupt(&merges_path, e))?;
        Self::new(
            vocab,
            merges.lines().filter(|l| !l.starts_with("#version")),
            &pad,
        )
    }

    fn new<'a>(
        encoder: HashMap<String, u32>,
        merges: impl Iterator<Item = &'a str>,
        pad_token: &str,
    ) -> Result<Self, DiffusionError> {
        let mut ranks = HashMap::new();
        for (rank, line) in merges.enumerate() {
            let mut parts = line.split(' ');
            if let (Some(a), Some(b)) = (parts.next(), parts.next()) {
                ranks.insert((a.to_string(), b.to_string()), rank);
            }
        }
        let id = |t: &str| {
            encoder.get(t).copied().ok_or_else(|| {
                DiffusionError::BadModel(format!("the tokenizer vocabulary has no {t:?} token"))
            })
        };
        let (bos, eos, pad) = (id(START_OF_TEXT)?, id(END_OF_TEXT)?, id(pad_token)?);
        let mut specials = vec![
            (START_OF_TEXT.to_string(), bos),
            (END_OF_TEXT.to_string(), eos),
        ];
        if pad_token != START_OF_TEXT && pad_token != END_OF_TEXT {
            specials.push((pad_token.to_string(), pad));
        }
        let pattern = regex::Regex::new(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .expect("static pattern");
        Ok(Self {
            encoder,
            ranks,
            byte_chars: byte_chars(),
            pattern,
            bos,
            eos,
            pad,
            specials,
            cache: Mutex::default(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    fn bpe(&self, token: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().expect("cache lock").get(token) {
            return ids.clone();
        }
        let mapped: Vec<String> = token
            .bytes()
            .map(|b| self.byte_chars[b as usize].to_string())
            .collect();
        let mut word = mapped;
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let (a, b) = (word[i].clone(), word[i + 1].clone());
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        let ids: Vec<u32> = word
            .iter()
            .filter_map(|w| self.encoder.get(w).copied())
            .collect();
        self.cache
            .lock()
            .expect("cache lock")
            .insert(token.to_string(), ids.clone());
        ids
    }

    /// The ids of `text` without start/end tokens or padding.
    pub fn encode_words(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            let next = self
                .specials
                .iter()
                .filter_map(|(tok, id)| {
                    rest.find(tok.as_str())
                        .map(|p| (p, std::cmp::Reverse(tok.len()), *id))
                })
                .min();
            match next {
                Some((p, std::cmp::Reverse(len), id)) => {
                    ids.extend(self.encode_plain(&rest[..p]));
                    ids.push(id);
                    rest = &rest[p + len..];
                }
                None => {
                    ids.extend(self.encode_plain(rest));
                    return ids;
                }
            }
        }
    }

    /// Text without special tokens: normalize, split, byte-pair encode.
    fn encode_plain(&self, text: &str) -> Vec<u32> {
        let normalized: String = text.nfc().collect::<String>().to_lowercase();
        let cleaned = normalized.split_whitespace().collect::<Vec<_>>().join(" ");
        self.pattern
            .find_iter(&cleaned)
            .flat_map(|m| match m.as_str() {
                START_OF_TEXT => vec![self.bos],
                END_OF_TEXT => vec![self.eos],
                t => self.bpe(t),
            })
            .collect()
    }

    /// `<|startoftext|>` + up to 75 ids + `<|endoftext|>`, padded to 77.
    pub fn encode(&self, text: &str) -> Tokens {
        let mut words = self.encode_words(text);
        let truncated = words.len() > MAX_TOKENS - 2;
        words.truncate(MAX_TOKENS - 2);
        let mut ids = Vec::with_capacity(MAX_TOKENS);
        ids.push(self.bos);
        ids.extend(words);
        let eos_position = ids.len();
        ids.push(self.eos);
        ids.resize(MAX_TOKENS, self.pad);
        Tokens {
            ids,
            eos_position,
            truncated,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, DiffusionError> {
    std::fs::read(path).map_err(|e| DiffusionError::io(path, e))
}

/// The pad token a folder declares (SD 1.x pads with `<|endoftext|>`, SD 2.x
/// and SDXL with `!`).
fn pad_token(dir: &Path) -> Result<String, DiffusionError> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_slice(&read(&path)?).map_err(|e| DiffusionError::corrupt(&path, e))?;
        match v.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Ok(s.clone()),
            Some(serde_json::Value::Object(o)) => {
                if let Some(serde_json::Value::String(s)) = o.get("content") {
                    return Ok(s.clone());
                }
            }
            _ => {}
        }
    }
    Ok(END_OF_TEXT.to_string())
}

/// `vocab.json` and `merges.txt` rebuilt from CLIP's gzipped BPE merge list
/// (`bpe_simple_vocab_16e6.txt.gz`), as the reference tokenizer builds them.
pub fn vocab_from_bpe_gz(path: &Path) -> Result<(String, String), DiffusionError> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(&read(path)?[..])
        .read_to_string(&mut text)
        .map_err(|e| DiffusionError::corrupt(path, e))?;
    // The first line is a header; CLIP uses the next 49152 - 256 - 2 merges.
    let merges: Vec<&str> = text.lines().skip(1).take(49152 - 256 - 2).collect();
    if merges.len() != 49152 - 256 - 2 {
        return Err(DiffusionError::corrupt(
            path,
            format!("expected 48894 merges, found {}", merges.len()),
        ));
    }
    let ordered = byte_chars_ordered();
    let mut vocab: Vec<String> = ordered.iter().map(|(_, c)| c.to_string()).collect();
    vocab.extend(ordered.iter().map(|(_, c)| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.push(START_OF_TEXT.into());
    vocab.push(END_OF_TEXT.into());
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::Value::from(i)))
        .collect();
    let vocab_json = serde_json::to_string(&map).expect("a map of numbers serializes");
    let merges_txt = format!("#version: 0.2\n{}\n", merges.join("\n"));
    Ok((vocab_json, merges_txt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer(pad: &str) -> ClipTokenizer {
        let gz = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/clip/bpe_simple_vocab_16e6.txt.gz");
        let (vocab, merges) = vocab_from_bpe_gz(&gz).unwrap();
        let vocab: HashMap<String, u32> = serde_json::from_str(&vocab).unwrap();
        ClipTokenizer::new(vocab, merges.lines().skip(1), pad).unwrap()
    }

    #[test]
    fn rebuilt_vocabulary_gives_clips_known_ids() {
        let t = tokenizer(END_OF_TEXT);
        assert_eq!(t.vocab_size(), 49408);
        let ids = t.encode("a photo of a cat");
        assert_eq!(&ids.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!(ids.eos_position, 6);
        assert!(
            ids.ids[7..].iter().all(|&i| i == 49407),
            "SD 1.x pads with end-of-text"
        );
    }

    #[test]
    fn long_prompts_are_cut_to_77_and_flagged() {
        let t = tokenizer("!");
        let ids = t.encode(&"word ".repeat(100));
        assert!(ids.truncated);
        assert_eq!(ids.ids.len(), MAX_TOKENS);
        assert_eq!(ids.ids[76], 49407);
        assert!(!t.encode("word").truncated);
        assert_eq!(
            t.encode("word").ids[3],
            t.encode("!").ids[1],
            "the ! pad is its own token"
        );
    }
}
