"""ultraad_jax: few-shot CLIP adaptation for ultrasound anomaly localization.

A JAX/Flax reconstruction of UltraAD (MICCAI 2025). See README.md for the two
commands a newcomer runs, and docs/METHOD.md for what is stated by the paper
and what is reconstructed.
"""
