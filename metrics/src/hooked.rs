//! [`SpliceTarget`] for `transformer-hooks` models, token windows from text, and the direct logit
//! effect of a feature's decoder direction.

use candle_core::{DType, Device, Tensor};
use sae_core::SaeModel;
use transformer_hooks::{BoxError, HookPoint, Hooks, Intervention, Model, Site};

use crate::ablation::top_logit_effects;
use crate::error::{MetricsError, Result};
use crate::html::LogitEffects;
use crate::sae_ops::decoder_row;
use crate::spliced::{HookEdit, SpliceTarget};

/// A model with one hook point chosen for splicing.
pub struct HookedSplice<'m> {
    model: &'m Model,
    hook: HookPoint,
    width: usize,
}

impl<'m> HookedSplice<'m> {
    /// Chooses `hook` (a TransformerLens name) of `model`.
    ///
    /// # Errors
    /// A malformed name or one the model lacks (e.g. layer 40 of a 30-layer model), each naming
    /// the hook; `UnknownHook` for hook points whose activations are not `[batch, pos, width]`
    /// (attention q/k/v/z and patterns), which an SAE here cannot read.
    pub fn new(model: &'m Model, hook: &str) -> Result<Self> {
        let h = model.hook_point(hook)?;
        let cfg = model.config();
        let width = match h {
            HookPoint::Embed | HookPoint::PosEmbed | HookPoint::LnFinalNormalized => cfg.d_model,
            HookPoint::Block(_, site) => match site {
                Site::MlpPre | Site::MlpPreLinear | Site::MlpPost => cfg.d_mlp,
                Site::ResidPre
                | Site::ResidMid
                | Site::ResidPost
                | Site::Ln1Normalized
                | Site::Ln2Normalized
                | Site::AttnOut
                | Site::MlpOut => cfg.d_model,
                _ => {
                    return Err(MetricsError::UnknownHook {
                        hook: hook.to_string(),
                        reason: "spliced evaluation needs a [batch, pos, width] activation; \
                                 attention heads and patterns are not supported"
                            .into(),
                    });
                }
            },
            _ => {
                return Err(MetricsError::UnknownHook {
                    hook: hook.to_string(),
                    reason: "not a hook point spliced evaluation knows".into(),
                });
            }
        };
        Ok(Self {
            model,
            hook: h,
            width,
        })
    }

    /// The chosen hook point.
    pub fn hook(&self) -> HookPoint {
        self.hook
    }

    /// The model.
    pub fn model(&self) -> &Model {
        self.model
    }

    /// Checks that `sae` reads this hook's width.
    ///
    /// # Errors
    /// `SaeHookWidth` naming the hook and both widths.
    pub fn check_sae(&self, sae: &SaeModel) -> Result<()> {
        if sae.d_in() != self.width {
            return Err(MetricsError::SaeHookWidth {
                hook: self.hook.to_string(),
                sae_d_in: sae.d_in(),
                hook_width: self.width,
            });
        }
        Ok(())
    }

    fn param(&self, name: &str) -> Result<&Tensor> {
        self.model
            .params()
            .get(name)
            .ok_or_else(|| MetricsError::UnknownHook {
                hook: self.hook.to_string(),
                reason: format!("the model has no parameter `{name}` to map the direction with"),
            })
    }

    /// The residual-stream direction `[d_model]` that a unit of `direction` (a vector at this
    /// hook) adds: through the MLP's down projection for neuron hooks, as is otherwise.
    ///
    /// # Errors
    /// `UnknownHook` for hooks whose effect on the residual is not linear (`mlp.hook_pre`, the
    /// norms' outputs); shape errors for a direction of the wrong width.
    pub fn residual_direction(&self, direction: &[f32]) -> Result<Tensor> {
        let dev = self.model.device();
        let v = Tensor::from_slice(direction, direction.len(), dev)?;
        match self.hook {
            HookPoint::Block(l, Site::MlpPost) => {
                let w = self.param(&format!("blocks.{l}.mlp.down.weight"))?;
                Ok(w.to_dtype(DType::F32)?
                    .matmul(&v.unsqueeze(1)?)?
                    .squeeze(1)?)
            }
            HookPoint::Block(_, Site::ResidPre | Site::ResidMid | Site::ResidPost)
            | HookPoint::Block(_, Site::AttnOut | Site::MlpOut)
            | HookPoint::Embed
            | HookPoint::PosEmbed => Ok(v),
            _ => Err(MetricsError::UnknownHook {
                hook: self.hook.to_string(),
                reason: "a direction here does not reach the residual stream linearly".into(),
            }),
        }
    }

