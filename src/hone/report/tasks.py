"""The report's task table: eval_tasks.json rows with the change's own standard error, so a
change the items cannot tell from noise is not coloured as a gain or a loss."""

from __future__ import annotations

import math


def change_stderr(row: dict, metric: str = "acc") -> float | None:
    """Standard error of after - before, the two accuracies taken as independent (a bound: the
    same items on both sides make the true one smaller)."""
    b, a = row.get(f"{metric}_stderr_before"), row.get(f"{metric}_stderr_after")
    return math.hypot(b, a) if isinstance(b, (int, float)) and isinstance(a, (int, float)) else None


def verdict(change: float, stderr: float | None) -> str:
    """'good' / 'bad' for a change of more than two standard errors, '' within them."""
    if stderr is None or abs(change) <= 2 * stderr:
        return ""
    return "good" if change > 0 else "bad"


def task_rows(table: dict[str, dict]) -> list[dict]:
    rows = []
    for name, r in table.items():
        se = change_stderr(r)
        rows.append({"name": name, **r, "change_stderr": se, "verdict": verdict(r["acc_change"], se)})
    return rows
