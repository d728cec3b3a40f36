//! Typed hook points; their documentation is on [`HookPoint`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// A place inside a transformer block, in the order the forward pass reaches them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Site {
    /// `hook_resid_pre`, `[batch, pos, d_model]`.
    ResidPre,
    /// `ln1.hook_normalized`, `[batch, pos, d_model]`.
    Ln1Normalized,
    /// `attn.hook_q`, `[batch, pos, n_heads, d_head]`.
    Q,
    /// `attn.hook_k`, `[batch, pos, n_kv_heads, d_head]`.
    K,
    /// `attn.hook_v`, `[batch, pos, n_kv_heads, d_head]`.
    V,
    /// `attn.hook_rot_q`, `[batch, pos, n_heads, d_head]`.
    RotQ,
    /// `attn.hook_rot_k`, `[batch, pos, n_kv_heads, d_head]`.
    RotK,
    /// `attn.hook_attn_scores`, `[batch, n_heads, query_pos, key_pos]`.
    AttnScores,
    /// `attn.hook_pattern`, `[batch, n_heads, query_pos, key_pos]`.
    Pattern,
    /// `attn.hook_z`, `[batch, pos, n_heads, d_head]`.
    Z,
    /// `hook_attn_out`, `[batch, pos, d_model]`.
    AttnOut,
    /// `hook_resid_mid`, `[batch, pos, d_model]`.
    ResidMid,
    /// `ln2.hook_normalized`, `[batch, pos, d_model]`.
    Ln2Normalized,
    /// `mlp.hook_pre`, `[batch, pos, d_mlp]`.
    MlpPre,
    /// `mlp.hook_pre_linear`, `[batch, pos, d_mlp]` (gated MLPs only).
    MlpPreLinear,
    /// `mlp.hook_post`, `[batch, pos, d_mlp]`: the MLP neurons.
    MlpPost,
    /// `hook_mlp_out`, `[batch, pos, d_model]`.
    MlpOut,
    /// `hook_resid_post`, `[batch, pos, d_model]`.
    ResidPost,
}

impl Site {
    /// Every site, in forward order.
    pub const ALL: [Site; 18] = [
        Site::ResidPre,
        Site::Ln1Normalized,
        Site::Q,
        Site::K,
        Site::V,
        Site::RotQ,
        Site::RotK,
        Site::AttnScores,
        Site::Pattern,
        Site::Z,
        Site::AttnOut,
        Site::ResidMid,
        Site::Ln2Normalized,
        Site::MlpPre,
        Site::MlpPreLinear,
        Site::MlpPost,
        Site::MlpOut,
        Site::ResidPost,
    ];

    /// The name after `blocks.{L}.`, as TransformerLens spells it.
    pub const fn suffix(self) -> &'static str {
        match self {
            Site::ResidPre => "hook_resid_pre",
            Site::Ln1Normalized => "ln1.hook_normalized",
            Site::Q => "attn.hook_q",
            Site::K => "attn.hook_k",
            Site::V => "attn.hook_v",
            Site::RotQ => "attn.hook_rot_q",
            Site::RotK => "attn.hook_rot_k",
            Site::AttnScores => "attn.hook_attn_scores",
            Site::Pattern => "attn.hook_pattern",
            Site::Z => "attn.hook_z",
            Site::AttnOut => "hook_attn_out",
            Site::ResidMid => "hook_resid_mid",
            Site::Ln2Normalized => "ln2.hook_normalized",
            Site::MlpPre => "mlp.hook_pre",
            Site::MlpPreLinear => "mlp.hook_pre_linear",
            Site::MlpPost => "mlp.hook_post",
            Site::MlpOut => "hook_mlp_out",
            Site::ResidPost => "hook_resid_post",
        }
    }
}

