//! Models from the Hugging Face Hub. `hf:owner/name[@revision]` resolves to
//! a snapshot folder in the diffusers layout inside the Hub cache, downloaded
//! through the `hf-hub` crate — only the files this engine loads: the
//! pipeline's `model_index.json`, the configs and tokenizer files of the
//! components it runs, and one set of `.safetensors` weights per component
//! (the requested variant where the repository has it). The folder then
//! opens through [`crate::model::ModelFolder`] like any local one.
//!
//! Settings follow the Hub's own conventions: `HF_ENDPOINT` (another hub or
//! a mirror), `HF_HOME` (the cache), `HF_TOKEN` (or the cache's token file),
//! `HF_HUB_OFFLINE=1` (use what the cache holds, no network).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::DiffusionError;

/// The components this engine loads (others, such as a safety checker, are
/// not downloaded).
const COMPONENTS: &[&str] = &[
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
];

/// A model on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    /// `owner/name`.
    pub repo: String,
    pub revision: String,
}

impl HubModel {
    /// `hf:owner/name[@revision]`; `None` for anything else (a local path).
    pub fn parse(s: &str) -> Option<Result<Self, DiffusionError>> {
        let rest = s.strip_prefix("hf:")?;
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) => (r, v),
            None => (rest, "main"),
        };
        let valid = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let ok = matches!(repo.split_once('/'), Some((o, n)) if valid(o) && valid(n))
            && !revision.is_empty();
        Some(if ok {
            Ok(Self {
                repo: repo.to_string(),
                revision: revision.to_string(),
            })
        } else {
            Err(DiffusionError::BadRequest(format!(
                "{s:?} is not a Hub model reference (hf:owner/name or hf:owner/name@revision)"
            )))
        })
    }

    /// The short name used as the model's id (`name`).
    pub fn name(&self) -> &str {
        self.repo.rsplit('/').next().unwrap_or(&self.repo)
    }
}

/// Where and how to reach the Hub.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// `None`: `https://huggingface.co` (or `HF_ENDPOINT`).
    pub endpoint: Option<String>,
    /// `None`: the Hub cache (`HF_HOME`, else `~/.cache/huggingface`).
    pub cache_dir: Option<PathBuf>,
    pub token: Option<String>,
    /// Use the cache only.
    pub offline: bool,
}

impl HubOptions {
    /// From `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            endpoint: var("HF_ENDPOINT"),
            cache_dir: var("HF_HOME").map(|h| PathBuf::from(h).join("hub")),
            token: var("HF_TOKEN"),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| v != "0"),
        }
    }

    fn cache(&self) -> Cache {
        match &self.cache_dir {
            Some(d) => Cache::new(d.clone()),
            None => Cache::from_env(),
        }
    }
}

/// The variant tag of a weights file name (`fp16` in
/// `diffusion_pytorch_model.fp16.safetensors`,
/// `model.fp16-00001-of-00002.safetensors` and
/// `model.safetensors.index.fp16.json`), `None` for the full-precision file.
fn weight_variant(name: &str) -> Option<&str> {
    if let Some(stem) = name.strip_suffix(".safetensors") {
        let (_, tail) = stem.rsplit_once('.')?;
        return tail.split('-').next();
    }
    let (_, tail) = name.split_once(".safetensors.index.")?;
    tail.strip_suffix(".json")
}

fn is_weights(name: &str) -> bool {
    name.ends_with(".safetensors") || name.contains(".safetensors.index.")
}

/// Framework checkpoints this engine does not read.
fn is_foreign_weights(name: &str) -> bool {
    [
        ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5", ".pb",
    ]
    .iter()
    .any(|x| name.ends_with(x))
}

/// Pick, from a repository's file list, the files to download for a
/// pipeline whose `model_index.json` names `components`.
pub fn select_files(
    files: &[String],
    components: &[String],
    variant: Option<&str>,
) -> Result<Vec<String>, DiffusionError> {
    let mut by_component: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in files {
        if let Some((dir, name)) = f.split_once('/')
            && !name.contains('/')
            && components.iter().any(|c| c == dir)
            && COMPONENTS.contains(&dir)
        {
            by_component.entry(dir).or_default().push(name);
        }
    }
    let mut chosen = vec!["model_index.json".to_string()];
    for (dir, names) in by_component {
        let weights: Vec<&str> = names.iter().copied().filter(|n| is_weights(n)).collect();
        let wanted = variant.filter(|v| weights.iter().any(|n| weight_variant(n) == Some(*v)));
        if weights.is_empty() && names.iter().any(|n| is_foreign_weights(n)) {
            return Err(DiffusionError::BadModel(format!(
                "{dir}/ on the Hub holds no .safetensors weights (only PyTorch/other formats this engine does not read)"
            )));
        }
        for n in names {
            let keep = if is_weights(n) {
                weight_variant(n) == wanted
            } else {
                n.ends_with(".json") || n.ends_with(".txt")
            };
            if keep {
                chosen.push(format!("{dir}/{n}"));
            }
        }
    }
    Ok(chosen)
}

/// The components a `model_index.json` names (entries `[library, class]`
/// whose class is set).
fn components(index: &Path) -> Result<Vec<String>, DiffusionError> {
    let text = std::fs::read_to_string(index).map_err(|e| DiffusionError::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| DiffusionError::corrupt(index, e))?;
    let obj = v
        .as_object()
        .ok_or_else(|| DiffusionError::corrupt(index, "not a JSON object"))?;
    Ok(obj
        .iter()
        .filter(|(k, v)| !k.starts_with('_') && v.get(1).is_some_and(|c| !c.is_null()))
        .map(|(k, _)| k.clone())
        .collect())
}

