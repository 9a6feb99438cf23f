"""The profile reader: HLO instructions sorted into kinds, and device time attributed to them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qdit_jax.perf.trace import custom_call_targets, format_profile, hlo_kinds, profile_compiled, summarize

HLO = """HloModule jit_f, is_scheduled=true

%fused_dot (p0: s8[64,32], p1: s8[16,32]) -> bf16[64,16] {
  %p0 = s8[64,32]{1,0} parameter(0)
  %p1 = s8[16,32]{1,0} parameter(1)
  %d = s32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %c = bf16[64,16]{1,0} convert(%d)
}

%fused_gelu (p0.1: bf16[64,16]) -> bf16[64,16] {
  %p0.1 = bf16[64,16]{1,0} parameter(0)
  ROOT %t = bf16[64,16]{1,0} tanh(%p0.1)
}

ENTRY %main.3 (a: s8[64,32], b: s8[16,32], q: bf16[2,8,4,16]) -> bf16[64,16] {
  %a = s8[64,32]{1,0} parameter(0)
  %b = s8[16,32]{1,0} parameter(1)
  %q = bf16[2,8,4,16]{3,2,1,0} parameter(2)
  %custom-call.1 = (s32[64,16]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"
  %custom-call.2 = (bf16[2,8,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax"
  %custom-call.3 = bf16[64,16]{1,0} custom-call(%a, %b), custom_call_target="__gpu$xla.gpu.triton"
  %custom-call.5 = bf16[2,8,64]{2,1,0} custom-call(%q, %q, %q), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(f)/DiT/blocks_0/attn/core/attention_mosaic/mpmd_map" source_file="x.py" source_line=1}
  %custom-call.6 = bf16[64,16]{1,0} custom-call(%a, %b), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(f)/DiT/blocks_0/attn/qkv/mpmd_map" source_file="attention_x.py" source_line=1}
  %gemm_fusion = bf16[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %loop_fusion = bf16[64,16]{1,0} fusion(%a, %b), kind=kLoop, calls=%fused_dot
  %copy.4 = bf16[64,16]{0,1} copy(%custom-call.3)
  ROOT %gelu_fusion = bf16[64,16]{1,0} fusion(%loop_fusion), kind=kLoop, calls=%fused_gelu
}
"""


def test_custom_call_targets_counts_each_target():
    assert custom_call_targets(HLO) == {"__cublas$lt$matmul": 1, "__cudnn$fmhaSoftmax": 1, "__gpu$xla.gpu.triton": 1,
                                        "mosaic_gpu_v2": 2}
    assert custom_call_targets(HLO.replace("__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax")) == {
        "__cublas$lt$matmul": 1, "__cudnn$fmhaSoftmax": 2, "mosaic_gpu_v2": 2}


def test_hlo_kinds_sorts_instructions():
    k = {name: kind for name, (kind, _) in hlo_kinds(HLO).items()}
    assert k["custom-call.1"] == "gemm"
    assert k["custom-call.2"] == "attention"
    assert k["custom-call.3"] == "pallas/triton"
    assert k["custom-call.5"] == "attention"  # a Pallas kernel in an attention scope (models.attention_mosaic)
    assert k["custom-call.6"] == "pallas/triton"  # a GEMM kernel: the source file's name does not count
    assert k["gemm_fusion"] == "triton-gemm"
    assert k["loop_fusion"] == "gemm-fusion"  # an XLA fusion that computes the dot itself
    assert k["gelu_fusion"] == "fusion"
    assert k["copy.4"] == "copy/transpose"
    assert hlo_kinds(HLO)["copy.4"][1].startswith("bf16[64,16]")


def test_profile_attributes_time_to_the_compiled_instructions():
    """On CPU: every profiled name is an instruction of the compiled module, and a 768^3 matmul
    outweighs an elementwise pass over a 768-vector."""
    f = jax.jit(lambda a, b, v: (jnp.tanh(a @ b), v * 2.0 + 1.0))
    r = np.random.default_rng(0)
    args = [(jnp.asarray(r.standard_normal((768, 768)), jnp.float32),
             jnp.asarray(r.standard_normal((768, 768)), jnp.float32),
             jnp.asarray(r.standard_normal(768), jnp.float32)) for _ in range(2)]
    compiled = f.lower(*args[0]).compile()
    ops = profile_compiled(compiled, args, calls=2)
    names = set(hlo_kinds(compiled.as_text()))
    assert ops and all(o.name in names for o in ops)
    assert all(o.us_per_call > 0 for o in ops)
    s = summarize(ops)
    assert s["gemm"] + s["gemm-fusion"] > 0.5 * s["total"]
    assert ops[0].kind in ("gemm", "gemm-fusion")
    text = format_profile(ops, top=3, title="t")
    assert "profile t" in text and ops[0].name[:20] in text


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
    ("cutlass3x_sm90_tensorop_i8816gemm_s8_s8_s32", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
    ("triton_softmax_1", "pallas/triton"),
    ("loop_add_fusion_3", "fusion"),
    ("Memcpy DtoD", "copy/transpose"),
    ("nccl_all_reduce", "other"),
])
def test_kernel_names_get_kinds(name, kind):
    """The fallback for traces whose kernels carry no HLO annotation."""
    from qdit_jax.perf.trace import kernel_kind

    assert kernel_kind(name) == kind


def test_format_profile_says_when_command_buffers_hide_the_kernels():
    from qdit_jax.perf.trace import OpTime

    hidden = [OpTime("command_buffer_12", "other", "?", 900.0, 1), OpTime("fusion.3", "fusion", "", 100.0, 1)]
    seen = [OpTime("gemm.1", "gemm", "", 900.0, 1), OpTime("command_buffer_1", "other", "?", 100.0, 1)]
    assert "xla_gpu_enable_command_buffer=" in format_profile(hidden)
    assert "xla_gpu_enable_command_buffer=" not in format_profile(seen)


def test_hlo_kinds_entry_only_skips_the_fused_computations():
    everything, entry = hlo_kinds(HLO), hlo_kinds(HLO, entry_only=True)
    assert "d" in everything and "t" in everything  # the dot / tanh inside fused computations
    assert "d" not in entry and "t" not in entry
    assert set(entry) == {"a", "b", "q", "custom-call.1", "custom-call.2", "custom-call.3", "custom-call.5",
                          "custom-call.6", "gemm_fusion", "loop_fusion", "copy.4", "gelu_fusion"}


def test_idle_gaps_counts_idle_time_inside_calls_only():
    """Two calls of three kernels (us): the sync between the calls is left out, overlapping kernels on
    two streams count once, and each idle interval is charged to the kernels around it."""
    from qdit_jax.perf.trace import idle_gaps

    us = 1000
    call = [(0, 10, "gemm.1"), (12, 20, "fusion.2"), (15, 18, "copy.3"), (25, 30, "gemm.1")]
    events = [(s * us, e * us, n) for s, e, n in call] + [((s + 500) * us, (e + 500) * us, n) for s, e, n in call]
    g = idle_gaps(events, calls=2)
    assert g.span_us == pytest.approx(30.0) and g.busy_us == pytest.approx(23.0)
    assert g.idle_us == pytest.approx(7.0) and g.count == pytest.approx(2.0)
    assert g.top[0] == ("fusion", "gemm", pytest.approx(5.0), pytest.approx(1.0))
    assert g.top[1] == ("gemm", "fusion", pytest.approx(2.0), pytest.approx(1.0))
    # one call: nothing is taken as a sync, so the 470 us between the copies is idle inside it
    assert idle_gaps(events, calls=1).idle_us == pytest.approx(14.0 + 470.0)
    with pytest.raises(ValueError, match="at least one call"):
        idle_gaps([], calls=1)


def test_profile_reports_gaps_of_a_real_trace():
    """On CPU: the host thunks of a traced program give a span no shorter than their busy time."""
    f = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b)
    r = np.random.default_rng(1)
    args = [(jnp.asarray(r.standard_normal((256, 256)), jnp.float32),
             jnp.asarray(r.standard_normal((256, 256)), jnp.float32))]
    found: list = []
    profile_compiled(f.lower(*args[0]).compile(), args, calls=2, gaps=found)
    (g,) = found
    assert g.busy_us > 0 and g.span_us >= g.busy_us - 1e-6
    assert g.idle_us == pytest.approx(g.span_us - g.busy_us)


def test_traced_calls_traces_the_calls_after_a_warmup():
    """One warm-up call outside the trace, then ``calls`` calls rotating the inputs; the path is a
    trace whose events kernel_events reads, by HLO name or (kernel_names) by the event's own name."""
    import os

    import jax
    import jax.numpy as jnp

    from qdit_jax.perf.trace import kernel_events, traced_calls

    seen = []

    def fn(x):
        seen.append(float(x[0, 0]))
        return jax.jit(lambda v: jnp.tanh(v @ v))(x)

    args = [(jnp.full((64, 64), float(i)),) for i in range(2)]
    with traced_calls(fn, args, calls=3) as path:
        assert os.path.exists(path) and path.endswith(".xplane.pb")
        by_hlo, by_kernel = kernel_events(path), kernel_events(path, kernel_names=True)
    assert seen == [0.0, 0.0, 1.0, 0.0]  # the warm-up, then the traced calls
    assert by_hlo and len(by_hlo) == len(by_kernel)
    assert [e[:2] for e in by_hlo] == [e[:2] for e in by_kernel]


def test_trace_of_times_what_it_traces():
    """``trace_of(run)``: run inside the trace, once, and its wall time; the path a trace file."""
    import os
    import time

    from qdit_jax.perf.trace import trace_of

    ran = []
    with trace_of(lambda: (time.sleep(0.05), ran.append(1))) as (path, wall):
        assert os.path.exists(path) and path.endswith(".xplane.pb")
    assert ran == [1] and 0.05 <= wall < 5
