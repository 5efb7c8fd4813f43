//! Job specs: validation and expansion into items and per-item stage tasks.
//!
//! Everything here is pure, so a bad spec is refused before any row exists.

use std::collections::HashMap;

use hallmark_proto::v1::JobSpec;

/// Engines a job may name.
pub const ENGINES: &[&str] = &["synthetic", "diffusion"];
pub use hallmark_proto::SCHEDULERS;
pub use hallmark_proto::UPSCALE_METHODS;
/// The first stage of every item.
pub const STAGE_GENERATE: &str = "generate";
/// The optional img2img pass at the base size, ready once the item's
/// generate succeeded.
pub const STAGE_REFINE: &str = "refine";
/// The optional super-resolution stage, ready once the item's previous
/// stage (refine, else generate) succeeded.
pub const STAGE_UPSCALE: &str = "upscale";
/// Where a stage comes in an item's chain (0 for `generate`); for ordering.
pub fn stage_rank(stage: &str) -> i32 {
    match stage {
        STAGE_GENERATE => 0,
        STAGE_REFINE => 1,
        _ => 2,
    }
}

/// Refine strength when the spec leaves it at 0.
pub const DEFAULT_REFINE_STRENGTH: f64 = 0.3;

/// Limits a spec is checked against (from the coordinator config).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_items: u32,
    pub max_side: u32,
    pub max_steps: u32,
    pub default_max_attempts: u32,
}

/// A spec field that is wrong, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

/// One image to make: a prompt, an image index and everything that sets its pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub index: u64,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    pub scheduler: String,
    /// img2img: the uploaded input the item starts from, and how much of it
    /// is re-imagined; `None` for text-to-image.
    pub init_image: Option<InitImage>,
    /// How the item's mask is used, when it inpaints.
    pub mask_use: MaskUse,
}

/// The init image of an img2img item.
#[derive(Debug, Clone, PartialEq)]
pub struct InitImage {
    /// sha256 of an uploaded input (`Jobs.UploadInput`).
    pub sha256: String,
    /// (0, 1]: the fraction of the schedule run from the noised image.
    pub strength: f64,
    /// Inpainting: the sha256 of an uploaded mask; only its white part is
    /// repainted.
    pub mask: Option<String>,
    /// Outpainting: new canvas around the init image, inpainted through a
    /// mask the worker makes (never with `mask`).
    pub outpaint: Option<Outpaint>,
}

impl InitImage {
    /// Whether the item renders through a mask: its uploaded one, or the
    /// one its outpaint's worker makes.
    pub fn inpaints(&self) -> bool {
        self.mask.is_some() || self.outpaint.is_some()
    }
}

/// The refine stage of a job: which model re-runs each base image, and how
/// much (serialised as the stored spec and the ledger record it).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Refine {
    pub model_id: String,
    /// (0, 1).
    pub strength: f64,
}

/// A validated job ready to be written.
#[derive(Debug, Clone)]
pub struct ExpandedJob {
    pub engine: String,
    pub model_id: String,
    /// The optional refine stage between generate and upscale.
    pub refine: Option<Refine>,
    pub tenant: String,
    pub priority: i32,
    pub upscale: u32,
    /// `esrgan`, `hires-fix`, or empty for the worker's default.
    pub upscale_method: String,
    pub max_attempts: u32,
    pub labels: HashMap<String, String>,
    pub items: Vec<Item>,
}

/// How an item's mask is used: the line's `mask_blur` and `mask_crop`,
/// else the job's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MaskUse {
    /// Blur radius in pixels of the item's size; 0 for none.
    pub blur: u32,
    /// Render only a crop around the mask grown by this many pixels, pasted
    /// back; `None` renders the whole image.
    pub crop: Option<u32>,
}

/// Pixels of new canvas on each side of an init image (`JobSpec.outpaint`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Outpaint {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

impl From<hallmark_proto::v1::Outpaint> for Outpaint {
    fn from(o: hallmark_proto::v1::Outpaint) -> Self {
        Self {
            left: o.left,
            top: o.top,
            right: o.right,
            bottom: o.bottom,
        }
    }
}

impl From<Outpaint> for hallmark_proto::v1::Outpaint {
    fn from(o: Outpaint) -> Self {
        Self {
            left: o.left,
            top: o.top,
            right: o.right,
            bottom: o.bottom,
        }
    }
}

impl Outpaint {
    /// Whether there is new canvas on some side (on a prompt line, none on
    /// any turns the job's outpaint off).
    pub fn adds_canvas(&self) -> bool {
        [self.left, self.top, self.right, self.bottom] != [0; 4]
    }

    /// The margins a prompt line's item outpaints with: the line's `own`
    /// (none where they add no canvas: the job's turned off), else the
    /// `job`'s.
    pub fn of_line(own: Option<Self>, job: Option<Self>) -> Option<Self> {
        match own {
            Some(o) => Some(o).filter(Self::adds_canvas),
            None => job,
        }
    }

    /// As the tasks table keeps it: `left,top,right,bottom`.
    pub fn to_column(&self) -> String {
        format!("{},{},{},{}", self.left, self.top, self.right, self.bottom)
    }

    /// From the tasks table's `left,top,right,bottom`.
    pub fn from_column(column: &str) -> Option<Self> {
        let v: Vec<u32> = column
            .split(',')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        match v[..] {
            [left, top, right, bottom] => Some(Self {
                left,
                top,
                right,
                bottom,
            }),
            _ => None,
        }
    }
}

impl Item {
    /// Whether the item renders through a mask: its own uploaded one, or
    /// the one its outpaint's worker makes around its init image.
    pub fn inpaints(&self) -> bool {
        self.init_image.as_ref().is_some_and(InitImage::inpaints)
    }

    /// The item's outpaint margins, when it outpaints.
    pub fn outpaint(&self) -> Option<Outpaint> {
        self.init_image.as_ref().and_then(|i| i.outpaint)
    }
}

