"""Noise predictors (U-Net, DiT) and the KL autoencoder."""
