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


# On a CPU the engine's threads spin on every core while a call runs; the worker's own loop (and a
# gateway on the same machine) then waits for the scheduler to get a turn, and every lease, post
# and answer is late. The engine yields to them: it has the cores whenever they are idle.
ENGINE_NICE = 5


def yield_to_control(nice: int = ENGINE_NICE) -> int:
    """Lower the scheduling priority of every thread of this process's descendants (the engine's
    processes, spawned by now) to ``nice``; how many threads. Linux only; elsewhere nothing."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/task").exists() else ():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    todo, threads = list(children.get(os.getpid(), [])), 0
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), max(nice, os.getpriority(os.PRIO_PROCESS, int(tid))))
                threads += 1
        except OSError:
            continue  # it ended meanwhile
    return threads