/// The largest mask blur a job may ask for, in pixels.
pub const MAX_MASK_BLUR: u32 = 128;

impl ExpandedJob {
    /// Largest pixel count any task of the job needs a worker to hold.
    pub fn max_task_pixels(&self) -> u64 {
        let factor = u64::from(self.upscale.max(1));
        self.items
            .iter()
            .map(|i| u64::from(i.width) * u64::from(i.height) * factor * factor)
            .max()
            .unwrap_or(0)
    }

    /// The stages every item runs, in order: `generate`, then `refine` and
    /// `upscale` when the job asks for them. Each waits on the one before.
    pub fn stages(&self) -> Vec<&'static str> {
        let mut stages = vec![STAGE_GENERATE];
        if self.refine.is_some() {
            stages.push(STAGE_REFINE);
        }
        if self.upscale > 0 {
            stages.push(STAGE_UPSCALE);
        }
        stages
    }

    /// The model a stage's tasks name: the refine model for `refine`, the
    /// job's otherwise.
    pub fn stage_model(&self, stage: &str) -> &str {
        match (&self.refine, stage) {
            (Some(r), STAGE_REFINE) => &r.model_id,
            _ => &self.model_id,
        }
    }

    /// Each model the job needs a worker for, with the largest pixel count
    /// that model's tasks need a worker to hold.
    pub fn models(&self) -> Vec<(&str, u64)> {
        let base = self
            .items
            .iter()
            .map(|i| u64::from(i.width) * u64::from(i.height))
            .max()
            .unwrap_or(0);
        let mut models = vec![(self.model_id.as_str(), self.max_task_pixels())];
        if let Some(r) = &self.refine {
            match models.iter_mut().find(|(m, _)| *m == r.model_id) {
                Some((_, px)) => *px = (*px).max(base),
                None => models.push((r.model_id.as_str(), base)),
            }
        }
        models
    }

    /// How many tasks the job expands into (items × stages).
    pub fn task_count(&self) -> usize {
        self.items.len() * self.stages().len()
    }

    /// The distinct uploaded inputs the job's items start from.
    pub fn init_images(&self) -> std::collections::BTreeSet<&str> {
        self.items
            .iter()
            .filter_map(|i| i.init_image.as_ref().map(|x| x.sha256.as_str()))
            .collect()
    }

    /// The distinct uploaded masks the job's items inpaint with.
    pub fn masks(&self) -> std::collections::BTreeSet<&str> {
        self.items
            .iter()
            .filter_map(|i| i.init_image.as_ref().and_then(|x| x.mask.as_deref()))
            .collect()
    }

    /// Every uploaded input the job uses, each with the spec field that
    /// names it (for errors).
    pub fn inputs(&self) -> Vec<(&str, &'static str)> {
        let inits = self
            .init_images()
            .into_iter()
            .map(|s| (s, "init_image_sha256"));
        inits
            .chain(self.masks().into_iter().map(|s| (s, "mask_sha256")))
            .collect()
    }
}

/// Derives the seed of item `index` from the job seed (SplitMix64 of the pair),
/// so a re-run of a job gives every item the same seed.
pub fn derive_seed(job_seed: u64, index: u64) -> u64 {
    let mut z = job_seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Smallest side of an output image: every output carries the watermark.
pub const MIN_SIDE: u32 = hallmark_provenance::watermark::MIN_SIDE;

fn check_side(field: &str, value: u32, max: u32) -> Result<(), SpecError> {
    if value == 0 {
        return Err(bad(field, "is required"));
    }
    if !value.is_multiple_of(8) {
        return Err(bad(
            field,
            format!("{value} is not a multiple of 8 (try {})", value / 8 * 8),
        ));
    }
    if !(MIN_SIDE..=max).contains(&value) {
        return Err(bad(
            field,
            format!(
                "{value} is outside {MIN_SIDE}..={max} (the watermark needs at least {MIN_SIDE} pixels a side)"
            ),
        ));
    }
    Ok(())
}

fn check_steps(field: &str, value: u32, max: u32) -> Result<(), SpecError> {
    if !(1..=max).contains(&value) {
        return Err(bad(field, format!("{value} is outside 1..={max}")));
    }
    Ok(())
}

fn check_guidance(field: &str, value: f32) -> Result<(), SpecError> {
    if !value.is_finite() || !(0.0..=50.0).contains(&value) {
        return Err(bad(field, format!("{value} is outside 0..=50")));
    }
    Ok(())
}

fn check_scheduler(field: &str, value: &str) -> Result<(), SpecError> {
    if !SCHEDULERS.contains(&value) {
        return Err(bad(
            field,
            format!(
                "unknown scheduler {value:?}; use one of {}",
                SCHEDULERS.join(", ")
            ),
        ));
    }
    Ok(())
}

fn check_name(field: &str, value: &str) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/@".contains(c));
    if !ok {
        return Err(bad(
            field,
            format!("{value:?} must be 1-128 characters of letters, digits and -_.:/@"),
        ));
    }
    Ok(())
}

