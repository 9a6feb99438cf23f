"""Foreign checkpoints -> Flax params: official DiT ``.pt``, diffusers DiT, VAE, Inception.

The DiT converters are re-exported here; torch is imported only when a ``.pt``/``.bin`` is read.
"""
from qdit_jax.convert.diffusers_dit import convert_diffusers_dit
from qdit_jax.convert.torch_dit import convert_torch_checkpoint, infer_config, load_torch_checkpoint, state_dict_to_params

__all__ = ["convert_diffusers_dit", "convert_torch_checkpoint", "infer_config", "load_torch_checkpoint",
           "state_dict_to_params"]
