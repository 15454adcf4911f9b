"""The CPU's int8 instruction sets, printed next to every speed figure (they decide what int8 gains)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def int8_instructions() -> dict:
    """{"cpu": model name, "int8_flags": [...present...], "vnni": bool, "cores": n, "load_avg_1m": x}."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    present = [f for f in INT8_FLAGS if f in flags]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {"cpu": model, "int8_flags": present, "vnni": any("vnni" in f for f in present),
            "cores": os.cpu_count(), "load_avg_1m": load}


def describe(info: dict | None = None) -> str:
    info = info or int8_instructions()
    kind = "VNNI" if info["vnni"] else ("AVX2 only" if "avx2" in info["int8_flags"] else "no AVX2")
    return (f"CPU {info['cpu']} ({info['cores']} cores), int8 instructions: {', '.join(info['int8_flags']) or 'none'} "
            f"-> {kind}; load average {info['load_avg_1m']:.2f}")
