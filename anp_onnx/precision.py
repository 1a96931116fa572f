"""Reduced precision for the steps that tolerate it (the unlearning rounds' trigger reconstruction and
training, each checked afterwards by the accuracy guard): bfloat16 autocast where the device computes
it natively, float32 elsewhere.

Measured (benchmarks/README.md, "What was tried for speed"): on the development CPU (AVX-512 BF16 and
AMX) one reconstruction step of the PreAct sample takes 38 ms in bfloat16 against 89 ms in float32,
with the same patch. Where the CPU has neither, bfloat16 is emulated and slower, so "auto" keeps
float32 there. Whatever decides runs in float32: the unlearning's per-class scan (which class, and
whether to unlearn at all: in bfloat16 it chose another class on one bench model), its accuracy
guard, ANP's masks, the pruning curve, the export and its verification.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16 support; a CPU with AVX-512 BF16 or AMX)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if callable(check))


def resolve_precision(precision: str, device: str) -> str:
    """"bf16" or "fp32" for ``precision`` ("auto": bf16 where :func:`native_bf16`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: str):
    """A context in which ``device``'s matrix products run in ``precision`` ("bf16" or "fp32", resolved)."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if precision == "bf16":
        # no cast cache: it keeps the first bfloat16 copy of each weight for the whole region, and the
        # unlearning updates its weights inside one (the forward passes would never see the updates)
        return torch.autocast(kind, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()
