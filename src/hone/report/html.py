"""Assemble report.html from the artifacts of a run directory.

Every section is optional: the report shows what the run has produced so far, so it can
be written for a partial run too.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from hone.errors import HoneError
from hone.heal.summary import heal_context  # events.jsonl: failures, decisions, recoveries
from hone.mix.decision import DECISION_FILE, PREDICTED
from hone.mix.laws import load_runs
from hone.report import plots
from hone.report.tasks import task_rows
from hone.rundir import (
    SAMPLES_TEXT_FILE,
    SOURCES_DIR,
    TOKENS_DIR,
    parts_manifest,
    read_events,
    read_json,
    read_jsonl,
    write_text,
)


def funnel_stages(manifest: dict) -> list[tuple[str, int]]:
    """(step name, documents out) in pipeline order, starting with documents read."""
    steps = manifest.get("steps", [])
    if isinstance(steps, dict):
        steps = [dict(name=k, **v) for k, v in steps.items()]
    out = []
    for i, step in enumerate(steps):
        if i == 0:
            out.append(("input", step["docs_in"]))
        out.append((step["name"], step["docs_out"]))
    for domain, n in manifest.get("domains", {}).items():
        out.append((f"→ {domain}", n["docs"] if isinstance(n, dict) else n))
    return out


def drop_reasons(manifest: dict) -> dict[str, int]:
    steps = manifest.get("steps", [])
    if isinstance(steps, dict):
        steps = list(steps.values())
    reasons: dict[str, int] = {}
    for step in steps:
        for reason, n in step.get("dropped", {}).items():
            count = n["docs"] if isinstance(n, dict) else n
            if count:
                reasons[reason] = reasons.get(reason, 0) + count
    return reasons


def _mixture(workdir: Path, recipe: dict | None) -> tuple[list[dict], dict | None]:
    """(proxy-run points, fitted mixture) from the run's train.mixture file, RUNDIR/mixture.json,
    RUNDIR/mix/mixture.json, or only the points of RUNDIR/mix/runs.jsonl."""
    candidates = [workdir / "mixture.json", workdir / "mix" / "mixture.json"]
    if recipe and (path := recipe.get("train", {}).get("mixture")):
        candidates.insert(0, Path(path))
    mixture = next((read_json(p) for p in candidates if p.exists()), None)
    if mixture is not None and not isinstance(mixture.get("points"), list):
        mixture = None
    if mixture is not None:
        return mixture["points"], mixture
    runs = workdir / "mix" / "runs.jsonl"
    return (load_runs(runs), None) if runs.exists() else ([], None)


def plan_rows(plan: dict, top: int = 10) -> list[dict]:
    """The plan's ranked configurations as table rows (missing fields left empty)."""
    rows = []
    for i, c in enumerate(plan.get("configs", [])[:top], 1):
        rows.append({"rank": i, **{k: c.get(k) for k in ("tp", "pp", "dp", "micro_batch", "recompute", "zero", "vpp",
                                                         "memory_gib_per_gpu", "step_time_s", "tokens_per_s", "mfu")}})
    return rows


def domain_sets(recipe: dict) -> list[str]:
    """Evaluation sets where a fall is the goal: the packaged 'domain' set and held-out domain sources."""
    sources = (recipe.get("data") or {}).get("sources") or []
    return ["domain"] + [s["name"] for s in sources if s.get("role", "domain") == "domain"]


def base_note(recipe: dict) -> str | None:
    """What the base model is, where that changes how to read the general figures."""
    model = recipe.get("model") or {}
    if model.get("source") == "smollm2":
        return ("The base is SmolLM2-135M-Instruct from its packaged GGUF file: 4-bit (Q4_1) weights, dequantized to "
                "fp32 for training. Part of any general improvement is recovery from that quantization.")
    if model.get("source") == "gguf":
        return ("The base came from a GGUF file; quantized weights were dequantized for training, so part of any "
                "general improvement may be recovery from quantization.")
    return None


def source_summaries(workdir: Path) -> list[dict]:
    """Each data source's counts (sources/NAME/train.done)."""
    out = []
    for marker in sorted((workdir / SOURCES_DIR).glob("*/train.done")):
        summary = read_json(marker).get("summary")
        if summary:
            out.append(summary)
    return out


