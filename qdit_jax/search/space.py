"""The search space of Q-DiT's granularity allocation: one group size per quantized block linear.

A *slot* is one of the four linears of a block (``attn/qkv``, ``attn/proj``, ``mlp/fc1``,
``mlp/fc2``); its weight and its input activation share the slot's group size, as in Q-DiT.
A slot's candidate sizes are those of a configurable list that divide the layer's input width
(Q-DiT uses {32, 64, 128, 192, 288} for DiT-XL/2, width 1152 / 4608). A *candidate* is a tuple
of group sizes, one per slot in model order; ``to_layer_config`` turns it into the per-layer
config that ``quantize_model`` / ``qdit quantize --per-layer`` read.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from qdit_jax.errors import QditError
from qdit_jax.models.dit import DiTConfig
from qdit_jax.quant.config import BLOCK_LINEARS, LayerInfo, LayerQuant, QuantConfig, qdit_rules, resolve
from qdit_jax.quant.interceptor import discover_layers

Candidate = tuple[int, ...]

# Q-DiT's candidate list for DiT-XL/2; the bundled Fashion-MNIST DiT (widths 256 / 1024) uses
# the powers of two up to 256.
QDIT_XL_GROUPS: tuple[int, ...] = (32, 64, 128, 192, 288)
FMNIST_GROUPS: tuple[int, ...] = (32, 64, 128, 256)


def default_group_choices(cfg: DiTConfig) -> tuple[int, ...]:
    """Q-DiT's list when it fits the model (XL/2-like widths), else powers of two 32..256."""
    if cfg.hidden_size % 288 == 0 and cfg.mlp_hidden % 288 == 0:
        return QDIT_XL_GROUPS
    return FMNIST_GROUPS


