"""The one place where Flax meets the quantizer: a ``flax.linen.intercept_methods`` interceptor.

The model (``qdit_jax.models``) carries no quantization code. Under ``quantized(plan, ...)``
every call of a planned module has its array inputs fake-quantized before the module runs:

* dynamic activations (Q-DiT): scales computed on the fly from the input itself, per sample,
  per token, per group of input channels, so inside a jitted sampling loop they follow every
  timestep and every sample of the batch;
* static activations (the baseline): per-group scales fixed from calibration data.

Weights are not touched here: ``quant.quantize.quantize_model`` quantizes them once, outside the
sampling loop. ``recording(...)`` runs a forward that hands each planned layer's (quantized)
input to a callback, which is how calibration statistics and GPTQ Hessians are gathered.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from qdit_jax.errors import QditError
from qdit_jax.models.dit import AttentionCore, DiT, DiTConfig
from qdit_jax.quant.config import LayerInfo, LayerQuant
from qdit_jax.quant.quantizers import QParams, QuantSpec, _int_params, fake_of_groups, fake_quant_spec

Tap = Callable[[str, int, jax.Array], None]


def module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


# ----------------------------------------------------------------------------- activations


def fake_quant_static(x: jax.Array, qp: QParams, spec: QuantSpec) -> jax.Array:
    """Fake-quantize ``x`` (..., width) with fixed per-group parameters (n_groups,)."""
    g = x.shape[-1] if spec.group_size == 0 else spec.group_size
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // g, g)
    out = fake_of_groups(xg, qp.scale.astype(jnp.float32), qp.zero_point.astype(jnp.float32), spec)
    return out.reshape(x.shape).astype(x.dtype)


def quantize_activation(x: jax.Array, spec: QuantSpec, static: QParams | None = None) -> jax.Array:
    """Dynamic (``static is None``) or static fake quantization along the last axis."""
    if static is not None:
        return fake_quant_static(x, static, spec)
    return fake_quant_spec(x.astype(jnp.float32), spec).astype(x.dtype)


class ChoiceQuant(NamedTuple):
    """A plan entry whose input-activation spec is picked at run time: ``candidates[index]``.

    ``index`` may be a traced int (e.g. one candidate of the granularity search under ``jax.vmap``):
    the input is fake-quantized by ``lax.switch`` over the candidates' dynamic activation specs,
    which runs one branch when unbatched and selects among all of them under ``vmap``. Weights are
    not touched (the search selects pre-quantized kernels itself)."""

    candidates: tuple[LayerQuant, ...]
    index: Any


def _shared_stats_ok(specs: list[QuantSpec | None], width: int) -> int:
    """The common subgroup size when every candidate is a dynamic integer min-max quantizer that
    differs only in group size (each a multiple of the subgroup), else 0."""
    if any(s is None for s in specs):
        return 0
    first = specs[0]
    same = all((s.format, s.bits, s.symmetric, s.method, s.clip_ratio, s.include_zero)
               == (first.format, first.bits, first.symmetric, first.method, first.clip_ratio, first.include_zero)
               for s in specs)
    if not same or first.format != "int" or first.method != "max":
        return 0
    sizes = [width if s.group_size == 0 else s.group_size for s in specs]
    g0 = math.gcd(*sizes)
    return g0 if all(width % g == 0 and g % g0 == 0 for g in sizes) else 0


def _choice_by_shared_stats(x: jax.Array, specs: list[QuantSpec], index: Any, g0: int) -> jax.Array:
    """Group min/max at the finest common subgroup once, coarsened per candidate (small arrays),
    the chosen candidate's range gathered, then ONE quantization pass: the same numbers as
    quantizing under the chosen spec, at about one candidate's cost under ``vmap``."""
    spec = specs[0]
    w = x.shape[-1]
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], w // g0, g0)
    if spec.symmetric:
        hi0 = jnp.max(jnp.abs(xg), axis=-1)
        lo0 = -hi0
    else:
        hi0, lo0 = jnp.max(xg, axis=-1), jnp.min(xg, axis=-1)
    los, his = [], []
    for s in specs:
        k = (w if s.group_size == 0 else s.group_size) // g0
        coarse = lambda a, f: jnp.repeat(f(a.reshape(*a.shape[:-1], a.shape[-1] // k, k), axis=-1), k, axis=-1)
        los.append(coarse(lo0, jnp.min))
        his.append(coarse(hi0, jnp.max))
    idx = jnp.asarray(index, jnp.int32)
    lo = jnp.take(jnp.stack(los), idx, axis=0) * spec.clip_ratio
    hi = jnp.take(jnp.stack(his), idx, axis=0) * spec.clip_ratio
    scale, zp = _int_params(lo, hi, spec.bits, spec.symmetric, spec.scale_dtype)
    return fake_of_groups(xg, scale, zp, spec).reshape(x.shape).astype(x.dtype)


def quantize_activation_choice(x: jax.Array, choice: ChoiceQuant) -> jax.Array:
    """Dynamic fake quantization of ``x`` under ``choice.candidates[choice.index].act``."""
    specs = [lq.act for lq in choice.candidates]
    g0 = _shared_stats_ok(specs, x.shape[-1]) if len(specs) > 1 else 0
    if g0:
        return _choice_by_shared_stats(x, specs, choice.index, g0)

    def branch(spec: QuantSpec | None) -> Callable[[jax.Array], jax.Array]:
        if spec is None:
            return lambda v: v
        return lambda v: fake_quant_spec(v.astype(jnp.float32), spec).astype(v.dtype)

    branches = [branch(spec) for spec in specs]
    if len(branches) == 1:
        return branches[0](x)
    return jax.lax.switch(jnp.asarray(choice.index, jnp.int32), branches, x)


def _choice_args(choice: ChoiceQuant, path: str, args: tuple, static: Mapping[str, Any], tap: Tap | None) -> list:
    if path in static:
        raise QditError(f"{path}: run-time group-size choice works with dynamic activations only, not static ones")
    out = []
    for i, a in enumerate(args):
        if isinstance(a, jax.Array) and a.ndim >= 2 and jnp.issubdtype(a.dtype, jnp.floating):
            a = quantize_activation_choice(a, choice)
        if tap is not None:
            tap(path, i, a)
        out.append(a)
    return out


def _make_interceptor(plan: Mapping[str, LayerQuant], static: Mapping[str, Any] | None, tap: Tap | None):
    static = static or {}

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = module_path(context.module)
        lq = plan.get(path)
        if isinstance(lq, ChoiceQuant):
            return next_fun(*_choice_args(lq, path, args, static, tap), **kwargs)
        if lq is None or lq.act is None:
            if tap is not None and lq is not None:
                for i, a in enumerate(args):
                    tap(path, i, a)
            return next_fun(*args, **kwargs)
        new_args = []
        for i, a in enumerate(args):
            if isinstance(a, jax.Array) and a.ndim >= 2 and jnp.issubdtype(a.dtype, jnp.floating):
                st = static.get(path)
                a = quantize_activation(a, lq.act, None if st is None else st[i])
                if tap is not None:
                    tap(path, i, a)
            new_args.append(a)
        return next_fun(*new_args, **kwargs)

    return interceptor


@contextlib.contextmanager
def quantized(plan: Mapping[str, LayerQuant], static: Mapping[str, Any] | None = None,
              tap: Tap | None = None) -> Iterator[None]:
    """Within this context, every Flax call of a planned layer quantizes its inputs."""
    with nn.intercept_methods(_make_interceptor(plan, static, tap)):
        yield


def quantized_apply_fn(cfg: DiTConfig, plan: Mapping[str, LayerQuant]):
    """``apply_fn(bundle, x, t, y)`` of the model with fake-quantized activations, where
    ``bundle = {"params": params, "static": static_act_params}`` (see ``make_bundle``).

    Weights are quantized beforehand (``quantize_model``). Static
    activation parameters travel as arguments, not constants, so one compiled sampler serves every
    model that shares the activation settings (different weights, bits of weights, calibrations).
    """
    model = DiT(cfg)
    plan = dict(plan)

    def apply_fn(bundle: Mapping[str, Any], x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        with quantized(plan, bundle.get("static") or None):
            return model.apply({"params": bundle["params"]}, x, t, y)

    return apply_fn


def make_bundle(params: Any, static: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The first argument of a quantized ``apply_fn``."""
    return {"params": params, "static": dict(static or {})}


# ----------------------------------------------------------------------------- layers and weights


def discover_layers(cfg: DiTConfig) -> list[LayerInfo]:
    """Every Dense and attention core of ``cfg``'s model, in call order, with its widths (no FLOPs)."""
    found: dict[str, LayerInfo] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, AttentionCore)):
            path = module_path(mod)
            if isinstance(mod, nn.Dense):
                found.setdefault(path, LayerInfo(path, "dense", int(args[0].shape[-1]), int(out.shape[-1])))
            else:
                found.setdefault(path, LayerInfo(path, "attention", int(args[0].shape[-1]), int(out.shape[-1])))
        return out

    def run(key):
        x = jnp.zeros((1, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
        with nn.intercept_methods(interceptor):
            return DiT(cfg).init(key, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))

    jax.eval_shape(run, jax.random.PRNGKey(0))
    return list(found.values())


def get_kernel(params: Any, path: str) -> Any:
    node = params
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise QditError(f"params have no layer {path!r}")
        node = node[part]
    return node


def set_leaf(params: Mapping[str, Any], path: str, name: str, value: Any) -> dict[str, Any]:
    """A copy of ``params`` with ``path/name`` replaced (copies only the dicts along the path)."""
    parts = path.split("/")
    out = dict(params)
    node = out
    for part in parts:
        node[part] = dict(node[part])
        node = node[part]
    node[name] = value
    return out