/// Checks the whole spec and expands it into items. The first error found
/// names its field (`prompts[3].width`, `steps`, …).
pub fn expand(spec: &JobSpec, limits: &Limits, random_seed: u64) -> Result<ExpandedJob, SpecError> {
    if !ENGINES.contains(&spec.engine.as_str()) {
        return Err(bad(
            "engine",
            format!(
                "unknown engine {:?}; use one of {}",
                spec.engine,
                ENGINES.join(", ")
            ),
        ));
    }
    check_name("model_id", &spec.model_id)?;
    let tenant = if spec.tenant.is_empty() {
        "default"
    } else {
        spec.tenant.as_str()
    };
    check_name("tenant", tenant)?;
    check_side("width", spec.width, limits.max_side)?;
    check_side("height", spec.height, limits.max_side)?;
    check_steps("steps", spec.steps, limits.max_steps)?;
    check_guidance("guidance", spec.guidance)?;
    check_scheduler("scheduler", &spec.scheduler)?;
    if !spec.upscale_method.is_empty() {
        if !UPSCALE_METHODS.contains(&spec.upscale_method.as_str()) {
            return Err(bad(
                "upscale_method",
                format!(
                    "unknown method {:?}; use one of {}",
                    spec.upscale_method,
                    UPSCALE_METHODS.join(", ")
                ),
            ));
        }
        if spec.engine != "diffusion" {
            return Err(bad(
                "upscale_method",
                format!("applies to the diffusion engine, not {:?}", spec.engine),
            ));
        }
        if spec.upscale == 0 {
            return Err(bad("upscale_method", "is set but upscale is not (2 or 4)"));
        }
    }
    if ![0, 2, 4].contains(&spec.upscale) {
        return Err(bad(
            "upscale",
            format!("{} must be 2 or 4 (or 0 for none)", spec.upscale),
        ));
    }
    let per_prompt = spec.images_per_prompt.max(1);
    if per_prompt > 64 {
        return Err(bad("images_per_prompt", format!("{per_prompt} is over 64")));
    }
    if spec.prompts.is_empty() {
        return Err(bad("prompts", "the job has no prompts"));
    }
    let total = spec.prompts.len() as u64 * u64::from(per_prompt);
    if total > u64::from(limits.max_items) {
        return Err(bad(
            "prompts",
            format!(
                "{} prompts × {per_prompt} images = {total} items, over the limit of {}",
                spec.prompts.len(),
                limits.max_items
            ),
        ));
    }
    if spec.max_attempts > 20 {
        return Err(bad(
            "max_attempts",
            format!("{} is over 20", spec.max_attempts),
        ));
    }
    for (key, value) in &spec.labels {
        if key.is_empty() || key.len() > 64 || value.len() > 256 {
            return Err(bad(
                format!("labels[{key:?}]"),
                "keys must be 1-64 bytes and values at most 256",
            ));
        }
    }
    check_text("negative_prompt", &spec.negative_prompt, true)?;
    let job_init = check_sha("init_image_sha256", &spec.init_image_sha256)?;
    let job_mask = check_sha("mask_sha256", &spec.mask_sha256)?;
    if spec.strength != 0.0 {
        check_strength("strength", spec.strength)?;
    }
    let refine = match &spec.refine {
        None => None,
        Some(r) => {
            let model_id = if r.model_id.is_empty() {
                spec.model_id.clone()
            } else {
                check_name("refine.model_id", &r.model_id)?;
                r.model_id.clone()
            };
            let strength = if r.strength == 0.0 {
                DEFAULT_REFINE_STRENGTH
            } else {
                r.strength
            };
            if !strength.is_finite() || strength <= 0.0 || strength >= 1.0 {
                return Err(bad(
                    "refine.strength",
                    format!(
                        "{strength} is outside (0, 1) (a refine keeps part of its base image; 0.2-0.4 is usual)"
                    ),
                ));
            }
            Some(Refine { model_id, strength })
        }
    };

    check_mask_use("", spec.mask_blur, spec.mask_crop, limits)?;
    let job_outpaint = match spec.outpaint.map(Outpaint::from) {
        Some(o) if !o.adds_canvas() => {
            return Err(bad("outpaint", "adds no canvas: give at least one side"));
        }
        o => o,
    };
    let job_inputs = JobInputs {
        sha: job_init.as_deref(),
        strength: spec.strength,
        mask: job_mask.as_deref(),
        outpaint: job_outpaint,
    };
    let job_seed = spec.seed.unwrap_or(random_seed);
    let mut items = Vec::with_capacity(total as usize);
    for (p, line) in spec.prompts.iter().enumerate() {
        let field = |name: &str| format!("prompts[{p}].{name}");
        check_text(&field("prompt"), &line.prompt, false)?;
        let negative = line
            .negative_prompt
            .clone()
            .unwrap_or_else(|| spec.negative_prompt.clone());
        check_text(&field("negative_prompt"), &negative, true)?;
        let width = line.width.unwrap_or(spec.width);
        let height = line.height.unwrap_or(spec.height);
        let steps = line.steps.unwrap_or(spec.steps);
        let guidance = line.guidance.unwrap_or(spec.guidance);
        let scheduler = line
            .scheduler
            .clone()
            .unwrap_or_else(|| spec.scheduler.clone());
        check_side(&field("width"), width, limits.max_side)?;
        check_side(&field("height"), height, limits.max_side)?;
        check_steps(&field("steps"), steps, limits.max_steps)?;
        check_guidance(&field("guidance"), guidance)?;
        check_scheduler(&field("scheduler"), &scheduler)?;
        let init_image = item_init(
            &field,
            ItemInputs {
                sha: line.init_image_sha256.as_deref(),
                strength: line.strength,
                mask: line.mask_sha256.as_deref(),
                outpaint: line.outpaint.map(Outpaint::from),
            },
            &job_inputs,
        )?;
        if let Some(init) = &init_image {
            check_img2img_steps(&field("steps"), steps, init.strength)?;
            if let Some(o) = init.outpaint {
                let which = if line.outpaint.is_some() {
                    field("outpaint")
                } else {
                    "outpaint".into()
                };
                check_outpaint_room(&which, o, p, width, height)?;
            }
        }
        let inpaints = init_image.as_ref().is_some_and(InitImage::inpaints);
        let mask_use = item_mask_use(&field, line, spec, limits, inpaints)?;
        if let Some(r) = &refine {
            check_img2img_steps(&field("steps"), steps, r.strength)?;
        }
        for image in 0..u64::from(per_prompt) {
            let index = p as u64 * u64::from(per_prompt) + image;
            let seed = match line.seed {
                Some(seed) => seed.wrapping_add(image),
                None => derive_seed(job_seed, index),
            };
            items.push(Item {
                index,
                prompt: line.prompt.clone(),
                negative_prompt: negative.clone(),
                seed,
                width,
                height,
                steps,
                guidance,
                scheduler: scheduler.clone(),
                init_image: init_image.clone(),
                mask_use,
            });
        }
    }
    if spec.strength != 0.0 && items.iter().all(|i| i.init_image.is_none()) {
        return Err(bad(
            "strength",
            "is set but no item has an init image (strength applies to img2img)",
        ));
    }
    if job_mask.is_some() && items.iter().all(|i| i.init_image.is_none()) {
        return Err(bad(
            "mask_sha256",
            "is set but no item has an init image (a mask says which part of an init image to repaint)",
        ));
    }
    if job_outpaint.is_some() && items.iter().all(|i| i.outpaint().is_none()) {
        return Err(bad(
            "outpaint",
            if items.iter().all(|i| i.init_image.is_none()) {
                "is set but no item has an init image (outpainting extends an init image)"
            } else {
                "is set but every item with an init image turns it off"
            },
        ));
    }
    let masked = items.iter().any(Item::inpaints);
    for (name, set) in [
        ("mask_blur", spec.mask_blur != 0),
        ("mask_crop", spec.mask_crop.is_some()),
    ] {
        if set && !masked {
            return Err(bad(
                name,
                "is set but no item has a mask (it says how a mask is used)",
            ));
        }
    }
    Ok(ExpandedJob {
        engine: spec.engine.clone(),
        model_id: spec.model_id.clone(),
        refine,
        tenant: tenant.to_string(),
        priority: spec.priority,
        upscale: spec.upscale,
        upscale_method: spec.upscale_method.clone(),
        max_attempts: if spec.max_attempts == 0 {
            limits.default_max_attempts
        } else {
            spec.max_attempts
        },
        labels: spec.labels.clone(),
        items,
    })
}

