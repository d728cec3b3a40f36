//! Feature interventions: clamp, add or ablate SAE features in the activation at the SAE's hook,
//! at every position or at generated positions only.
//!
//! A clamp keeps the SAE's error term, so that only the clamped feature changes:
//!
//! ```text
//! x' = x + Σ_i (v_i - a_i(x)) · W_dec[i]
//! ```
//!
//! where `a_i(x)` is the feature's activation as the SAE computes it on `x`. Written out,
//! `x = SAE(x) + err(x)` and `SAE(x) = b_dec + Σ_j a_j(x) W_dec[j]`; the clamp replaces `a_i` by
//! `v_i` in that sum and keeps every other `a_j` and `err(x)` as they were. For TopK and
//! BatchTopK SAEs the other features are deliberately *not* re-selected: re-encoding after the
//! clamp would let a large `v_i` push other features out of the top k and change them too, so the
//! edit would no longer be "this feature, and only this feature". Ablation is a clamp to 0.
//! Additive steering, `x + α · W_dec[i]`, does not look at the SAE's activations at all.

use candle_core::{DType, Device, Tensor};
use sae_core::SaeModel;
use transformer_hooks::{HookPoint, Hooks, Intervention, Model};

use crate::error::{Result, SteeringError};

/// What to do to one feature.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edit {
    /// Set the activation to this value (in the SAE's own units, not multiples of the maximum:
    /// see [`crate::FeatureStats::max_activation`] to convert).
    Clamp(f32),
    /// Add this multiple of the feature's decoder direction.
    Add(f32),
}

/// An edit of one feature.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FeatureEdit {
    pub feature: usize,
    pub edit: Edit,
}

impl FeatureEdit {
    /// Clamp `feature` to `value`.
    pub fn clamp(feature: usize, value: f32) -> Self {
        Self {
            feature,
            edit: Edit::Clamp(value),
        }
    }

    /// Clamp `feature` to 0 (ablation).
    pub fn ablate(feature: usize) -> Self {
        Self::clamp(feature, 0.0)
    }

    /// Add `alpha · W_dec[feature]`.
    pub fn add(feature: usize, alpha: f32) -> Self {
        Self {
            feature,
            edit: Edit::Add(alpha),
        }
    }
}

/// Which positions an intervention touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Prompt and generated positions.
    #[default]
    All,
    /// Only positions at or after this index of the (padded) sequence: the generated ones when
    /// it is the padded prompt length.
    From(usize),
}

/// A set of feature edits on one SAE at one hook point.
#[derive(Clone, Debug)]
pub struct Steering<'s> {
    sae: &'s SaeModel,
    hook: HookPoint,
    edits: Vec<FeatureEdit>,
    scope: Scope,
    /// Decoder rows of the edited features, `[edits, d_in]`.
    dirs: Vec<Vec<f32>>,
}

impl<'s> Steering<'s> {
    /// Edits of features of `sae`, applied at `hook` (normally the hook it was trained on:
    /// [`sae_hook`]).
    ///
    /// # Errors
    /// A feature past the dictionary, a non-finite value, or no edit at all.
    pub fn new(sae: &'s SaeModel, hook: HookPoint, edits: Vec<FeatureEdit>) -> Result<Self> {
        if edits.is_empty() {
            return Err(SteeringError::invalid("edits", "no feature to edit"));
        }
        let mut dirs = Vec::with_capacity(edits.len());
        for e in &edits {
            let row = sae
                .w_dec_row(e.feature)
                .ok_or(SteeringError::NoSuchFeature {
                    feature: e.feature,
                    d_sae: sae.d_sae(),
                })?;
            let (Edit::Clamp(v) | Edit::Add(v)) = e.edit;
            if !v.is_finite() {
                return Err(SteeringError::invalid(
                    format!("value for feature {}", e.feature),
                    format!("{v} is not finite"),
                ));
            }
            dirs.push(row.to_vec());
        }
        Ok(Self {
            sae,
            hook,
            edits,
            scope: Scope::All,
            dirs,
        })
    }

    /// Restrict the edits to `scope`.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// The hook point edited.
    pub fn hook(&self) -> HookPoint {
        self.hook
    }

    /// The edits.
    pub fn edits(&self) -> &[FeatureEdit] {
        &self.edits
    }

