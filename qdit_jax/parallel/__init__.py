"""Scale-out: device meshes (data / model axes), sharded statistics, multi-host runs.

``mesh`` holds the mesh and sharding helpers; ``stats`` the sharded calibration, GPTQ and FID
statistics; ``distributed`` multi-host initialisation and per-host files; ``cli`` the shared flags.
"""
from qdit_jax.parallel.mesh import (DATA, MODEL, batch_sharding, check_divisible, data_parallel, data_size,
                                    global_batch, make_mesh, per_device_batch, replicate, round_up, shard_batch,
                                    shard_params)

__all__ = ["DATA", "MODEL", "batch_sharding", "check_divisible", "data_parallel", "data_size", "global_batch",
           "make_mesh", "per_device_batch", "replicate", "round_up", "shard_batch", "shard_params"]
