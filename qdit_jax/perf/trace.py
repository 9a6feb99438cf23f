"""Where a compiled program's device time goes: trace it with ``jax.profiler``, sum the traced
events per HLO instruction, and sort the instructions into kinds (GEMM library call, fused
attention, Pallas/Triton kernel, XLA fusion, copy) read from the compiled HLO text.

Why: the real low-bit forward is compared with bf16 layer by layer; isolated layer timings do not
show what XLA does to a layer inside the whole model (which fusions absorb a quantize pass or an
epilogue). ``profile_compiled`` answers that from one short trace, on any backend: on a GPU the
kernels of the device plane, on CPU the host thunks (the same HLO names). ``idle_gaps`` reads the
same trace for the time the device waits between kernels inside a call (``qdit bench --gaps``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import re
import tempfile
from typing import Any, Iterator, Sequence

# gemm: a library GEMM (cuBLAS / cuBLASLt custom call, a bare dot); gemm-fusion: an XLA fusion
# that computes a dot itself (XLA's own emitter, or the CPU backend's dot fusions); triton-gemm:
# XLA's Triton GEMM fusions; pallas/triton: a Pallas (or other Triton / Mosaic) custom call
KINDS = ("gemm", "gemm-fusion", "triton-gemm", "attention", "pallas/triton", "fusion", "copy/transpose", "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-$]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FUSION_KIND = re.compile(r'"kind":"([^"]+)"')
_CALLS = re.compile(r"calls=%?([\w.\-$]+)")
KERNEL_PREFIX = "kernel:"  # names of kernels known without an HLO annotation
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-$]+)\s*\(.*\)\s*->.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class OpTime:
    """Device time of one HLO instruction, per call of the program."""

    name: str
    kind: str
    shape: str
    us_per_call: float
    events_per_call: float


def hlo_kinds(hlo_text: str, entry_only: bool = False) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (kind, result shape) for the instructions of an optimized module;
    ``entry_only``: just the ENTRY computation's (the kernels the program launches)."""
    with_dot: set[str] = set()  # computations that contain a dot / convolution
    current = None
    for line in hlo_text.splitlines():
        c = _COMP.match(line)
        if c:
            current = c.group(1)
        elif current and (" dot(" in line or " convolution(" in line):
            with_dot.add(current)
    out: dict[str, tuple[str, str]] = {}
    in_entry = False
    for line in hlo_text.splitlines():
        if _COMP.match(line):
            in_entry = line.startswith("ENTRY")
            continue
        m = _INSTR.match(line)
        if not m or (entry_only and not in_entry):
            continue
        name, shape, opcode = m.groups()
        kind = _classify(opcode, line)
        if kind == "fusion" and (_CALLS.search(line) or [None, ""])[1] in with_dot:
            kind = "gemm-fusion"
        out[name] = (kind, shape)
    return out


def custom_call_targets(hlo_text: str) -> dict[str, int]:
    """How many custom calls of each target a compiled module holds (cuBLAS, cuDNN, Mosaic GPU, Triton):
    what XLA launches besides its own fusions."""
    return dict(collections.Counter(_TARGET.findall(hlo_text)))


def _classify(opcode: str, line: str) -> str:
    low = line.lower()
    if opcode == "custom-call":
        target = (_TARGET.search(line) or [None, ""])[1].lower()
        if "cublas" in target or "gemm" in target or "matmul" in target:
            return "gemm"
        if "fmha" in target or "cudnn" in target or "attention" in target:
            return "attention"
        if "attention" in (_OP_NAME.search(line) or [None, ""])[1].lower():
            return "attention"  # our attention kernels (Mosaic / Triton) run in a named scope saying so
        if "triton" in target or "mosaic" in target or "pallas" in target:
            return "pallas/triton"
        return "other"
    if opcode == "fusion":
        fk = (_FUSION_KIND.search(line) or [None, ""])[1].lower()
        if "triton_gemm" in fk:
            return "triton-gemm"
        if "cudnn" in fk or "fmha" in low:
            return "attention"
        if "cublas" in fk or "gemm" in fk:
            return "gemm"
        return "fusion"
    if opcode in ("dot", "convolution"):
        return "gemm"
    if opcode in ("copy", "transpose", "copy-start", "copy-done", "bitcast-convert"):
        return "copy/transpose"
    return "other"


def _stat(event: Any, key: str) -> Any:
    for k, v in event.stats:
        if k == key:
            return v
    return None


