"""prunepath_jax.kernels (installed from the top-level `kernels/` folder)."""
