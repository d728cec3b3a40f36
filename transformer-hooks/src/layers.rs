//! The transformer components every family shares, and the one forward pass that wires them.
//!
//! Every hook point is applied in exactly one place in this file. Families differ only through
//! [`ModelConfig`] flags (sandwich norms, q/k norms, gated MLP, learned positions, ...).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use cpu_blas::PackedWeight;
use std::sync::OnceLock;

use crate::causal_attention;
use crate::config::{Activation, AttentionType, ModelConfig, NormKind};
use crate::error::{Error, Result};
use crate::hook_point::{HookPoint, Site};
use crate::hooks::HookRun;
use crate::ops;
use crate::weights::Weights;

/// Apply the hooks at a site; return `Ok(None)` from the enclosing function if the pass stops there.
macro_rules! hook {
    ($run:expr, $point:expr, $x:expr) => {{
        let point = $point;
        let x = $run.at(point, $x)?;
        if $run.stops_at(point) {
            return Ok(None);
        }
        x
    }};
}

fn param(p: &Weights, name: &str) -> Result<Tensor> {
    p.get(name).cloned().ok_or_else(|| Error::MissingTensor {
        path: "<parameters>".into(),
        name: name.to_string(),
        arch: "any".into(),
    })
}

/// `x W^T + b` with `W` stored `[out, in]`, and optionally a block-quantized copy of `W` that
/// the product uses instead (see [`crate::Model::quantize`]).
pub(crate) struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    q: Option<QMatMul>,
    /// `w` rearranged for generation steps, made on the first product with few rows.
    packed: OnceLock<Option<PackedWeight>>,
}

/// `x W^T`: a generation step's few rows through the packed copy of `w` (made on first use and
/// kept in `packed`), everything else through [`cpu_blas::matmul_t`].
///
/// Packing costs a second copy of the weight, so only a product that will use it triggers it:
/// a training or harvesting pass (many rows, or a tracked `x`) never does.
fn weight_product(
    x: &Tensor,
    w: &Tensor,
    packed: &OnceLock<Option<PackedWeight>>,
) -> Result<Tensor> {
    let few_rows = x.dims().first().is_some_and(|&m| m <= cpu_blas::SMALL_M);
    if few_rows && x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op() {
        // A weight that cannot be packed (no AVX-512, not f32, a Var) is remembered as None.
        if let Some(p) = packed.get_or_init(|| PackedWeight::new(w).ok().flatten())
            && let Some(y) = p.matmul_t(&x.contiguous()?)?
        {
            return Ok(y);
        }
    }
    Ok(cpu_blas::matmul_t(x, w)?)
}

impl Linear {
    fn new(p: &Weights, prefix: &str) -> Result<Self> {
        Ok(Self {
            w: param(p, &format!("{prefix}.weight"))?,
            b: p.get(&format!("{prefix}.bias")).cloned(),
            q: None,
            packed: OnceLock::new(),
        })
    }

    fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        self.q = Some(quantized_matmul(&self.w, dtype)?);
        Ok(())
    }

    /// `[..., in] -> [..., out]`, as one matrix product over all leading dimensions.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let d_in = dims[dims.len() - 1];
        let rows = x.elem_count() / d_in.max(1);
        let x = x.reshape((rows, d_in))?;
        let y = match &self.q {
            Some(q) => q.forward(&x)?,
            None => weight_product(&x, &self.w, &self.packed)?,
        };
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims.to_vec();
        let last = out.len() - 1;
        out[last] = self.w.dim(0)?;
        Ok(y.reshape(out)?)
    }
}

/// Several linear maps of one input (q/k/v). With fixed weights they run as one matrix
/// product over the concatenated weights (fewer, larger products run faster); when any weight is
/// a `Var` they run separately, so that gradients reach each weight and an optimizer's in-place
/// update is never hidden behind a stale concatenated copy.
pub(crate) struct MultiLinear {
    parts: Vec<Linear>,
    fused: Option<Linear>,
}

