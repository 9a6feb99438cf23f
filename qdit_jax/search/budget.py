"""The compute budget of a granularity candidate: Q-DiT's mean-group constraint and a cost model.

Q-DiT constrains the search by the mean group size over the searched layers (>= C, default 128):
smaller groups mean more scales to store and more rescaling work. The cost model makes that
concrete, per searched linear of input width ``d_in``, output width ``d_out``, group size ``g``
and ``T`` tokens of one image forward (``n_g = d_in / g`` groups per row):

* **bit operations** ``T d_in d_out * wbits * abits`` (the integer MACs) plus the group
  epilogue: each (token, output, group) partial sum is rescaled by ``s_w * s_a`` (one
  multiply-accumulate) and, per asymmetric operand, corrected by its zero point (one more),
  each at ``scale_bits x scale_bits`` (fp16 scales: 16 x 16 = 256 bit operations);
* **bytes** of the weight codes (``d_in d_out`` codes, 2..4-bit codes packed two per byte, as
  ``qdit quantize`` stores them), fp32 scales (4 bytes per group and output channel) and uint8
  zero points (1 byte, asymmetric weights only).

A budget is stated either way: ``mean-group=128``, ``bitops=3.2e9`` or ``bytes=2.5M``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from qdit_jax.errors import QditError
from qdit_jax.search.space import SearchSpace

BUDGET_KINDS = ("mean-group", "bitops", "bytes")
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30}


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Constants of the cost model (see the module docstring)."""

    scale_bits: int = 16
    scale_bytes: int = 4
    zero_point_bytes: int = 1


@dataclasses.dataclass(frozen=True)
class Cost:
    """Costs of one candidate over the searched layers (per image forward for ``bitops``)."""

    mean_group: float
    bitops: float  # total = integer MACs + group epilogue
    bitops_gemm: float
    bitops_groups: float
    bytes: int  # total = codes + scales + zero points
    bytes_codes: int
    bytes_scales: int
    bytes_zero_points: int

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _code_bytes(n: int, bits: int) -> int:
    return (n + 1) // 2 if bits <= 4 else n


def cost(space: SearchSpace, cand: Sequence[int], model: CostModel = CostModel()) -> Cost:
    """Bit operations and bytes of ``cand`` (a tuple of group sizes) in ``space``."""
    cand = space.check(cand)
    t = space.tokens
    gemm = groups = 0.0
    codes = scales = zps = 0
    for g, slot in zip(cand, space.slots):
        lq = space.base[slot.path]
        w, a = lq.weight, lq.act
        d_in, d_out = slot.in_features, slot.out_features
        n_groups = d_in // g
        if w is not None:
            codes += _code_bytes(d_in * d_out, w.bits)
            scales += d_out * n_groups * model.scale_bytes
            if not w.symmetric:
                zps += d_out * n_groups * model.zero_point_bytes
        if w is not None and a is not None:
            gemm += t * d_in * d_out * w.bits * a.bits
            ops_per_group = 1 + int(not w.symmetric) + int(not a.symmetric)
            groups += t * d_out * n_groups * ops_per_group * model.scale_bits**2
    mean_group = sum(cand) / len(cand)
    return Cost(mean_group, gemm + groups, gemm, groups, codes + scales + zps, codes, scales, zps)


def _parse_number(text: str, spec: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]{0,2})\s*", text)
    if not m or m.group(2).lower() not in _SUFFIX:
        raise QditError(f"budget {spec!r}: {text!r} is not a number (examples: 128, 3.2e9, 2.5M, 4Mi)")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


@dataclasses.dataclass(frozen=True)
class Budget:
    """``kind`` in mean-group (a lower bound) / bitops / bytes (upper bounds) and its ``value``."""

    kind: str = "mean-group"
    value: float = 128.0

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise QditError(f"unknown budget kind {self.kind!r}; use one of {', '.join(BUDGET_KINDS)} (e.g. mean-group=128)")
        if not self.value > 0:
            raise QditError(f"budget {self.kind} must be positive, got {self.value}")

    @classmethod
    def parse(cls, spec: str) -> "Budget":
        """``"mean-group=128"``, ``"bitops=3.2e9"``, ``"bytes=2.5M"``."""
        if not isinstance(spec, str) or "=" not in spec:
            raise QditError(f"budget {spec!r} must read KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)}, "
                            "e.g. mean-group=128 or bitops=3.2e9")
        kind, value = (s.strip() for s in spec.split("=", 1))
        kind = kind.lower().replace("_", "-")
        if kind not in BUDGET_KINDS:
            raise QditError(f"unknown budget kind {kind!r} in {spec!r}; use one of {', '.join(BUDGET_KINDS)}")
        return cls(kind, _parse_number(value, spec))

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    def allows(self, c: Cost) -> bool:
        if self.kind == "mean-group":
            return c.mean_group >= self.value - 1e-9
        return (c.bitops if self.kind == "bitops" else c.bytes) <= self.value * (1 + 1e-12)


class BudgetCheck:
    """``space`` + ``budget``: fast feasibility of candidates, cached, with a clear error when even
    the cheapest candidate (the largest group everywhere) does not fit."""

    def __init__(self, space: SearchSpace, budget: Budget, model: CostModel = CostModel()) -> None:
        self.space, self.budget, self.model = space, budget, model
        self._cache: dict[tuple[int, ...], bool] = {}
        cheapest = tuple(max(s.choices) for s in space.slots)
        c = cost(space, cheapest, model)
        if not budget.allows(c):
            got = {"mean-group": c.mean_group, "bitops": c.bitops, "bytes": c.bytes}[budget.kind]
            raise QditError(f"budget {budget} cannot be met: the cheapest candidate (largest groups) has "
                            f"{budget.kind} {got:.4g}; relax the budget or add larger --groups")

    def cost(self, cand: Sequence[int]) -> Cost:
        return cost(self.space, cand, self.model)

    def __call__(self, cand: Sequence[int]) -> bool:
        key = tuple(int(g) for g in cand)
        if key not in self._cache:
            self._cache[key] = self.space.contains(key) and self.budget.allows(self.cost(key))
        return self._cache[key]
