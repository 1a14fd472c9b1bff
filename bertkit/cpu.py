"""What this CPU computes natively, read at run time: the machines bertkit runs on vary (AVX2-only, AVX-512 with
VNNI and BF16, AMX), so no fast path is chosen by a build flag or a guess."""

from __future__ import annotations

import functools
import os
from pathlib import Path

# The x86 flags that decide bertkit's CPU paths (Linux /proc/cpuinfo names), and aarch64's bf16.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS).

    ``BERTKIT_CPU_FLAGS`` (space- or comma-separated, e.g. ``"avx2 fma"``) replaces them: to see which paths
    bertkit picks on another CPU, together with ``ONEDNN_MAX_CPU_ISA=AVX2`` and ``ATEN_CPU_CAPABILITY=avx2``,
    which make oneDNN and PyTorch use that CPU's kernels (``benchmarks/cpu_engines.py --emulate-avx2``)."""
    override = os.environ.get("BERTKIT_CPU_FLAGS")
    if override is not None:
        return frozenset(override.replace(",", " ").lower().split())
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, aarch64
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when bfloat16 matrix products run in hardware (AVX512-BF16, AMX-BF16, or aarch64 BF16); elsewhere
    PyTorch emulates them, slower than float32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def describe(flags: frozenset[str] | None = None) -> str:
    """One line for benchmark tables and bug reports, e.g. ``AVX2 AVX512F AVX512_VNNI AVX512_BF16``."""
    flags = cpu_flags() if flags is None else flags
    return " ".join(name.upper() for name in ISA_FLAGS if name in flags) or "no flags known"