def op_times(xspace_path: str, module_substr: str) -> dict[str, tuple[float, int]]:
    """HLO op name -> (total ns, event count) over the whole trace.

    Device planes ("/device:...") are used when present, else the host plane (CPU backend). On a
    device plane, kernel events on the stream lines carry ``hlo_op``; the derived "XLA Ops" line
    repeats them, so it is used only when no stream line has any."""
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(xspace_path)
    planes = [p for p in pd.planes if p.name.startswith("/device:")] or \
             [p for p in pd.planes if p.name.startswith("/host:CPU")]
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for plane in planes:
        lines = list(plane.lines)
        per_line = []
        for line in lines:
            evs = []
            for e in line.events:
                op, mod = _stat(e, "hlo_op"), _stat(e, "hlo_module")
                if op and (mod is None or module_substr in str(mod)):
                    evs.append((str(op), float(e.duration_ns)))
            if evs:
                per_line.append((line.name, evs))
        chosen = [x for x in per_line if not x[0].startswith("XLA Ops")] or per_line
        for _, evs in chosen:
            for op, ns in evs:
                totals[op][0] += ns
                totals[op][1] += 1
    if not totals:  # a tracer without HLO annotations: fall back to the kernels' own names
        for plane in planes:
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    for e in line.events:
                        totals[KERNEL_PREFIX + e.name][0] += float(e.duration_ns)
                        totals[KERNEL_PREFIX + e.name][1] += 1
    return {k: (v[0], int(v[1])) for k, v in totals.items()}


def kernel_kind(name: str) -> str:
    """A kind for a GPU kernel known only by its name (no HLO annotation in the trace)."""
    low = name.lower()
    if any(s in low for s in ("fmha", "flash", "cudnn", "attention")):
        return "attention"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "cublas", "matmul", "gemv")):
        return "gemm"
    if "triton" in low:
        return "pallas/triton"
    if any(s in low for s in ("memcpy", "copy", "transpose")):
        return "copy/transpose"
    if "fusion" in low:
        return "fusion"
    return "other"


def kernel_events(xspace_path: str, kernel_names: bool = False) -> list[tuple[int, int, str]]:
    """(start ns, end ns, name) of every event on the device planes' stream lines (kernels, copies;
    CUDA-graph kernels included, whether or not they carry an HLO name), sorted by start; the host
    plane's HLO thunks when there is no device plane (CPU backend). Named by their HLO instruction
    where they carry one, or with ``kernel_names`` by the kernel itself (what a library call runs)."""
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(xspace_path)
    dev = [p for p in pd.planes if p.name.startswith("/device:")]
    out = []
    for plane in dev or [p for p in pd.planes if p.name.startswith("/host:CPU")]:
        for line in plane.lines:
            if dev and not line.name.startswith("Stream"):
                continue
            for e in line.events:
                name = _stat(e, "hlo_op")
                if name or dev:  # host lines also hold the Python / runtime spans around the thunks
                    out.append((int(e.start_ns), int(e.end_ns), str(e.name if kernel_names else name or e.name)))
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class Gaps:
    """Device idle time inside traced calls: ``span_us`` (first kernel start to last kernel end, per
    call), ``busy_us`` (the union of kernel intervals, per call), ``idle_us = span - busy``,
    ``count`` (idle intervals per call) and ``top``: (previous kernel, next kernel, total us per call,
    intervals per call), the largest first."""

    span_us: float
    busy_us: float
    idle_us: float
    count: float
    top: list[tuple[str, str, float, float]]


def idle_gaps(events: Sequence[tuple[int, int, str]], calls: int, top: int = 12) -> Gaps:
    """Where the device waits between kernels. ``events`` are (start, end, name) intervals of
    ``calls`` calls run one after another with a host sync between them: the ``calls - 1`` longest
    idle intervals are taken as those syncs and left out. Overlapping kernels (several streams)
    count once."""
    if calls < 1 or not events:
        raise ValueError(f"idle_gaps needs events of at least one call (got {len(events)} events, calls={calls})")
    ev = sorted(events)
    idle: list[tuple[int, str, str]] = []  # (ns, kernel that ended last, kernel that starts)
    busy, cur_s, cur_e, last = 0, ev[0][0], ev[0][1], ev[0][2]
    for s, e, name in ev[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            idle.append((s - cur_e, last, name))
            cur_s, cur_e, last = s, e, name
        elif e >= cur_e:
            cur_e, last = e, name
    busy += cur_e - cur_s
    between = set(sorted(range(len(idle)), key=lambda i: -idle[i][0])[:calls - 1])
    inside = [g for i, g in enumerate(idle) if i not in between]
    span = ev[-1][1] - ev[0][0] - sum(idle[i][0] for i in between)
    pairs: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for ns, a, b in inside:
        pairs[(_short(a), _short(b))][0] += ns
        pairs[(_short(a), _short(b))][1] += 1
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]
    return Gaps(span / calls / 1e3, busy / calls / 1e3, (span - busy) / calls / 1e3, len(inside) / calls,
                [(a, b, ns / calls / 1e3, n / calls) for (a, b), (ns, n) in ranked])


