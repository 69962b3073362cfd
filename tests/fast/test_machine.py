"""What the worker makes of the machine: the dtype "auto" resolves to, and the allocator."""

from __future__ import annotations

import os

import pytest

from worker.machine import cpu_flags, preload_tcmalloc, resolve_dtype

# Excerpts of /proc/cpuinfo: the 2-core AMD EPYC (AVX2 only) the issue was measured on, an Intel
# Sapphire Rapids (AVX-512 BF16 and AMX), and an Arm Neoverse V2.
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu vme sse sse2 avx avx2 fma bmi2 sha_ni\n"
SAPPHIRE = (
    "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
)
NEOVERSE = "processor\t: 0\nFeatures\t: fp asimd sve sve2 bf16 i8mm\n"


def test_auto_is_float32_on_a_cpu_that_would_emulate_bf16():
    chosen = resolve_dtype("auto", on_gpu=False, flags=cpu_flags(EPYC))
    assert chosen.dtype == "float32" and "no native bf16" in chosen.why and chosen.warning is None


@pytest.mark.parametrize("cpuinfo", [SAPPHIRE, NEOVERSE], ids=["x86-avx512-amx", "arm-bf16"])
def test_auto_is_bfloat16_where_the_cpu_computes_it_natively(cpuinfo):
    chosen = resolve_dtype("auto", on_gpu=False, flags=cpu_flags(cpuinfo))
    assert chosen.dtype == "bfloat16" and "natively" in chosen.why


def test_auto_is_never_float16_on_a_cpu_and_is_vllms_own_on_a_gpu():
    assert {resolve_dtype("auto", False, cpu_flags(info)).dtype for info in (EPYC, SAPPHIRE)} == {"float32", "bfloat16"}
    assert resolve_dtype("auto", on_gpu=True, flags=set()).dtype == "auto"


def test_an_explicit_dtype_is_honoured_with_a_warning_where_it_is_slow():
    emulated = resolve_dtype("bfloat16", on_gpu=False, flags=cpu_flags(EPYC))
    assert emulated.dtype == "bfloat16" and "6-8x slower" in (emulated.warning or "")
    assert resolve_dtype("bfloat16", on_gpu=False, flags=cpu_flags(SAPPHIRE)).warning is None
    assert "8x slower" in (resolve_dtype("float16", on_gpu=False, flags=cpu_flags(SAPPHIRE)).warning or "")
    assert resolve_dtype("float16", on_gpu=True, flags=set()).warning is None


def test_tcmalloc_is_preloaded_once_keeping_what_the_operator_preloads(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/theirs.so")
    found = preload_tcmalloc()
    assert found, "libtcmalloc-minimal4 is not installed (make install and .ci/run install it)"
    assert os.environ["LD_PRELOAD"] == f"{found}:/opt/theirs.so"
    assert preload_tcmalloc() is None and os.environ["LD_PRELOAD"] == f"{found}:/opt/theirs.so"
