//! Corpora, tokenized windows, a crash-safe activation cache and shuffled streaming batches.