impl MultiLinear {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let trainable = parts
            .iter()
            .any(|l| l.w.track_op() || l.b.as_ref().is_some_and(|b| b.track_op()));
        let all_bias = parts.iter().all(|l| l.b.is_some());
        let no_bias = parts.iter().all(|l| l.b.is_none());
        let fused = if trainable || !(all_bias || no_bias) {
            None
        } else {
            let ws: Vec<&Tensor> = parts.iter().map(|l| &l.w).collect();
            let b = if all_bias {
                let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.b.as_ref()).collect();
                Some(Tensor::cat(&bs, 0)?)
            } else {
                None
            };
            Some(Linear {
                w: Tensor::cat(&ws, 0)?,
                b,
                q: None,
                packed: OnceLock::new(),
            })
        };
        Ok(Self { parts, fused })
    }

    /// Quantized parts run as separate products (each keeps its own block layout).
    fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        self.fused = None;
        self.parts.iter_mut().try_for_each(|l| l.quantize(dtype))
    }

    /// One output per part, `[..., out_i]` (views into one product when fused).
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.fused {
            None => self.parts.iter().map(|l| l.forward(x)).collect(),
            Some(f) => {
                let y = f.forward(x)?;
                let mut start = 0;
                let mut out = Vec::with_capacity(self.parts.len());
                for l in &self.parts {
                    let n = l.w.dim(0)?;
                    out.push(y.narrow(candle_core::D::Minus1, start, n)?);
                    start += n;
                }
                Ok(out)
            }
        }
    }
}

/// RMSNorm or LayerNorm over the last dimension.
pub(crate) struct Norm {
    kind: NormKind,
    w: Tensor,
    b: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn new(p: &Weights, prefix: &str, kind: NormKind, eps: f64) -> Result<Self> {
        let b = match kind {
            NormKind::RmsNorm => None,
            NormKind::LayerNorm => Some(param(p, &format!("{prefix}.bias"))?),
        };
        Ok(Self {
            kind,
            w: param(p, &format!("{prefix}.weight"))?,
            b,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match (&self.kind, &self.b) {
            (NormKind::LayerNorm, Some(b)) => ops::layer_norm(x, &self.w, b, self.eps)?,
            _ => ops::rms_norm(x, &self.w, self.eps)?,
        })
    }
}

/// Multi-head attention with grouped key/value heads, optional q/k norms and rotary.
pub(crate) struct Attention {
    /// q, k, v projections.
    qkv: MultiLinear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    /// Full or sliding-window: which rotary table and mask of the pass this layer uses.
    kind: AttentionType,
}

/// Per-pass tensors shared by all layers: rotary tables and masks for each attention type.
pub(crate) struct PassContext {
    /// `(cos, sin)`, `[seq, d_head/2]` or `[batch, seq, d_head/2]`, per attention type.
    rope_full: Option<(Tensor, Tensor)>,
    rope_local: Option<(Tensor, Tensor)>,
    /// Additive masks `[batch or 1, 1, seq, seq]` (0 or -inf).
    mask_full: Tensor,
    mask_local: Tensor,
}

/// Keys and values of the positions already run, so that generation runs one new position per
/// step instead of the whole sequence (see [`crate::KvCache`]); `None` before the first pass.
pub(crate) type LayerKv = Option<KvBuffers>;

/// One layer's cached keys and values: buffers `[batch, kv_heads, capacity, d_head]` whose first
/// `len` positions are filled. A step writes its own keys and values in place, so it copies only
/// them rather than the whole cache (which concatenating did, every layer, every step); the
/// capacity doubles when it runs out.
///
/// A clone shares the buffers, marked not `owned`: its first append copies them into buffers
/// of its own before writing. The original may go on writing in place, but only past the
/// clone's `len`, which the clone never reads.
#[derive(Debug)]
pub(crate) struct KvBuffers {
    k: Tensor,
    v: Tensor,
    len: usize,
    owned: bool,
}

impl Clone for KvBuffers {
    fn clone(&self) -> Self {
        Self {
            k: self.k.clone(),
            v: self.v.clone(),
            len: self.len,
            owned: false,
        }
    }
}

impl KvBuffers {
    /// Adds `k` and `v` (`[batch, kv_heads, seq, d_head]`) after the cached positions and
    /// returns views of all of them.
    fn append(slot: &mut LayerKv, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = k.dim(2)?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let buf = match slot.take() {
            // The first pass: its own keys, full to capacity.
            None => KvBuffers {
                k,
                v,
                len: s,
                owned: true,
            },
            Some(mut buf) => {
                let cap = buf.k.dim(2)?;
                if !buf.owned || buf.len + s > cap {
                    let new_cap = (2 * cap).max(buf.len + s);
                    let grow = |old: &Tensor| -> Result<Tensor> {
                        let (b, h, _, d) = old.dims4()?;
                        let t = Tensor::zeros((b, h, new_cap, d), old.dtype(), old.device())?;
                        t.slice_set(&old.narrow(2, 0, buf.len)?.contiguous()?, 2, 0)?;
                        Ok(t)
                    };
                    buf.k = grow(&buf.k)?;
                    buf.v = grow(&buf.v)?;
                    buf.owned = true;
                }
                buf.k.slice_set(&k, 2, buf.len)?;
                buf.v.slice_set(&v, 2, buf.len)?;
                buf.len += s;
                buf
            }
        };
        let views = (buf.k.narrow(2, 0, buf.len)?, buf.v.narrow(2, 0, buf.len)?);
        *slot = Some(buf);
        Ok(views)
    }
}

impl Attention {
    fn new(p: &Weights, prefix: &str, cfg: &ModelConfig, kind: AttentionType) -> Result<Self> {
        let qk_norm = |which: &str| -> Result<Option<Norm>> {
            if cfg.qk_norm {
                Ok(Some(Norm::new(
                    p,
                    &format!("{prefix}.{which}"),
                    NormKind::RmsNorm,
                    cfg.norm_eps,
                )?))
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            qkv: MultiLinear::new(vec![
                Linear::new(p, &format!("{prefix}.q"))?,
                Linear::new(p, &format!("{prefix}.k"))?,
                Linear::new(p, &format!("{prefix}.v"))?,
            ])?,
            o: Linear::new(p, &format!("{prefix}.o"))?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            kind,
        })
    }

    fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        self.qkv.quantize(dtype)?;
        self.o.quantize(dtype)
    }

    /// `[batch, seq, d_model] -> [batch, seq, d_model]`.
    fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        cfg: &ModelConfig,
        ctx: &PassContext,
        kv: Option<&mut LayerKv>,
        run: &mut HookRun,
    ) -> Result<Option<Tensor>> {
        let (b, s, _) = x.dims3()?;
        let (h, kvh, dh) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
        let at = |site| HookPoint::Block(layer, site);
        let [q, k, v]: [Tensor; 3] = self
            .qkv
            .forward(x)?
            .try_into()
            .map_err(|_| Error::invalid("attention", "q/k/v projections"))?;
        let q = hook!(run, at(Site::Q), q.reshape((b, s, h, dh))?);
        let k = hook!(run, at(Site::K), k.reshape((b, s, kvh, dh))?);
        let v = hook!(run, at(Site::V), v.reshape((b, s, kvh, dh))?);
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        // [batch, heads, seq, d_head] from here on.
        let mut q = q.transpose(1, 2)?.contiguous()?;
        let mut k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (rope, mask) = match self.kind {
            AttentionType::Full => (&ctx.rope_full, &ctx.mask_full),
            AttentionType::Sliding => (&ctx.rope_local, &ctx.mask_local),
        };
        if let Some((cos, sin)) = rope {
            q = ops::rope(&q, cos, sin, cfg.rope_layout)?;
            k = ops::rope(&k, cos, sin, cfg.rope_layout)?;
            for (site, t) in [(Site::RotQ, &mut q), (Site::RotK, &mut k)] {
                if run.wants(at(site)) {
                    *t = hook!(run, at(site), t.transpose(1, 2)?)
                        .transpose(1, 2)?
                        .contiguous()?;
                }
            }
        }
        // With a cache, this step's keys and values join those of the earlier positions.
        let (k, v) = match kv {
            None => (k, v),
            Some(slot) => KvBuffers::append(slot, &k, &v)?,
        };
        let t = k.dim(2)?;
        // Scaling q before the product is the same as scaling the scores, on s*d not s*s numbers.
        let q = (q * cfg.attn_scale)?;
        let z = if !run.wants(at(Site::AttnScores))
            && !run.wants(at(Site::Pattern))
            && causal_attention::applies(&q, &k, &v, mask)
        {
            causal_attention::causal_attention(&q, &k, &v, mask)?
        } else {
            // Grouped-query attention without copying k/v: the n_rep query heads sharing a kv
            // head are stacked along the sequence axis of one product.
            let n_rep = h / kvh;
            // A cache's keys are views of longer buffers.
            let (k, v) = (k.contiguous()?, v.contiguous()?);
            let q = q.reshape((b, kvh, n_rep * s, dh))?;
            let scores = q.matmul(&k.t()?)?.reshape((b, h, s, t))?;
            let scores = scores.broadcast_add(mask)?;
            let scores = hook!(run, at(Site::AttnScores), scores);
            let pattern = ops::softmax_last_dim(&scores)?;
            let pattern = hook!(run, at(Site::Pattern), pattern);
            pattern
                .reshape((b, kvh, n_rep * s, t))?
                .matmul(&v)?
                .reshape((b, h, s, dh))?
        };
        let z = hook!(run, at(Site::Z), z.transpose(1, 2)?);
        Ok(Some(self.o.forward(&z.reshape((b, s, h * dh))?)?))
    }
}

