"""qdit_jax: post-training quantization (Q-DiT) of Diffusion Transformers in JAX/Flax."""
__version__ = "0.1.0"
