"""Which CPU a benchmark ran on: machines of one kind differ (an Intel Xeon with AMX, an AMD EPYC
without) in speed by up to 2x and in float rounding, so every figure names its CPU."""

from __future__ import annotations

from pathlib import Path

#: CPU flags that change what runs fast (bf16 autocast, oneDNN's kernels), recorded when present.
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_facts(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """``{"cpu_model": ..., "cpu_features": [...]}`` from ``cpuinfo`` (Linux); unknown elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"cpu_model": None, "cpu_features": []}
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), "cpu_features": [f for f in FEATURES if f in flags]}