/// The MLP: gated (`down(act(gate x) * up x)`) or not (`down(act(up x))`).
pub(crate) struct Mlp {
    /// The gate branch of a gated MLP. Kept a separate product from `up`: a fused one would hand
    /// the element-wise `act(gate) * up` two strided halves, which costs more than it saves.
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn new(p: &Weights, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self {
            gate: if cfg.gated_mlp {
                Some(Linear::new(p, &format!("{prefix}.gate"))?)
            } else {
                None
            },
            up: Linear::new(p, &format!("{prefix}.up"))?,
            down: Linear::new(p, &format!("{prefix}.down"))?,
            act: cfg.act,
        })
    }

    fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        if let Some(g) = &mut self.gate {
            g.quantize(dtype)?;
        }
        self.up.quantize(dtype)?;
        self.down.quantize(dtype)
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.act {
            Activation::Silu => x.silu()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::GeluErf => x.gelu_erf()?,
        })
    }

    fn forward(&self, layer: usize, x: &Tensor, run: &mut HookRun) -> Result<Option<Tensor>> {
        let at = |site| HookPoint::Block(layer, site);
        let post = match &self.gate {
            Some(gate) => {
                let pre = hook!(run, at(Site::MlpPre), gate.forward(x)?);
                let lin = hook!(run, at(Site::MlpPreLinear), self.up.forward(x)?);
                match self.act {
                    Activation::Silu => ops::silu_mul(&pre, &lin)?,
                    _ => (self.act(&pre)? * lin)?,
                }
            }
            None => {
                let pre = hook!(run, at(Site::MlpPre), self.up.forward(x)?);
                self.act(&pre)?
            }
        };
        let post = hook!(run, at(Site::MlpPost), post);
        Ok(Some(self.down.forward(&post)?))
    }
}

/// One pre-norm block, with Gemma's optional post-norms on both branches.
pub(crate) struct Block {
    ln1: Norm,
    attn: Attention,
    ln1_post: Option<Norm>,
    ln2: Norm,
    mlp: Mlp,
    ln2_post: Option<Norm>,
}

impl Block {
    fn new(p: &Weights, layer: usize, cfg: &ModelConfig) -> Result<Self> {
        let pre = format!("blocks.{layer}");
        let norm = |n: &str| Norm::new(p, &format!("{pre}.{n}"), cfg.norm, cfg.norm_eps);
        Ok(Self {
            ln1: norm("ln1")?,
            attn: Attention::new(p, &format!("{pre}.attn"), cfg, cfg.layer_types[layer])?,
            ln1_post: if cfg.sandwich_norms {
                Some(norm("ln1_post")?)
            } else {
                None
            },
            ln2: norm("ln2")?,
            mlp: Mlp::new(p, &format!("{pre}.mlp"), cfg)?,
            ln2_post: if cfg.sandwich_norms {
                Some(norm("ln2_post")?)
            } else {
                None
            },
        })
    }

