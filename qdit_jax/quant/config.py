"""Which layers are quantized, and how: ordered regex rules, presets, and per-layer configs.

A rule matches module paths such as ``blocks_3/attn/qkv`` (``re.fullmatch``); the first rule that
matches a layer decides its settings. A per-layer config (a mapping ``path -> LayerQuant``, what the
granularity search produces) overrides the rules for the layers it names. Every layer a config
names must exist; rules that match nothing are reported, so a typo cannot silently quantize less.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterable, Mapping

from qdit_jax.errors import QditError
from qdit_jax.quant import formats as F
from qdit_jax.quant.quantizers import QuantSpec

# The layers Q-DiT quantizes in every block: four linears get weight + input activation
# quantization; adaLN's modulation linear gets weight quantization only.
BLOCK_LINEARS = r"blocks_\d+/(attn/qkv|attn/proj|mlp/fc1|mlp/fc2)"
BLOCK_ADALN = r"blocks_\d+/adaLN_modulation"
ATTENTION_CORE = r"blocks_\d+/attn/core"
ACT_MODES = ("dynamic", "static")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """Settings of one layer: weight spec, input-activation spec (None = not quantized)."""

    weight: QuantSpec | None = None
    act: QuantSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict() if self.weight else None,
                "act": self.act.to_dict() if self.act else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "layer") -> "LayerQuant":
        if not isinstance(d, Mapping):
            raise QditError(f"{where}: expected a mapping with 'weight' and/or 'act', got {type(d).__name__}")
        unknown = sorted(set(d) - {"weight", "act"})
        if unknown:
            raise QditError(f"{where}: unknown keys {unknown}; a layer entry has 'weight' and 'act'")
        w, a = d.get("weight"), d.get("act")
        return cls(QuantSpec.from_dict(w) if w else None, QuantSpec.from_dict(a) if a else None)

    def with_group(self, group_size: int) -> "LayerQuant":
        """The same settings with one group size for weight and activation (a search slot)."""
        return LayerQuant(
            dataclasses.replace(self.weight, group_size=group_size) if self.weight else None,
            dataclasses.replace(self.act, group_size=group_size) if self.act else None)


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """``pattern`` (regex over the module path) -> settings; ``skip`` leaves matches unquantized."""

    pattern: str
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise QditError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "skip": self.skip, **LayerQuant(self.weight, self.act).to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantRule":
        if "pattern" not in d:
            raise QditError("a quantization rule needs a 'pattern'")
        lq = LayerQuant.from_dict({k: v for k, v in d.items() if k in ("weight", "act")}, f"rule {d['pattern']!r}")
        return cls(d["pattern"], lq.weight, lq.act, bool(d.get("skip", False)))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """A whole quantization recipe. ``act_mode``: 'dynamic' (Q-DiT) or 'static' (calibrated)."""

    rules: tuple[QuantRule, ...]
    per_layer: tuple[tuple[str, LayerQuant], ...] = ()
    act_mode: str = "dynamic"
    gptq: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.act_mode not in ACT_MODES:
            raise QditError(f"act_mode must be one of {ACT_MODES}, got {self.act_mode!r}")
        object.__setattr__(self, "rules", tuple(self.rules))
        pl = self.per_layer.items() if isinstance(self.per_layer, Mapping) else self.per_layer
        object.__setattr__(self, "per_layer", tuple(sorted((str(k), v) for k, v in pl)))

    def replace(self, **kw: Any) -> "QuantConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "act_mode": self.act_mode, "gptq": self.gptq,
                "rules": [r.to_dict() for r in self.rules],
                "per_layer": {k: v.to_dict() for k, v in self.per_layer}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        return cls(rules=tuple(QuantRule.from_dict(r) for r in d.get("rules", [])),
                   per_layer=load_per_layer(d.get("per_layer", {})),
                   act_mode=d.get("act_mode", "dynamic"), gptq=bool(d.get("gptq", False)),
                   name=d.get("name", "custom"))


def load_per_layer(d: Mapping[str, Any]) -> dict[str, LayerQuant]:
    """A per-layer config: ``{path: {"weight": spec, "act": spec}}`` (also the 'layers' entry of a
    search result file)."""
    if "layers" in d and isinstance(d["layers"], Mapping):
        d = d["layers"]
    return {str(k): LayerQuant.from_dict(v, f"per-layer entry {k!r}") for k, v in d.items()}


def read_per_layer(path: str) -> dict[str, LayerQuant]:
    try:
        with open(path) as f:
            return load_per_layer(json.load(f))
    except FileNotFoundError:
        raise QditError(f"per-layer config {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise QditError(f"per-layer config {path} is not valid JSON ({e})") from None


def qdit_rules(wbits: int, abits: int | None, *, w_group: int = 128, a_group: int = 128,
               w_sym: bool = False, a_sym: bool = False, method: str = "max", fmt: str = "int",
               quantize_attention: bool = False, adaln: bool = True,
               scale_dtype: str = "float32", a_fmt: str | None = None) -> tuple[QuantRule, ...]:
    """Q-DiT's default rules: block linears W+A, adaLN W only, optionally attention q/k/v inputs.
    ``scale_dtype``: storage dtype of the weight scales (activation scales are computed on the fly).
    ``fmt``: the code format of weights and activations; ``a_fmt``: the activations' if it differs
    (e.g. int 4-bit weights with fp8_e4m3 activations: W4A8 with FP8 activations, which real execution
    runs on fp8 tensor cores, the 4-bit codes being exact in e4m3)."""
    w = QuantSpec(bits=wbits, group_size=w_group, symmetric=w_sym, method=method, format=fmt,
                  scale_dtype=scale_dtype)
    a = QuantSpec(bits=abits, group_size=a_group, symmetric=a_sym, format=a_fmt or fmt) if abits else None
    rules = [QuantRule(BLOCK_LINEARS, w, a)]
    if adaln:
        rules.append(QuantRule(BLOCK_ADALN, dataclasses.replace(w)))
    if quantize_attention and a is not None:
        rules.append(QuantRule(ATTENTION_CORE, None, dataclasses.replace(a, group_size=0)))
    return tuple(rules)


PRESETS: dict[str, tuple[int, int]] = {"w8a8": (8, 8), "w6a8": (6, 8), "w4a8": (4, 8), "w4a4": (4, 4)}


def preset(name: str, **kw: Any) -> QuantConfig:
    """``w8a8`` / ``w6a8`` / ``w4a8`` / ``w4a4`` with Q-DiT's defaults (group 128, dynamic activations)."""
    if name not in PRESETS:
        raise QditError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    wb, ab = PRESETS[name]
    act_mode = kw.pop("act_mode", "dynamic")
    gptq = kw.pop("gptq", False)
    return QuantConfig(qdit_rules(wb, ab, **kw), act_mode=act_mode, gptq=gptq, name=name)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer of a model: its kind and widths (``in_features`` is the grouped axis)."""

    path: str
    kind: str  # "dense" or "attention"
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class ResolvedPlan:
    """The outcome of applying a config to a model's layers."""

    layers: tuple[tuple[str, LayerQuant], ...]  # quantized layers in model order
    unmatched_rules: tuple[str, ...]

    def as_dict(self) -> dict[str, LayerQuant]:
        return dict(self.layers)

    def report(self) -> str:
        lines = []
        for path, lq in self.layers:
            w = f"W{lq.weight.bits} g{lq.weight.group_size}{' sym' if lq.weight.symmetric else ''}" if lq.weight else "-"
            a = f"A{lq.act.bits} g{lq.act.group_size}{' sym' if lq.act.symmetric else ''}" if lq.act else "-"
            lines.append(f"{path:32s} {w:14s} {a}")
        for r in self.unmatched_rules:
            lines.append(f"rule {r!r} matched no layer")
        return "\n".join(lines)


