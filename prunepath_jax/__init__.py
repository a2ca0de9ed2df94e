"""prunepath_jax: PrunePath structured FFN sparsity for language models in JAX / Flax NNX."""

__version__ = "0.1.0"
