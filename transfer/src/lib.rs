//! Base-to-chat SAE transfer evaluation.
//!
//! Not built yet. It will own: applying an SAE trained on a base model's activations to its chat
//! fine-tune (and the reverse), diagnosing activation-norm differences between the two, and
//! fine-tuning an SAE on a few activations of the other model (the base-to-chat experiment).