/// How an item uses its mask: its line's blur and crop, else the job's.
/// A line's own are refused where the item has no mask to use them on.
fn item_mask_use(
    field: &dyn Fn(&str) -> String,
    line: &hallmark_proto::v1::PromptItem,
    spec: &JobSpec,
    limits: &Limits,
    inpaints: bool,
) -> Result<MaskUse, SpecError> {
    for (name, set) in [
        ("mask_blur", line.mask_blur.is_some()),
        ("mask_crop", line.mask_crop.is_some()),
        ("no_mask_crop", line.no_mask_crop),
    ] {
        if set && !inpaints {
            return Err(bad(
                field(name),
                "is set but the item has no mask (it says how a mask is used)",
            ));
        }
    }
    if line.no_mask_crop && line.mask_crop.is_some() {
        return Err(bad(
            field("no_mask_crop"),
            "asks for the whole image, and mask_crop for a crop: give one",
        ));
    }
    let prefix = field("");
    check_mask_use(&prefix, line.mask_blur.unwrap_or(0), line.mask_crop, limits)?;
    Ok(MaskUse {
        blur: line.mask_blur.unwrap_or(spec.mask_blur),
        crop: line
            .mask_crop
            .or(spec.mask_crop)
            .filter(|_| !line.no_mask_crop),
    })
}

/// A mask blur and crop padding within their limits; `prefix` leads the
/// fields named (`prompts[3].` for a line's own).
fn check_mask_use(
    prefix: &str,
    blur: u32,
    crop: Option<u32>,
    limits: &Limits,
) -> Result<(), SpecError> {
    if blur > MAX_MASK_BLUR {
        return Err(bad(
            format!("{prefix}mask_blur"),
            format!("{blur} is over {MAX_MASK_BLUR} pixels"),
        ));
    }
    if let Some(pad) = crop
        && pad > limits.max_side
    {
        return Err(bad(
            format!("{prefix}mask_crop"),
            format!(
                "{pad} is over {} pixels (the largest side)",
                limits.max_side
            ),
        ));
    }
    Ok(())
}

/// Room left on item `p`'s `width`×`height` canvas for its init image
/// once outpaint `o` (named by `field`) takes its margins.
fn check_outpaint_room(
    field: &str,
    o: Outpaint,
    p: usize,
    width: u32,
    height: u32,
) -> Result<(), SpecError> {
    const MIN_INNER: u64 = 8;
    let inner_w = u64::from(width).saturating_sub(u64::from(o.left) + u64::from(o.right));
    let inner_h = u64::from(height).saturating_sub(u64::from(o.top) + u64::from(o.bottom));
    if inner_w < MIN_INNER || inner_h < MIN_INNER {
        return Err(bad(
            field,
            format!(
                "leaves {inner_w}x{inner_h} of prompt {p}'s {width}x{height} canvas for its init image; at least {MIN_INNER}x{MIN_INNER} (the width and height are the whole canvas)"
            ),
        ));
    }
    Ok(())
}

/// An init image's sha256 (lowercased), or `None` when empty.
fn check_sha(field: &str, value: &str) -> Result<Option<String>, SpecError> {
    if value.is_empty() {
        return Ok(None);
    }
    if !hallmark_provenance::is_sha256_hex(value) {
        return Err(bad(field, format!("{value:?} is not 64 hex digits")));
    }
    Ok(Some(value.to_ascii_lowercase()))
}

fn check_strength(field: &str, value: f64) -> Result<(), SpecError> {
    if !value.is_finite() || value <= 0.0 || value > 1.0 {
        return Err(bad(
            field,
            format!("{value} is outside (0, 1] (img2img needs a strength)"),
        ));
    }
    Ok(())
}

/// What a prompt line names for img2img, inpainting and outpainting.
struct ItemInputs<'a> {
    sha: Option<&'a str>,
    strength: Option<f64>,
    mask: Option<&'a str>,
    /// All four margins 0: the job's outpaint turned off.
    outpaint: Option<Outpaint>,
}

/// What the job names for img2img, inpainting and outpainting: each line's
/// default.
struct JobInputs<'a> {
    sha: Option<&'a str>,
    strength: f64,
    mask: Option<&'a str>,
    outpaint: Option<Outpaint>,
}