def _check_divides(info: LayerInfo, spec: QuantSpec | None, what: str) -> None:
    if spec is None or spec.group_size == 0:
        return
    width = info.in_features
    if width % spec.group_size:
        valid = [d for d in F.divisors(width) if d > 1]
        raise QditError(f"{what} group size {spec.group_size} does not divide {info.path}'s input width {width}; "
                        f"use one of {valid} (or 0 for one group per row)")


def resolve(qcfg: QuantConfig, layers: Iterable[LayerInfo]) -> ResolvedPlan:
    """Apply rules then per-layer overrides to ``layers``; validate paths and group sizes."""
    layers = list(layers)
    by_path = {l.path: l for l in layers}
    unknown = [p for p, _ in qcfg.per_layer if p not in by_path]
    if unknown:
        known = ", ".join(list(by_path)[:6])
        raise QditError(f"the per-layer config names layer {unknown[0]!r}, which this model does not have "
                        f"({len(unknown)} unknown); layers look like: {known}, ...")
    overrides = dict(qcfg.per_layer)
    used = [False] * len(qcfg.rules)
    out = []
    for info in layers:
        lq = None
        for i, rule in enumerate(qcfg.rules):
            if rule.matches(info.path):
                used[i] = True
                lq = None if rule.skip else LayerQuant(rule.weight, rule.act)
                break
        if info.path in overrides:
            lq = overrides[info.path]
        if lq is None or (lq.weight is None and lq.act is None):
            continue
        if info.kind == "attention" and lq.weight is not None:
            raise QditError(f"{info.path} is the attention core (no weight); give it an 'act' spec only")
        _check_divides(info, lq.weight, "weight")
        _check_divides(info, lq.act, "activation")
        out.append((info.path, lq))
    unmatched = tuple(r.pattern for r, u in zip(qcfg.rules, used) if not u)
    return ResolvedPlan(tuple(out), unmatched)