    /// The tokens whose logits feature `feature`'s decoder direction raises and lowers most,
    /// read directly through the final norm's weight and the unembedding.
    ///
    /// # Errors
    /// As [`Self::residual_direction`]; `InvalidArgument` for a feature out of range.
    pub fn logit_effects(&self, sae: &SaeModel, feature: usize, k: usize) -> Result<LogitEffects> {
        let dir = self.residual_direction(&decoder_row(sae, feature)?)?;
        let dir = match self.model.params().get("ln_final.weight") {
            Some(g) => (dir * g.to_dtype(DType::F32)?)?,
            None => dir,
        };
        let w_u = match self.model.params().get("unembed.weight") {
            Some(w) => w,
            None => self.param("embed.weight")?,
        };
        let (raised, lowered) = top_logit_effects(&dir, w_u, k)?;
        let tok = self.model.tokenizer()?;
        let name = |id: u32| tok.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"));
        let mut caveat = String::from(
            "Direct effect only: W_U · (final-norm weight ⊙ direction). It ignores every layer after \
             the hook (the direction may be read and transformed by later attention and MLPs) and \
             the final norm's division by the residual's RMS, which scales all logits of a token together.",
        );
        if matches!(self.hook, HookPoint::Block(_, Site::MlpPost)) {
            caveat.push_str(
                " For a neuron SAE the direction is first mapped through the MLP's down projection W_out.",
            );
        }
        if self.model.config().sandwich_norms {
            caveat.push_str(" It also ignores the post-MLP norm of this architecture.");
        }
        Ok(LogitEffects {
            raised: raised.into_iter().map(|(i, v)| (name(i), v)).collect(),
            lowered: lowered.into_iter().map(|(i, v)| (name(i), v)).collect(),
            caveat,
        })
    }
}

impl SpliceTarget for HookedSplice<'_> {
    fn hook_name(&self) -> String {
        self.hook.to_string()
    }

    fn hook_width(&self) -> usize {
        self.width
    }

    fn device(&self) -> Device {
        self.model.device().clone()
    }

    fn forward(&mut self, tokens: &Tensor, edit: Option<&mut HookEdit<'_>>) -> Result<Tensor> {
        let out = match edit {
            None => self.model.forward(tokens, &mut Hooks::new())?,
            Some(f) => {
                let intervention =
                    Intervention::map(move |x: &Tensor| f(x).map_err(|e| Box::new(e) as BoxError));
                let mut hooks = Hooks::new().intervene(self.hook, intervention);
                self.model.forward(tokens, &mut hooks)?
            }
        };
        out.logits.ok_or_else(|| MetricsError::InvalidArgument {
            what: "forward pass".into(),
            reason: "it returned no logits".into(),
        })
    }
}

/// Cuts text tokens (no BOS) into windows `[bos] + chunk` of at most `context_len` tokens, as
/// the activation cache's windows are cut, and batches windows of equal length, `batch_size`
/// per batch. Without a BOS token windows are plain chunks and a final chunk of one token (no
/// prediction) is dropped.
///
/// # Errors
/// `TextTooShort` when there is no prediction to score; `InvalidArgument` for
/// `context_len < 2` or `batch_size == 0`.
pub fn token_batches(
    text_ids: &[u32],
    bos: Option<u32>,
    context_len: usize,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Tensor>> {
    if context_len < 2 || batch_size == 0 {
        return Err(MetricsError::InvalidArgument {
            what: "windowing".into(),
            reason: format!(
                "context_len must be >= 2 and batch_size >= 1 (got {context_len}, {batch_size})"
            ),
        });
    }
    let mut windows: Vec<Vec<u32>> = Vec::new();
    for r in activation_store::chunk_ranges(text_ids.len(), context_len, bos.is_some()) {
        let mut w = Vec::with_capacity(r.len() + 1);
        w.extend(bos);
        w.extend_from_slice(&text_ids[r]);
        if w.len() >= 2 {
            windows.push(w);
        }
    }
    if windows.is_empty() {
        return Err(MetricsError::TextTooShort {
            what: "evaluation text".into(),
            tokens: text_ids.len() + usize::from(bos.is_some()),
            needed: 2,
        });
    }
    let mut batches = Vec::new();
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let mut j = i;
        while j < windows.len() && j - i < batch_size && windows[j].len() == len {
            j += 1;
        }
        let flat: Vec<u32> = windows[i..j].iter().flatten().copied().collect();
        batches.push(Tensor::from_vec(flat, (j - i, len), device)?);
        i = j;
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_start_with_bos_and_cover_the_text() {
        let ids: Vec<u32> = (10..30).collect();
        let b = token_batches(&ids, Some(1), 8, 2, &Device::Cpu).unwrap();
        // 20 tokens in chunks of 7: 7, 7, 6 -> windows of 8, 8, 7.
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].dims(), &[2, 8]);
        assert_eq!(b[1].dims(), &[1, 7]);
        let w = b[0].to_vec2::<u32>().unwrap();
        assert_eq!(w[0], vec![1, 10, 11, 12, 13, 14, 15, 16]);
        assert_eq!(w[1][0], 1);
        let e = token_batches(&[], Some(1), 8, 2, &Device::Cpu).unwrap_err();
        assert!(
            matches!(e, MetricsError::TextTooShort { tokens: 1, .. }),
            "{e}"
        );
        let e = token_batches(&[5], None, 8, 2, &Device::Cpu).unwrap_err();
        assert!(matches!(e, MetricsError::TextTooShort { .. }), "{e}");
        assert_eq!(
            token_batches(&[5], Some(1), 8, 2, &Device::Cpu)
                .unwrap()
                .len(),
            1
        );
    }
}
