//! Running a [`SaeModel`] on activations shaped as a hook produces them (`[batch, seq, d_in]`).

use candle_core::Tensor;
use sae_core::{SaeModel, SparseCodes};

use crate::error::{MetricsError, Result, shape_err};

/// Feature activations and reconstruction of `x` (`[..., d_in]`).
///
/// Returns `x̂` with `x`'s shape, dtype and device, and the codes of the `x.elem_count() / d_in`
/// rows in row-major order.
///
/// # Errors
/// `ShapeMismatch` if the last dimension is not the SAE's `d_in`; the SAE's errors (e.g. NaN in
/// the activations).
pub fn reconstruct(sae: &SaeModel, x: &Tensor) -> Result<(Tensor, SparseCodes)> {
    let d_in = sae.d_in();
    let dims = x.dims().to_vec();
    if dims.last() != Some(&d_in) {
        return Err(shape_err(
            "activations for the SAE",
            format!("[..., {d_in}] (the SAE's d_in)"),
            format!("{dims:?}"),
        ));
    }
    let n = x.elem_count() / d_in.max(1);
    let rows = x.reshape((n, d_in))?;
    let codes = sae.encode_sparse(&rows)?;
    let x_hat = sae
        .decode_sparse(&codes, x.device())?
        .reshape(dims)?
        .to_dtype(x.dtype())?;
    Ok((x_hat, codes))
}

/// Feature `feature`'s activation on each row of `codes`.
pub fn feature_column(codes: &SparseCodes, feature: usize) -> Vec<f32> {
    (0..codes.n_tokens)
        .map(|t| {
            let (fs, vs) = codes.row(t);
            fs.iter()
                .position(|&f| f as usize == feature)
                .map_or(0.0, |i| vs[i])
        })
        .collect()
}

/// Feature `feature`'s decoder direction, `W_dec[feature]` (`d_in` values).
///
/// # Errors
/// `InvalidArgument` if `feature >= d_sae`.
pub fn decoder_row(sae: &SaeModel, feature: usize) -> Result<Vec<f32>> {
    sae.w_dec_row(feature)
        .map(<[f32]>::to_vec)
        .ok_or_else(|| MetricsError::InvalidArgument {
            what: format!("feature {feature}"),
            reason: format!("the SAE has {} features (0..{})", sae.d_sae(), sae.d_sae()),
        })
}