def parse_groups(text: str) -> tuple[int, ...]:
    """``"32,64,128"`` -> (32, 64, 128), with a clear error for anything else."""
    try:
        vals = tuple(int(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError:
        raise QditError(f"--groups must be comma-separated positive integers such as 32,64,128, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise QditError(f"--groups must be comma-separated positive integers such as 32,64,128, got {text!r}")
    return tuple(sorted(set(vals)))


@dataclasses.dataclass(frozen=True)
class Slot:
    """One searchable layer: its path, widths and the group sizes allowed for it."""

    path: str
    in_features: int
    out_features: int
    choices: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Slots (model order), the base settings each slot's group size is applied to, and the
    layers quantized but not searched (``fixed``: adaLN weights at the base rules' settings)."""

    slots: tuple[Slot, ...]
    base: Mapping[str, LayerQuant]
    fixed: Mapping[str, LayerQuant]
    wbits: int
    abits: int | None
    tokens: int  # tokens of one image forward (the cost model's T)

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of choices per slot."""
        return tuple(len(s.choices) for s in self.slots)

    def contains(self, cand: Sequence[int]) -> bool:
        return len(cand) == len(self.slots) and all(int(g) in s.choices for g, s in zip(cand, self.slots))

    def check(self, cand: Sequence[int]) -> Candidate:
        """``cand`` as a tuple of ints, or a QditError naming the first slot it does not fit."""
        cand = tuple(int(g) for g in cand)
        if len(cand) != len(self.slots):
            raise QditError(f"a candidate needs {len(self.slots)} group sizes (one per slot), got {len(cand)}")
        for g, s in zip(cand, self.slots):
            if g not in s.choices:
                raise QditError(f"group size {g} is not a choice of slot {s.path}; choose one of {list(s.choices)}")
        return cand

    def to_indices(self, cand: Sequence[int]) -> np.ndarray:
        """Group sizes -> per-slot choice indices (int32), the form the vmapped evaluator takes."""
        cand = self.check(cand)
        return np.asarray([s.choices.index(g) for g, s in zip(cand, self.slots)], np.int32)

    def from_indices(self, idx: Sequence[int]) -> Candidate:
        return tuple(s.choices[int(i)] for i, s in zip(idx, self.slots))

    def closest_uniform(self, group: int = 128) -> Candidate:
        """Every slot at ``group`` or, where it is not a choice, the closest valid size (ties: larger)."""
        return tuple(min(s.choices, key=lambda g: (abs(g - group), -g)) for s in self.slots)

    def random(self, rng: np.random.Generator) -> Candidate:
        """A uniformly random candidate (each slot independently)."""
        return tuple(s.choices[int(rng.integers(len(s.choices)))] for s in self.slots)

    def layer_quant(self, slot: int, group: int) -> LayerQuant:
        return self.base[self.slots[slot].path].with_group(int(group))

    def to_layer_config(self, cand: Sequence[int]) -> dict[str, LayerQuant]:
        """``{path: LayerQuant}`` for the searched slots (a per-layer config for ``QuantConfig``)."""
        cand = self.check(cand)
        return {s.path: self.layer_quant(i, g) for i, (g, s) in enumerate(zip(cand, self.slots))}

    def plan(self, cand: Sequence[int]) -> dict[str, LayerQuant]:
        """The whole quantization plan of ``cand``: searched slots plus the fixed layers."""
        return {**dict(self.fixed), **self.to_layer_config(cand)}

    def quant_config(self, cand: Sequence[int], name: str = "searched") -> QuantConfig:
        """A ``QuantConfig`` for ``quantize_model``: Q-DiT's rules overridden by ``plan(cand)``."""
        return QuantConfig(qdit_rules(self.wbits, self.abits), per_layer=self.plan(cand), name=name)

    def to_json_config(self, cand: Sequence[int], **metadata: Any) -> dict[str, Any]:
        """``{"layers": {path: {"weight": ..., "act": ...}}, ...metadata}`` for every quantized layer
        (slots and fixed ones): what ``qdit quantize --per-layer`` reads (``load_per_layer``)."""
        layers = {p: lq.to_dict() for p, lq in self.plan(cand).items()}
        return {"layers": layers, "group_sizes": list(self.check(cand)), **metadata}


def build_space(cfg: DiTConfig, wbits: int, abits: int | None, *, groups: Iterable[int] | None = None,
                w_sym: bool = False, a_sym: bool = False, method: str = "max", base_group: int = 128,
                layers: Sequence[LayerInfo] | None = None) -> SearchSpace:
    """The search space of ``cfg`` at W``wbits``A``abits``: Q-DiT's default rules, block linears as
    slots; a QditError when some slot has no candidate size that divides its input width."""
    groups = tuple(sorted(set(int(g) for g in (groups or default_group_choices(cfg)))))
    if not groups or any(g <= 0 for g in groups):
        raise QditError(f"group size candidates must be positive integers, got {list(groups)}")
    layers = list(layers) if layers is not None else discover_layers(cfg)
    info = {l.path: l for l in layers}
    # Base rules with group 0 (always valid) so resolve() accepts every layer; slots override it.
    fixed_group = base_group
    rules = qdit_rules(wbits, abits, w_group=0, a_group=0, w_sym=w_sym, a_sym=a_sym, method=method)
    plan = resolve(QuantConfig(rules), layers).as_dict()
    slots, base, fixed = [], {}, {}
    for path, lq in plan.items():
        li = info[path]
        if re.fullmatch(BLOCK_LINEARS, path):
            valid = tuple(g for g in groups if li.in_features % g == 0)
            if not valid:
                raise QditError(f"no candidate group size divides {path}'s input width {li.in_features} "
                                f"(candidates {list(groups)}); add a divisor of {li.in_features} to --groups")
            slots.append(Slot(path, li.in_features, li.out_features, valid))
            base[path] = lq
        else:  # adaLN: weight-only at the base group size (or per row if it does not divide)
            g = fixed_group if li.in_features % fixed_group == 0 else 0
            fixed[path] = lq.with_group(g)
    if not slots:
        raise QditError("this model has no block linears to search over")
    return SearchSpace(tuple(slots), base, fixed, wbits, abits, cfg.num_patches)
