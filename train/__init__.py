"""prunepath_jax.train (installed from the top-level `train/` folder)."""