/// An item's init image, strength, mask and outpaint: its own, else the
/// job's.
fn item_init(
    field: &dyn Fn(&str) -> String,
    own: ItemInputs<'_>,
    job: &JobInputs<'_>,
) -> Result<Option<InitImage>, SpecError> {
    let sha = match own.sha {
        Some(s) => check_sha(&field("init_image_sha256"), s)?,
        None => None,
    };
    let mask = match own.mask {
        Some(s) => check_sha(&field("mask_sha256"), s)?,
        None => None,
    };
    let Some(sha256) = sha.or(job.sha.map(str::to_string)) else {
        if own.strength.is_some() {
            return Err(bad(
                field("strength"),
                "is set but the item has no init image (strength applies to img2img)",
            ));
        }
        if mask.is_some() {
            return Err(bad(
                field("mask_sha256"),
                "is set but the item has no init image (a mask says which part of an init image to repaint)",
            ));
        }
        if own.outpaint.is_some() {
            return Err(bad(
                field("outpaint"),
                "is set but the item has no init image (outpainting extends an init image)",
            ));
        }
        return Ok(None);
    };
    let strength = match own.strength {
        Some(s) => {
            check_strength(&field("strength"), s)?;
            s
        }
        None => {
            check_strength("strength", job.strength)?;
            job.strength
        }
    };
    let outpaint = Outpaint::of_line(own.outpaint, job.outpaint);
    let mask = mask.or(job.mask.map(str::to_string));
    if outpaint.is_some() && mask.is_some() {
        let (name, whose) = match (own.outpaint.is_some(), own.mask.is_some()) {
            (true, _) => (field("outpaint"), "the item's mask"),
            (false, true) => (
                field("mask_sha256"),
                "the job's outpaint (give the line outpaint none)",
            ),
            (false, false) => ("outpaint".to_string(), "a mask"),
        };
        return Err(bad(
            name,
            format!(
                "cannot be combined with {whose}: outpainting makes its own mask, white over the new canvas"
            ),
        ));
    }
    Ok(Some(InitImage {
        sha256,
        strength,
        mask,
        outpaint,
    }))
}

/// img2img runs the last `floor(steps × strength)` steps of the schedule
/// (as diffusers does): at least one.
fn check_img2img_steps(field: &str, steps: u32, strength: f64) -> Result<(), SpecError> {
    if hallmark_proto::img2img_steps(steps as usize, strength) == 0 {
        return Err(bad(
            field,
            format!(
                "{steps} steps at strength {strength} run no step (img2img runs floor(steps × strength)); raise either"
            ),
        ));
    }
    Ok(())
}

