//! Real transformer checkpoints with TransformerLens hook points.
