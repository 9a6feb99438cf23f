"""Timing JAX calls on an asynchronous device: the two ways every benchmark here times.

``synced_calls``: each call waited for (``block_until_ready``), rotating among input sets, after a
warm-up: for programs long enough that a host round trip per call is noise (a whole forward,
sampling). ``chained_median``: calls dispatched back to back and waited for once per round, the
median over rounds: for kernels of tens to hundreds of microseconds, where a round trip per call
would be timed too. Both return wall seconds measured with ``time.perf_counter``; nothing estimated.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence


def synced_calls(fn: Callable, args_list: Sequence[tuple], repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``repeats`` calls (each synced), after ``warmup`` calls, rotating among the
    input sets of ``args_list`` (several sets, so that no cache sees the same inputs twice in a row)."""
    if repeats < 1 or not args_list:
        raise ValueError(f"synced_calls needs repeats >= 1 and at least one input set (got {repeats}, "
                         f"{len(args_list)})")
    import jax  # here, not at import: the CLI imports this before it may set XLA flags

    for i in range(warmup):
        jax.block_until_ready(fn(*args_list[i % len(args_list)]))
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args_list[i % len(args_list)]))
        out.append(time.perf_counter() - t0)
    return out


def chained_median(fn: Callable, args: tuple, repeats: int, rounds: int = 5, warmup: int = 3) -> tuple[Any, float]:
    """(an output of ``fn(*args)``, median seconds per call): ``rounds`` rounds of ``repeats`` calls
    dispatched back to back and synced once, after ``warmup`` calls."""
    if repeats < 1 or rounds < 1:
        raise ValueError(f"chained_median needs repeats >= 1 and rounds >= 1 (got {repeats}, {rounds})")
    import jax

    out = None
    for _ in range(max(1, warmup)):
        out = jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(repeats)]
        jax.block_until_ready(outs)
        per_call.append((time.perf_counter() - t0) / repeats)
        out = outs[-1]
    return out, statistics.median(per_call)


def cuda_event_median(fn: Callable[[], Any], repeats: int, rounds: int = 5, warmup: int = 3) -> float:
    """Median seconds per call of a PyTorch CUDA callable: ``rounds`` rounds of ``repeats`` calls
    between two CUDA events, after ``warmup`` calls. For the benchmark scripts' outside-reference
    rows (cuBLASLt, cuDNN through PyTorch); needs torch with CUDA, imported here only."""
    if repeats < 1 or rounds < 1:
        raise ValueError(f"cuda_event_median needs repeats >= 1 and rounds >= 1 (got {repeats}, {rounds})")
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        per.append(start.elapsed_time(end) / 1e3 / repeats)
    return statistics.median(per)