    fn forward(
        &self,
        layer: usize,
        resid: Tensor,
        cfg: &ModelConfig,
        ctx: &PassContext,
        kv: Option<&mut LayerKv>,
        run: &mut HookRun,
    ) -> Result<Option<Tensor>> {
        let at = |site| HookPoint::Block(layer, site);
        let resid = hook!(run, at(Site::ResidPre), resid);
        let x = hook!(run, at(Site::Ln1Normalized), self.ln1.forward(&resid)?);
        let Some(attn) = self.attn.forward(layer, &x, cfg, ctx, kv, run)? else {
            return Ok(None);
        };
        let attn = match &self.ln1_post {
            Some(n) => n.forward(&attn)?,
            None => attn,
        };
        let attn = hook!(run, at(Site::AttnOut), attn);
        let resid = hook!(run, at(Site::ResidMid), (resid + attn)?);
        let x = hook!(run, at(Site::Ln2Normalized), self.ln2.forward(&resid)?);
        let Some(mlp) = self.mlp.forward(layer, &x, run)? else {
            return Ok(None);
        };
        let mlp = match &self.ln2_post {
            Some(n) => n.forward(&mlp)?,
            None => mlp,
        };
        let mlp = hook!(run, at(Site::MlpOut), mlp);
        let resid = hook!(run, at(Site::ResidPost), (resid + mlp)?);
        Ok(Some(resid))
    }
}

/// The whole stack, built from canonical parameters.
pub(crate) struct Transformer {
    embed: Tensor,
    pos_embed: Option<Tensor>,
    blocks: Vec<Block>,
    ln_final: Norm,
    unembed: Tensor,
    unembed_q: Option<QMatMul>,
    unembed_packed: OnceLock<Option<PackedWeight>>,
}

/// A block-quantized copy of an `[out, in]` weight for `x W^T`.
fn quantized_matmul(w: &Tensor, dtype: GgmlDType) -> Result<QMatMul> {
    let (_, k) = w.dims2()?;
    if k % dtype.block_size() != 0 {
        return Err(Error::invalid(
            "quantization",
            format!(
                "{dtype:?} needs widths that are multiples of {}; this weight's is {k}",
                dtype.block_size()
            ),
        ));
    }
    let q = QTensor::quantize(&w.to_dtype(DType::F32)?, dtype)?;
    Ok(QMatMul::from_qtensor(q)?)
}

/// Where each sequence's tokens sit: `0..seq` for every row, or per row from an attention mask;
/// with a KV cache, after `offset` positions already run.
pub(crate) struct Positions {
    /// `[batch][seq]` rotary position of each token; `None` means `0..seq` in every row.
    pub per_row: Option<Vec<Vec<u32>>>,
    /// `[batch][offset + seq]` whether each key is a real token (not padding), the cached keys
    /// first; `None` means all are.
    pub real: Option<Vec<Vec<bool>>>,
    /// Positions (of the padded layout) already in the KV cache; the tokens of this pass follow.
    pub offset: usize,
}

impl Positions {
    pub(crate) fn from_mask(mask: Option<Vec<Vec<u32>>>) -> Self {
        match mask {
            None => Self {
                per_row: None,
                real: None,
                offset: 0,
            },
            Some(rows) => {
                let real: Vec<Vec<bool>> = rows
                    .iter()
                    .map(|r| r.iter().map(|&m| m != 0).collect())
                    .collect();
                let starts = vec![0u32; real.len()];
                Self {
                    per_row: Some(rotary_positions(&real, &starts)),
                    real: Some(real),
                    offset: 0,
                }
            }
        }
    }

    /// The tokens of one cached pass: `new_real[r][i]` says whether new token `i` of row `r` is
    /// real; `cached_real` are the cached keys' flags and `next[r]` the number of real tokens row
    /// `r` has had, which is the rotary position its next real token gets.
    pub(crate) fn continuing(
        cached_real: &[Vec<bool>],
        next: &[u32],
        new_real: &[Vec<bool>],
    ) -> Self {
        let offset = cached_real.first().map_or(0, Vec::len);
        let real = cached_real
            .iter()
            .zip(new_real)
            .map(|(c, n)| c.iter().chain(n).copied().collect())
            .collect();
        Self {
            per_row: Some(rotary_positions(new_real, next)),
            real: Some(real),
            offset,
        }
    }
}

