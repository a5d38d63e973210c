"""The study's tables from its runs' json (``bench/study/*.json``, written by ``bench.priors``).

    python -m bench.study_table                  # bench/study/*.json -> bench/study.md

Runs named ``<name>-s<seed>`` are seeds of one study: their rows are the mean and standard
deviation over seeds, per checkpoint. The first table gives, per evidence-based variant, its
worst NLL gap to LA (val) over the trained checkpoints (step > 0) of every run: the criterion
"within 0.02 of LA (val) everywhere, with no validation data".
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from lalora.core.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = (
    ("rows", "standard", "init", "ours, marglik"),
    ("rows", "linear", "init", "ours, linear evidence"),
    ("sequences", "standard", "init", "/ sequences"),
    ("sequences", "linear", "init", "/ sequences, linear"),
    ("sequences_padded", "standard", "zero", "the paper's (padded, mean 0)"),
)


def key(v: dict) -> tuple[str, str, str]:
    return v["normalisation"], v["evidence"], v["mean"]


def load(out_dir: Path) -> dict[str, list[dict]]:
    """Study name -> its runs (one per seed, or one)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(out_dir.glob("*.json")):
        if path.name.endswith(".partial.json"):
            continue
        run = json.loads(path.read_text())
        m = re.fullmatch(r"(.+)-s(\d+)", path.stem)
        run["seed"] = int(m.group(2)) if m else None
        groups[m.group(1) if m else path.stem].append(run)
    return groups


def stat(values: list[float], digits: int = 3, kind: str = "f") -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}{kind}}"
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return f"{mean:.{digits}{kind}} ± {sd:.{digits}{kind}}"


def per_step(runs: list[dict]) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = defaultdict(list)
    for run in runs:
        for e in run["steps"]:
            steps[e["step"]].append(e)
    return dict(sorted(steps.items()))


def variant(e: dict, k: tuple[str, str, str]) -> dict:
    return next(v for v in e["variants"] if key(v) == k)


def gaps(groups: dict[str, list[dict]]) -> dict[tuple[str, str, str], list[tuple[str, float]]]:
    """Per variant: (study step, mean NLL - mean LA (val) NLL) at every trained checkpoint."""
    out: dict[tuple[str, str, str], list[tuple[str, float]]] = defaultdict(list)
    for name, runs in groups.items():
        for step, entries in per_step(runs).items():
            if step == 0:
                continue
            val = statistics.mean(e["la_val"]["nll"] for e in entries)
            for k in {key(v) for v in entries[0]["variants"]}:
                nll = statistics.mean(variant(e, k)["nll"] for e in entries)
                out[k].append((f"{name} {step}", nll - val))
    return out


def _cell(vs: list[dict], lam: bool = False) -> str:
    """NLL / ECE / mean confidence over seeds (and lambda in brackets)."""
    text = " / ".join(stat([v[m] for v in vs]) for m in ("nll", "ece", "conf"))
    if lam:
        text += f" ({stat([v['lambda'] for v in vs], 3, 'g')})"
    return text


def gap_lines(groups: dict[str, list[dict]]) -> list[str]:
    """The worst NLL gap of each variant to LA (val), over every run and trained checkpoint."""
    lines = [
        "## Worst NLL gap to LA (val) over the trained checkpoints",
        "",
        "| normalisation | evidence | prior mean | worst gap (where) | mean gap | within 0.02 |",
        "|---|---|---|---|---|---|",
    ]
    for k, rows in sorted(gaps(groups).items(), key=lambda kv: max(g for _, g in kv[1])):
        where, worst = max(rows, key=lambda r: r[1])
        mean = statistics.mean(g for _, g in rows)
        ok = "yes" if worst <= 0.02 else "no"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {worst:+.3f} ({where}) | {mean:+.3f} | {ok} |")
    return lines


