//! Sparse autoencoder architectures and their training.
