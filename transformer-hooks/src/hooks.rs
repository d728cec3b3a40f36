//! What to capture and what to change during one forward pass.
//!
//! A [`Hooks`] is built per call and dropped after it, so no hook outlives the pass it was meant
//! for. An empty one costs nothing: every hook site checks a set that is empty.
//!
//! Three ways to use it:
//!
//! ```no_run
//! # use transformer_hooks::{Model, Hooks, HookPoint, Intervention, Result};
//! # fn demo(model: &Model, tokens: &candle_core::Tensor) -> Result<()> {
//! // 1. Read activations, stopping after the deepest one (no later layers, no unembedding).
//! let mut hooks = Hooks::new().capture(HookPoint::mlp_post(15)).stop_at_deepest_capture();
//! let out = model.forward(tokens, &mut hooks)?;
//! let neurons = out.cache.require(HookPoint::mlp_post(15))?; // [batch, pos, d_mlp]
//!
//! // 2. Change an activation with a fixed edit and read the logits.
//! let mut hooks = Hooks::new().intervene(HookPoint::mlp_out(3), Intervention::Zero);
//! let logits = model.forward(tokens, &mut hooks)?.logits;
//!
//! // 3. Rewrite it with any function of the whole [batch, pos, d] tensor (an SAE splice, a
//! //    feature clamp at chosen positions), in the same single pass.
//! let mut hooks = Hooks::new().intervene(
//!     HookPoint::mlp_post(15),
//!     Intervention::map(|x| Ok(x.affine(0.5, 0.0)?)),
//! );
//! let out = model.forward(tokens, &mut hooks)?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::error::{BoxError, Error, Result};
use crate::hook_point::HookPoint;

type MapFn<'a> = Box<dyn FnMut(&Tensor) -> std::result::Result<Tensor, BoxError> + 'a>;
type MapAtFn<'a> = Box<dyn FnMut(&Tensor, usize) -> std::result::Result<Tensor, BoxError> + 'a>;