def _short(name: str) -> str:
    """A kernel name without its template / argument list and numeric suffix, for grouping."""
    name = re.split(r"[(<]", name, 1)[0]
    return re.sub(r"[._]\d+$", "", name)[:60]


def format_gaps(g: Gaps, title: str = "") -> str:
    """The span / busy / idle summary and the ``top`` kernel pairs around the idle time, as text."""
    rows = [f"gaps {title}: span {g.span_us / 1e3:.2f} ms per call, kernels busy {g.busy_us / 1e3:.2f} ms, "
            f"idle {g.idle_us / 1e3:.2f} ms in {g.count:.0f} intervals"]
    rows += [f"    {us:9.1f} us x{n:<6.3g} {a[:44]:44s} -> {b[:44]}" for a, b, us, n in g.top]
    return "\n".join(rows)


@contextlib.contextmanager
def trace_of(run: Any) -> Iterator[tuple[str, float]]:
    """(the path of a ``jax.profiler`` trace of ``run()`` (.xplane.pb, valid inside the ``with``), the wall
    seconds ``run()`` took inside it); ``run`` waits for its own results."""
    import time

    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError("jax.profiler wrote no .xplane.pb trace")
        yield paths[0], wall


@contextlib.contextmanager
def traced_calls(fn: Any, args_list: Sequence[tuple], calls: int) -> Iterator[str]:
    """The path of a ``jax.profiler`` trace (.xplane.pb, valid inside the ``with``) of ``calls`` synced
    calls of ``fn``, rotating among the input sets of ``args_list``, after one untraced warm-up call."""
    import jax

    def run() -> None:
        for i in range(calls):
            jax.block_until_ready(fn(*args_list[i % len(args_list)]))

    jax.block_until_ready(fn(*args_list[0]))
    with trace_of(run) as (path, _):
        yield path


def profile_compiled(compiled: Any, args_list: Sequence[tuple], calls: int = 3,
                     gaps: list[Gaps] | None = None) -> list[OpTime]:
    """Trace ``calls`` calls of a compiled JAX function (after one untraced warm-up) and return its
    HLO instructions with their device time per call, slowest first. With ``gaps`` (a list), the
    same trace's :func:`idle_gaps` is appended to it."""
    text = compiled.as_text()
    mod = re.search(r"HloModule\s+([\w.\-]+)", text)
    module = mod.group(1) if mod else ""
    with traced_calls(compiled, args_list, calls) as path:
        times = op_times(path, module)
        if gaps is not None:
            gaps.append(idle_gaps(kernel_events(path), calls))
    kinds = hlo_kinds(text)

    def kind_shape(name: str) -> tuple[str, str]:
        if name.startswith(KERNEL_PREFIX):
            return kernel_kind(name[len(KERNEL_PREFIX):]), "?"
        return kinds.get(name, ("other", "?"))

    out = [OpTime(name, *kind_shape(name), ns / calls / 1e3, n / calls) for name, (ns, n) in times.items()]
    return sorted(out, key=lambda o: -o.us_per_call)


def summarize(ops: Sequence[OpTime]) -> dict[str, float]:
    """Microseconds per call by kind (``KINDS``) plus 'total'."""
    out = {k: 0.0 for k in KINDS}
    for o in ops:
        out[o.kind] = out.get(o.kind, 0.0) + o.us_per_call
    out["total"] = sum(o.us_per_call for o in ops)
    return out


def format_profile(ops: Sequence[OpTime], top: int = 25, title: str = "") -> str:
    """A kind summary and the ``top`` slowest instructions, as text."""
    s = summarize(ops)
    tot = s["total"] or 1.0
    rows = [f"profile {title}: {s['total'] / 1e3:.2f} ms of traced device time per call"]
    rows += [f"  {k:15s} {s[k] / 1e3:9.3f} ms  {100 * s[k] / tot:5.1f}%" for k in KINDS if s[k]]
    rows.append(f"  top {top} instructions:")
    rows += [f"    {o.us_per_call:10.1f} us  {o.kind:14s} x{o.events_per_call:<5.3g} {o.name[:48]:48s} {o.shape[:40]}"
             for o in ops[:top]]
    graphs = sum(o.us_per_call for o in ops if o.name.startswith("command_buffer"))
    if graphs > 0.5 * tot:
        rows.append("  most time is inside XLA command buffers (CUDA graphs), which hide the kernels: run with "
                    "XLA_FLAGS=--xla_gpu_enable_command_buffer= to see them")
    return "\n".join(rows)
