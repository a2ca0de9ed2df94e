"""prunepath_jax.eval (installed from the top-level `eval/` folder)."""
