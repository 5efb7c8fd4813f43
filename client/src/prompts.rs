//! Prompt files: `.txt` (one prompt per line, blank lines and `#` comments
//! skipped), `.jsonl` (one object per line with per-item overrides) and
//! `.csv` (a header naming `prompt` and any override columns).

use std::path::Path;

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
];

/// Reads a prompt file, refusing empty, non-UTF-8 and malformed files with
/// the line that is wrong.
pub fn read_prompt_file(path: &Path) -> anyhow::Result<Vec<PromptItem>> {
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
        _ => Ok(parse_txt(&text)),
    }
    .with_context(|| format!("in prompt file {}", path.display()))?;
    if items.is_empty() {
        bail!(
            "prompt file {} has no prompts (blank lines and # comments are skipped)",
            path.display()
        );
    }
    Ok(items)
}

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

fn parse_jsonl(text: &str) -> anyhow::Result<Vec<PromptItem>> {
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
        let mut item = PromptItem::default();
        for (key, v) in obj {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Null => continue,
                other => bail!("line {}: {key:?} has an unsupported value {other}", n + 1),
            };
            set_field(&mut item, key, &text).with_context(|| format!("line {}", n + 1))?;
        }
        if item.prompt.is_empty() {
            bail!("line {}: missing \"prompt\"", n + 1);
        }
        items.push(item);
    }
    Ok(items)
}

fn parse_csv(text: &str) -> anyhow::Result<Vec<PromptItem>> {
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
        let mut item = PromptItem::default();
        for (key, value) in headers.iter().zip(record.iter()) {
            if !value.is_empty() {
                set_field(&mut item, key, value).with_context(|| format!("row {}", n + 2))?;
            }
        }
        if item.prompt.is_empty() {
            continue;
        }
        items.push(item);
    }
    Ok(items)
}

fn set_field(item: &mut PromptItem, key: &str, value: &str) -> anyhow::Result<()> {
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
        let items = read_prompt_file(&p).unwrap();
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
        let items = read_prompt_file(&p).unwrap();
        assert_eq!((items[0].seed, items[0].width), (Some(5), Some(128)));
    }

    #[test]
    fn csv_needs_a_prompt_column() {
        let (_d, p) = write("p.csv", b"prompt,seed\n\"a, b\",3\nc,\n");
        let items = read_prompt_file(&p).unwrap();
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
}
