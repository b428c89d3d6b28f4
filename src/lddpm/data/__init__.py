"""Datasets, preprocessing into uint8 caches, loaders and latent caches."""
