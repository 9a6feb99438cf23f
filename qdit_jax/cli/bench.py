"""qdit bench [--model XL/2] [--batch 64 256] [--variants bf16 fake-w8a8 real-w8a8 ...] [--sample-batch 64]

Forward throughput and end-to-end sampling time (DDIM, classifier-free guidance) of the FP bf16
model, the fake-quant model and the real low-bit model (W8A8 / W4A8, per-channel or group-wise),
on random weights (every weight random; speed does not depend on trained weights). Reports
images/s, the fraction of the card's bf16 peak (datasheet and an 8192^3 bf16 matmul measured in
the same run), the compiled program's device memory, the process's peak device memory, weight
bytes of the quantized linears and the whole-model checkpoint size. Timings are medians of
repeated runs after warm-up, on random inputs, synchronised with ``block_until_ready``.

    qdit bench --model XL/2 --batch 64 256 --json out/bench.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.perf.timing import chained_median, synced_calls

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by device kind substring.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5": 459e12}

# the quantization rules the variants share (``qdit_rules`` keyword arguments): symmetric weights and
# activations, per channel / per token (group 0) or in 128-wide groups; int8 codes unless fp8 e4m3
W8A8 = dict(wbits=8, abits=8, w_group=0, a_group=0, w_sym=True, a_sym=True)
FP8 = dict(W8A8, fmt="fp8_e4m3")
W4A8 = dict(W8A8, wbits=4)
W8A8_G128 = dict(W8A8, w_group=128, a_group=128)
FP8_G128 = dict(W8A8_G128, fmt="fp8_e4m3")
W4A8_G128 = dict(W8A8_G128, wbits=4)

# name -> (preset rules kwargs or None for FP, mode, real backend)
VARIANTS: dict[str, tuple[dict[str, Any] | None, str, str]] = {
    "bf16": (None, "fp", ""),
    "bf16-xla-attn": (None, "fp", "xla-attn"),  # XLA attention instead of the default's kernel
    "bf16-triton-attn": (None, "fp", "triton-attn"),  # models.attention_kernel's Triton kernel
    "bf16-cudnn-attn": (None, "fp", "cudnn-attn"),  # cuDNN's fused attention (the default before Mosaic's)
    "bf16-qkv1": (None, "fp", "qkv1"),  # q, k, v out of one fused GEMM (DiTConfig.qkv_gemms="fused")
    # the gated residuals as XLA passes after cuBLAS' proj / fc2 (the default since the eighteenth
    # session puts them in a Mosaic GEMM's epilogue on Hopper: quant.fused_float)
    "bf16-xla-res": (None, "fp", "xlares"),
    # the gated residual GEMMs' epilogue on the kernel's fourth warpgroup (fused_float_apply_fn(epilogue_wg))
    "bf16-epi": (None, "fp", "epi"),
    "fake-w8a8-g128": (W8A8_G128, "fake", ""),
    "real-w8a8": (W8A8, "real", "xla"),
    "real-w8a8-pallas": (W8A8, "real", "pallas"),
    "real-w4a8": (W4A8, "real", "xla"),
    "real-w4a8-pallas": (W4A8, "real", "pallas"),
    "real-w8a8-g128": (W8A8_G128, "real", "auto"),
    "real-w4a8-g128": (W4A8_G128, "real", "auto"),
    # W4A8 with fp8 e4m3 activations: the 4-bit codes unpacked to fp8, the fp8 group GEMM
    "real-w4a8fp8-g128": (dict(W4A8_G128, a_fmt="fp8_e4m3"), "real", "auto"),
    "real-w8a8-g128-f16s": (dict(W8A8_G128, scale_dtype="float16"), "real", "auto"),  # weight scales in float16
    "real-w4a8-g128-f16s": (dict(W4A8_G128, scale_dtype="float16"), "real", "auto"),
    "real-w8a8-g128-xla": (W8A8_G128, "real", "xla"),
    "real-fp8-g128": (FP8_G128, "real", "auto"),
    # group-128 without the Mosaic GPU group-scaled GEMM (RealOptions.group_kernel, on by default): the
    # Triton group kernel (int8) or XLA's batched product (fp8), the group inputs quantized by XLA
    "real-w8a8-g128-triton": (W8A8_G128, "real", "auto-nogroupk"),
    # group-128 with the group GEMM's schedule named (RealOptions.group_mode; the default is 'split'): fp8
    # 'plain' (the default before 'split'), int8 'split' (the default since the twenty-eighth session; int8
    # 'overlap' before it, on every group GEMM but fc1's codes warpgroup, which 'overlap' makes spill)
    "real-fp8-g128-plain": (FP8_G128, "real", "auto-gmplain"),
    "real-w8a8-g128-split": (W8A8_G128, "real", "auto-gmsplit"),
    "real-w4a8-g128-split": (W4A8_G128, "real", "auto-gmsplit"),
    # kernels.scaled_gemm with a pipeline per output tile instead of one chained across each CTA's
    # tiles (RealOptions.chain_tiles, on by default)
    "real-fp8-nochain": (FP8, "real", "xla-nochain"),
    "real-fp8-g128-nochain": (FP8_G128, "real", "auto-nochain"),
    "real-w8a8-g128-nochain": (W8A8_G128, "real", "auto-nochain"),
    # fc1 with a bf16 output and gelu_quant's pass writing fc2's group codes, instead of fc1's epilogue
    # writing them (RealOptions.gelu_epilogue, on by default)
    "real-fp8-g128-nogelue": (FP8_G128, "real", "auto-nogelue"),
    "real-w8a8-g128-nogelue": (W8A8_G128, "real", "auto-nogelue"),
    # fc1's codes epilogue on the kernel's fourth warpgroup, or not (RealOptions.codes_wg; default: int8 on,
    # fp8 off)
    "real-fp8-g128-wg": (FP8_G128, "real", "auto-wg"),
    "real-w8a8-g128-nowg": (W8A8_G128, "real", "auto-nowg"),
    "real-w4a8-g128-nowg": (W4A8_G128, "real", "auto-nowg"),
    # W4A8 g128 with its weights kept packed in device memory (RealModel.variables(unpack_w4=False)): the
    # Triton group kernel unpacking in registers, instead of int8 codes unpacked once for the Mosaic GEMM
    "real-w4a8-g128-packed": (W4A8_G128, "real", "auto-packed"),
    "real-fp8-g128-nogroupk": (FP8_G128, "real", "auto-nogroupk"),
    "real-w8a8-mat": (W8A8, "real", "xla-mat"),
    "real-w8a8-qk": (W8A8, "real", "xla-qk"),
    "real-w8a8-fused": (W8A8, "real", "xla-fused"),
    "real-w8a8-g128-qk": (W8A8_G128, "real", "auto-qk"),
    "real-fp8": (FP8, "real", "xla"),
    # q, k, v from cuBLAS + XLA's epilogue pass instead of the Mosaic GPU scaled GEMM (kernels.scaled_gemm,
    # RealOptions.qkv_kernel, on by default)
    "real-fp8-noqkvk": (FP8, "real", "xla-noqkvk"),
    # q, k, v as three scaled_gemm calls (one per output) with the epilogue's vectors loaded where used, as
    # until the nineteenth session, instead of one call writing all three with them loaded before the K
    # loop (RealOptions.qkv_one_call / qkv_prefetch); -nopf: one call, the vectors loaded where used
    "real-fp8-qkvcalls": (FP8, "real", "xla-qkvcalls-nopf-noepi"),
    "real-fp8-nopf": (FP8, "real", "xla-nopf-noepi"),
    # per-channel fp8: the GEMMs' epilogues in their compute warpgroups (RealOptions.epilogue_wg off), fc2's
    # gated residual there (residual_epilogue_wg off), and fc1 on the Mosaic GEMM with the epilogue
    # warpgroup (RealOptions.fc1_kernel on)
    "real-fp8-noepi": (FP8, "real", "xla-noepi"),
    "real-fp8-noresepi": (FP8, "real", "xla-noresepi"),
    "real-fp8-fc1k": (FP8, "real", "xla-fc1k"),
    # per-channel int8: fc1 as cuBLAS' int32 product + the middle step applying the scales (RealOptions.fc1_kernel
    # off) instead of the Mosaic GEMM writing fc1's bf16 output (int8's default)
    "real-w8a8-nofc1k": (W8A8, "real", "xla-nofc1k"),
    # group-wise GEMMs with stacked parts and an even group count (XL/2: fc2) taking two groups a pipeline step
    # (RealOptions.group_pairs; not yet measured on a GPU)
    "real-fp8-g128-gpairs": (FP8_G128, "real", "auto-gpairs"),
    "real-w8a8-g128-gpairs": (W8A8_G128, "real", "auto-gpairs"),
    # group-wise q, k, v and fc2 + residual GEMMs' epilogue on the kernel's fourth warpgroup too
    # (RealOptions.epilogue_wg=True)
    "real-fp8-g128-epi": (FP8_G128, "real", "auto-epi"),
    "real-w8a8-g128-epi": (W8A8_G128, "real", "auto-epi"),
    # group-wise GEMMs issuing their own TMA stores (RealOptions.store_wg off), as until the twenty-first session
    "real-fp8-g128-nostwg": (FP8_G128, "real", "auto-nostwg"),
    "real-w8a8-g128-nostwg": (W8A8_G128, "real", "auto-nostwg"),
    "real-w4a8-g128-nostwg": (W4A8_G128, "real", "auto-nostwg"),
    # group-wise GEMMs' float32 sums started at the bias or not (RealOptions.bias_first; default: fp8 on)
    "real-fp8-g128-nobiasfirst": (FP8_G128, "real", "auto-nobiasfirst"),
    "real-w8a8-g128-biasfirst": (W8A8_G128, "real", "auto-biasfirst"),
    # fc1's codes epilogue with its GELU evaluated as the bf16 model's, every step rounded (RealOptions.fc1_gelu
    # 'dtype'; the default evaluates it on the float32 sums)
    "real-fp8-g128-gelubf16": (FP8_G128, "real", "auto-gelubf16"),
    "real-w8a8-g128-gelubf16": (W8A8_G128, "real", "auto-gelubf16"),
    # two-CTA clusters sharing each K step's weight tile by TMA multicast (RealOptions.cta_pairs, opt-in)
    "real-fp8-pairs": (FP8, "real", "xla-pairs"),
    "real-fp8-g128-pairs": (FP8_G128, "real", "auto-pairs"),
    "real-w8a8-g128-pairs": (W8A8_G128, "real", "auto-pairs"),
    # group 'split' GEMMs (no codes epilogue) with their two parts side by side instead of stacked along M
    # (RealOptions.stacked, on by default where 'split' runs); int8 'split' with the parts stacked
    "real-fp8-g128-nostack": (FP8_G128, "real", "auto-nostack"),
    "real-w4a8fp8-g128-nostack": (dict(W4A8_G128, a_fmt="fp8_e4m3"), "real", "auto-nostack"),
    "real-w8a8-g128-split-nostack": (W8A8_G128, "real", "auto-gmsplit-nostack"),
    # the proj input's group codes written by the attention kernel's epilogue instead of a quantize pass over
    # its bf16 output (RealOptions.attention_codes, off by default)
    "real-fp8-g128-attncodes": (FP8_G128, "real", "auto-attncodes"),
    "real-w4a8fp8-g128-attncodes": (dict(W4A8_G128, a_fmt="fp8_e4m3"), "real", "auto-attncodes"),
    "real-w8a8-g128-attncodes": (W8A8_G128, "real", "auto-attncodes"),
    # proj / fc2 from cuBLAS + XLA's epilogue-and-residual pass instead of scaled_gemm with the gated
    # residual in its epilogue (RealOptions.residual_kernel, on by default)
    "real-fp8-nores": (FP8, "real", "xla-nores"),
    # int8 without the Mosaic GPU GEMMs (qkv and the residual routes), as the fp8 -noqkvk / -nores pair
    "real-w8a8-nomosaic": (W8A8, "real", "xla-noqkvk-nores"),
    "real-fp8-fused": (FP8, "real", "xla-fused"),  # scale epilogues left to XLA to fuse into the GEMMs (no barrier)
    "real-fp8-f32": (FP8, "real", "xla-f32"),
    "real-fp8-qkv3": (FP8, "real", "xla-qkv3"),  # RealOptions(split_qkv=True): q, k, v as three quantized GEMMs
    "real-w8a8-qkv3": (W8A8, "real", "xla-qkv3"),
    # without the one-pass MLP middle step (kernels.gelu_quant): fc1, GELU, fc2 as separate layers
    "real-fp8-nomlp": (FP8, "real", "xla-nomlp"),
    "real-w8a8-nomlp": (W8A8, "real", "xla-nomlp"),
    # per-token inputs quantized by XLA's passes (no kernels.norm_quant: neither the LayerNorm +
    # modulate fusion into the qkv / fc1 inputs' quantization nor the one-pass proj input)
    "real-fp8-nonorm": (FP8, "real", "xla-nonorm"),
    "real-w8a8-nonorm": (W8A8, "real", "xla-nonorm"),
    # the one-pass kernel for every per-token input, but without the LayerNorm + modulate prologue
    "real-fp8-rowq": (FP8, "real", "xla-rowq"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="XL/2")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn", "triton", "mosaic"),
                   help="the attention kernel of every variant (DiTConfig.attention; an -attn variant overrides it)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--variants", nargs="+", default=["bf16", "fake-w8a8-g128", "real-w8a8", "real-fp8", "real-w8a8-g128",
                                                     "real-fp8-g128", "real-w4a8-g128"], help=f"of {sorted(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sample-batch", type=int, default=0, help="also time DDIM sampling at this batch (0: skip)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-repeats", type=int, default=2)
    p.add_argument("--matmul-peak", type=int, default=8192, help="NxNxN bf16 matmul as measured ceiling (0: skip)")
    p.add_argument("--fuse-quant", action="store_true", help="quantize activations inside the Pallas kernel")
    p.add_argument("--tiles", default="128,128,128,8,3", help="Pallas tiles bm,bn,bk,warps,stages")
    p.add_argument("--time-budget", type=float, default=0, help="skip variants started after this many s (0: none)")
    p.add_argument("--profile", type=int, default=0, metavar="CALLS",
                   help="also trace CALLS forward calls per variant and batch with jax.profiler and print where "
                        "the device time goes (kinds of kernels, slowest HLO instructions); 0: off")
    p.add_argument("--profile-top", type=int, default=25, help="instructions listed per profile")
    p.add_argument("--loop", type=int, default=0, metavar="K",
                   help="also time K forwards inside one jitted lax.scan (distinct inputs per step, as the "
                        "sampler's loop runs them) and report images/s per forward; 0: off")
    p.add_argument("--back-to-back", type=int, default=0, metavar="N",
                   help="also time N forward calls dispatched back to back and synced once (the median of 3 "
                        "rounds): the throughput of a pipelined caller, without the per-call host dispatch the "
                        "synced timing includes (2.5-7 ms a call on the H100 machines, a large share at batch "
                        "64); 0: off")
    p.add_argument("--gaps", type=int, default=0, metavar="CALLS",
                   help="also trace CALLS forward calls as timed (CUDA graphs as configured) and print how long "
                        "the device sits idle between kernels inside a call, and after which kernels; 0: off")
    p.add_argument("--xla-option", action="append", default=[], metavar="KEY=VALUE",
                   help="XLA compiler option for the forward compiles, e.g. xla_gpu_enable_triton_gemm=false "
                        "(repeatable; the row records them)")
    p.add_argument("--diff-against", default="", metavar="VARIANT",
                   help="also print each variant's output difference (relative L2, same inputs) from this "
                        "variant's, e.g. to check that a faster path computes the same model")
    p.add_argument("--no-xla-defaults", action="store_true",
                   help="compile without qdit's default XLA options (qdit_jax.perf.compiler: on GPUs, Triton GEMM "
                        "fusions off so GELU fuses into cuBLASLt), to measure what they change")
    p.add_argument("--dump-hlo", default=None, metavar="DIR",
                   help="write each compiled forward's optimized HLO to DIR/<variant>_b<batch>.hlo.txt "
                        "(to read what a profiled instruction computes)")
    p.add_argument("--power", action="store_true",
                   help="also sample the GPU's SM clock, power draw and throttle reasons with nvidia-smi while each "
                        "variant is timed (perf.power): at batch 256 an H100 runs the forward at its power cap, "
                        "below its boost clock; use --repeats 30 or more for a few seconds of samples")
    p.add_argument("--json", default=None)


def randomize(params: Any, key: Any) -> Any:
    """Every weight random, std 0.02 (DiT zero-initialises adaLN and the final layer). ``params``
    may be arrays or ``ShapeDtypeStruct``s (``models.dit.param_shapes``: no Flax init at all).
    One compiled draw per distinct (shape, dtype), so an XL/2 tree costs a handful of compiles."""
    import functools

    import jax
    import jax.numpy as jnp

    @functools.lru_cache(maxsize=None)
    def draw(shape: tuple[int, ...], dtype: Any):
        return jax.jit(lambda k: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))

    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [draw(tuple(x.shape), jnp.dtype(x.dtype))(k)
                                                  for k, x in zip(keys, leaves)])


def random_params(cfg: Any, seed: int = 1) -> Any:
    """Random DiT params of ``cfg`` straight from its shapes (benchmarks: speed needs no trained or
    properly initialised weights)."""
    import jax

    from qdit_jax.models.dit import param_shapes

    return jax.block_until_ready(randomize(param_shapes(cfg), jax.random.PRNGKey(seed)))


def matmul_peak(n: int, repeats: int) -> float:
    """FLOP/s of an n^3 bf16 matmul on random data."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(7))
    sets = [(jax.random.normal(jax.random.fold_in(ka, i), (n, n), jnp.bfloat16),
             jax.random.normal(jax.random.fold_in(kb, i), (n, n), jnp.bfloat16)) for i in range(2)]
    t = statistics.median(synced_calls(jax.jit(lambda a, b: a @ b), sets, repeats))
    return 2 * n**3 / t


