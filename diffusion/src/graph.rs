//! The UNet's calls of one render, replayed as a CUDA graph.
//!
//! At batch 1 a UNet call on an H100 is bound by the host: candle issues
//! hundreds of kernels per call, each with its own allocation,
//! layout bookkeeping and launch, and the GPU waits for them. A CUDA graph
//! records the call's kernels once and replays them with one launch.
//! `HALLMARK_CUDA_GRAPHS=on` turns this on for renders on a CUDA device
//! (off by default until measured on a GPU; `check` also compares the first
//! replay with an eager call and reports the difference on stderr).
//!
//! How a render's calls go, all on the render's thread (candle's per-thread
//! stream):
//! 1. The first call runs eagerly with candle's host-to-device cache on, so
//!    that every small parameter upload it makes (the strides of strided
//!    kernels) stays on the device for the recording to reuse, and so that
//!    the cross-attention's keys and values of this render's text are made
//!    and kept outside the graph.
//! 2. The second call is recorded: the timestep embedding is made on the
//!    host side first ([`Unet::embed`]), then [`Unet::forward_embedded`]
//!    runs under stream capture on copies of its inputs that the graph
//!    keeps, and its result is copied into a buffer the graph keeps too, so
//!    every allocation made inside the graph is freed inside it and the
//!    graph can be launched again. What the call takes from the model's
//!    caches (the text's keys and values, the group norms' constants) the
//!    graph keeps alive, and nothing made during the recording goes into a
//!    cache ([`recording`]). Then it is launched.
//! 3. Every later call copies its latents and embedding into the graph's
//!    inputs, launches the graph and copies the result out.
//!
//! Anything that stops the recording — an upload candle did not cache, a
//! copy to the host, a library call that cannot be captured — ends the
//! capture, logs why, and the render goes on eagerly; so does a call whose
//! shapes or text differ from the recorded one's.

use candle_core::{Device, Tensor};

use crate::DiffusionError;
use crate::unet::{AddedConditioning, Unet};

thread_local! {
    static RECORDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Tensors made before the recording that the graph reads and that a
    /// cache could drop: the graph keeps them alive.
    static READ: std::cell::RefCell<Vec<Tensor>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Graph launches in this process (what the benchmark reports, so a render
/// that fell back to eager calls shows as such).
static REPLAYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// UNet calls replayed from a graph so far in this process.
pub fn replays() -> u64 {
    REPLAYS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether this thread is recording a graph: what is made now lives in the
/// graph's memory, so nothing may keep it (the cross-attention's key and
/// value cache and the group norm's unit scale do not fill while this is
/// true).
pub(crate) fn recording() -> bool {
    RECORDING.with(std::cell::Cell::get)
}

/// While a graph records, `tensors` (taken from a cache) are kept alive
/// with the graph, whatever the cache does with them later.
pub(crate) fn keep_alive(tensors: &[&Tensor]) {
    if recording() {
        READ.with(|r| r.borrow_mut().extend(tensors.iter().map(|t| (*t).clone())));
    }
}

/// Runs `f` with [`recording`] true on this thread; also returns what it
/// asked to [`keep_alive`].
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn while_recording<T>(f: impl FnOnce() -> T) -> (T, Vec<Tensor>) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            RECORDING.with(|r| r.set(false));
            READ.with(|r| r.borrow_mut().clear());
        }
    }
    RECORDING.with(|r| r.set(true));
    let _reset = Reset;
    let out = f();
    (out, READ.with(|r| std::mem::take(&mut *r.borrow_mut())))
}

/// What `HALLMARK_CUDA_GRAPHS` asks for (read once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphMode {
    /// Every call eager (the default).
    Off,
    /// Record the second call, replay from then on.
    On,
    /// As `On`, and the first replay is compared with an eager call.
    Check,
}

