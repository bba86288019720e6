"""The "Failures and recoveries" part of the report, from ``events.jsonl`` and ``samples.jsonl``."""

from __future__ import annotations

from pathlib import Path

from hone.heal.accounting import audit
from hone.rundir import read_events, read_json


def recovery_rows(events: list[dict]) -> list[dict]:
    """One row per failure: what was seen, what was decided at what expected cost, and how
    long it took until the next completed step."""
    t0 = events[0]["time"] if events else 0.0
    rows: list[dict] = []
    blank = {"action": None, "new_world": None, "options": "", "plan": "", "recovery_s": None, "recovered_step": None,
             "lost_steps": None}
    for e in events:
        if e["kind"] == "nonfinite":  # the workers saw it; they roll back in place or stop
            rows.append({**blank, "t": round(e["time"] - t0, 1), "failure": "nonfinite", "rank": None,
                         "step": e.get("step"), "world": e.get("world"),
                         "detail": f"loss {e.get('loss')}, grad norm {e.get('grad_norm')}; "
                                   f"skipped batches {e.get('skip_batches')}"})
        elif e["kind"] == "failure" and e["failure"] == "nonfinite" and rows and rows[-1]["failure"] == "nonfinite":
            continue  # the supervisor's view of the same NaN (workers stopped: no checkpoint yet)
        elif e["kind"] == "failure":
            rows.append({**blank, "t": round(e["time"] - t0, 1), "failure": e["failure"], "rank": e.get("rank"),
                         "step": e.get("step"), "detail": e.get("detail", ""), "world": e.get("world")})
        elif e["kind"] == "decision" and e.get("failure") == "repaired":
            rows.append({**blank, "t": round(e["time"] - t0, 1), "failure": "repaired", "rank": None,
                         "step": e.get("step"),
                         "detail": "lost device back", "world": None, **_decision(e)})
        elif e["kind"] == "decision" and rows:
            rows[-1].update(_decision(e))
        elif e["kind"] == "recovered" and rows:
            rows[-1].update(recovery_s=e.get("recovery_s"), recovered_step=e.get("step"),
                            lost_steps=e.get("lost_steps"))
    return rows


def _decision(e: dict) -> dict:
    options = " / ".join(f"{o['action']} on {o['world']}: {o['cost_s']:.1f} s" for o in e.get("options", []))
    return {"action": e.get("action"), "new_world": e.get("world"), "options": options,
            "plan": plan_text(e.get("plan"))}


def plan_text(plan: dict | None) -> str:
    """``dp 3 x tp 1, micro-batch 4, 0.41 GiB per device (hone.plan on 4xcpu)``, or '' without a plan."""
    if not plan or not plan.get("dp"):
        return ""
    text = f"dp {plan['dp']} x tp {plan['tp']}, micro-batch {plan.get('micro_batch')}"
    if plan.get("memory_gib") is not None:
        text += f", {plan['memory_gib']:.2f} GiB per device"
    return f"{text} ({plan.get('source', '')})"


def heal_context(workdir: Path) -> dict | None:
    """Everything the report shows about failures, or None for a run without events."""
    events = read_events(workdir)
    if not events:
        return None
    ctx = {"rows": recovery_rows(events),
           "stragglers": [e for e in events if e["kind"] == "straggler"],
           "intervals": [e for e in events if e["kind"] == "checkpoint_interval"],
           "finished": next((e for e in reversed(events) if e["kind"] == "finished"), None)}
    if (Path(workdir) / "samples.jsonl").exists():
        seq_len = None
        recipe = Path(workdir) / "recipe.json"
        if recipe.exists():
            seq_len = read_json(recipe).get("recipe", {}).get("train", {}).get("seq_len")
        if seq_len:
            lengths = {}
            for index in (Path(workdir) / "tokens" / "train").glob("*/index.json"):
                lengths[index.parent.name] = read_json(index).get("tokens")
            ctx["accounting"] = audit(Path(workdir) / "samples.jsonl", seq_len,
                                      {k: v for k, v in lengths.items() if v})
    return ctx
