//! Prompt files: `.txt` (one prompt per line, blank lines and `#` comments
//! skipped), `.jsonl` (one object per line with per-item overrides) and
//! `.csv` (a header naming `prompt` and any override columns).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hallmark_proto::v1::PromptItem;

/// Override columns/keys a prompt line may carry besides `prompt`.
const FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance",
    "scheduler",
    "init_image",
    "strength",
    "mask",
    "mask_blur",
    "mask_crop",
    "outpaint",
];

/// A prompt file read: its items, and the init images and masks they name
/// (each item's `init_image_sha256` and `mask_sha256` is the sha256 of one
/// of these files).
#[derive(Debug, Default)]
pub struct PromptFile {
    pub items: Vec<PromptItem>,
    /// (sha256, path) of every distinct init image and mask.
    pub uploads: Vec<(String, PathBuf)>,
    /// What was read of each of those pictures, by sha256.
    pub pictures: HashMap<String, Picture>,
}

/// What the CLI knows of a picture it read: its size, and whether it is
/// black everywhere (as a mask: nothing to repaint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub black: bool,
}

/// Reads a prompt file, refusing empty, non-UTF-8 and malformed files with
/// the line that is wrong. An `init_image` or `mask` is a path relative to
/// the file's folder; it is read here (and refused if it is not an image).
pub fn read_prompt_file(path: &Path) -> anyhow::Result<PromptFile> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading prompt file {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "prompt file {} is not UTF-8 text (invalid byte at offset {}); save it as UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let items = match ext.as_str() {
        "jsonl" | "ndjson" => parse_jsonl(&text),
        "csv" => parse_csv(&text),
        _ => Ok(parse_txt(&text)
            .into_iter()
            .map(|i| (i, LinePaths::default()))
            .collect()),
    }
    .with_context(|| format!("in prompt file {}", path.display()))?;
    if items.is_empty() {
        bail!(
            "prompt file {} has no prompts (blank lines and # comments are skipped)",
            path.display()
        );
    }
    let folder = path.parent().unwrap_or(Path::new("."));
    let mut file = PromptFile::default();
    // Each path is read once; files with the same bytes are uploaded once.
    let mut read: HashMap<PathBuf, String> = HashMap::new();
    let mut uploads: HashSet<String> = HashSet::new();
    let mut resolve = |name: &str, file: &mut PromptFile| -> anyhow::Result<String> {
        let image = folder.join(name);
        if let Some(sha) = read.get(&image) {
            return Ok(sha.clone());
        }
        let read_file = crate::InitImageFile::read(&image)
            .with_context(|| format!("in prompt file {}, {name:?}", path.display()))?;
        let sha = read_file.sha256.clone();
        if uploads.insert(sha.clone()) {
            file.uploads.push((sha.clone(), image.clone()));
            file.pictures.insert(sha.clone(), read_file.picture);
        }
        read.insert(image, sha.clone());
        Ok(sha)
    };
    for (mut item, paths) in items {
        if let Some(init) = &paths.init {
            item.init_image_sha256 = Some(resolve(init, &mut file)?);
        }
        if let Some(mask) = &paths.mask {
            item.mask_sha256 = Some(resolve(mask, &mut file)?);
        }
        file.items.push(item);
    }
    Ok(file)
}

/// The files a prompt line names, relative to the prompt file.
#[derive(Debug, Default)]
struct LinePaths {
    init: Option<String>,
    mask: Option<String>,
}

/// A parsed line: the item and the files it names.
type Line = (PromptItem, LinePaths);

/// One prompt per line; blank lines and `#` comments are skipped.
pub fn parse_txt(text: &str) -> Vec<PromptItem> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| PromptItem {
            prompt: l.to_string(),
            ..Default::default()
        })
        .collect()
}

fn parse_jsonl(text: &str) -> anyhow::Result<Vec<Line>> {
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("line {}: not valid JSON", n + 1))?;
        let obj = value
            .as_object()
            .with_context(|| format!("line {}: expected a JSON object", n + 1))?;
        let mut line = Line::default();
        for (key, v) in obj {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Null => continue,
                other => bail!("line {}: {key:?} has an unsupported value {other}", n + 1),
            };
            set_field(&mut line, key, &text).with_context(|| format!("line {}", n + 1))?;
        }
        if line.0.prompt.is_empty() {
            bail!("line {}: missing \"prompt\"", n + 1);
        }
        items.push(line);
    }
    Ok(items)
}