impl GraphMode {
    /// The mode `HALLMARK_CUDA_GRAPHS` names: `on`, `check`, else off.
    pub fn from_env() -> Self {
        static MODE: std::sync::OnceLock<GraphMode> = std::sync::OnceLock::new();
        *MODE.get_or_init(|| Self::parse(std::env::var("HALLMARK_CUDA_GRAPHS").ok().as_deref()))
    }

    fn parse(value: Option<&str>) -> Self {
        match value.map(str::to_ascii_lowercase).as_deref() {
            Some("on") => Self::On,
            Some("check") => Self::Check,
            _ => Self::Off,
        }
    }
}

/// The UNet's calls of one render: eager, or through a graph on CUDA.
pub(crate) struct UnetCalls<'a> {
    unet: &'a Unet,
    state: State,
}

enum State {
    /// Every call eager.
    Eager,
    /// The next call runs eagerly with the upload cache on (warm-up).
    WarmUp { check: bool },
    /// The next call with this text is recorded.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Record {
        check: bool,
        context: candle_core::TensorId,
    },
    #[cfg(feature = "cuda")]
    Replay(Box<cuda::Recorded>),
}

impl<'a> UnetCalls<'a> {
    /// Calls of `unet` on `device` in `mode`: a graph only on a CUDA device
    /// with no profile running (the profile synchronises inside the call).
    pub(crate) fn new(unet: &'a Unet, device: &Device, mode: GraphMode) -> Self {
        let graphs = device.is_cuda() && !crate::profile::running() && mode != GraphMode::Off;
        let state = if graphs && cfg!(feature = "cuda") {
            State::WarmUp {
                check: mode == GraphMode::Check,
            }
        } else {
            State::Eager
        };
        Self { unet, state }
    }