fn check_text(field: &str, text: &str, may_be_empty: bool) -> Result<(), SpecError> {
    if !may_be_empty && text.trim().is_empty() {
        return Err(bad(field, "is empty"));
    }
    if text.len() > 8192 {
        return Err(bad(field, format!("is {} bytes, over 8192", text.len())));
    }
    if text.contains('\0') {
        return Err(bad(field, "contains a NUL byte"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hallmark_proto::v1::PromptItem;

    fn limits() -> Limits {
        Limits {
            max_items: 10,
            max_side: 1024,
            max_steps: 50,
            default_max_attempts: 3,
        }
    }

    fn spec(prompts: &[&str]) -> JobSpec {
        JobSpec {
            engine: "synthetic".into(),
            model_id: "synthetic-v1".into(),
            prompts: prompts
                .iter()
                .map(|p| PromptItem {
                    prompt: p.to_string(),
                    ..Default::default()
                })
                .collect(),
            width: 192,
            height: 192,
            steps: 4,
            guidance: 7.5,
            scheduler: "euler".into(),
            ..Default::default()
        }
    }

    #[test]
    fn width_not_multiple_of_eight_names_the_field() {
        let mut s = spec(&["a"]);
        s.width = 513;
        let err = expand(&s, &limits(), 1).unwrap_err();
        assert_eq!(err.field, "width");
        assert!(err.message.contains("multiple of 8"), "{err}");
    }

    #[test]
    fn per_item_override_is_checked_with_its_index() {
        let mut s = spec(&["a", "b"]);
        s.prompts[1].steps = Some(0);
        assert_eq!(
            expand(&s, &limits(), 1).unwrap_err().field,
            "prompts[1].steps"
        );
    }

    #[test]
    fn item_limit_counts_images_per_prompt() {
        let mut s = spec(&["a", "b", "c"]);
        s.images_per_prompt = 4;
        let err = expand(&s, &limits(), 1).unwrap_err();
        assert_eq!(err.field, "prompts");
        assert!(err.message.contains("12 items"), "{err}");
    }

    #[test]
    fn seeds_derive_from_job_seed_and_index_deterministically() {
        let mut s = spec(&["a", "b"]);
        s.seed = Some(42);
        s.images_per_prompt = 2;
        let a = expand(&s, &limits(), 1).unwrap();
        let b = expand(&s, &limits(), 999).unwrap();
        let seeds: Vec<u64> = a.items.iter().map(|i| i.seed).collect();
        assert_eq!(seeds, b.items.iter().map(|i| i.seed).collect::<Vec<_>>());
        let mut unique = seeds.clone();
        unique.dedup();
        assert_eq!(unique.len(), 4, "every item gets its own seed");
    }

    #[test]
    fn explicit_item_seed_counts_up_per_image() {
        let mut s = spec(&["a"]);
        s.images_per_prompt = 3;
        s.prompts[0].seed = Some(7);
        let e = expand(&s, &limits(), 1).unwrap();
        assert_eq!(
            e.items.iter().map(|i| i.seed).collect::<Vec<_>>(),
            vec![7, 8, 9]
        );
    }

    #[test]
    fn blank_prompt_and_unknown_scheduler_are_refused() {
        let s = spec(&["ok", "  "]);
        assert_eq!(
            expand(&s, &limits(), 1).unwrap_err().field,
            "prompts[1].prompt"
        );
        let mut s = spec(&["ok"]);
        s.scheduler = "warp".into();
        assert_eq!(expand(&s, &limits(), 1).unwrap_err().field, "scheduler");
    }

    #[test]
    fn upscale_method_is_checked_against_method_engine_and_factor() {
        let mut s = spec(&["ok"]);
        s.engine = "diffusion".into();
        s.upscale = 2;
        s.upscale_method = "hires-fix".into();
        assert_eq!(
            expand(&s, &limits(), 1).unwrap().upscale_method,
            "hires-fix"
        );
        let refused = |s: &JobSpec| {
            let e = expand(s, &limits(), 1).unwrap_err();
            assert_eq!(e.field, "upscale_method");
            e.to_string()
        };
        let mut bad = s.clone();
        bad.upscale_method = "bicubic".into();
        assert!(refused(&bad).contains("esrgan, hires-fix"));
        let mut bad = s.clone();
        bad.upscale = 0;
        assert!(refused(&bad).contains("upscale is not"));
        let mut bad = s.clone();
        bad.engine = "synthetic".into();
        assert!(refused(&bad).contains("diffusion engine"));
    }

    #[test]
    fn init_image_needs_a_strength_that_runs_a_step() {
        let sha = "AB".repeat(32);
        let mut s = spec(&["ok"]);
        s.init_image_sha256 = sha.clone();
        s.strength = 0.5;
        s.steps = 4;
        let init = expand(&s, &limits(), 1).unwrap().items[0]
            .init_image
            .clone()
            .unwrap();
        assert_eq!(init.sha256, sha.to_ascii_lowercase());
        assert_eq!(init.strength, 0.5);
        assert_eq!(
            expand(&spec(&["ok"]), &limits(), 1).unwrap().items[0].init_image,
            None
        );

        let field = |s: &JobSpec| expand(s, &limits(), 1).unwrap_err().field;
        let mut bad = s.clone();
        bad.strength = 0.0;
        assert_eq!(field(&bad), "strength");
        bad.strength = 1.5;
        assert_eq!(field(&bad), "strength");
        bad.strength = f64::NAN;
        assert_eq!(field(&bad), "strength");
        let mut bad = spec(&["ok"]);
        bad.strength = 0.5;
        assert_eq!(field(&bad), "strength");
        let mut bad = s.clone();
        bad.init_image_sha256 = "not-a-digest".into();
        assert_eq!(field(&bad), "init_image_sha256");
        // 4 steps × 0.2 runs no step; an item that overrides its steps is
        // checked with its own.
        let mut bad = s.clone();
        bad.strength = 0.2;
        assert_eq!(field(&bad), "prompts[0].steps");
        let mut ok = bad.clone();
        ok.prompts[0].steps = Some(5);
        assert!(expand(&ok, &limits(), 1).is_ok());
    }

    #[test]
    fn items_may_name_their_own_init_image_and_strength() {
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        let mut s = spec(&["job's", "own", "none"]);
        s.steps = 10;
        s.strength = 0.6;
        s.prompts[0].init_image_sha256 = Some(a.clone());
        s.prompts[1].init_image_sha256 = Some(b.clone());
        s.prompts[1].strength = Some(0.3);
        let job = expand(&s, &limits(), 1).unwrap();
        let inits: Vec<_> = job.items.iter().map(|i| i.init_image.clone()).collect();
        assert_eq!(
            inits,
            [
                Some(InitImage {
                    sha256: a.clone(),
                    strength: 0.6,
                    mask: None,
                    outpaint: None,
                }),
                Some(InitImage {
                    sha256: b.clone(),
                    strength: 0.3,
                    mask: None,
                    outpaint: None,
                }),
                None
            ]
        );
        assert_eq!(job.init_images().len(), 2);
        // A job-level image is every item's unless an item names another.
        let mut all = s.clone();
        all.init_image_sha256 = a.clone();
        let job = expand(&all, &limits(), 1).unwrap();
        assert_eq!(job.items[2].init_image.as_ref().unwrap().sha256, a);
        assert_eq!(job.items[1].init_image.as_ref().unwrap().sha256, b);

        let field = |s: &JobSpec| expand(s, &limits(), 1).unwrap_err().field;
        let mut bad = s.clone();
        bad.prompts[2].strength = Some(0.5);
        assert_eq!(field(&bad), "prompts[2].strength");
        let mut bad = s.clone();
        bad.prompts[1].strength = Some(2.0);
        assert_eq!(field(&bad), "prompts[1].strength");
        let mut bad = s.clone();
        bad.prompts[0].init_image_sha256 = Some("zz".into());
        assert_eq!(field(&bad), "prompts[0].init_image_sha256");
        let mut bad = s.clone();
        bad.strength = 0.0;
        assert_eq!(field(&bad), "strength", "item 0 has no strength of its own");
        let mut bad = spec(&["a", "b"]);
        bad.strength = 0.5;
        assert_eq!(field(&bad), "strength", "no item has an init image");
    }

    #[test]
    fn masks_inpaint_items_with_an_init_image_the_job_s_or_their_own() {
        let (init, m, own) = ("aa".repeat(32), "CC".repeat(32), "dd".repeat(32));
        let mut s = spec(&["job's mask", "own mask", "text only"]);
        s.steps = 10;
        s.strength = 0.6;
        s.mask_sha256 = m.clone();
        s.prompts[0].init_image_sha256 = Some(init.clone());
        s.prompts[1].init_image_sha256 = Some(init.clone());
        s.prompts[1].mask_sha256 = Some(own.clone());
        let job = expand(&s, &limits(), 1).unwrap();
        let masks: Vec<_> = job
            .items
            .iter()
            .map(|i| i.init_image.as_ref().and_then(|x| x.mask.clone()))
            .collect();
        // Digests are kept in lower case; an item without an init image
        // is a text-to-image one, which the job's mask does not touch.
        assert_eq!(
            masks,
            [Some(m.to_ascii_lowercase()), Some(own.clone()), None]
        );
        assert_eq!(
            job.inputs(),
            [
                (init.as_str(), "init_image_sha256"),
                (m.to_ascii_lowercase().as_str(), "mask_sha256"),
                (own.as_str(), "mask_sha256"),
            ]
        );

        let field = |s: &JobSpec| expand(s, &limits(), 1).unwrap_err().field;
        let mut bad = s.clone();
        bad.prompts[2].mask_sha256 = Some(own.clone());
        assert_eq!(
            field(&bad),
            "prompts[2].mask_sha256",
            "a mask without an init image"
        );
        let mut bad = s.clone();
        bad.prompts[1].mask_sha256 = Some("zz".into());
        assert_eq!(field(&bad), "prompts[1].mask_sha256");
        let mut bad = s.clone();
        bad.mask_sha256 = "not-a-digest".into();
        assert_eq!(field(&bad), "mask_sha256");
        let mut bad = spec(&["a", "b"]);
        bad.mask_sha256 = m.clone();
        assert_eq!(field(&bad), "mask_sha256", "no item has an init image");
    }

    /// Outpaint margins as a spec gives them.
    fn margins(
        left: u32,
        top: u32,
        right: u32,
        bottom: u32,
    ) -> Option<hallmark_proto::v1::Outpaint> {
        Some(hallmark_proto::v1::Outpaint {
            left,
            top,
            right,
            bottom,
        })
    }

    #[test]
    fn an_outpaint_extends_items_with_init_images_and_leaves_room_for_them() {
        let mut s = spec(&["extend", "text only"]);
        s.steps = 10;
        s.strength = 1.0;
        s.width = 384;
        s.height = 192;
        s.prompts[0].init_image_sha256 = Some("aa".repeat(32));
        s.outpaint = margins(64, 0, 64, 0);
        s.mask_blur = 4;
        let job = expand(&s, &limits(), 1).unwrap();
        let wide = Outpaint {
            left: 64,
            top: 0,
            right: 64,
            bottom: 0,
        };
        assert_eq!(job.items[0].outpaint(), Some(wide));
        // The item with an init image renders through the outpaint's mask;
        // the text-to-image one does not.
        assert!(job.items[0].inpaints() && !job.items[1].inpaints());
        assert_eq!(job.items[1].outpaint(), None);
        let column = wide.to_column();
        assert_eq!(column, "64,0,64,0");
        assert_eq!(Outpaint::from_column(&column), Some(wide));
        assert_eq!(Outpaint::from_column("1,2,3"), None);

        let refused = |s: &JobSpec| {
            let e = expand(s, &limits(), 1).unwrap_err();
            (e.field, e.message)
        };
        let mut bad = s.clone();
        bad.outpaint = margins(0, 0, 0, 0);
        assert!(refused(&bad).1.contains("adds no canvas"));
        // 384 wide less 378 leaves 6 columns: too few for the init image.
        let mut bad = s.clone();
        bad.outpaint = margins(300, 0, 78, 0);
        let (field, message) = refused(&bad);
        assert_eq!(field, "outpaint");
        assert!(message.contains("leaves 6x192"), "{message}");
        let mut bad = s.clone();
        bad.mask_sha256 = "cc".repeat(32);
        assert!(refused(&bad).1.contains("cannot be combined with a mask"));
        let mut bad = s.clone();
        bad.prompts[0].init_image_sha256 = None;
        bad.strength = 0.0;
        bad.mask_blur = 0;
        assert!(refused(&bad).1.contains("no item has an init image"));
    }

    #[test]
    fn prompt_lines_outpaint_with_margins_of_their_own_or_turn_the_job_s_off() {
        let mut s = spec(&["job's margins", "own margins", "none", "masked"]);
        s.steps = 10;
        s.strength = 1.0;
        s.width = 384;
        s.height = 256;
        s.init_image_sha256 = "aa".repeat(32);
        s.outpaint = margins(64, 0, 64, 0);
        s.prompts[1].outpaint = margins(0, 64, 0, 0);
        s.prompts[2].outpaint = margins(0, 0, 0, 0);
        // A line that turns the job's outpaint off may inpaint through its
        // own mask instead, and crop around it.
        s.prompts[3].outpaint = margins(0, 0, 0, 0);
        s.prompts[3].mask_sha256 = Some("cc".repeat(32));
        s.prompts[3].mask_crop = Some(16);
        let job = expand(&s, &limits(), 1).unwrap();
        let got: Vec<_> = job.items.iter().map(Item::outpaint).collect();
        let side = |l, t, r, b| margins(l, t, r, b).map(Outpaint::from).unwrap();
        assert_eq!(
            got,
            [
                Some(side(64, 0, 64, 0)),
                Some(side(0, 64, 0, 0)),
                None,
                None
            ]
        );
        let inpaints: Vec<_> = job.items.iter().map(Item::inpaints).collect();
        assert_eq!(inpaints, [true, true, false, true]);
        assert_eq!(job.items[3].mask_use.crop, Some(16));

        let refused = |s: &JobSpec| {
            let e = expand(s, &limits(), 1).unwrap_err();
            (e.field, e.message)
        };
        // A line's own margins are checked against its own canvas.
        let mut bad = s.clone();
        bad.prompts[1].outpaint = margins(0, 250, 0, 0);
        let (field, message) = refused(&bad);
        assert_eq!(field, "prompts[1].outpaint");
        assert!(message.contains("leaves 384x6"), "{message}");
        // A mask of the line's own meets the job's outpaint.
        let mut bad = s.clone();
        bad.prompts[0].mask_sha256 = Some("cc".repeat(32));
        let (field, message) = refused(&bad);
        assert_eq!(field, "prompts[0].mask_sha256");
        assert!(message.contains("outpaint none"), "{message}");
        // A line's own margins meet the job's mask.
        let mut bad = s.clone();
        bad.outpaint = None;
        bad.mask_sha256 = "cc".repeat(32);
        bad.prompts[3].mask_sha256 = None;
        assert_eq!(refused(&bad).0, "prompts[1].outpaint");
        // Margins on a line with no init image extend nothing.
        let mut bad = s.clone();
        bad.init_image_sha256.clear();
        bad.prompts[1].init_image_sha256 = Some("aa".repeat(32));
        bad.prompts[0].outpaint = margins(8, 0, 0, 0);
        assert_eq!(refused(&bad).0, "prompts[0].outpaint");
        // The job's outpaint, turned off by every line it would apply to.
        let mut bad = s.clone();
        bad.prompts[0].outpaint = margins(0, 0, 0, 0);
        bad.prompts[1].outpaint = margins(0, 0, 0, 0);
        let (field, message) = refused(&bad);
        assert_eq!(field, "outpaint");
        assert!(message.contains("turns it off"), "{message}");
    }

    #[test]
    fn a_line_may_render_its_whole_image_where_the_job_crops_around_masks() {
        let mut s = spec(&["cropped", "whole"]);
        s.steps = 10;
        s.strength = 0.6;
        s.init_image_sha256 = "aa".repeat(32);
        s.mask_sha256 = "cc".repeat(32);
        s.mask_crop = Some(24);
        s.prompts[1].no_mask_crop = true;
        let job = expand(&s, &limits(), 1).unwrap();
        let crops: Vec<_> = job.items.iter().map(|i| i.mask_use.crop).collect();
        assert_eq!(crops, [Some(24), None]);
        let mut both = s.clone();
        both.prompts[1].mask_crop = Some(8);
        let e = expand(&both, &limits(), 1).unwrap_err();
        assert_eq!(e.field, "prompts[1].no_mask_crop");
        let mut unmasked = s.clone();
        unmasked.mask_sha256.clear();
        unmasked.mask_crop = None;
        let e = expand(&unmasked, &limits(), 1).unwrap_err();
        assert_eq!(e.field, "prompts[1].no_mask_crop");
    }

    #[test]
    fn a_mask_blur_and_crop_apply_to_jobs_with_masks_within_their_limits() {
        let mut s = spec(&["masked", "own blur", "own crop"]);
        s.steps = 10;
        s.strength = 0.6;
        s.init_image_sha256 = "aa".repeat(32);
        s.mask_sha256 = "cc".repeat(32);
        s.mask_blur = 8;
        s.mask_crop = Some(32);
        s.prompts[1].mask_blur = Some(2);
        // A crop with no padding is a crop still, not the whole image.
        s.prompts[2].mask_crop = Some(0);
        let job = expand(&s, &limits(), 1).unwrap();
        let uses: Vec<_> = job.items.iter().map(|i| i.mask_use).collect();
        let used = |blur, crop| MaskUse { blur, crop };
        assert_eq!(
            uses,
            [used(8, Some(32)), used(2, Some(32)), used(8, Some(0))],
            "each line's own, else the job's"
        );

        let field = |s: &JobSpec| expand(s, &limits(), 1).unwrap_err().field;
        let mut bad = s.clone();
        bad.mask_blur = MAX_MASK_BLUR + 1;
        assert_eq!(field(&bad), "mask_blur");
        let mut bad = s.clone();
        bad.mask_crop = Some(limits().max_side + 1);
        assert_eq!(field(&bad), "mask_crop");
        let mut bad = s.clone();
        bad.prompts[1].mask_blur = Some(MAX_MASK_BLUR + 1);
        assert_eq!(field(&bad), "prompts[1].mask_blur");
        // Without a mask they mean nothing: refused, naming the field.
        let mut plain = s.clone();
        plain.mask_sha256.clear();
        plain.prompts[1].mask_blur = None;
        plain.prompts[2].mask_crop = None;
        plain.mask_crop = None;
        assert_eq!(field(&plain), "mask_blur");
        plain.mask_blur = 0;
        plain.mask_crop = Some(4);
        assert_eq!(field(&plain), "mask_crop");
        plain.mask_crop = None;
        plain.prompts[2].mask_crop = Some(4);
        assert_eq!(field(&plain), "prompts[2].mask_crop");
    }

    #[test]
    fn refine_adds_a_stage_between_generate_and_upscale_on_its_own_model() {
        use hallmark_proto::v1::RefineSpec;
        let mut s = spec(&["a", "b"]);
        s.upscale = 2;
        s.refine = Some(RefineSpec {
            model_id: "refiner-v1".into(),
            strength: 0.0,
        });
        let job = expand(&s, &limits(), 1).unwrap();
        assert_eq!(job.stages(), vec!["generate", "refine", "upscale"]);
        assert_eq!(job.task_count(), 6);
        let r = job.refine.as_ref().unwrap();
        assert_eq!((r.model_id.as_str(), r.strength), ("refiner-v1", 0.3));
        assert_eq!(job.stage_model("refine"), "refiner-v1");
        assert_eq!(job.stage_model("upscale"), "synthetic-v1");
        // The refiner holds base-size images; the job's model the upscales.
        assert_eq!(
            job.models(),
            vec![("synthetic-v1", 384 * 384), ("refiner-v1", 192 * 192)]
        );

        // Without a model of its own, the job's model refines (one entry).
        s.refine = Some(RefineSpec {
            model_id: String::new(),
            strength: 0.5,
        });
        s.upscale = 0;
        let job = expand(&s, &limits(), 1).unwrap();
        assert_eq!(job.stages(), vec!["generate", "refine"]);
        assert_eq!(job.stage_model("refine"), "synthetic-v1");
        assert_eq!(job.models(), vec![("synthetic-v1", 192 * 192)]);

        let err = |s: &JobSpec| expand(s, &limits(), 1).unwrap_err();
        for strength in [1.0, -0.1, f64::NAN] {
            s.refine.as_mut().unwrap().strength = strength;
            assert_eq!(err(&s).field, "refine.strength", "{strength}");
        }
        // 4 steps at 0.2 run floor(0.8) = 0 steps.
        s.refine.as_mut().unwrap().strength = 0.2;
        assert_eq!(err(&s).field, "prompts[0].steps");
        s.refine.as_mut().unwrap().model_id = "bad model".into();
        assert_eq!(err(&s).field, "refine.model_id");
    }
}