/// An edit of the activation at a hook point; the rest of the forward pass sees the result.
#[non_exhaustive]
pub enum Intervention<'a> {
    /// Replace the activation by this tensor, broadcast to the activation's shape.
    Replace(Tensor),
    /// Add this tensor, broadcast (a `[d]` steering vector, a `[pos, d]` or `[batch, pos, d]` edit).
    Add(Tensor),
    /// Set the activation to zero (zero-ablation).
    Zero,
    /// Multiply the activation by a constant.
    Scale(f64),
    /// Any function of the whole activation; it must return a tensor of the same shape. Build it
    /// with [`Intervention::map`].
    Map(MapFn<'a>),
    /// As `Map`, also told the index (in the padded sequence) of the activation's first
    /// position: 0 for a plain pass, the number of cached positions for a KV-cached generation
    /// step. Build it with [`Intervention::map_at`].
    MapAt(MapAtFn<'a>),
}

impl<'a> Intervention<'a> {
    /// An intervention computed by `f` from the whole activation tensor, e.g. an SAE's
    /// reconstruction (`|x| sae.forward(x)`) or an edit at chosen positions. Inside `f`, `?` works on
    /// any error type. During generation `f` runs once per step, on every position so far.
    pub fn map<F>(f: F) -> Self
    where
        F: FnMut(&Tensor) -> std::result::Result<Tensor, BoxError> + 'a,
    {
        Intervention::Map(Box::new(f))
    }

    /// An intervention computed by `f(x, offset)`, where `offset` is the sequence index of `x`'s
    /// first position. With a KV cache each generation step shows `f` only the new positions
    /// (`offset` > 0), so an edit that depends on where a position sits (e.g. "generated
    /// positions only": `offset + i >= prompt_len`) needs it to act the same with and without
    /// the cache.
    pub fn map_at<F>(f: F) -> Self
    where
        F: FnMut(&Tensor, usize) -> std::result::Result<Tensor, BoxError> + 'a,
    {
        Intervention::MapAt(Box::new(f))
    }

    fn apply(&mut self, hook: HookPoint, x: &Tensor, offset: usize) -> Result<Tensor> {
        let shape_err = |t: &Tensor| Error::ShapeMismatch {
            what: format!("intervention tensor at `{hook}` (must broadcast to the activation)"),
            expected: x.dims().to_vec(),
            got: t.dims().to_vec(),
        };
        match self {
            Intervention::Replace(t) => {
                let t = t.to_dtype(x.dtype())?.to_device(x.device())?;
                t.broadcast_as(x.shape())
                    .map_err(|_| shape_err(&t))?
                    .contiguous()
                    .map_err(Error::from)
            }
            Intervention::Add(t) => {
                let t = t.to_dtype(x.dtype())?.to_device(x.device())?;
                if t.broadcast_as(x.shape()).is_err() {
                    return Err(shape_err(&t));
                }
                Ok(x.broadcast_add(&t)?)
            }
            Intervention::Zero => Ok(x.zeros_like()?),
            Intervention::Scale(s) => Ok(x.affine(*s, 0.0)?),
            Intervention::Map(f) => checked(hook, x, f(x)),
            Intervention::MapAt(f) => checked(hook, x, f(x, offset)),
        }
    }
}

/// The result of a user function at `hook`: its error wrapped, its shape held to `x`'s.
fn checked(
    hook: HookPoint,
    x: &Tensor,
    y: std::result::Result<Tensor, BoxError>,
) -> Result<Tensor> {
    let y = y.map_err(|source| Error::Intervention {
        hook: hook.to_string(),
        source,
    })?;
    if y.dims() != x.dims() {
        return Err(Error::ShapeMismatch {
            what: format!("result of the intervention at `{hook}`"),
            expected: x.dims().to_vec(),
            got: y.dims().to_vec(),
        });
    }
    Ok(y)
}

impl fmt::Debug for Intervention<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Intervention::Replace(t) => write!(f, "Replace({:?})", t.shape()),
            Intervention::Add(t) => write!(f, "Add({:?})", t.shape()),
            Intervention::Zero => f.write_str("Zero"),
            Intervention::Scale(s) => write!(f, "Scale({s})"),
            Intervention::Map(_) => f.write_str("Map(<closure>)"),
            Intervention::MapAt(_) => f.write_str("MapAt(<closure>)"),
        }
    }
}

/// The hook points to capture and the interventions to apply in one forward pass.
#[derive(Debug, Default)]
pub struct Hooks<'a> {
    capture: BTreeSet<HookPoint>,
    interventions: Vec<(HookPoint, Intervention<'a>)>,
    stop_at_deepest_capture: bool,
}

impl<'a> Hooks<'a> {
    /// No captures, no interventions: a plain forward pass.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record the activation at `hook` (after any intervention there) in the output's cache.
    pub fn capture(mut self, hook: HookPoint) -> Self {
        self.capture.insert(hook);
        self
    }

    /// Record every one of `hooks`, e.g. `model.hook_points().into_iter().filter(pred)`.
    pub fn capture_all(mut self, hooks: impl IntoIterator<Item = HookPoint>) -> Self {
        self.capture.extend(hooks);
        self
    }

    /// Apply `intervention` at `hook`. Several at one point apply in the order they were added.
    pub fn intervene(mut self, hook: HookPoint, intervention: Intervention<'a>) -> Self {
        self.interventions.push((hook, intervention));
        self
    }

    /// End the pass right after the deepest captured hook point: later layers and the
    /// unembedding are not computed and the output has no logits.
    pub fn stop_at_deepest_capture(mut self) -> Self {
        self.stop_at_deepest_capture = true;
        self
    }