    /// The UNet's prediction for `xs` at `timestep`, as [`Unet::forward`].
    pub(crate) fn forward(
        &mut self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor, DiffusionError> {
        match std::mem::replace(&mut self.state, State::Eager) {
            State::Eager => self.unet.forward(xs, timestep, context, added),
            State::WarmUp { check } => {
                let out = self.warm_up(xs, timestep, context, added)?;
                self.state = State::Record {
                    check,
                    context: context.id(),
                };
                Ok(out)
            }
            #[cfg(not(feature = "cuda"))]
            State::Record { .. } => self.unet.forward(xs, timestep, context, added),
            #[cfg(feature = "cuda")]
            State::Record {
                check,
                context: warmed,
            } => {
                let emb = self.unet.embed(xs, timestep, added)?;
                if warmed != context.id() {
                    // Another text: its keys and values were not made yet.
                    self.state = State::WarmUp { check };
                    return self.unet.forward_embedded(xs, &emb, context);
                }
                match cuda::Recorded::record(self.unet, xs, &emb, context) {
                    Ok(recorded) => {
                        let out = recorded.replay(xs, &emb)?;
                        if check {
                            let (eager, agree) =
                                self.checked(&recorded, &out, xs, &emb, context)?;
                            if !agree {
                                tracing::warn!(
                                    "the CUDA graph's UNet call differs from the eager one; this render runs eagerly"
                                );
                                return Ok(eager);
                            }
                        }
                        self.state = State::Replay(Box::new(recorded));
                        Ok(out)
                    }
                    Err(e) => {
                        tracing::warn!(
                            "the UNet call could not be recorded as a CUDA graph ({e}); this render runs eagerly"
                        );
                        self.unet.forward_embedded(xs, &emb, context)
                    }
                }
            }
            #[cfg(feature = "cuda")]
            State::Replay(recorded) => {
                let emb = self.unet.embed(xs, timestep, added)?;
                if !recorded.fits(xs, &emb, context) {
                    tracing::warn!(
                        "a UNet call unlike the recorded one ({:?}); this render goes on eagerly",
                        xs.dims()
                    );
                    return self.unet.forward_embedded(xs, &emb, context);
                }
                let out = recorded.replay(xs, &emb)?;
                self.state = State::Replay(recorded);
                Ok(out)
            }
        }
    }

    /// The first call, eager, with candle's upload cache on so the
    /// recording finds every parameter upload on the device.
    fn warm_up(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor, DiffusionError> {
        let emb = self.unet.embed(xs, timestep, added)?;
        #[cfg(feature = "cuda")]
        let _cache = match xs.device() {
            Device::Cuda(dev) => Some(dev.enable_cuda_graph_htod_cache()),
            _ => None,
        };
        self.unet.forward_embedded(xs, &emb, context)
    }

    /// `check` mode: the first replay's result against an eager call's,
    /// reported on stderr as a JSON line. They agree when the largest
    /// difference is within 1 % of the largest value. The eager result is
    /// returned either way, and whether they agreed.
    #[cfg(feature = "cuda")]
    fn checked(
        &self,
        recorded: &cuda::Recorded,
        replayed: &Tensor,
        xs: &Tensor,
        emb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, bool), DiffusionError> {
        use candle_core::DType;
        let eager = self.unet.forward_embedded(xs, emb, context)?;
        let largest = |t: &Tensor| -> candle_core::Result<f32> {
            t.to_dtype(DType::F32)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        let diff = largest(&(replayed.to_dtype(DType::F32)? - eager.to_dtype(DType::F32)?)?)?;
        let scale = largest(&eager)?;
        let agree = diff.is_finite() && diff <= 0.01 * scale.max(1e-6);
        eprintln!(
            "{{\"bench\":\"cuda_graph_check\",\"batch\":{},\"nodes\":{},\"max_abs_diff\":{diff},\"max_abs\":{scale},\"agree\":{agree}}}",
            xs.dim(0)?,
            recorded.nodes()
        );
        Ok((eager, agree))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream, DriverError};
    use candle_core::{Device, Tensor};

    use crate::DiffusionError;
    use crate::unet::Unet;

    /// A recorded UNet call: the graph, and the tensors it reads and writes
    /// beside the model's weights.
    pub(super) struct Recorded {
        graph: CudaGraph,
        xs: Tensor,
        emb: Tensor,
        out: Tensor,
        context: Tensor,
        /// The cached keys, values and norm constants the graph reads.
        _cached: Vec<Tensor>,
    }

    fn failed(what: impl std::fmt::Display) -> DiffusionError {
        candle_core::Error::Msg(format!("CUDA graph: {what}")).into()
    }

    fn driver(what: &str, e: DriverError) -> DiffusionError {
        failed(format_args!("{what}: {e}"))
    }

    impl Recorded {
        /// Records `unet.forward_embedded` on copies of `xs` and `emb`.
        /// The graph is not launched.
        pub(super) fn record(
            unet: &Unet,
            xs: &Tensor,
            emb: &Tensor,
            context: &Tensor,
        ) -> Result<Self, DiffusionError> {
            let Device::Cuda(dev) = xs.device() else {
                return Err(failed("not a CUDA device"));
            };
            let (b, _, h, w) = xs.dims4()?;
            let xs_in = xs.contiguous()?.copy()?;
            let emb_in = emb.contiguous()?.copy()?;
            let out = Tensor::zeros((b, unet.out_channels(), h, w), xs.dtype(), xs.device())?;
            let stream = dev.cuda_stream();
            let _cache = dev.enable_cuda_graph_htod_cache();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(|e| driver("starting the capture", e))?;
            // Ends the capture if the call panics, so this thread's stream
            // does not stay capturing.
            struct Capturing<'a>(Option<&'a std::sync::Arc<CudaStream>>);
            impl Drop for Capturing<'_> {
                fn drop(&mut self) {
                    if let Some(stream) = self.0.take() {
                        let _ = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                    }
                }
            }
            let mut capturing = Capturing(Some(&stream));
            // Everything allocated in here is dropped in here, the result
            // after its copy into `out`.
            let (recorded, cached) = super::while_recording(|| -> Result<(), DiffusionError> {
                let y = unet.forward_embedded(&xs_in, &emb_in, context)?;
                out.slice_set(&y.contiguous()?, 0, 0)?;
                Ok(())
            });
            capturing.0 = None;
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            // An error the capture's frees recorded in cudarc's context (a
            // free in a capture that broke) would otherwise fail the next
            // call that binds the context; taken here, it fails the
            // recording instead.
            let deferred = stream.context().check_err();
            recorded?;
            deferred.map_err(|e| driver("during the capture", e))?;
            let graph = ended
                .map_err(|e| driver("ending the capture", e))?
                .ok_or_else(|| failed("the capture recorded nothing"))?;
            graph
                .upload()
                .map_err(|e| driver("uploading the graph", e))?;
            Ok(Self {
                graph,
                xs: xs_in,
                emb: emb_in,
                out,
                context: context.clone(),
                _cached: cached,
            })
        }

        /// Whether a call on these inputs is the recorded one's.
        pub(super) fn fits(&self, xs: &Tensor, emb: &Tensor, context: &Tensor) -> bool {
            xs.dims() == self.xs.dims()
                && xs.dtype() == self.xs.dtype()
                && emb.dims() == self.emb.dims()
                && emb.dtype() == self.emb.dtype()
                && context.id() == self.context.id()
        }

        /// The recorded call on `xs` and `emb`: both copied into the graph's
        /// inputs, one launch, the result copied out (the next launch
        /// overwrites the graph's own).
        pub(super) fn replay(&self, xs: &Tensor, emb: &Tensor) -> Result<Tensor, DiffusionError> {
            self.xs.slice_set(&xs.contiguous()?, 0, 0)?;
            self.emb.slice_set(&emb.contiguous()?, 0, 0)?;
            self.graph
                .launch()
                .map_err(|e| driver("launching the graph", e))?;
            super::REPLAYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(self.out.copy()?)
        }

        /// The graph's node count (kernels, copies, allocations, frees).
        pub(super) fn nodes(&self) -> usize {
            let mut n = 0usize;
            // SAFETY: the graph is alive; a null node array asks only for
            // the count.
            let got = unsafe {
                sys::cuGraphGetNodes(self.graph.cu_graph(), std::ptr::null_mut(), &mut n)
            };
            if got == sys::CUresult::CUDA_SUCCESS {
                n
            } else {
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_named_by_the_variable() {
        assert_eq!(GraphMode::parse(None), GraphMode::Off);
        assert_eq!(GraphMode::parse(Some("on")), GraphMode::On);
        assert_eq!(GraphMode::parse(Some("ON")), GraphMode::On);
        assert_eq!(GraphMode::parse(Some("check")), GraphMode::Check);
        assert_eq!(GraphMode::parse(Some("off")), GraphMode::Off);
        assert_eq!(GraphMode::parse(Some("yes")), GraphMode::Off);
    }

    #[test]
    fn recording_is_set_only_inside_and_collects_what_caches_gave() {
        let t = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(!recording());
        keep_alive(&[&t]);
        let (inside, kept) = while_recording(|| {
            keep_alive(&[&t, &t]);
            recording()
        });
        assert!(inside);
        assert_eq!(kept.len(), 2, "what the recorded call read from caches");
        assert!(kept.iter().all(|k| k.id() == t.id()));
        assert!(!recording());
        let (_, kept) = while_recording(|| ());
        assert!(kept.is_empty(), "nothing kept outside a recording");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while_recording(|| {
                keep_alive(&[&t]);
                panic!("inside")
            })
        }));
        assert!(panicked.is_err());
        assert!(!recording(), "reset when the recorded call panics");
        assert!(
            while_recording(|| ()).1.is_empty(),
            "and what it kept dropped"
        );
    }
}
