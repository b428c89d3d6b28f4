"""Converters between lddpm runs and other formats (diffusers model and pipeline folders)."""