fn hub_err(model: &HubModel, what: &str, e: impl std::fmt::Display) -> DiffusionError {
    DiffusionError::BadModel(format!(
        "Hub model {}@{}: {what}: {e}",
        model.repo, model.revision
    ))
}

/// Download (or find in the cache) what the engine needs of `model`, and
/// return the snapshot folder.
pub fn fetch(
    model: &HubModel,
    variant: Option<&str>,
    options: &HubOptions,
) -> Result<PathBuf, DiffusionError> {
    let repo = Repo::with_revision(model.repo.clone(), RepoType::Model, model.revision.clone());
    if options.offline {
        let index = options
            .cache()
            .repo(repo)
            .get("model_index.json")
            .ok_or_else(|| {
                hub_err(
                    model,
                    "offline (HF_HUB_OFFLINE)",
                    "not in the Hub cache; fetch it once online",
                )
            })?;
        return Ok(index.parent().expect("a file in a snapshot").to_path_buf());
    }
    let mut builder = ApiBuilder::from_cache(options.cache()).with_progress(false);
    if let Some(e) = &options.endpoint {
        builder = builder.with_endpoint(e.clone());
    }
    if options.token.is_some() {
        builder = builder.with_token(options.token.clone());
    }
    let api = builder.build().map_err(|e| hub_err(model, "client", e))?;
    let api = api.repo(repo);
    let info = api
        .info()
        .map_err(|e| hub_err(model, "listing the repository", e))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !files.iter().any(|f| f == "model_index.json") {
        return Err(hub_err(
            model,
            "not a diffusers pipeline",
            "the repository has no model_index.json",
        ));
    }
    let index = api
        .get("model_index.json")
        .map_err(|e| hub_err(model, "downloading model_index.json", e))?;
    let root = index.parent().expect("a file in a snapshot").to_path_buf();
    for f in select_files(&files, &components(&index)?, variant)? {
        tracing::info!(repo = %model.repo, file = %f, "fetching from the Hub");
        api.get(&f)
            .map_err(|e| hub_err(model, &format!("downloading {f}"), e))?;
    }
    Ok(root)
}

/// A model reference as the CLI takes it: a local folder, or a Hub model
/// (fetched). Returns the folder.
pub fn resolve(reference: &str, variant: Option<&str>) -> Result<PathBuf, DiffusionError> {
    match HubModel::parse(reference) {
        None => Ok(PathBuf::from(reference)),
        Some(model) => fetch(&model?, variant, &HubOptions::from_env()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn references_parse_and_bad_ones_are_named() {
        let m = HubModel::parse("hf:stabilityai/sdxl-turbo")
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.repo.as_str(), m.revision.as_str()),
            ("stabilityai/sdxl-turbo", "main")
        );
        assert_eq!(m.name(), "sdxl-turbo");
        let m = HubModel::parse("hf:a/b@fp16").unwrap().unwrap();
        assert_eq!(m.revision, "fp16");
        assert!(HubModel::parse("models/sd15").is_none());
        for bad in ["hf:nameonly", "hf:a/b/c", "hf:a/b@", "hf:/b", "hf:a b/c"] {
            let e = HubModel::parse(bad).unwrap().unwrap_err().to_string();
            assert!(e.contains("not a Hub model reference"), "{bad}: {e}");
        }
    }

    #[test]
    fn variants_are_read_off_file_names() {
        assert_eq!(weight_variant("diffusion_pytorch_model.safetensors"), None);
        assert_eq!(
            weight_variant("diffusion_pytorch_model.fp16.safetensors"),
            Some("fp16")
        );
        assert_eq!(weight_variant("model-00001-of-00002.safetensors"), None);
        assert_eq!(
            weight_variant("model.fp16-00001-of-00002.safetensors"),
            Some("fp16")
        );
        assert_eq!(weight_variant("model.safetensors.index.json"), None);
        assert_eq!(
            weight_variant("model.safetensors.index.fp16.json"),
            Some("fp16")
        );
    }

    #[test]
    fn only_the_loaded_components_and_one_weight_set_are_chosen() {
        let files = names(&[
            "model_index.json",
            "README.md",
            "v1-5-pruned.safetensors",
            "safety_checker/model.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "scheduler/scheduler_config.json",
        ]);
        let comps = names(&[
            "unet",
            "vae",
            "text_encoder",
            "tokenizer",
            "scheduler",
            "safety_checker",
        ]);
        let full = select_files(&files, &comps, None).unwrap();
        assert!(full.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(
            !full
                .iter()
                .any(|f| f.contains("fp16") || f.ends_with(".bin"))
        );
        assert!(
            !full
                .iter()
                .any(|f| f.starts_with("safety_checker") || f.starts_with("v1-5"))
        );
        assert!(full.contains(&"text_encoder/model-00002-of-00002.safetensors".to_string()));
        assert_eq!(full.len(), 12, "{full:?}");
        // fp16 where the component has it, full precision where it does not.
        let half = select_files(&files, &comps, Some("fp16")).unwrap();
        assert!(half.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(!half.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
        assert!(half.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
        // A component with only .bin weights is refused by name.
        let bin_only = names(&[
            "model_index.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.bin",
        ]);
        let e = select_files(&bin_only, &names(&["vae"]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vae/") && e.contains("no .safetensors"), "{e}");
    }
}