fn parse_csv(text: &str) -> anyhow::Result<Vec<Line>> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader.headers().context("reading the CSV header")?.clone();
    if !headers.iter().any(|h| h == "prompt") {
        bail!(
            "the CSV header has no \"prompt\" column (found: {})",
            headers.iter().collect::<Vec<_>>().join(", ")
        );
    }
    let mut items = Vec::new();
    for (n, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("row {}", n + 2))?;
        let mut line = Line::default();
        for (key, value) in headers.iter().zip(record.iter()) {
            if !value.is_empty() {
                set_field(&mut line, key, value).with_context(|| format!("row {}", n + 2))?;
            }
        }
        if line.0.prompt.is_empty() {
            continue;
        }
        items.push(line);
    }
    Ok(items)
}

fn set_field((item, paths): &mut Line, key: &str, value: &str) -> anyhow::Result<()> {
    fn num<T: std::str::FromStr>(key: &str, value: &str) -> anyhow::Result<T> {
        value
            .parse()
            .map_err(|_| anyhow::anyhow!("{key} {value:?} is not a valid number"))
    }
    match key {
        "prompt" => item.prompt = value.to_string(),
        "negative_prompt" => item.negative_prompt = Some(value.to_string()),
        "seed" => item.seed = Some(num(key, value)?),
        "width" => item.width = Some(num(key, value)?),
        "height" => item.height = Some(num(key, value)?),
        "steps" => item.steps = Some(num(key, value)?),
        "guidance" => item.guidance = Some(num(key, value)?),
        "scheduler" => item.scheduler = Some(value.to_string()),
        "init_image" => paths.init = Some(value.to_string()),
        "mask" => paths.mask = Some(value.to_string()),
        "strength" => item.strength = Some(num(key, value)?),
        "mask_blur" => item.mask_blur = Some(num(key, value)?),
        "mask_crop" if value.eq_ignore_ascii_case("none") => item.no_mask_crop = true,
        "mask_crop" => item.mask_crop = Some(num(key, value)?),
        "outpaint" if value.eq_ignore_ascii_case("none") => {
            item.outpaint = Some(hallmark_proto::v1::Outpaint::default());
        }
        "outpaint" => {
            item.outpaint =
                Some(crate::parse_outpaint(value).map_err(|e| anyhow::anyhow!("outpaint: {e}"))?);
        }
        other => bail!("unknown field {other:?}; allowed: {}", FIELDS.join(", ")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn txt_skips_blank_lines_and_comments() {
        let (_d, p) = write("p.txt", b"# header\n\na red fox\n  \n# note\nblue sky\n");
        let items = read_prompt_file(&p).unwrap().items;
        assert_eq!(
            items.iter().map(|i| i.prompt.as_str()).collect::<Vec<_>>(),
            ["a red fox", "blue sky"]
        );
    }

    #[test]
    fn jsonl_carries_overrides_and_names_bad_lines() {
        let (_d, p) = write("p.jsonl", b"{\"prompt\": \"a\", \"seed\": 5, \"width\": 128}\n{\"prompt\": \"b\", \"steps\": \"x\"}\n");
        let err = format!("{:#}", read_prompt_file(&p).unwrap_err());
        assert!(err.contains("line 2") && err.contains("steps"), "{err}");
        let (_d, p) = write(
            "p.jsonl",
            b"{\"prompt\": \"a\", \"seed\": 5, \"width\": 128}\n",
        );
        let items = read_prompt_file(&p).unwrap().items;
        assert_eq!((items[0].seed, items[0].width), (Some(5), Some(128)));
    }

    #[test]
    fn lines_may_set_their_own_mask_blur_and_crop() {
        let (_d, p) = write(
            "p.jsonl",
            b"{\"prompt\": \"a\", \"mask_blur\": 6, \"mask_crop\": 0}\n{\"prompt\": \"b\"}\n",
        );
        let items = read_prompt_file(&p).unwrap().items;
        assert_eq!((items[0].mask_blur, items[0].mask_crop), (Some(6), Some(0)));
        assert_eq!((items[1].mask_blur, items[1].mask_crop), (None, None));
        let (_d, p) = write("p.csv", b"prompt,mask_crop\na,16\nb,-3\n");
        let err = format!("{:#}", read_prompt_file(&p).unwrap_err());
        assert!(err.contains("row 3") && err.contains("mask_crop"), "{err}");
        // `none`: the whole image, where the job crops.
        let (_d, p) = write(
            "p.csv",
            b"prompt,mask_crop
a,none
b,
",
        );
        let items = read_prompt_file(&p).unwrap().items;
        assert_eq!(
            items.iter().map(|i| i.no_mask_crop).collect::<Vec<_>>(),
            [true, false]
        );
    }

    #[test]
    fn lines_may_set_their_own_outpaint_or_none() {
        let (_d, p) = write(
            "p.jsonl",
            b"{\"prompt\": \"a\", \"outpaint\": \"left=64, bottom=8\"}\n\
              {\"prompt\": \"b\", \"outpaint\": \"none\"}\n{\"prompt\": \"c\"}\n",
        );
        let items = read_prompt_file(&p).unwrap().items;
        let margins =
            |o: Option<hallmark_proto::v1::Outpaint>| o.map(|o| (o.left, o.top, o.right, o.bottom));
        assert_eq!(
            items
                .iter()
                .map(|i| margins(i.outpaint))
                .collect::<Vec<_>>(),
            [Some((64, 0, 0, 8)), Some((0, 0, 0, 0)), None]
        );
        let (_d, p) = write("p.csv", b"prompt,outpaint\na,left=8\nb,up=8\n");
        let err = format!("{:#}", read_prompt_file(&p).unwrap_err());
        assert!(
            err.contains("row 3") && err.contains("outpaint") && err.contains("\"up\""),
            "{err}"
        );
    }

    #[test]
    fn csv_needs_a_prompt_column() {
        let (_d, p) = write("p.csv", b"prompt,seed\n\"a, b\",3\nc,\n");
        let items = read_prompt_file(&p).unwrap().items;
        assert_eq!(items[0].prompt, "a, b");
        assert_eq!(items[0].seed, Some(3));
        assert_eq!(items[1].seed, None);
        let (_d, p) = write("p.csv", b"text\nx\n");
        assert!(
            format!("{:#}", read_prompt_file(&p).unwrap_err()).contains("no \"prompt\" column")
        );
    }

    #[test]
    fn empty_and_non_utf8_files_are_refused() {
        let (_d, p) = write("p.txt", b"\n# only a comment\n");
        assert!(
            read_prompt_file(&p)
                .unwrap_err()
                .to_string()
                .contains("has no prompts")
        );
        let (_d, p) = write("p.txt", b"ok\n\xff\xfe bad\n");
        assert!(
            read_prompt_file(&p)
                .unwrap_err()
                .to_string()
                .contains("not UTF-8")
        );
    }

    #[test]
    fn init_images_are_read_relative_to_the_file_once_each() {
        let (dir, p) = write(
            "p.jsonl",
            b"{\"prompt\": \"a\", \"init_image\": \"in/cat.png\", \"strength\": 0.4}\n\
              {\"prompt\": \"b\", \"init_image\": \"in/cat.png\"}\n{\"prompt\": \"c\"}\n",
        );
        std::fs::create_dir(dir.path().join("in")).unwrap();
        image::RgbImage::new(16, 8)
            .save(dir.path().join("in/cat.png"))
            .unwrap();
        let file = read_prompt_file(&p).unwrap();
        assert_eq!(file.uploads.len(), 1, "one file, read once");
        let (sha, path) = &file.uploads[0];
        assert_eq!(path, &dir.path().join("in/cat.png"));
        assert_eq!(
            sha,
            &hallmark_provenance::sha256_hex(&std::fs::read(path).unwrap())
        );
        let inits: Vec<_> = file
            .items
            .iter()
            .map(|i| i.init_image_sha256.clone())
            .collect();
        assert_eq!(inits, [Some(sha.clone()), Some(sha.clone()), None]);
        assert_eq!(file.items[0].strength, Some(0.4));
        assert_eq!(file.items[1].strength, None);
        // A missing or unreadable image names the file and the line's path.
        std::fs::write(dir.path().join("in/cat.png"), b"not an image").unwrap();
        let err = format!("{:#}", read_prompt_file(&p).unwrap_err());
        assert!(
            err.contains("in/cat.png") && err.contains("not a usable image"),
            "{err}"
        );
    }

    #[test]
    fn masks_are_read_like_init_images_and_uploaded_once_with_them() {
        let (dir, p) = write(
            "p.csv",
            b"prompt,init_image,mask\na,cat.png,m.png\nb,cat.png,\nc,cat.png,m.png\n",
        );
        image::RgbImage::new(16, 8)
            .save(dir.path().join("cat.png"))
            .unwrap();
        image::RgbImage::from_pixel(16, 8, image::Rgb([255, 255, 255]))
            .save(dir.path().join("m.png"))
            .unwrap();
        let file = read_prompt_file(&p).unwrap();
        let names: Vec<_> = file
            .uploads
            .iter()
            .map(|(_, p)| p.file_name().unwrap())
            .collect();
        assert_eq!(names, ["cat.png", "m.png"], "each file once");
        let mask_sha = &file.uploads[1].0;
        let masks: Vec<_> = file.items.iter().map(|i| i.mask_sha256.clone()).collect();
        assert_eq!(
            masks,
            [Some(mask_sha.clone()), None, Some(mask_sha.clone())]
        );
        std::fs::remove_file(dir.path().join("m.png")).unwrap();
        let err = format!("{:#}", read_prompt_file(&p).unwrap_err());
        assert!(err.contains("m.png"), "{err}");
    }
}
