"""The development bench's printed output: the Markdown table and the summary (from its JSON rows).

No torch: ``python benchmarks/quality.py --from results.json`` re-prints a saved run.
"""

from __future__ import annotations

from typing import Optional

from benchmarks.oracle import MAX_ASR

#: The targets of the summary: ASR at most 5% and clean accuracy at most 3 points below the original.
TARGET_ASR = 0.05
TARGET_DROP = 0.03

ORACLE_NOTE = (f"oracle columns: diagnosis only, never a decision. They use the triggered TEST set: the best "
               f"test clean accuracy at which test ASR <= {MAX_ASR:.0%}, pruning in mask order (the masks of "
               f"the method's repair, and of the reference ANP loop with the same iterations), up to half "
               f"the neurons; 'ACC at k' = k neurons pruned.")

COLUMNS = ("model", "source", "arch / norm", "attack → target", "random patch → target", "ACC before → after",
           "ASR before → after", "pruned", "time", "probe", "noise", "rule", "refinement", "meets target",
           "oracle (default masks)", "oracle (reference)")
#: A clean model meets its target when it loses at most this much accuracy.
TARGET_CLEAN_DROP = 0.01


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def probe_text(probe: Optional[dict], target: Optional[int], clean: bool = False) -> str:
    if not probe:
        return "not run"
    t = probe.get("suspected_target")
    if t is None:
        return f"none (top {probe['top']}, {probe['top_share']:.0%})"
    if clean:
        verdict = " (false alarm)"
    else:  # target None: an all-to-all attack has no single target
        verdict = (" (true)" if t == target else " (wrong)") if target is not None else ""
    return f"class {t}, {probe['top_share']:.0%}{verdict}"


def refinement_text(r: dict) -> str:
    """What the unlearning stage did: the scan, the classes unlearnt, the rounds kept and their lr."""
    un = (r.get("refinements") or {}).get("unlearn")
    if not un:
        return "-"
    m = un.get("metrics", {})
    scan = f"scan {int(m['scan_smallest'])} ({m['scan_anomaly']:.2f})" if "scan_smallest" in m else "no scan"
    if m.get("skipped"):
        return f"{scan}; skipped"
    classes = " and ".join(str(int(v)) for k, v in sorted(m.items()) if k.startswith("target_"))
    lrs = sorted({round(v, 4) for k, v in m.items() if k.startswith("lr_")}, reverse=True)
    lr_text = f" (lr {', '.join(f'{v:g}' for v in lrs)})" if lrs else ""
    control = f", control {m['control_acc']:.0f}%" if "control_acc" in m else ""
    return f"{scan}; class {classes}: {int(m.get('rounds', 0))} rounds kept{lr_text}{control}"


def meets_text(r: dict) -> str:
    if r.get("mode") == "all-to-all":
        return "- (all-to-all)"
    if r.get("source") == "clean":
        drop = r["acc_before"] - r["acc_after"]
        return f"{'yes' if drop <= TARGET_CLEAN_DROP + 1e-12 else 'no'} (drop {100 * drop:.1f})"
    return "-" if r.get("asr_after") is None else ("yes" if meets(r) else "no")


def row_cells(r: dict) -> list[str]:
    if r.get("error"):
        return [r["model"], r.get("source", "-"), "-", "-", "-", f"error: {r['error'][:80]}"] + \
            ["-"] * (len(COLUMNS) - 6)
    target = r.get("target")
    mode = r.get("mode", "all-to-one")
    attack = "clean (no backdoor)" if r.get("attack") is None else \
        f"{r['attack']} → {target if mode == 'all-to-one' else 'label + 1'}"
    control = r.get("random_control")
    control_text = "-" if control is None else f"{100 * control:.0f}%" + (" (fires)" if r.get("fires_for_random") else "")
    noise = "untargeted" if r.get("noise_target") is None else f"class {r['noise_target']}"
    if r.get("iterations") == 0:  # a default repair that did not need ANP (anp_onnx.pipeline)
        noise = "ANP not run"
    rule = r.get("rule_kind") or {True: "signal", False: "budget"}.get(r.get("signal_gone"), "-")
    check = r.get("torch_ort_check") or {}
    flag = " (torch ≠ ort!)" if check and not check.get("ok", True) else ""
    oracle = r.get("oracle_method", {}) or {}
    ref = r.get("oracle_reference", {}) or {}
    return [
        r["model"], r.get("source", "samples"), f"{r.get('arch', '-')} / {r.get('norm', '-')}", attack, control_text,
        f"{pct(r['acc_before'])} → {pct(r['acc_after'])}",
        "-" if r.get("asr_before") is None else f"{pct(r['asr_before'])} → {pct(r['asr_after'])}",
        f"{r['pruned']} / {r['neurons']}", f"{r['seconds']:.0f} s ({r['iterations']} it, {r['device']})" if r["iterations"]
        else f"{r['seconds']:.0f} s (ANP not run, {r['device']})",
        probe_text(r.get("probe"), target if mode == "all-to-one" else None, r.get("attack") is None),
        noise, rule, refinement_text(r), meets_text(r),
        (oracle.get("text", "-") + flag) if oracle else "-",
        (ref.get("text", "-") + (" (same loop)" if ref.get("same_loop_as_default") else "")) if ref else "-",
    ]


def table(rows: list[dict]) -> str:
    columns = list(COLUMNS)
    if any((r.get("oracle_reference") or {}).get("same_as_method") for r in rows):  # a --reference run
        columns[-2] = "oracle (method = reference masks)"
    lines = [ORACLE_NOTE, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    firing = [r for r in rows if r.get("fires_for_random")]
    if firing:
        lines += ["", "Triggers that also fire for random pixels on their location (card control "
                      "`metrics.controls_torch`, random patch on the trigger's pixels → target >= 30%): "
                  + ", ".join(f"{r['model']} ({100 * r['random_control']:.0f}%)" for r in firing)
                  + ". A trigger reconstructed for them need not match the card's pattern."]
    return "\n".join(lines)


def meets(r: dict) -> bool:
    return (r.get("asr_after") is not None and r["asr_after"] <= TARGET_ASR
            and r["acc_before"] - r["acc_after"] <= TARGET_DROP + 1e-12)


def summary(rows: list[dict]) -> str:
    ok_rows = [r for r in rows if not r.get("error")]
    backdoored = [r for r in ok_rows if r.get("mode", "all-to-one") == "all-to-one" and r.get("asr_after") is not None]
    lines = [f"Targets: ASR <= {TARGET_ASR:.0%} and ACC drop <= {100 * TARGET_DROP:g} points."]
    good = [r for r in backdoored if meets(r)]
    lines.append(f"All-to-one models meeting both: {len(good)} of {len(backdoored)}"
                 + (f" ({', '.join(r['model'] for r in good)})" if good else ""))
    for source in ("samples", "third-party"):
        part = [r for r in backdoored if r.get("source", "samples") == source]
        if part:
            lines.append(f"  {source}: {sum(map(meets, part))} of {len(part)}")
    for r in (r for r in ok_rows if r.get("source") == "clean"):
        drop = 100 * (r["acc_before"] - r["acc_after"])
        lines.append(f"Clean model {r['model']}: ACC {pct(r['acc_before'])} → {pct(r['acc_after'])} "
                     f"(drop {drop:.1f} points), {r['pruned']} neurons pruned, probe: "
                     f"{probe_text(r.get('probe'), None, clean=True)}")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines.append("Failed: " + ", ".join(f"{r['model']} ({r['error'][:60]})" for r in errors))
    return "\n".join(lines)