def parse_tiles(text: str):
    from qdit_jax.quant.kernels.group_gemm import Tiles

    try:
        vals = [int(v) for v in text.split(",")]
        return Tiles(*vals)
    except (ValueError, TypeError):
        raise QditError(f"--tiles must be 5 integers bm,bn,bk,warps,stages, got {text!r}") from None


def build_variant(name: str, cfg: Any, params: Any, tiles: Any, fuse_quant: bool) -> tuple[Callable, Any, dict]:
    """(apply_fn, its params pytree, info) for a variant name."""
    from qdit_jax.quant.config import QuantConfig, qdit_rules
    from qdit_jax.quant.quantize import quantize_model, weight_bytes
    from qdit_jax.quant.real import RealOptions, checkpoint_bytes, real_from_params
    from qdit_jax.quant.runtime import with_compute_params

    if name not in VARIANTS:
        raise QditError(f"unknown bench variant {name!r}; choose from {sorted(VARIANTS)}")
    rules, mode, backend = VARIANTS[name]
    tags = backend.split("-")  # backend plus options: -mat (codes behind a barrier), -qk (one-pass Pallas
    # activation quantization), -fused (the GEMM's scale epilogue fused into it, not its own pass),
    # -f32 (float32 fp8 products), -qkv1 (the float model's q, k, v from one fused GEMM), -qkv3 (real
    # mode: q, k, v as three quantized GEMMs), -nomlp (no fused MLP middle step), -nonorm (no norm_quant
    # kernel), -rowq (norm_quant without the LayerNorm prologue), -noqkvk (no scaled_gemm for qkv),
    # -nores (no scaled_gemm with the residual for proj / fc2), -qkvcalls (q, k, v in three scaled_gemm
    # calls), -nopf (qkv's epilogue vectors loaded where used, not before the K loop), -nogroupk (no
    # scaled_gemm for group-wise layers), -nogelue (group-wise fc1 with a bf16 output, then gelu_quant),
    # -wg / -nowg (fc1's codes epilogue on the kernel's fourth warpgroup or not), -noepi (per-channel fp8
    # epilogues in the compute warpgroups; -noresepi: fc2's residual epilogue only; -epi: group-wise
    # layers' epilogue on the fourth warpgroup too), -fc1k / -nofc1k (per-channel fc1 on the Mosaic GEMM or
    # cuBLAS' raw product: RealOptions.fc1_kernel, default int8 on, fp8 off),
    # -gmMODE (the group GEMM's schedule, kernels.scaled_gemm.GROUP_MODES), -biasfirst / -nobiasfirst (group
    # sums started at the bias or not), -nostwg (the store warpgroup off), -pairs (two-CTA clusters sharing
    # the weight tile), -gelubf16 (fc1's codes epilogue's GELU with the bf16 model's roundings), -stack /
    # -nostack (group 'split' parts stacked along M or side by side), -gpairs (two groups a pipeline step where
    # stacked and the groups pair up), -attncodes (the proj input's codes from
    # the attention kernel's epilogue instead of a pass over its bf16 output),
    # -packed (4-bit weights kept packed on the device, RealModel.variables), xla-attn / triton-attn /
    # cudnn-attn (XLA's attention, the Triton kernel's, cuDNN's)
    if "qkv1" in tags:
        cfg = cfg.replace(qkv_gemms="fused")
    if mode == "fp":
        from qdit_jax.quant.fused_float import fused_float_apply_fn

        attn = {"xla-attn": "xla", "triton-attn": "triton", "cudnn-attn": "cudnn"}.get(backend)
        fcfg = cfg.replace(attention=attn) if attn else cfg
        fn = fused_float_apply_fn(fcfg, "xla" if "xlares" in tags else "auto", epilogue_wg="epi" in tags)
        return fn, with_compute_params(params, fcfg), {"checkpoint_bytes": checkpoint_bytes(params)}
    qcfg = QuantConfig(qdit_rules(**rules), name=name)
    if mode == "fake":
        qm = quantize_model(params, cfg, qcfg)
        return qm.apply_fn(), with_compute_params(qm.bundle, cfg), {"weight_bytes": weight_bytes(qm)}
    rm = real_from_params(params, cfg, qcfg)
    opts = RealOptions(backend=tags[0], tiles=tiles, fuse_quant=fuse_quant, materialize="mat" in tags,
                       quant_kernel="qk" in tags, split_epilogue="fused" not in tags,
                       float_product="float32" if "f32" in tags else "auto", split_qkv="qkv3" in tags,
                       fused_mlp="nomlp" not in tags, fused_norm=not {"nonorm", "rowq"} & set(tags),
                       row_quant="nonorm" not in tags, qkv_kernel="noqkvk" not in tags,
                       residual_kernel="nores" not in tags, group_kernel="nogroupk" not in tags,
                       gelu_epilogue="nogelue" not in tags, chain_tiles="nochain" not in tags,
                       qkv_one_call="qkvcalls" not in tags, qkv_prefetch=None if "nopf" in tags else "before",
                       codes_wg=True if "wg" in tags else False if "nowg" in tags else None,
                       epilogue_wg=False if "noepi" in tags else True if "epi" in tags else None,
                       fc1_kernel=True if "fc1k" in tags else False if "nofc1k" in tags else None,
                       store_wg=False if "nostwg" in tags else None,
                       bias_first=True if "biasfirst" in tags else False if "nobiasfirst" in tags else None,
                       cta_pairs="pairs" in tags, fc1_gelu="dtype" if "gelubf16" in tags else "float32",
                       residual_epilogue_wg="noresepi" not in tags,
                       stacked=False if "nostack" in tags else True if "stack" in tags else None,
                       group_pairs="gpairs" in tags,
                       attention_codes="attncodes" in tags,
                       group_mode=next((t[len("gm"):] for t in tags if t.startswith("gm")), None))
    variables = rm.variables(unpack_w4=False if "packed" in tags else None)
    return rm.apply_fn(opts), with_compute_params(variables, cfg), {
        "weight_bytes": rm.weight_bytes(), "checkpoint_bytes": checkpoint_bytes(rm.variables(unpack_w4=False))}