    /// The edited activation for `x` `[batch, seq, d_in]` whose first position is sequence
    /// index `offset` (0 for a whole sequence; the cache length for a KV-cached step).
    ///
    /// # Errors
    /// A width other than the SAE's, NaN activations (the SAE refuses them).
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        if d != self.sae.d_in() {
            return Err(SteeringError::SaeHook {
                hook: self.hook.to_string(),
                reason: format!("activation width {d}, SAE d_in {}", self.sae.d_in()),
            });
        }
        let first = match self.scope {
            Scope::All => 0,
            Scope::From(p) => p.saturating_sub(offset).min(s),
        };
        if first == s {
            return Ok(x.clone());
        }
        let xs = x.narrow(1, first, s - first)?;
        let n = b * (s - first);
        let flat = xs
            .reshape((n, d))?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        let needs_codes = self.edits.iter().any(|e| matches!(e.edit, Edit::Clamp(_)));
        let codes = if needs_codes {
            Some(self.sae.encode_sparse(&flat)?)
        } else {
            None
        };
        let mut delta = vec![0f32; n * d];
        for (row, out) in delta.chunks_mut(d).enumerate() {
            for (e, dir) in self.edits.iter().zip(&self.dirs) {
                let coef = match (e.edit, &codes) {
                    (Edit::Add(alpha), _) => alpha,
                    (Edit::Clamp(v), Some(c)) => {
                        let span = c.offsets[row]..c.offsets[row + 1];
                        let a = c.features[span.clone()]
                            .iter()
                            .zip(&c.values[span])
                            .find(|(f, _)| **f as usize == e.feature)
                            .map_or(0.0, |(_, v)| *v);
                        v - a
                    }
                    (Edit::Clamp(_), None) => 0.0,
                };
                if coef != 0.0 {
                    out.iter_mut().zip(dir).for_each(|(o, w)| *o += coef * w);
                }
            }
        }
        let delta = Tensor::from_vec(delta, (b, s - first, d), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        let edited = (xs + delta)?;
        if first == 0 {
            Ok(edited)
        } else {
            Ok(Tensor::cat(&[&x.narrow(1, 0, first)?, &edited], 1)?)
        }
    }

    /// The edits as one [`Intervention`], for [`Hooks::intervene`] at [`Steering::hook`].
    pub fn intervention(&self) -> Intervention<'_> {
        Intervention::map_at(move |x, offset| Ok(self.apply(x, offset)?))
    }

    /// Hooks that apply the edits and nothing else.
    pub fn hooks(&self) -> Hooks<'_> {
        Hooks::new().intervene(self.hook, self.intervention())
    }
}

/// [`sae_hook`], checked against `model`: the hook exists there and gives the SAE's `d_in`
/// values a token. An SAE from another model (or another layer's width) is refused before any
/// pass, naming the hook and both widths, rather than at the first encode.
///
/// # Errors
/// Those of [`sae_hook`]; a hook the model lacks; [`SteeringError::SaeHook`] for a hook that
/// is not a per-token activation or another width.
pub fn sae_hook_in(sae: &SaeModel, model: &Model) -> Result<HookPoint> {
    let hook = sae_hook(sae)?;
    hook.check(model.config())?;
    let reason = match hook.width(model.config()) {
        None => "it is not one activation vector per token".to_string(),
        Some(w) if w != sae.d_in() => format!(
            "the SAE reads {} values a token (d_in), the model's hook gives {w}",
            sae.d_in()
        ),
        Some(_) => return Ok(hook),
    };
    Err(SteeringError::SaeHook {
        hook: hook.to_string(),
        reason,
    })
}

/// The hook point an SAE was trained on, from its config (`hook_name`).
///
/// # Errors
/// No hook name in the config, or one that does not parse as a TransformerLens name.
pub fn sae_hook(sae: &SaeModel) -> Result<HookPoint> {
    let name = sae.hook_name().ok_or_else(|| SteeringError::SaeHook {
        hook: "(none)".into(),
        reason: "the SAE's cfg.json names no hook_name; pass the hook explicitly".into(),
    })?;
    name.parse()
        .map_err(|e: transformer_hooks::Error| SteeringError::SaeHook {
            hook: name.to_string(),
            reason: e.to_string(),
        })
}