/// Each row's positions counting real tokens only, from `start[r]`; padding before a row's first
/// real token shares that token's position (it is never attended to by real tokens).
fn rotary_positions(real: &[Vec<bool>], start: &[u32]) -> Vec<Vec<u32>> {
    real.iter()
        .zip(start)
        .map(|(r, &s0)| {
            let mut n = s0;
            r.iter()
                .map(|&is_real| {
                    let p = n;
                    if is_real {
                        n += 1;
                    }
                    if is_real { p } else { p.saturating_sub(1) }
                })
                .collect()
        })
        .collect()
}

fn rope_tables(
    theta: f64,
    d_head: usize,
    seq: usize,
    pos: &Positions,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = d_head / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / d_head as f64))
        .collect();
    let angles = |p: u32| inv_freq.iter().map(move |f| p as f64 * f);
    let (cos, sin, shape): (Vec<f32>, Vec<f32>, Vec<usize>) = match &pos.per_row {
        None => {
            let a: Vec<f64> = (0..seq as u32).flat_map(angles).collect();
            (
                a.iter().map(|x| x.cos() as f32).collect(),
                a.iter().map(|x| x.sin() as f32).collect(),
                vec![seq, half],
            )
        }
        Some(rows) => {
            let a: Vec<f64> = rows
                .iter()
                .flat_map(|r| r.iter().flat_map(|&p| angles(p)))
                .collect();
            (
                a.iter().map(|x| x.cos() as f32).collect(),
                a.iter().map(|x| x.sin() as f32).collect(),
                vec![rows.len(), seq, half],
            )
        }
    };
    Ok((
        Tensor::from_vec(cos, shape.clone(), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
    ))
}