    /// The hook points that will be captured.
    pub fn captured(&self) -> impl Iterator<Item = HookPoint> + '_ {
        self.capture.iter().copied()
    }

    /// The hook points that have an intervention.
    pub fn intervened(&self) -> impl Iterator<Item = HookPoint> + '_ {
        self.interventions.iter().map(|(h, _)| *h)
    }

    /// Where the pass ends, if it ends early.
    pub fn stop_point(&self) -> Option<HookPoint> {
        if self.stop_at_deepest_capture {
            self.capture.last().copied()
        } else {
            None
        }
    }

    pub(crate) fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        for h in self
            .capture
            .iter()
            .chain(self.interventions.iter().map(|(h, _)| h))
        {
            h.check(cfg)?;
        }
        Ok(())
    }
}

/// Activations captured in one forward pass, by hook point.
#[derive(Clone, Debug, Default)]
pub struct ActivationCache {
    map: BTreeMap<HookPoint, Tensor>,
}

impl ActivationCache {
    /// The activation at `hook`, if captured.
    pub fn get(&self, hook: HookPoint) -> Option<&Tensor> {
        self.map.get(&hook)
    }

    /// The activation at `hook`.
    ///
    /// # Errors
    /// [`Error::NotCaptured`] listing what was captured.
    pub fn require(&self, hook: HookPoint) -> Result<&Tensor> {
        self.map.get(&hook).ok_or_else(|| Error::NotCaptured {
            hook: hook.to_string(),
            captured: self.map.keys().map(|h| h.to_string()).collect(),
        })
    }

    /// The activation at a TransformerLens name such as `"blocks.3.hook_resid_post"`.
    ///
    /// # Errors
    /// [`Error::UnknownHookPoint`] for a malformed name, [`Error::NotCaptured`] otherwise.
    pub fn get_by_name(&self, name: &str) -> Result<&Tensor> {
        self.require(name.parse()?)
    }

    /// Take the activation at `hook` out of the cache.
    pub fn remove(&mut self, hook: HookPoint) -> Option<Tensor> {
        self.map.remove(&hook)
    }

    /// Captured points and activations, in forward order.
    pub fn iter(&self) -> impl Iterator<Item = (HookPoint, &Tensor)> {
        self.map.iter().map(|(h, t)| (*h, t))
    }

    /// Number of captured points.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The underlying map.
    pub fn into_map(self) -> BTreeMap<HookPoint, Tensor> {
        self.map
    }
}

/// The live state of one pass: the caller's hooks plus what has been captured so far.
pub(crate) struct HookRun<'h, 'a> {
    hooks: &'h mut Hooks<'a>,
    pub(crate) cache: ActivationCache,
    stop: Option<HookPoint>,
    idle: bool,
    /// Sequence index of the first position of this pass (KV-cached steps start later).
    offset: usize,
}

impl<'h, 'a> HookRun<'h, 'a> {
    pub(crate) fn new(hooks: &'h mut Hooks<'a>, offset: usize) -> Self {
        let stop = hooks.stop_point();
        let idle = hooks.capture.is_empty() && hooks.interventions.is_empty();
        Self {
            hooks,
            cache: ActivationCache::default(),
            stop,
            idle,
            offset,
        }
    }

    /// Whether anything happens at `hook` (so that building its view is worth it).
    pub(crate) fn wants(&self, hook: HookPoint) -> bool {
        !self.idle
            && (self.hooks.capture.contains(&hook)
                || self.hooks.interventions.iter().any(|(h, _)| *h == hook))
    }

    /// Apply the interventions at `hook` to `x`, capture the result if asked, and hand it back.
    pub(crate) fn at(&mut self, hook: HookPoint, x: Tensor) -> Result<Tensor> {
        if self.idle {
            return Ok(x);
        }
        let mut x = x;
        for (h, iv) in self.hooks.interventions.iter_mut() {
            if *h == hook {
                x = iv.apply(hook, &x, self.offset)?;
            }
        }
        if self.hooks.capture.contains(&hook) {
            self.cache.map.insert(hook, x.clone());
        }
        Ok(x)
    }

    /// Whether the pass ends after `hook`.
    pub(crate) fn stops_at(&self, hook: HookPoint) -> bool {
        self.stop == Some(hook)
    }
}