def parse_xla_options(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> compiler options; "true"/"false" become booleans, digits integers."""
    out: dict[str, Any] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise QditError(f"--xla-option {it!r}: expected KEY=VALUE, e.g. xla_gpu_enable_triton_gemm=false")
        low = val.lower()
        out[key] = True if low == "true" else False if low == "false" else int(val) if val.lstrip("-").isdigit() else val
    return out


def _profile(compiled: Any, inputs: list[tuple], calls: int, top: int, title: str) -> dict[str, Any]:
    """Trace ``calls`` calls, print the breakdown; return the kind summary and every instruction's time
    (the JSON keeps them all, the printout only the ``top``)."""
    from qdit_jax.perf.trace import format_profile, profile_compiled, summarize

    try:
        ops = profile_compiled(compiled, inputs, calls=calls)
    except Exception as e:  # profiling is diagnostics: a missing CUPTI must not lose the timings
        print(f"{title}: profile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}
    print(format_profile(ops, top=top, title=title), flush=True)
    return {"us_by_kind": summarize(ops),
            "ops": [dict(name=o.name, kind=o.kind, shape=o.shape, us=o.us_per_call, events=o.events_per_call)
                    for o in ops]}


def looped_forward(apply_fn: Callable) -> Callable:
    """(params, xs, ts, ys) -> the forward of each leading-axis slice, in one ``lax.scan``: K forwards
    in one program, so the per-call dispatch (and XLA's command-buffer update for new input / output
    addresses) is paid once per K, as in a jitted sampling loop."""
    import jax

    def run(params: Any, xs: Any, ts: Any, ys: Any) -> Any:
        return jax.lax.scan(lambda c, inp: (c, apply_fn(params, *inp)), 0, (xs, ts, ys))[1]

    return run


def _gaps(compiled: Any, inputs: list[tuple], calls: int, title: str) -> dict[str, Any]:
    """Trace ``calls`` calls and print the idle time between kernels (perf.trace.idle_gaps)."""
    import dataclasses

    from qdit_jax.perf.trace import format_gaps, profile_compiled

    found: list = []
    try:
        profile_compiled(compiled, inputs, calls=calls, gaps=found)
    except Exception as e:  # diagnostics, as _profile
        print(f"{title}: gap trace failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"}
    print(format_gaps(found[0], title), flush=True)
    return dataclasses.asdict(found[0])


def _time_loop(apply_fn: Callable, cfg: Any, vparams: Any, b: int, args: argparse.Namespace,
               xla_opts: dict[str, Any]) -> dict[str, Any]:
    """Time ``args.loop`` forwards of batch ``b`` in one scan (:func:`looped_forward`); per-forward
    seconds and images/s, or an error entry (diagnostics: a failure keeps the single-call row)."""
    import jax
    import jax.numpy as jnp

    k = args.loop
    rng = np.random.default_rng(1000 + b)
    sets = [(vparams,
             jnp.asarray(rng.standard_normal((k, b, cfg.input_size, cfg.input_size, cfg.in_channels)), jnp.float32),
             jnp.asarray(rng.integers(0, 1000, (k, b)), jnp.int32),
             jnp.asarray(rng.integers(0, cfg.num_classes, (k, b)), jnp.int32)) for _ in range(2)]
    try:
        compiled = jax.jit(looped_forward(apply_fn)).lower(*sets[0]).compile(compiler_options=xla_opts or None)
        t = statistics.median(synced_calls(compiled, sets, max(3, args.repeats // 2))) / k
    except Exception as e:
        print(f"loop of {k} at batch {b}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return {"loop_error": f"{type(e).__name__}: {e}"}
    print(f"    {k} forwards in one scan: {t * 1e3:8.2f} ms per forward, {b / t:8.1f} img/s", flush=True)
    return {"loop_k": k, "loop_median_s": t, "loop_images_per_s": b / t}


def _mem(compiled: Any) -> int | None:
    try:
        ma = compiled.memory_analysis()
        return int(ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes)
    except Exception:
        return None


NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="


def disable_command_buffers() -> bool:
    """Turn XLA:GPU command buffers (CUDA graphs) off for this process, so a profile sees each HLO
    instruction instead of one opaque graph launch. Works only before the backend starts; returns
    whether the flag is now in effect."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if NO_COMMAND_BUFFERS not in flags.split():
        os.environ["XLA_FLAGS"] = (flags + " " + NO_COMMAND_BUFFERS).strip()
    try:
        from jax._src import xla_bridge

        return not xla_bridge._backends  # flags are read once, when the first backend starts
    except Exception:  # private API moved: assume the flag arrived in time
        return True


def _power_log(args: argparse.Namespace, dev: Any) -> Any:
    """A ``perf.power.PowerLog`` of ``dev`` where ``--power`` asks and it is a GPU, else one that is off."""
    from qdit_jax.perf.power import PowerLog, gpu_index

    if args.power and dev.platform == "gpu":
        return PowerLog(gpu_index(dev))
    return PowerLog(command=None)  # off


def _power_text(row: dict[str, Any]) -> str:
    """The power log's part of a variant's line (empty without ``--power``)."""
    if "power" not in row:
        return ""
    summary = row["power"]
    if summary is None:
        return "  power: no samples (not a GPU, no nvidia-smi, or a timed span shorter than its interval)"
    avg = " (1-s average)" if summary.get("power_field") == "power.draw" else ""  # perf.power.POWER_FIELDS
    return (f"  {summary['sm_mhz']:.0f} MHz {summary['power_w']:.0f} / {summary['limit_w']:.0f} W{avg}, power-capped "
            f"{summary['power_capped']:.0%} of {summary['samples']} samples")


def run(args: argparse.Namespace) -> int:
    if args.profile:
        if disable_command_buffers():
            print("profile: XLA command buffers (CUDA graphs) off for this run, so every kernel is seen; "
                  "timings may differ slightly from a run without --profile", flush=True)
        else:
            print("profile: the backend had started, command buffers stay on (kernels inside them are "
                  "attributed to one 'command_buffer' instruction)", flush=True)
    import jax
    import jax.numpy as jnp

    from qdit_jax.diffusion.pipeline import SamplerConfig, make_sample_fn
    from qdit_jax.models.dit import dit_config, flops_per_forward

    for v in args.variants:
        if v not in VARIANTS:
            raise QditError(f"unknown bench variant {v!r}; choose from {sorted(VARIANTS)}")
    if any(b < 1 for b in args.batch) or args.repeats < 1:
        raise QditError("--batch values and --repeats must be >= 1")
    tiles = parse_tiles(args.tiles)
    from qdit_jax.perf.compiler import compiler_options

    xla_opts = {**((None if args.no_xla_defaults else compiler_options()) or {}), **parse_xla_options(args.xla_option)}
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    peak = next((v for k, v in PEAK_BF16.items() if k.lower() in dev.device_kind.lower()), None)
    cfg = dit_config(args.model, image_size=args.image_size, dtype="bfloat16").replace(attention=args.attention)
    t0 = time.perf_counter()
    params = random_params(cfg)
    print(f"{args.model} random params in {time.perf_counter() - t0:.1f}s", flush=True)
    flops = flops_per_forward(cfg)
    measured = matmul_peak(args.matmul_peak, args.repeats) if args.matmul_peak else None
    if measured:
        print(f"bf16 matmul {args.matmul_peak}^3: {measured / 1e12:.1f} TFLOP/s on {dev.device_kind}", flush=True)
    if args.diff_against and args.diff_against not in args.variants:
        raise QditError(f"--diff-against {args.diff_against!r} must be one of the --variants")
    rows: list[dict[str, Any]] = []
    outputs: dict[tuple[str, int], np.ndarray] = {}
    for name in args.variants:
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            print(f"{name}: skipped (time budget)", flush=True)
            continue
        t_build = time.perf_counter()
        try:
            apply_fn, vparams, info = build_variant(name, cfg, params, tiles, args.fuse_quant)
            jax.block_until_ready(vparams)
        except Exception as e:  # a variant that cannot be built is reported, the rest still run
            print(f"{name}: build failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        t_build = time.perf_counter() - t_build
        print(f"{name}: weights built in {t_build:.1f}s", flush=True)
        fwd = jax.jit(apply_fn)
        for b in args.batch:
            rng = np.random.default_rng(b)
            inputs = [(vparams,
                       jnp.asarray(rng.standard_normal((b, cfg.input_size, cfg.input_size, cfg.in_channels)), jnp.float32),
                       jnp.asarray(rng.integers(0, 1000, b), jnp.int32),
                       jnp.asarray(rng.integers(0, cfg.num_classes, b), jnp.int32)) for _ in range(2)]
            try:
                t0 = time.perf_counter()
                compiled = fwd.lower(*inputs[0]).compile(compiler_options=xla_opts or None)
                t_compile = time.perf_counter() - t0
                if args.dump_hlo:
                    import os

                    os.makedirs(args.dump_hlo, exist_ok=True)
                    with open(os.path.join(args.dump_hlo, f"{name}_b{b}.hlo.txt"), "w") as f:
                        f.write(compiled.as_text())
                t0 = time.perf_counter()
                with _power_log(args, dev) as plog:
                    plog.mark()
                    t = statistics.median(synced_calls(compiled, inputs, args.repeats))
                    plog.mark()
                t_timed = time.perf_counter() - t0
            except Exception as e:
                print(f"{name} batch {b}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            ips = b / t
            row = dict(variant=name, batch=b, median_s=t, images_per_s=ips, tflops=ips * flops / 1e12,
                       datasheet_fraction=ips * flops / peak if peak else None,
                       measured_fraction=ips * flops / measured if measured else None,
                       program_bytes=_mem(compiled), compile_s=t_compile, build_s=t_build,
                       xla_options=xla_opts, **info)
            if args.power:
                row["power"] = plog.summary()
            if args.back_to_back:
                _, t_b2b = chained_median(compiled, inputs[0], args.back_to_back, rounds=3, warmup=2)
                row.update(b2b_calls=args.back_to_back, b2b_median_s=t_b2b, b2b_images_per_s=b / t_b2b)
            if args.loop:
                row.update(_time_loop(apply_fn, cfg, vparams, b, args, xla_opts))
            if args.profile:
                row["profile"] = _profile(compiled, inputs, args.profile, args.profile_top, f"{name} b{b}")
            if args.gaps:
                row["gaps"] = _gaps(compiled, inputs, args.gaps, f"{name} b{b}")
            if args.diff_against:
                outputs[(name, b)] = np.asarray(compiled(*inputs[0]), np.float64)
            rows.append(row)
            print(f"{name:22s} b{b:4d} {t * 1e3:8.2f} ms {ips:8.1f} img/s {row['tflops']:6.1f} TFLOP/s "
                  f"prog {((row['program_bytes'] or 0) / 2**30):5.2f} GiB compile {t_compile:5.1f}s "
                  f"timing {t_timed:5.1f}s" + _power_text(row), flush=True)
        if args.sample_batch:
            scfg = SamplerConfig(sampler="ddim", steps=args.sample_steps, cfg_scale=4.0)
            fn = make_sample_fn(apply_fn, cfg, scfg, compiler_options=xla_opts)
            b = args.sample_batch
            rng = np.random.default_rng(0)
            sets = [(vparams, jnp.asarray(rng.standard_normal((b, cfg.input_size, cfg.input_size, cfg.in_channels)),
                                          jnp.float32), jnp.asarray(rng.integers(0, 1000, b), jnp.int32),
                     jax.random.PRNGKey(i)) for i in range(2)]
            try:
                ts = synced_calls(fn, sets, args.sample_repeats, warmup=1)
                t = statistics.median(ts)
                rows.append(dict(variant=name, sample_batch=b, steps=args.sample_steps, sample_s=t,
                                 sample_images_per_s=b / t))
                print(f"{name:22s} sample b{b} DDIM{args.sample_steps} CFG: {t:7.2f} s {b / t:7.2f} img/s", flush=True)
            except Exception as e:
                print(f"{name} sampling failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if args.json:  # after every variant, so a run stopped at its time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(dict(device=dev.device_kind, jax=jax.__version__, partial=True, rows=rows), f, indent=2,
                          default=str)
    for r in rows:
        ref = outputs.get((args.diff_against, r.get("batch")))
        if ref is not None and (r["variant"], r["batch"]) in outputs:
            r["rel_diff"] = float(np.linalg.norm(outputs[(r["variant"], r["batch"])] - ref) / np.linalg.norm(ref))
            print(f"{r['variant']:22s} b{r['batch']:4d} output vs {args.diff_against}: relative L2 difference "
                  f"{r['rel_diff']:.3e}", flush=True)
    stats = dev.memory_stats() or {}
    summary = dict(device=dev.device_kind, jax=jax.__version__, matmul_tflops=measured and measured / 1e12,
                   peak_bytes_in_use=stats.get("peak_bytes_in_use"), rows=rows)
    base = {r["batch"]: r["images_per_s"] for r in rows if r["variant"] == "bf16" and "batch" in r}
    # optional column pairs (images/s, x bf16): header, row key
    extra = [(h, k) for h, k in (("b2b img/s", "b2b_images_per_s"), ("loop img/s", "loop_images_per_s"))
             if any(k in r for r in rows)]
    ebase = {k: {r["batch"]: r[k] for r in rows if r["variant"] == "bf16" and k in r} for _, k in extra}
    power = any(r.get("power") for r in rows)
    print(f"\n{'variant':22s} {'batch':>5s} {'img/s':>8s} {'x bf16':>7s} {'TFLOP/s':>8s} {'frac':>6s} {'weightMB':>9s} "
          f"{'ckptMB':>8s}" + "".join(f" {h:>10s} {'x bf16':>7s}" for h, _ in extra)
          + (f" {'SM MHz':>7s} {'W':>5s} {'capped':>6s}" if power else ""))
    for r in rows:
        if "batch" not in r:
            continue
        wb = r.get("weight_bytes", {}).get("quantized")
        ck = r.get("checkpoint_bytes")
        rel = r["images_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        line = (f"{r['variant']:22s} {r['batch']:5d} {r['images_per_s']:8.1f} {rel:7.3f} {r['tflops']:8.1f} "
                f"{(r['datasheet_fraction'] or 0):6.3f} {(wb or 0) / 1e6:9.1f} {(ck or 0) / 1e6:8.1f}")
        for _, k in extra:
            if k in r:
                erel = r[k] / ebase[k][r["batch"]] if r["batch"] in ebase[k] else float("nan")
                line += f" {r[k]:10.1f} {erel:7.3f}"
            else:
                line += f" {'-':>10s} {'-':>7s}"
        if power:
            pw = r.get("power")
            line += (f" {pw['sm_mhz']:7.0f} {pw['power_w']:5.0f} {pw['power_capped']:6.0%}" if pw
                     else f" {'-':>7s} {'-':>5s} {'-':>6s}")
        print(line)
    samples = [r for r in rows if "sample_images_per_s" in r]
    if samples:
        sbase = next((r["sample_images_per_s"] for r in samples if r["variant"] == "bf16"), None)
        print(f"\n{'sampling (DDIM, CFG)':22s} {'batch':>5s} {'steps':>5s} {'s/batch':>8s} {'img/s':>8s} {'x bf16':>7s}")
        for r in samples:
            rel = r["sample_images_per_s"] / sbase if sbase else float("nan")
            print(f"{r['variant']:22s} {r['sample_batch']:5d} {r['steps']:5d} {r['sample_s']:8.3f} "
                  f"{r['sample_images_per_s']:8.2f} {rel:7.3f}")
    print(f"peak device memory in use (process): {(summary['peak_bytes_in_use'] or 0) / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return 0