def build_context(workdir: Path) -> dict:
    ctx: dict = {"workdir": str(workdir), "figures": {}}
    if (workdir / "recipe.json").exists():
        ctx["recipe"] = read_json(workdir / "recipe.json").get("recipe", {})
        ctx["name"] = ctx["recipe"].get("run", {}).get("name", workdir.name)
    manifest_path = parts_manifest(workdir / "corpus")
    if manifest_path.exists():
        manifest = read_json(manifest_path)
        ctx["manifest"] = manifest
        if stages := funnel_stages(manifest):
            ctx["figures"]["funnel"] = plots.funnel(stages)
            ctx["funnel"] = stages
        if reasons := drop_reasons(manifest):
            ctx["figures"]["drops"] = plots.drop_reasons(reasons)
            ctx["drops"] = reasons
        if retrieval := manifest.get("retrieval"):
            ctx["figures"]["retrieval"] = plots.retrieval(retrieval)
            ctx["retrieval"] = retrieval
    metrics = read_jsonl(workdir / "metrics.jsonl")
    if metrics:
        ctx["figures"]["loss"] = plots.loss_curves(metrics)
        if any(m.get("lr") is not None for m in metrics):
            schedule = ctx.get("recipe", {}).get("train", {}).get("schedule", "cosine")
            ctx["figures"]["lr"] = plots.learning_rate(metrics, schedule)
        ctx["train"] = metrics[-1]
    if (workdir / "eval.json").exists():
        table = read_json(workdir / "eval.json")
        ctx["eval"] = table
        ctx["figures"]["ppl"] = plots.perplexity(table)
    if (workdir / "eval_tasks.json").exists():  # eval.tasks: multiple-choice accuracy before and after
        ctx["tasks"] = task_rows(read_json(workdir / "eval_tasks.json"))
    ctx["domain_sets"] = domain_sets(ctx.get("recipe") or {})
    ctx["base_note"] = base_note(ctx.get("recipe") or {})
    if sources := source_summaries(workdir):
        ctx["sources"] = sources
    if (workdir / TOKENS_DIR / "ledger.json").exists():
        ctx["ledger"] = read_json(workdir / TOKENS_DIR / "ledger.json")
    if (workdir / SAMPLES_TEXT_FILE).exists():
        done = read_json(workdir / SAMPLES_TEXT_FILE)
        ctx["completions"] = [{"prompt": p, "before": (done.get("before") or [None] * (i + 1))[i],
                               "after": (done.get("after") or [None] * (i + 1))[i]}
                              for i, p in enumerate(done.get("prompts", []))]
    points, mixture = _mixture(workdir, ctx.get("recipe"))
    if points:
        ctx["mix_points"] = points
        ctx["mixture"] = mixture
        ctx["figures"]["mix"] = plots.mixture_fits(points, mixture)
    if (workdir / "plan.json").exists():
        plan = read_json(workdir / "plan.json")
        if isinstance(plan, dict) and (rows := plan_rows(plan)):
            ctx["plan"] = {"rows": rows, "model": (plan.get("model") or {}).get("name", ""),
                           "cluster": (plan.get("cluster") or {}).get("name", ""), "seq": plan.get("seq"),
                           "global_batch": plan.get("global_batch")}
    if (workdir / "experts" / "eval.json").exists():  # hone branch: per-domain comparison of the variants
        out = read_json(workdir / "experts" / "eval.json")
        if out.get("models"):
            ctx["experts"] = out
            ctx["figures"]["experts"] = plots.experts(out)

    if (workdir / DECISION_FILE).exists():  # the report's first section: what was decided, and how it went
        decision = read_json(workdir / DECISION_FILE)
        ctx["decision"] = decision_context(decision)
        ctx["decision"]["redecide"] = [e for e in read_events(workdir) if e.get("kind") == "redecide"]
        ctx["figures"]["decision"] = plots.decision_curve(decision, metrics)
    if (heal := heal_context(workdir)) is not None:
        ctx["heal"] = heal
    return ctx


def decision_context(d: dict) -> dict:
    """The decision's rows, predicted beside measured with the relative error of each."""
    measured, error = d.get("measured") or {}, d.get("error") or {}
    rows = [{"key": k, "predicted": d["predicted"].get(k), "measured": measured.get(k), "error": error.get(k)}
            for k in PREDICTED]
    return {**d, "rows": rows}


def write_report(workdir: Path) -> Path:
    """Render ``workdir/report.html`` from whatever artifacts the run has; return its path."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise HoneError(f"{workdir}: run directory not found")
    ctx = build_context(workdir)
    env = Environment(loader=PackageLoader("hone", "report"), autoescape=select_autoescape())
    html = env.get_template("report.html").render(**ctx)
    out = workdir / "report.html"
    write_text(out, html)
    return out
