"""Two verdicts on an export: is the written file valid, and is the repair good?

The first is the library's verification (onnx.checker and onnxruntime against the pruned model);
the export fails without it. The second reads what the :class:`anp_onnx.RepairResult` measured:
clean accuracy before and after (test set, else the held-out images) against the accuracy budget,
and whether the backdoor is gone (attack success rate on a triggered test set; the curve's
backdoor signal of the suspected target). A valid file can still be a bad repair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from anp_onnx import DEFAULT_MAX_DROP, DEFAULT_SIGNAL_MAX_DROP, RepairResult

#: An attack success rate at or below this counts as the backdoor removed (the README's target).
ASR_TARGET = 0.05


@dataclass
class RepairVerdict:
    """``good``: True (looks good), False (a figure says to check it), None (the backdoor was not measured)."""

    good: Optional[bool]
    headline: str
    findings: list[str] = field(default_factory=list)   # measured facts that look fine
    warnings: list[str] = field(default_factory=list)   # measured facts that do not


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def judge(result: RepairResult) -> RepairVerdict:
    """Read the repair's measurements: accuracy against the budget, and the backdoor (ASR, signal)."""
    curve = result.curve
    budget = curve.max_drop if curve is not None else DEFAULT_MAX_DROP
    findings: list[str] = []
    warnings: list[str] = []
    pairs = [(result.before, result.after, f"test accuracy ({result.before.n_clean if result.before else 0} images)"),
             (result.holdout_before, result.holdout_after, "held-out clean accuracy")]
    for before, after, name in pairs:
        if before is not None and after is not None and before.accuracy is not None and after.accuracy is not None:
            drop = before.accuracy - after.accuracy
            text = f"{name} {_pct(before.accuracy)} → {_pct(after.accuracy)}"
            if drop > budget + 1e-9:
                allowed = (f"; the backdoor-signal rule may spend up to {100 * DEFAULT_SIGNAL_MAX_DROP:g} points"
                           if curve is not None and curve.signal_gone else "")
                warnings.append(f"{text}: {100 * drop:.1f} points lost, more than the budget of "
                                f"{100 * budget:g} points{allowed}")
            else:
                findings.append(f"{text}: within the budget of {100 * budget:g} points")
            break  # the test set when there is one, else the held-out images
    backdoor_measured = False
    before, after = result.before, result.after
    if before is not None and after is not None and before.asr is not None and after.asr is not None:
        backdoor_measured = True
        text = f"attack success rate {_pct(before.asr)} → {_pct(after.asr)}"
        if after.asr > ASR_TARGET:
            warnings.append(f"{text}: the backdoor still works (above {_pct(ASR_TARGET)})")
        else:
            findings.append(f"{text}: the backdoor no longer works")
    if curve is not None and curve.signal_gone is not None:
        backdoor_measured = True
        target = curve.suspected_target
        if not curve.signal_gone:
            warnings.append(f"the backdoor signal of suspected target {target} did not go within "
                            f"{100 * DEFAULT_SIGNAL_MAX_DROP:g} points of accuracy")
        elif result.plan.count < curve.chosen.count:
            warnings.append(f"fewer neurons pruned ({result.plan.count}) than the {curve.chosen.count} that "
                            f"removed the backdoor signal of suspected target {target}")
        else:
            findings.append(f"the backdoor signal of suspected target {target} is gone "
                            f"(from {curve.chosen.count} neurons pruned)")
    if warnings:
        return RepairVerdict(False, "check before use", findings, warnings)
    if not backdoor_measured:
        return RepairVerdict(None, "not confirmed", findings,
                             ["whether the backdoor is gone was not measured: no triggered test set, and the "
                              "collapse probe named no suspected target"])
    return RepairVerdict(True, "looks good", findings, warnings)
