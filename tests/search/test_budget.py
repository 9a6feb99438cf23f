import pytest

from qdit_jax.errors import QditError
from qdit_jax.search.budget import Budget, BudgetCheck, cost
from qdit_jax.search.space import build_space
from tests.search._tiny import TINY


def test_cost_against_hand_computed_case():
    # TINY: 16 tokens (8x8 / patch 2), hidden 64, mlp 256; slots qkv 64->192, proj 64->64,
    # fc1 64->256, fc2 256->64. W4A8, asymmetric both (3 epilogue MACs per group), 16-bit scales.
    space = build_space(TINY, 4, 8, groups=(16, 32, 64))
    cand = (16, 32, 64, 64)
    c = cost(space, cand)
    layers = [(64, 192, 16), (64, 64, 32), (64, 256, 64), (256, 64, 64)]
    macs = sum(16 * i * o for i, o, _ in layers)
    assert c.bitops_gemm == macs * 4 * 8
    groups = sum(16 * o * (i // g) for i, o, g in layers)  # (token, output, group) triples
    assert groups == 16 * (192 * 4 + 64 * 2 + 256 * 1 + 64 * 4)
    assert c.bitops_groups == groups * 3 * 256
    assert c.bitops == c.bitops_gemm + c.bitops_groups
    assert c.bytes_codes == sum(i * o for i, o, _ in layers) // 2  # 4-bit codes, two per byte
    n_scales = sum(o * (i // g) for i, o, g in layers)
    assert c.bytes_scales == 4 * n_scales and c.bytes_zero_points == n_scales
    assert c.mean_group == (16 + 32 + 64 + 64) / 4


def test_symmetric_and_8bit_costs():
    space = build_space(TINY, 8, 8, groups=(64,), w_sym=True, a_sym=True)
    c = cost(space, (64,) * 4)
    assert c.bytes_zero_points == 0
    assert c.bytes_codes == 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64
    assert c.bitops_groups == 16 * (192 + 64 + 256 + 64 * 4) * 1 * 256


def test_budget_parsing_and_checks():
    assert Budget.parse("mean-group=128") == Budget("mean-group", 128.0)
    assert Budget.parse("bitops=3.5G").value == 3.5e9
    assert Budget.parse("bytes=2Mi").value == 2 * 2**20
    for bad in ("128", "flops=3", "bitops=abc", "bytes=-1", "mean-group=0"):
        with pytest.raises(QditError):
            Budget.parse(bad)
    space = build_space(TINY, 4, 8, groups=(16, 32, 64))
    check = BudgetCheck(space, Budget.parse("mean-group=40"))
    assert check((64, 16, 64, 16)) and not check((16, 16, 64, 16))
    b = cost(space, (32,) * 4).bytes
    check = BudgetCheck(space, Budget("bytes", b))
    assert check((32,) * 4) and check((64,) * 4) and not check((16, 32, 32, 32))
    with pytest.raises(QditError, match="cannot be met"):
        BudgetCheck(space, Budget.parse("mean-group=100"))