/// A TransformerLens hook point: where in the forward pass to capture or intervene.
///
/// Ordered as the forward pass reaches them, so the greatest of a set is the deepest.
///
/// SAE releases name the activation they were trained on by a TransformerLens string
/// (`hook_name: "blocks.8.hook_resid_pre"`). [`HookPoint`] is that string as a type: `Display` writes
/// it, `FromStr` reads it and fails on anything else (a typo is an error, never a silently unused
/// hook), and serde goes through the string.
///
/// | name | shape | what |
/// |---|---|---|
/// | `hook_embed` | `[batch, pos, d_model]` | token embedding (Gemma: already times `sqrt(d_model)`) |
/// | `hook_pos_embed` | `[batch, pos, d_model]` | learned position embedding (GPT-2 only) |
/// | `blocks.{L}.hook_resid_pre` | `[batch, pos, d_model]` | residual stream entering block L |
/// | `blocks.{L}.ln1.hook_normalized` | `[batch, pos, d_model]` | input to attention, after its norm |
/// | `blocks.{L}.attn.hook_q` / `hook_k` / `hook_v` | `[batch, pos, heads, d_head]` | projections (k/v: `n_kv_heads`), before q/k norm and rotary |
/// | `blocks.{L}.attn.hook_rot_q` / `hook_rot_k` | `[batch, pos, heads, d_head]` | q/k after q/k norm and rotary (rotary models only) |
/// | `blocks.{L}.attn.hook_attn_scores` | `[batch, heads, query_pos, key_pos]` | scaled, masked (-inf) scores |
/// | `blocks.{L}.attn.hook_pattern` | `[batch, heads, query_pos, key_pos]` | softmax of the scores |
/// | `blocks.{L}.attn.hook_z` | `[batch, pos, heads, d_head]` | pattern-weighted values, before `W_O` |
/// | `blocks.{L}.hook_attn_out` | `[batch, pos, d_model]` | what attention adds to the residual (Gemma: after its post-attention norm) |
/// | `blocks.{L}.hook_resid_mid` | `[batch, pos, d_model]` | residual between attention and MLP |
/// | `blocks.{L}.ln2.hook_normalized` | `[batch, pos, d_model]` | input to the MLP, after its norm |
/// | `blocks.{L}.mlp.hook_pre` | `[batch, pos, d_mlp]` | pre-activation (gated MLPs: the gate branch) |
/// | `blocks.{L}.mlp.hook_pre_linear` | `[batch, pos, d_mlp]` | the linear ("up") branch of a gated MLP |
/// | `blocks.{L}.mlp.hook_post` | `[batch, pos, d_mlp]` | the neurons: `act(pre)` or `act(pre) * pre_linear` |
/// | `blocks.{L}.hook_mlp_out` | `[batch, pos, d_model]` | what the MLP adds to the residual (Gemma: after its post-FFN norm) |
/// | `blocks.{L}.hook_resid_post` | `[batch, pos, d_model]` | residual leaving block L |
/// | `ln_final.hook_normalized` | `[batch, pos, d_model]` | input to the unembedding |
///
/// Not provided: `hook_scale` of the norms and `attn.hook_result` (per-head outputs), which the
/// fused kernels do not materialise.
///
/// ```
/// use transformer_hooks::{HookPoint, Site};
/// let h: HookPoint = "blocks.15.mlp.hook_post".parse().unwrap();
/// assert_eq!(h, HookPoint::Block(15, Site::MlpPost));
/// assert_eq!(h.to_string(), "blocks.15.mlp.hook_post");
/// assert!("blocks.15.mlp.hook_pots".parse::<HookPoint>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum HookPoint {
    /// `hook_embed`, `[batch, pos, d_model]`.
    Embed,
    /// `hook_pos_embed`, `[batch, pos, d_model]` (learned positions, GPT-2).
    PosEmbed,
    /// `blocks.{L}.{site}`.
    Block(usize, Site),
    /// `ln_final.hook_normalized`, `[batch, pos, d_model]`.
    LnFinalNormalized,
}

impl HookPoint {
    /// `blocks.{layer}.hook_resid_pre`.
    pub const fn resid_pre(layer: usize) -> Self {
        Self::Block(layer, Site::ResidPre)
    }
    /// `blocks.{layer}.hook_resid_mid`.
    pub const fn resid_mid(layer: usize) -> Self {
        Self::Block(layer, Site::ResidMid)
    }
    /// `blocks.{layer}.hook_resid_post`.
    pub const fn resid_post(layer: usize) -> Self {
        Self::Block(layer, Site::ResidPost)
    }
    /// `blocks.{layer}.hook_attn_out`.
    pub const fn attn_out(layer: usize) -> Self {
        Self::Block(layer, Site::AttnOut)
    }
    /// `blocks.{layer}.mlp.hook_pre`.
    pub const fn mlp_pre(layer: usize) -> Self {
        Self::Block(layer, Site::MlpPre)
    }
    /// `blocks.{layer}.mlp.hook_post`: the MLP neurons.
    pub const fn mlp_post(layer: usize) -> Self {
        Self::Block(layer, Site::MlpPost)
    }
    /// `blocks.{layer}.hook_mlp_out`.
    pub const fn mlp_out(layer: usize) -> Self {
        Self::Block(layer, Site::MlpOut)
    }

    /// The block this point is in, if any.
    pub const fn layer(&self) -> Option<usize> {
        match self {
            Self::Block(layer, _) => Some(*layer),
            _ => None,
        }
    }

