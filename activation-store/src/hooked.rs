//! The adapter from `transformer-hooks` models to [`ActivationSource`].
//!
//! Placeholder until transformer-hooks' API lands.

/// A transformer-hooks model as an activation source.
pub struct HookedModel;
