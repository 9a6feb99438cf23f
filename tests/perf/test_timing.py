"""The two timing helpers: what they call, in which order, and what they return."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.perf.timing import chained_median, synced_calls


def test_synced_calls_warms_up_then_times_each_call_rotating_inputs():
    seen = []

    def fn(x):
        seen.append(int(x[0]))
        return x * 2

    sets = [(jnp.asarray([i]),) for i in range(3)]
    ts = synced_calls(fn, sets, repeats=4, warmup=2)
    assert len(ts) == 4 and all(t > 0 for t in ts)
    assert seen == [0, 1, 0, 1, 2, 0]  # two warm-up calls, then the sets in turn from the first


def test_chained_median_returns_an_output_and_the_per_call_time():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    out, t = chained_median(fn, (jnp.arange(4.0),), repeats=3, rounds=2, warmup=1)
    np.testing.assert_array_equal(np.asarray(out), [1.0, 2.0, 3.0, 4.0])
    assert t > 0 and len(calls) == 1 + 3 * 2


@pytest.mark.parametrize("call", [lambda: synced_calls(lambda: 0, [], 3), lambda: synced_calls(lambda: 0, [()], 0),
                                  lambda: chained_median(lambda: 0, (), 0), lambda: chained_median(lambda: 0, (), 2, 0)])
def test_bad_counts_are_named(call):
    with pytest.raises(ValueError, match="needs repeats >= 1"):
        call()


def test_cuda_event_median_checks_its_counts_before_touching_torch():
    from qdit_jax.perf.timing import cuda_event_median

    with pytest.raises(ValueError, match="repeats >= 1"):
        cuda_event_median(lambda: None, repeats=0)
