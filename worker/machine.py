"""What this machine offers the engine: native bf16 or not, a GPU or not, and the allocator vLLM's
CPU backend wants. Read at start-up (and by ``--check``), never at import.

``dtype = "auto"`` resolves here. On a GPU it is vLLM's own ``auto`` (the model's dtype). On a
CPU it is bfloat16 only where the CPU computes it natively (AVX-512 BF16 or AMX on x86, the bf16
feature on Arm); elsewhere bf16 is emulated and measured 6-8x slower than float32, so it is
float32. Never float16 on a CPU (vLLM's own ``auto`` picks it there: 8x slower than bf16).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from worker.config import DtypeName

log = logging.getLogger(__name__)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# Debian's libtcmalloc-minimal4 (vLLM's CPU docs: preload it, or the engine's memory grows).
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


@dataclass(frozen=True)
class Dtype:
    dtype: DtypeName  # what vLLM is given
    why: str
    warning: str | None = None  # an explicit choice that costs speed here


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU's feature flags, from the text of /proc/cpuinfo (x86 ``flags``, Arm ``Features``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def resolve_dtype(requested: DtypeName, on_gpu: bool, flags: set[str]) -> Dtype:
    if on_gpu:
        if requested == "auto":
            return Dtype("auto", "on a GPU, vLLM's own choice (the model's dtype)")
        return Dtype(requested, "set in generator.dtype")
    native = sorted(flag for flag in NATIVE_BF16_FLAGS if flag in flags)
    if requested == "auto":
        if native:
            return Dtype("bfloat16", f"this CPU computes bf16 natively ({', '.join(native)})")
        return Dtype("float32", "this CPU has no native bf16 (no avx512_bf16 or amx_bf16): bf16 would be emulated, 6-8x slower")
    if requested == "bfloat16" and not native:
        return Dtype(
            requested,
            "set in generator.dtype",
            'generator.dtype = "bfloat16" on a CPU without native bf16: emulated, 6-8x slower than float32; '
            '"auto" picks float32 here',
        )
    if requested == "float16":
        return Dtype(
            requested,
            "set in generator.dtype",
            'generator.dtype = "float16" on a CPU: about 8x slower than bfloat16 or float32; "auto" avoids it',
        )
    return Dtype(requested, "set in generator.dtype")


def has_gpu() -> bool:
    import torch  # a second or two: only where an engine is about to start, or --check asks

    return bool(torch.cuda.is_available())


def this_cpu_flags() -> set[str]:
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return set()


def preload_tcmalloc() -> str | None:
    """Have the engine's processes (spawned from here) allocate with tcmalloc, as vLLM's CPU docs
    ask; the operator's own LD_PRELOAD is kept. The path used, or None where it is not installed."""
    found = next((path for path in TCMALLOC if Path(path).exists()), None)
    preloaded = os.environ.get("LD_PRELOAD", "")
    if found is None or "tcmalloc" in preloaded:
        return None
    os.environ["LD_PRELOAD"] = f"{found}:{preloaded}" if preloaded else found
    return found