def run_lines(name: str, runs: list[dict]) -> list[str]:
    """One run's tables: the scores per checkpoint, the mechanism, the shift."""
    seeds = sorted(r["seed"] for r in runs if r["seed"] is not None)
    first = runs[0]
    n = first["n"]
    note = re.sub(r", fine-tuning seed \d+$", "", first["note"])
    lines = [
        "",
        f"## {name}" + (f" (seeds {', '.join(map(str, seeds))})" if seeds else ""),
        "",
        f"{note}; {n['train']} training, {n['val']} validation, {n['test']} test "
        f"prompts. NLL / ECE / mean confidence; lambda in brackets.",
        "",
        "| step | MAP | temperature | LA (val) | " + " | ".join(h[3] for h in HEADLINE) + " |",
        "|---|---|---|---|" + "---|" * len(HEADLINE),
    ]
    for step, entries in per_step(runs).items():
        row = [
            str(step),
            _cell([e["map"] for e in entries]),
            _cell([e["temperature"] for e in entries]),
            _cell([e["la_val"] for e in entries], lam=True),
        ]
        row += [_cell([variant(e, h[:3]) for e in entries], lam=True) for h in HEADLINE]
        lines.append("| " + " | ".join(row) + " |")
    return lines + mechanism_lines(runs) + shift_lines(first)


def mechanism_lines(runs: list[dict]) -> list[str]:
    lines = [
        "",
        "| step | train conf | sum tr(Lambda_n) | delta' H delta (ours, init) | "
        "share of ||delta||^2 with h > lambda | symmetry share | ||grad log p(D)|| | "
        "gradient's log Z (linear) | trace padded / rows, all modules |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for step, entries in per_step(runs).items():
        ms = [e["mechanism"] for e in entries]
        ours = [variant(e, ("rows", "standard", "init")) for e in entries]
        lin = [variant(e, ("rows", "linear", "init")) for e in entries]
        lines.append(
            f"| {step} | {stat([m['train_confidence'] for m in ms], 4)} | "
            f"{stat([m['fisher_trace'] for m in ms], 3)} | "
            f"{stat([v['delta_h_delta'] for v in ours], 1)} | "
            f"{stat([v['share_above'] for v in ours], 4)} | "
            f"{stat([m['symmetry_share_init'] for m in ms], 3)} | "
            f"{stat([m['gradient_norm'] for m in ms], 3)} | "
            f"{stat([v['gradient_log_z'] for v in lin], 2)} | "
            f"{stat([m['trace_ratio_padded_to_rows'] for m in ms], 1)} |"
        )
    return lines


def shift_lines(first: dict) -> list[str]:
    lines = []
    for e in first["steps"]:
        for target, out in e.get("shift", {}).items():
            lines += ["", f"Shift at step {e['step']}: {first['dataset']} -> {target} "
                      "(NLL / ECE / mean confidence)", "",
                      "| method | NLL / ECE / conf |", "|---|---|"]  # fmt: skip
            lines += [
                f"| {k} | {v['nll']:.3f} / {v['ece']:.3f} / {v['conf']:.3f} |"
                for k, v in out.items()
            ]
    return lines


def write_table(out_dir: Path, path: Path) -> str:
    groups = load(out_dir)
    if not groups:
        raise SystemExit(f"no study results in {out_dir}")
    lines = [
        "# Which curvature scale and which prior: the study",
        "",
        "`python -m bench.study` (trains every run, scores it with `bench.priors`, writes this "
        "file); `python -m bench.study_table` rewrites it from `bench/study/*.json`. Per run "
        "and checkpoint, every variant's scalar prior precision maximises its own evidence on "
        "the training set (no validation data); LA (val) and temperature scaling use the "
        "validation split. Seeds: mean ± standard deviation.",
        "",
        *gap_lines(groups),
    ]
    for name, runs in groups.items():
        lines += run_lines(name, runs)
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "study"
    print(write_table(out, ROOT / "bench" / "study.md"))