/// Causal (and windowed) additive mask `[batch or 1, 1, seq, offset + seq]` for `seq` queries
/// that follow `offset` cached keys; padded keys are masked except a token's own position, so
/// that no row is all `-inf` (which would make softmax NaN for padding rows).
fn attention_mask(
    batch: usize,
    seq: usize,
    window: Option<usize>,
    pos: &Positions,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = pos.offset + seq;
    let allowed = |q: usize, k: usize| k <= q && window.is_none_or(|w| q - k < w);
    let rows = match &pos.real {
        None => 1,
        Some(_) => batch,
    };
    let mut m = vec![0f32; rows * seq * t];
    for r in 0..rows {
        for qi in 0..seq {
            let q = pos.offset + qi;
            for k in 0..t {
                let real = pos.real.as_ref().is_none_or(|real| real[r][k] || k == q);
                if !(allowed(q, k) && real) {
                    m[(r * seq + qi) * t + k] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(m, (rows, 1, seq, t), device)?.to_dtype(dtype)?)
}

impl Transformer {
    pub(crate) fn new(cfg: &ModelConfig, p: &Weights) -> Result<Self> {
        let embed = param(p, "embed.weight")?;
        let unembed = if cfg.tied_embeddings {
            embed.clone()
        } else {
            param(p, "unembed.weight")?
        };
        Ok(Self {
            embed,
            pos_embed: if cfg.learned_positions {
                Some(param(p, "pos_embed.weight")?)
            } else {
                None
            },
            blocks: (0..cfg.n_layers)
                .map(|l| Block::new(p, l, cfg))
                .collect::<Result<_>>()?,
            ln_final: Norm::new(p, "ln_final", cfg.norm, cfg.norm_eps)?,
            unembed,
            unembed_q: None,
            unembed_packed: OnceLock::new(),
        })
    }

    /// Every weight product (attention, MLP) in `dtype` blocks, the unembedding in `unembed`.
    pub(crate) fn quantize(&mut self, dtype: GgmlDType, unembed: GgmlDType) -> Result<()> {
        for b in &mut self.blocks {
            b.attn.quantize(dtype)?;
            b.mlp.quantize(dtype)?;
        }
        self.unembed_q = Some(quantized_matmul(&self.unembed, unembed)?);
        Ok(())
    }

    /// Runs to `ln_final.hook_normalized` and returns it, or `None` if the pass stopped earlier.
    ///
    /// `tokens` is `[batch, seq]` u32, already checked against the vocabulary.
    pub(crate) fn forward(
        &self,
        cfg: &ModelConfig,
        tokens: &Tensor,
        pos: &Positions,
        mut kv: Option<&mut [LayerKv]>,
        run: &mut HookRun,
    ) -> Result<Option<Tensor>> {
        let (b, s) = tokens.dims2()?;
        let device = tokens.device();
        let dtype = self.embed.dtype();
        let x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, s, cfg.d_model))?;
        let x = match cfg.embed_scale {
            Some(scale) => (x * scale)?,
            None => x,
        };
        let mut x = hook!(run, HookPoint::Embed, x);
        if let Some(pe) = &self.pos_embed {
            if pos.offset + s > cfg.n_ctx {
                return Err(Error::invalid(
                    "sequence length",
                    format!("{s} tokens exceed the {} learned positions", cfg.n_ctx),
                ));
            }
            let p = match &pos.per_row {
                None => {
                    pe.narrow(0, pos.offset, s)?
                        .unsqueeze(0)?
                        .broadcast_as((b, s, cfg.d_model))?
                }
                Some(rows) => {
                    let ids: Vec<u32> = rows.iter().flatten().copied().collect();
                    let ids = Tensor::from_vec(ids, b * s, device)?;
                    pe.index_select(&ids, 0)?.reshape((b, s, cfg.d_model))?
                }
            };
            let p = hook!(run, HookPoint::PosEmbed, p.contiguous()?);
            x = (x + p)?;
        }
        let uses = |t: AttentionType| cfg.layer_types.contains(&t);
        let rope = |theta: f64| -> Result<Option<(Tensor, Tensor)>> {
            if cfg.learned_positions {
                Ok(None)
            } else {
                rope_tables(theta, cfg.d_head, s, pos, dtype, device).map(Some)
            }
        };
        let mask_full = attention_mask(b, s, None, pos, dtype, device)?;
        let window = cfg.sliding_window.filter(|&w| w < pos.offset + s);
        let ctx = PassContext {
            rope_full: if uses(AttentionType::Full) {
                rope(cfg.rope_theta)?
            } else {
                None
            },
            rope_local: if uses(AttentionType::Sliding) {
                rope(cfg.local_rope_theta)?
            } else {
                None
            },
            mask_local: match (uses(AttentionType::Sliding), window) {
                (true, Some(w)) => attention_mask(b, s, Some(w), pos, dtype, device)?,
                _ => mask_full.clone(),
            },
            mask_full,
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            let slot = kv.as_deref_mut().and_then(|k| k.get_mut(layer));
            match block.forward(layer, x, cfg, &ctx, slot, run)? {
                Some(next) => x = next,
                None => return Ok(None),
            }
        }
        let x = hook!(
            run,
            HookPoint::LnFinalNormalized,
            self.ln_final.forward(&x)?
        );
        Ok(Some(x))
    }

    /// `log softmax(unembed(x))[targets]` for `[rows, d_model]` normalized residuals.
    ///
    /// When `x` is on the autograd graph but the unembedding is a constant (fine-tuning with the
    /// embedding frozen), one op computes it whose backward gives `x` its gradient and nothing
    /// else: candle's matmul backward would also compute the `vocab x d_model` gradient of the
    /// frozen weight (Gemma-3: 168M numbers per chunk, a third of a training step's work).
    pub(crate) fn unembed_logprobs(
        &self,
        cfg: &ModelConfig,
        x: &Tensor,
        targets: &[u32],
    ) -> Result<Tensor> {
        let fused = x.track_op()
            && !self.unembed.track_op()
            && self.unembed_q.is_none()
            && cfg.final_logit_softcap.is_none()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.unembed.dtype() == DType::F32;
        if fused {
            return Ok(crate::ops::frozen_unembed_logprobs(
                x,
                &self.unembed,
                targets,
            )?);
        }
        let logits = self.unembed(cfg, x)?;
        let logits = match logits.dtype() {
            DType::F16 | DType::BF16 => logits.to_dtype(DType::F32)?,
            _ => logits,
        };
        Ok(crate::ops::target_logprobs(&logits, targets)?)
    }

    /// Logits `[rows, vocab]` of `[rows, d_model]` normalized residuals.
    pub(crate) fn unembed(&self, cfg: &ModelConfig, x: &Tensor) -> Result<Tensor> {
        let logits = match &self.unembed_q {
            Some(q) => q.forward(x)?,
            None => weight_product(x, &self.unembed, &self.unembed_packed)?,
        };
        Ok(match cfg.final_logit_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }
}
