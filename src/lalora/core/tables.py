"""The vocabulary of the study's tables, and the one markdown writer they share.

Method keys (``la_val``, as in the metric files and ``summary.json``) and their display names
(the Laplace-LoRA paper's Table 1), metric keys and their column names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

METHOD_NAMES = {
    "map": "MAP",
    "la": "LA",
    "la_val": "LA (val)",
    "llla": "LLLA",
    "temperature": "Temperature scaling",
    "mc_dropout": "MC dropout",
    "ensemble": "Checkpoint ensemble",
    "deep_ensemble": "Deep ensemble",
}
METRICS = ("acc", "nll", "ece", "brier")
METRIC_LABELS = {"acc": "ACC", "nll": "NLL", "ece": "ECE", "brier": "Brier"}


def markdown_lines(head: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """A GitHub markdown table, one string per line: ``| a | b |``, ``|---|---|``, rows."""
    head = [str(c) for c in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
