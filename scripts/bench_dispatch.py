"""Where a forward call's wall time goes beyond its kernels: host dispatch, per-call sync, and the
host-side spans of a traced call.

    python scripts/bench_dispatch.py --variants bf16 real-fp8-g128 --batch 256

For each variant (names of ``qdit bench``), DiT-XL/2 random weights: the median time for the host to
return from a call (dispatch only), the median per call when each call is synced
(``block_until_ready``, as ``qdit bench`` times), the per-call time of ``--chain`` calls dispatched back
to back and synced once, each for the AOT ``Compiled`` object and for the ``jax.jit`` function; then
one traced call: the device's kernel span (first kernel start to last end) against the call's wall
time, and the host-plane spans that take longest. Also: the compiled program's custom calls by target,
and the host return / synced time when every call passes the same input arrays. Why: ``qdit bench
--gaps`` showed the kernels of a bf16 forward idle < 1 ms inside a call, yet wall time is ~3 ms above
the kernel span.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qdit_jax.cli import bench
from qdit_jax.models.dit import dit_config
from qdit_jax.perf.compiler import compiler_options
from qdit_jax.perf.trace import custom_call_targets, format_gaps, idle_gaps, kernel_events, trace_of


def _median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def dispatch_times(fn, inputs: list[tuple], repeats: int, chain: int, sets: int = 2) -> dict[str, float]:
    """ms: host return of one call, one synced call (calls rotating over the first ``sets`` input sets:
    1, the same arrays every call), one call of a back-to-back chain."""
    for i in range(3):
        jax.block_until_ready(fn(*inputs[i % sets]))
    ret, sync = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = fn(*inputs[i % sets])
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        ret.append(t1 - t0)
        sync.append(t2 - t0)
    chained = chained_ms([fn], inputs, chain, max(2, repeats // 3))
    return {"return_ms": _median_ms(ret), "synced_ms": _median_ms(sync), "chained_ms": chained}


def chained_ms(fns: list, inputs: list[tuple], chain: int, rounds: int) -> float:
    """Median ms per call of ``chain`` calls dispatched back to back and synced once, call i running
    ``fns[i % len(fns)]`` on ``inputs[i % len(inputs)]`` (rotating inputs: ``perf.timing.chained_median``
    reuses one set)."""
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [fns[i % len(fns)](*inputs[i % len(inputs)]) for i in range(chain)]
        jax.block_until_ready(outs)
        per.append((time.perf_counter() - t0) / chain)
        del outs
    return _median_ms(per)


def chain_trace(compiled, inputs: list[tuple], chain: int) -> None:
    """Trace ``chain`` calls dispatched back to back (synced once) and print the device's idle time with the
    kernel pairs around it (``perf.trace.idle_gaps`` over the whole chain): with the host ahead, an idle
    stretch between two calls is work the device waits for."""
    jax.block_until_ready(compiled(*inputs[0]))
    with trace_of(lambda: jax.block_until_ready([compiled(*inputs[i % len(inputs)]) for i in range(chain)])
                  ) as (path, wall):
        ev = kernel_events(path, kernel_names=True)
    g = idle_gaps(ev, 1, top=2 * chain)  # one traced span: the gaps between calls are kept
    print(f"chain of {chain}: wall {wall * 1e3 / chain:.2f} ms a call, device span {g.span_us / 1e3 / chain:.2f} ms "
          f"a call, idle {g.idle_us / 1e3 / chain:.2f} ms a call", flush=True)
    print(format_gaps(g, f"chain of {chain}, totals over the chain"), flush=True)


def traced_call(compiled, inputs: list[tuple], top: int) -> None:
    """Print the kernel span of one traced call against its wall time, and the longest host spans."""
    from jax.profiler import ProfileData

    with trace_of(lambda: jax.block_until_ready(compiled(*inputs[0]))) as (path, wall):
        g = idle_gaps(kernel_events(path), calls=1)
        print(f"  traced call: wall {wall * 1e3:.2f} ms, kernel span {g.span_us / 1e3:.2f} ms, "
              f"busy {g.busy_us / 1e3:.2f} ms", flush=True)
        pd = ProfileData.from_file(path)
        spans: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for plane in pd.planes:
            if not plane.name.startswith("/host:CPU"):
                continue
            for line in plane.lines:
                for e in line.events:
                    spans[e.name[:70]][0] += e.duration_ns / 1e6
                    spans[e.name[:70]][1] += 1
        for name, (ms, n) in sorted(spans.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"    host {ms:9.3f} ms x{n:<6d} {name}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="XL/2")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=["bf16"])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--chain", type=int, default=8)
    p.add_argument("--top", type=int, default=25, help="host spans of a traced call to print (0: no trace)")
    p.add_argument("--chain-trace", action="store_true",
                   help="trace --chain calls dispatched back to back and print the device's idle time")
    p.add_argument("--alternate", action="store_true",
                   help="also time calls alternating between two compiled executables of the same program")
    a = p.parse_args()
    cfg = dit_config(a.model, dtype="bfloat16")
    params = bench.random_params(cfg)
    tiles = bench.parse_tiles("128,128,128,8,3")
    rng = np.random.default_rng(0)
    for name in a.variants:
        apply_fn, vparams, _ = bench.build_variant(name, cfg, params, tiles, False)
        inputs = [(vparams,
                   jnp.asarray(rng.standard_normal((a.batch, cfg.input_size, cfg.input_size, cfg.in_channels)),
                               jnp.float32),
                   jnp.asarray(rng.integers(0, 1000, a.batch), jnp.int32),
                   jnp.asarray(rng.integers(0, cfg.num_classes, a.batch), jnp.int32)) for _ in range(2)]
        opts = compiler_options()
        fwd = jax.jit(apply_fn, compiler_options=opts)
        compiled = fwd.lower(*inputs[0]).compile()
        leaves = len(jax.tree_util.tree_leaves(inputs[0]))
        print(f"{name} b{a.batch}: custom calls {custom_call_targets(compiled.as_text())}", flush=True)
        r = dispatch_times(compiled, inputs, a.repeats, a.chain, sets=1)
        print(f"{name} b{a.batch} Compiled, the same input arrays every call: host return {r['return_ms']:.3f} ms, "
              f"synced {r['synced_ms']:.2f} ms", flush=True)
        for label, fn in (("Compiled", compiled), ("jit", fwd)):
            r = dispatch_times(fn, inputs, a.repeats, a.chain)
            print(f"{name} b{a.batch} {label:8s} ({leaves} argument arrays): host return {r['return_ms']:.3f} ms, "
                  f"synced {r['synced_ms']:.2f} ms ({a.batch / r['synced_ms'] * 1e3:.1f} img/s), "
                  f"{a.chain} back to back {r['chained_ms']:.2f} ms ({a.batch / r['chained_ms'] * 1e3:.1f} img/s)",
                  flush=True)
        if a.alternate:
            compiled2 = fwd.lower(*inputs[0]).compile()  # a second executable: its own command buffers
            ms = chained_ms([compiled, compiled2], inputs, a.chain, max(2, a.repeats // 3))
            print(f"{name} b{a.batch} two executables alternating, {a.chain} back to back {ms:.2f} ms "
                  f"({a.batch / ms * 1e3:.1f} img/s)", flush=True)
        if a.chain_trace:
            chain_trace(compiled, inputs, a.chain)
        if a.top:
            traced_call(compiled, inputs, a.top)


if __name__ == "__main__":
    main()
