//! [`SaeModel`]: a saved SAE, loaded and ready to encode and decode candle tensors.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::SparseCodes;
use crate::arch::{
    DecoderNorm, GatedSae, GatedTraining, JumpReluSae, JumpReluTraining, StandardSae,
    StandardTraining, TopKSae, TopKTraining, TrainableSae, transpose,
};
use crate::config::{NormalizeActivations, SaeConfig};
use crate::error::{Result, SaeError};
use crate::io::{self, HostTensor, LoadedFiles};
use crate::kernels;
use crate::params::{Param, Params};

/// An SAE with its config: what `metrics` and the examples load, encode with and decode with.
///
/// Computation runs on the host (the same kernels as training); tensors passed in may live on any
/// device and results come back on the input's device.
pub struct SaeModel {
    cfg: SaeConfig,
    sae: Box<dyn TrainableSae>,
    log10_sparsity: Option<Vec<f32>>,
}

impl std::fmt::Debug for SaeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaeModel")
            .field("cfg", &self.cfg)
            .field("has_sparsity", &self.log10_sparsity.is_some())
            .finish()
    }
}

impl SaeModel {
    /// Loads a SAELens (v6 or older), sparsify or dictionary_learning (`ae.pt` + `config.json`)
    /// folder; [`SaeModel::save`] writes any of them as SAELens v6.
    ///
    /// # Errors
    /// Missing or corrupt files, unknown architecture, a missing tensor or one of the wrong shape
    /// (each named), non-finite weights, normalisations that need per-input state
    /// (`constant_norm_rescale`, `layer_norm`).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let files = io::load_sae_files(dir.as_ref())?;
        Self::from_files(files)
    }

    /// Builds a model from what [`io::load_sae_files`] read.
    ///
    /// # Errors
    /// As [`SaeModel::load`].
    pub fn from_files(files: LoadedFiles) -> Result<Self> {
        let LoadedFiles {
            mut cfg,
            mut tensors,
            log10_sparsity,
            weights_file,
            w_enc_feature_major,
        } = files;
        cfg.validate()?;
        match cfg.common().normalize_activations {
            NormalizeActivations::ConstantNormRescale | NormalizeActivations::LayerNorm => {
                return Err(SaeError::Unsupported {
                    file: weights_file,
                    reason: format!(
                        "normalize_activations = {:?} rescales each input and keeps the factor \
                         between encode and decode; this crate's encode/decode are stateless",
                        cfg.common().normalize_activations
                    ),
                });
            }
            _ => {}
        }
        let (d_in, d_sae) = (cfg.d_in(), cfg.d_sae());
        let arch = cfg.architecture().to_string();
        let names: Vec<&str> = match &cfg {
            SaeConfig::Gated(_) => vec!["W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"],
            SaeConfig::JumpRelu(_) => vec!["W_enc", "b_enc", "W_dec", "b_dec", "threshold"],
            _ => vec!["W_enc", "b_enc", "W_dec", "b_dec"],
        };
        let mut list = Vec::new();
        for name in &names {
            let expected: Vec<usize> = match *name {
                "W_enc" if w_enc_feature_major => vec![d_sae, d_in],
                "W_enc" => vec![d_in, d_sae],
                "W_dec" => vec![d_sae, d_in],
                "b_dec" => vec![d_in],
                _ => vec![d_sae],
            };
            let HostTensor { shape, data } = match tensors.remove(*name) {
                Some(t) => t,
                // sparsify's encoder may lack a bias; SAELens's loader fills zeros too.
                None if *name == "b_enc" && w_enc_feature_major => HostTensor {
                    shape: vec![d_sae],
                    data: vec![0.0; d_sae],
                },
                None => {
                    return Err(SaeError::MissingTensor {
                        file: weights_file,
                        name: name.to_string(),
                        architecture: arch,
                        expected: names.iter().map(|s| s.to_string()).collect(),
                    });
                }
            };
            // 1-D tensors may come as [1, n] from some writers.
            let squeezed: Vec<usize> = shape.iter().copied().filter(|&s| s != 1).collect();
            let ok = shape == expected
                || (expected.len() == 1 && squeezed == expected)
                || (expected.len() == 1 && expected[0] == 1 && data.len() == 1);
            if !ok {
                return Err(SaeError::ShapeMismatch {
                    what: format!("{} tensor `{name}`", weights_file.display()),
                    expected,
                    got: shape,
                });
            }
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(SaeError::NonFiniteInput {
                    what: format!("{} tensor `{name}`", weights_file.display()),
                    row: i,
                    col: 0,
                    value: data[i],
                });
            }
            let data = if *name == "W_enc" && !w_enc_feature_major {
                transpose(&data, d_in, d_sae)
            } else {
                data
            };
            let stored_shape = if *name == "W_enc" {
                vec![d_sae, d_in]
            } else {
                expected
            };
            list.push(Param::new(name, &stored_shape, *name != "b_dec", data));
        }
        let mut params = Params::new(list);
        let apply = cfg.common().apply_b_dec_to_input;
        let sae: Box<dyn TrainableSae> = match &mut cfg {
            SaeConfig::Standard(_) => Box::new(StandardSae::from_params(
                d_in,
                d_sae,
                StandardTraining {
                    decoder_norm: DecoderNorm::Free,
                    apply_b_dec_to_input: apply,
                    ..StandardTraining::default()
                },
                params,
            )?),
            SaeConfig::TopK(t) => {
                if t.rescale_acts_by_decoder_norm {
                    // Fold the decoder norms into the encoder (SAELens's `_fold_norm_topk`);
                    // the SAE then computes the same function without the flag.
                    fold_topk_norms(&mut params, d_in)?;
                    t.rescale_acts_by_decoder_norm = false;
                }
                let mut tc = TopKTraining::new(t.k);
                tc.decoder_norm = DecoderNorm::Free;
                tc.apply_b_dec_to_input = apply;
                Box::new(TopKSae::from_params(d_in, d_sae, tc, params)?)
            }
            SaeConfig::JumpRelu(_) => Box::new(JumpReluSae::from_params(
                d_in,
                d_sae,
                JumpReluTraining {
                    apply_b_dec_to_input: apply,
                    ..JumpReluTraining::default()
                },
                params,
            )?),
            SaeConfig::Gated(_) => Box::new(GatedSae::from_params(
                d_in,
                d_sae,
                GatedTraining {
                    apply_b_dec_to_input: apply,
                    ..GatedTraining::default()
                },
                params,
            )?),
        };
        if let Some(sp) = &log10_sparsity
            && sp.len() != d_sae
        {
            return Err(SaeError::ShapeMismatch {
                what: "sparsity.safetensors tensor `sparsity`".into(),
                expected: vec![d_sae],
                got: vec![sp.len()],
            });
        }
        Ok(SaeModel {
            cfg,
            sae,
            log10_sparsity,
        })
    }

    /// Wraps a trainable SAE (e.g. a trainer's, already folded) with its config.
    pub fn from_parts(
        cfg: SaeConfig,
        sae: Box<dyn TrainableSae>,
        log10_sparsity: Option<Vec<f32>>,
    ) -> Self {
        SaeModel {
            cfg,
            sae,
            log10_sparsity,
        }
    }

    /// The same SAE for inputs `r` times larger: `SAE'(y) = r · SAE(y / r)`, by folding `1/r`
    /// into the weights. This is what normalising activations to a fitted mean norm does when an
    /// SAE meets a model whose activations have another scale (a chat fine-tune of its base
    /// model): with `r` the ratio of the two models' mean norms, the SAE sees inputs of the scale
    /// it was trained on.
    ///
    /// # Errors
    /// A non-positive or non-finite `r`; an SAE without `W_enc`, `W_dec` or `b_dec`.
    pub fn for_input_scale(mut self, r: f32) -> Result<Self> {
        if !(r.is_finite() && r > 0.0) {
            return Err(SaeError::InvalidConfig {
                what: "input scale".into(),
                reason: format!("{r}; must be a positive number"),
            });
        }
        crate::fold_activation_scale(self.sae.params_mut(), 1.0 / r)?;
        Ok(self)
    }

    /// Saves in the SAELens v6 layout.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let (cfg, tensors) = self
            .sae
            .export(self.sae.params(), self.cfg.common().clone())?;
        io::save_sae(dir.as_ref(), &cfg, &tensors, self.log10_sparsity.as_deref())
    }

    pub fn config(&self) -> &SaeConfig {
        &self.cfg
    }
    /// The TransformerLens hook the SAE reads (`cfg.metadata.hook_name`).
    pub fn hook_name(&self) -> Option<&str> {
        self.cfg.hook_name()
    }
    pub fn d_in(&self) -> usize {
        self.sae.d_in()
    }
    pub fn d_sae(&self) -> usize {
        self.sae.d_sae()
    }
    /// The underlying architecture.
    pub fn sae(&self) -> &dyn TrainableSae {
        self.sae.as_ref()
    }
    /// The underlying architecture, to fine-tune it.
    pub fn into_sae(self) -> Box<dyn TrainableSae> {
        self.sae
    }
    /// log10 feature firing rates from `sparsity.safetensors`, if the folder had one.
    pub fn log10_sparsity(&self) -> Option<&[f32]> {
        self.log10_sparsity.as_deref()
    }

    /// Sparse feature activations of `x` (`[n, d_in]`, any float dtype, any device).
    ///
    /// # Errors
    /// Wrong rank or `d_in`, NaN/inf in `x`.
    pub fn encode_sparse(&self, x: &Tensor) -> Result<SparseCodes> {
        let (v, n) = kernels::tensor_to_host(x, self.d_in(), "SaeModel::encode input")?;
        kernels::check_batch(&v, self.d_in(), "SaeModel::encode input")?;
        self.sae.encode_host(&v, n)
    }

    /// Dense feature activations `[n, d_sae]` on `x`'s device.
    ///
    /// # Shapes
    /// `x`: `[n, d_in]` -> `[n, d_sae]`.
    ///
    /// # Errors
    /// As [`SaeModel::encode_sparse`].
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let codes = self.encode_sparse(x)?;
        Ok(Tensor::from_vec(
            codes.to_dense(),
            (codes.n_tokens, self.d_sae()),
            &Device::Cpu,
        )?
        .to_device(x.device())?)
    }

    /// Reconstruction from dense activations.
    ///
    /// # Shapes
    /// `acts`: `[n, d_sae]` -> `[n, d_in]`.
    ///
    /// # Errors
    /// Wrong rank or `d_sae`.
    pub fn decode(&self, acts: &Tensor) -> Result<Tensor> {
        let (v, n) = kernels::tensor_to_host(acts, self.d_sae(), "SaeModel::decode input")?;
        let codes = SparseCodes::from_dense(&v, n, self.d_sae());
        let out = self.sae.decode_host(&codes)?;
        Ok(Tensor::from_vec(out, (n, self.d_in()), &Device::Cpu)?.to_device(acts.device())?)
    }

    /// Reconstruction from sparse codes, on `device`.
    ///
    /// # Errors
    /// If the codes' `d_sae` differs.
    pub fn decode_sparse(&self, codes: &SparseCodes, device: &Device) -> Result<Tensor> {
        let out = self.sae.decode_host(codes)?;
        Ok(
            Tensor::from_vec(out, (codes.n_tokens, self.d_in()), &Device::Cpu)?
                .to_device(device)?,
        )
    }

    /// `decode(encode(x))`.
    ///
    /// # Errors
    /// As [`SaeModel::encode_sparse`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let codes = self.encode_sparse(x)?;
        self.decode_sparse(&codes, x.device())
    }

    /// Decoder rows `[d_sae, d_in]` (each feature's direction in activation space), on the CPU.
    ///
    /// # Errors
    /// Candle errors.
    pub fn w_dec(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            self.sae.params().data("W_dec")?,
            (self.d_sae(), self.d_in()),
            &Device::Cpu,
        )?)
    }
    /// Feature `f`'s decoder row, or `None` if `f >= d_sae`.
    pub fn w_dec_row(&self, f: usize) -> Option<&[f32]> {
        let d = self.d_in();
        self.sae
            .params()
            .data("W_dec")
            .ok()
            .and_then(|w| w.get(f * d..(f + 1) * d))
    }
    /// `W_enc` in SAELens layout `[d_in, d_sae]`, on the CPU.
    ///
    /// # Errors
    /// Candle errors.
    pub fn w_enc(&self) -> Result<Tensor> {
        let t = transpose(self.sae.params().data("W_enc")?, self.d_sae(), self.d_in());
        Ok(Tensor::from_vec(
            t,
            (self.d_in(), self.d_sae()),
            &Device::Cpu,
        )?)
    }
    /// `b_dec` `[d_in]`.
    ///
    /// # Errors
    /// Never for built-in architectures.
    pub fn b_dec(&self) -> Result<&[f32]> {
        self.sae.params().data("b_dec")
    }
}

fn fold_topk_norms(params: &mut Params, d_in: usize) -> Result<()> {
    let norms = kernels::row_norms(params.data("W_dec")?, d_in);
    let [w_enc, b_enc, w_dec] = params.many_mut(["W_enc", "b_enc", "W_dec"])?;
    for (f, &n) in norms.iter().enumerate() {
        let n = n.max(1e-8);
        b_enc[f] *= n;
        w_enc[f * d_in..(f + 1) * d_in]
            .iter_mut()
            .for_each(|v| *v *= n);
        w_dec[f * d_in..(f + 1) * d_in]
            .iter_mut()
            .for_each(|v| *v /= n);
    }
    Ok(())
}