    /// Values per token position at this point (what an activation cache stores per row):
    /// `d_model`, `d_mlp`, or heads x `d_head`. `None` for the attention scores and pattern,
    /// whose size grows with the sequence.
    pub fn width(&self, cfg: &ModelConfig) -> Option<usize> {
        let site = match self {
            Self::Block(_, site) => *site,
            _ => return Some(cfg.d_model),
        };
        match site {
            Site::Q | Site::RotQ | Site::Z => Some(cfg.n_heads * cfg.d_head),
            Site::K | Site::V | Site::RotK => Some(cfg.n_kv_heads * cfg.d_head),
            Site::AttnScores | Site::Pattern => None,
            Site::MlpPre | Site::MlpPreLinear | Site::MlpPost => Some(cfg.d_mlp),
            Site::ResidPre
            | Site::Ln1Normalized
            | Site::AttnOut
            | Site::ResidMid
            | Site::Ln2Normalized
            | Site::MlpOut
            | Site::ResidPost => Some(cfg.d_model),
        }
    }

    /// Every hook point a model with this config has, in forward order.
    pub fn all(cfg: &ModelConfig) -> Vec<HookPoint> {
        let mut out = vec![HookPoint::Embed];
        if cfg.learned_positions {
            out.push(HookPoint::PosEmbed);
        }
        for layer in 0..cfg.n_layers {
            for site in Site::ALL {
                let h = HookPoint::Block(layer, site);
                if h.check(cfg).is_ok() {
                    out.push(h);
                }
            }
        }
        out.push(HookPoint::LnFinalNormalized);
        out
    }

    /// Whether a model with this config has this hook point.
    ///
    /// # Errors
    /// [`Error::HookNotInModel`] naming the point and why (layer out of range, no learned position
    /// embedding, no rotary embedding, no gated MLP).
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        let fail = |reason: String| {
            Err(Error::HookNotInModel {
                hook: self.to_string(),
                reason,
            })
        };
        match *self {
            HookPoint::Embed | HookPoint::LnFinalNormalized => Ok(()),
            HookPoint::PosEmbed if !cfg.learned_positions => fail(format!(
                "{} uses rotary position embeddings, not learned ones",
                cfg.arch
            )),
            HookPoint::PosEmbed => Ok(()),
            HookPoint::Block(layer, _) if layer >= cfg.n_layers => fail(format!(
                "layer {layer} is out of range: the model has {} layers (0..={})",
                cfg.n_layers,
                cfg.n_layers.saturating_sub(1)
            )),
            HookPoint::Block(_, Site::RotQ | Site::RotK) if cfg.learned_positions => fail(format!(
                "{} has no rotary embedding (use attn.hook_q / attn.hook_k)",
                cfg.arch
            )),
            HookPoint::Block(_, Site::MlpPreLinear) if !cfg.gated_mlp => fail(format!(
                "{} has an ungated MLP (no linear branch)",
                cfg.arch
            )),
            HookPoint::Block(..) => Ok(()),
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => f.write_str("hook_embed"),
            HookPoint::PosEmbed => f.write_str("hook_pos_embed"),
            HookPoint::Block(layer, site) => write!(f, "blocks.{layer}.{}", site.suffix()),
            HookPoint::LnFinalNormalized => f.write_str("ln_final.hook_normalized"),
        }
    }
}

impl FromStr for HookPoint {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        let unknown = |reason: String| Error::UnknownHookPoint {
            name: name.to_string(),
            reason,
        };
        match name {
            "hook_embed" => return Ok(HookPoint::Embed),
            "hook_pos_embed" => return Ok(HookPoint::PosEmbed),
            "ln_final.hook_normalized" => return Ok(HookPoint::LnFinalNormalized),
            _ => {}
        }
        let Some(rest) = name.strip_prefix("blocks.") else {
            return Err(unknown(
                "expected `hook_embed`, `hook_pos_embed`, `ln_final.hook_normalized` or `blocks.{L}.<site>`"
                    .into(),
            ));
        };
        let (layer, suffix) = rest
            .split_once('.')
            .ok_or_else(|| unknown("expected `blocks.{L}.<site>`".into()))?;
        let canonical = !layer.is_empty()
            && layer.bytes().all(|b| b.is_ascii_digit())
            && (layer == "0" || !layer.starts_with('0'));
        let layer: usize = match layer.parse() {
            Ok(l) if canonical => l,
            _ => {
                return Err(unknown(format!(
                    "`{layer}` is not a layer number (expected a decimal integer without leading zeros)"
                )));
            }
        };
        Site::ALL
            .iter()
            .find(|s| s.suffix() == suffix)
            .map(|&site| HookPoint::Block(layer, site))
            .ok_or_else(|| {
                let sites: Vec<&str> = Site::ALL.iter().map(|s| s.suffix()).collect();
                unknown(format!(
                    "`{suffix}` is not a block hook; expected one of {}",
                    sites.join(", ")
                ))
            })
    }
}

impl Serialize for HookPoint {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HookPoint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
