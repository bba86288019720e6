"""`hone branch`: Branch-Train-Merge over the domains of a recipe's [experts] section.

    WORKDIR/experts/
      seed/                 the checkpoint every expert branches from (HF format; + seed phase run)
      NAME/                 one run directory per expert, trainable on its own:
        recipe.json           the expert's recipe (model = the seed, its own budget and mixture)
        tokens/train/NAME/    its documents (and tokens/train/general/ when domain_ratio < 1)
        heldout.jsonl         its held-out documents (out of every model's training)
        checkpoints/ metrics.jsonl final/ expert.json (written last: the expert is finished)
        launch/slurm.sbatch   the same training as a cluster job
      joint/                the baseline: one model on the union, the experts' total tokens
      merged/average/ merged/ensemble/
      eval.json             per domain: base, each expert, average, ensemble, joint; costs

Every expert is an independent job: finished experts (expert.json with the same hash) are
never touched again, so a domain added to the recipe later trains only its own expert.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from hone.errors import HoneError
from hone.experts.compare import compare_variants
from hone.experts.data import build_expert_data, interleave, read_done, training_rows, write_union_stream
from hone.experts.merge import average
from hone.model.hf import load_hf, save_hf
from hone.model.load import load_base_model
from hone.model.lora import merge_lora
from hone.plan.commands import expert_commands
from hone.recipe import ExpertDomain, Recipe
from hone.rundir import EXPERTS_DIR, ensure_dir, read_json, write_json, write_text
from hone.tokens import eos_id, tokenizer_hash
from hone.train.run import build_loader, total_steps, train_recipe
from hone.train.workdir import forget_training, recipe_hash, train_hash

Log = Callable[[str], None]
DONE_FILE = "expert.json"
JOINT, SEED = "joint", "seed"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expert_recipe(recipe: Recipe, name: str, seed_dir: Path, *, max_tokens: int, ratio: float, lr: float) -> Recipe:
    """The recipe of one expert's run directory: the parent's, with the seed as its model and the
    expert's own budget, mixture and learning rate. `python -m hone.train.worker --workdir`
    trains it like any run."""
    data = json.loads(recipe.model_dump_json())
    data["run"]["name"] = f"{recipe.run.name}/{name}"
    data["curate"]["domain"]["name"] = name
    data["data"]["sources"] = []  # an expert trains on its own documents and the pool's replay
    data["model"] = {"source": "hf", "path": str(Path(seed_dir).resolve())}
    data["train"].update(max_tokens=max_tokens, domain_ratio=ratio, lr=lr, mixture=None,
                         upsample_fraction=0.0, upsample_ratio=None)
    data["experts"] = {}
    return Recipe.model_validate(data)


def _spec_of(recipe: Recipe, spec: ExpertDomain) -> dict:
    t = recipe.train
    return {"max_tokens": spec.max_tokens or t.max_tokens, "ratio": spec.domain_ratio, "lr": spec.lr or t.lr}


def _write_run_recipe(edir: Path, erecipe: Recipe, key: str) -> None:
    write_json(edir / "recipe.json", {"hash": recipe_hash(erecipe), "train_hash": train_hash(erecipe),
                                      "expert_hash": key, "recipe": json.loads(erecipe.model_dump_json())})


def _train_run(erecipe: Recipe, edir: Path, resume: bool, max_steps: int | None, log: Log) -> dict | None:
    """Train one run directory in this process; export final/. None if stopped early."""
    if not resume:
        forget_training(edir, log)
    model, tok = load_base_model(erecipe, edir, log)
    summary = train_recipe(erecipe, edir, model, max_steps, log)
    if summary["steps"] < summary["total_steps"]:
        log(f"stopped at step {summary['steps']} of {summary['total_steps']}; run again with --resume")
        return None
    save_hf(merge_lora(model).to("cpu"), tok, edir / "final")  # an expert trained with train.lora: merged
    t = erecipe.train
    metrics = [json.loads(x) for x in (edir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (edir / "metrics.jsonl").exists() else []
    return {"steps": summary["total_steps"], "tokens": summary["total_steps"] * t.batch_size * t.seq_len,
            "train_s": round(sum(m.get("step_s", 0.0) for m in metrics), 3)}


def _prefixed(log: Log, name: str) -> Log:
    return lambda msg: log(f"[{name}] {msg}")


class Brancher:
    """The state of one `hone branch` call: the recipe, the run directory, the base model."""

    def __init__(self, recipe: Recipe, workdir: Path, recipe_path: Path | None, log: Log, base, tok,
                 eval_sets: dict[str, Path]) -> None:
        self.recipe, self.workdir, self.recipe_path, self.log = recipe, Path(workdir), recipe_path, log
        self.base, self.tok, self.eval_sets = base, tok, eval_sets
        self.cfg = recipe.experts
        self.root = ensure_dir(self.workdir / EXPERTS_DIR)
        self.specs = {s.name: s for s in self.cfg.domain}

    # -- per-expert data -----------------------------------------------------------------------
    def data(self, spec: ExpertDomain) -> dict:
        """Build (once) the expert's tokens and held-out set; rebuilt if its selection changed."""
        edir = self.root / spec.name
        key = _hash({"select": spec.model_dump(include={"sources", "keywords", "examples", "top_k", "domain_ratio",
                                                        "eval_set"}),
                     "heldout": [self.cfg.heldout_fraction, self.cfg.heldout_max_docs],
                     "corpus": read_json(self.workdir / "recipe.json")["hash"], "tok": tokenizer_hash(self.tok)})
        marker = edir / "data.json"
        done = read_done(marker)
        if done and done.get("key") == key:
            return done
        if (edir / DONE_FILE).exists():
            self.log(f"[{spec.name}] its data selection changed: the expert is rebuilt")
        shutil.rmtree(edir, ignore_errors=True)
        summary = {"key": key, **build_expert_data(self.workdir, ensure_dir(edir), spec, self.cfg, self.tok,
                                                   self.recipe.run.seed)}
        write_json(marker, summary)
        self.log(f"[{spec.name}] corpus: {summary['docs']} documents ({summary['train_docs']} for training, "
                 f"{summary['train_tokens']:,} tokens; {summary.get('heldout_docs', 0)} held out)")
        return summary

    # -- the seed ------------------------------------------------------------------------------
    def seed(self) -> Path:
        """``experts/seed/``: the recipe's model (or experts.seed), after the optional seed phase
        on the union of the domains. Built once: later domains branch from the same seed."""
        sdir = self.root / SEED
        key = _hash({"seed": self.cfg.seed, "seed_tokens": self.cfg.seed_tokens,
                     "model": read_json(self.workdir / "recipe.json")["hash"]})
        done = read_done(sdir / DONE_FILE)
        if done and done.get("hash") == key:
            return sdir / "final"
        # Without a seed phase the start point is the seed itself (no copy of a large model).
        start = sdir / ("start" if self.cfg.seed_tokens else "final")
        if self.cfg.seed == "model":
            save_hf(self.base.to("cpu"), self.tok, start)
        else:
            model, tok = load_hf(Path(self.cfg.seed))
            if tok is None:
                raise HoneError(f"experts.seed: {self.cfg.seed}: no tokenizer.json beside the weights")
            save_hf(model, tok, start)
        cost = {"tokens": 0, "train_s": 0.0}
        if self.cfg.seed_tokens:
            cost = self._union_run(SEED, start, self.cfg.seed_tokens, list(self.specs), resume=True, max_steps=None)
            if cost is None:
                raise HoneError("the seed phase stopped early; run again")
        write_json(sdir / DONE_FILE, {**cost, "run_hash": cost.get("hash"), "hash": key})
        return sdir / "final"

    # -- one expert ----------------------------------------------------------------------------
    def expert_key(self, spec: ExpertDomain, seed_dir: Path, data: dict) -> str:
        parents = {p: (read_done(self.root / p / DONE_FILE) or {}).get("hash") for p in spec.branch_from}

        return _hash({"train": _spec_of(self.recipe, spec), "data": data["key"], "base_train": train_hash(self.recipe),
                      "seed": (read_done(seed_dir.parent / DONE_FILE) or {}).get("hash"),
                      "branch_from": parents, "branch_weights": spec.branch_weights})

    def branch_point(self, spec: ExpertDomain, seed_dir: Path) -> Path:
        """The seed, or the weighted average of earlier experts (BTM's later branching)."""
        if not spec.branch_from:
            return seed_dir

        for p in spec.branch_from:
            if not (self.root / p / DONE_FILE).exists():
                raise HoneError(f"experts.domain {spec.name!r}: branch_from {p!r} is not trained yet")
        return average([self.root / p / "final" for p in spec.branch_from], self.root / spec.name / "branch_point",
                       spec.branch_weights or None)

    def setup(self, spec: ExpertDomain, seed_dir: Path) -> tuple[Path, Recipe, str, bool]:
        """The expert's run directory and recipe; True when it is finished (left untouched)."""
        edir = self.root / spec.name
        data = self.data(spec)
        key = self.expert_key(spec, seed_dir, data)
        done = read_done(edir / DONE_FILE)
        if done and done.get("hash") == key and (edir / "final" / "config.json").exists():
            return edir, None, key, True
        if done:
            self.log(f"[{spec.name}] its recipe changed since it was trained: training it again")
            (edir / DONE_FILE).unlink()
        start = self.branch_point(spec, seed_dir)
        s = _spec_of(self.recipe, spec)
        erecipe = expert_recipe(self.recipe, spec.name, start, max_tokens=s["max_tokens"], ratio=s["ratio"], lr=s["lr"])
        existing = read_done(edir / "recipe.json")
        if existing and existing.get("expert_hash") != key:
            forget_training(edir, self.log)  # checkpoints of another recipe must not be resumed
        _write_run_recipe(edir, erecipe, key)
        cmds = expert_commands(str(edir), str(self.recipe_path) if self.recipe_path else None, str(self.workdir),
                               spec.name)
        write_text(ensure_dir(edir / "launch") / "slurm.sbatch", cmds["slurm"])
        return edir, erecipe, key, False

    def train_expert(self, spec: ExpertDomain, seed_dir: Path, resume: bool, max_steps: int | None) -> bool:
        log = _prefixed(self.log, spec.name)
        edir, erecipe, key, finished = self.setup(spec, seed_dir)
        if finished:
            log("finished earlier: left as it is")
            return True
        t0 = time.perf_counter()
        result = _train_run(erecipe, edir, resume, max_steps, log)
        if result is None:
            return False
        write_json(edir / DONE_FILE, {"name": spec.name, "hash": key, **result,
                                      "wall_s": round(time.perf_counter() - t0, 3),
                                      "branch_from": spec.branch_from or [SEED]})
        log(f"trained: {result['tokens']:,} tokens in {result['train_s']:.1f}s -> {edir / 'final'}")
        return True

    # -- seed phase and joint baseline: a ratio-1 run on the experts' interleaved batches ------
    def _union_run(self, name: str, start: Path, tokens: int, domains: list[str], resume: bool,
                   max_steps: int | None) -> dict | None:
        """Train ``start`` on ``tokens`` tokens of the domains' own training batches, interleaved
        in proportion to the experts' budgets (the joint model sees what the experts saw)."""
        t = self.recipe.train
        budgets = {d: _spec_of(self.recipe, self.specs[d]) for d in domains}
        steps = {d: total_steps(t.model_copy(update={"max_tokens": b["max_tokens"]})) for d, b in budgets.items()}
        want = max(1, tokens // (t.batch_size * t.seq_len))
        total = sum(steps.values())
        counts = {d: max(1, round(want * steps[d] / total)) if want != total else steps[d] for d in domains}
        batches = {}
        for d in domains:
            self.data(self.specs[d])
            s = budgets[d]
            drecipe = expert_recipe(self.recipe, d, start, max_tokens=s["max_tokens"], ratio=s["ratio"], lr=s["lr"])
            batches[d] = training_rows(build_loader(drecipe, self.root / d), counts[d])
        rdir = self.root / name
        rows = [row for batch in interleave(batches, counts) for row in batch]
        n_tokens = sum(counts.values()) * t.batch_size * t.seq_len
        urecipe = expert_recipe(self.recipe, name, start, max_tokens=n_tokens, ratio=1.0, lr=t.lr)
        key = _hash({"counts": counts, "start": str(start), "train": json.loads(urecipe.train.model_dump_json()),
                     "data": {d: self.data(self.specs[d])["key"] for d in domains}})
        existing = read_done(rdir / "recipe.json")
        if existing and existing.get("expert_hash") != key:
            forget_training(rdir, self.log)
        write_union_stream(rows, rdir / "tokens" / "train" / name, eos_id(self.tok), tokenizer_hash(self.tok))
        _write_run_recipe(rdir, urecipe, key)
        self.log(f"[{name}] {n_tokens:,} tokens interleaved from " + ", ".join(f"{d} {c} batches" for d,
                                                                               c in counts.items()))
        result = _train_run(urecipe, rdir, resume, max_steps, _prefixed(self.log, name))
        return None if result is None else {**result, "hash": key, "domains": counts}

    def joint(self, seed_dir: Path, resume: bool, max_steps: int | None) -> bool:
        """One model on the union of the domains with the experts' total token budget."""
        t = self.recipe.train
        domains = list(self.specs)
        tokens = sum(total_steps(t.model_copy(update={"max_tokens": _spec_of(self.recipe,
                                                                             self.specs[d])["max_tokens"]}))
                     for d in domains) * t.batch_size * t.seq_len
        jdir = self.root / JOINT
        done = read_done(jdir / DONE_FILE)
        want = _hash({"domains": {d: read_done(self.root / d / "data.json")["key"] for d in domains},
                      "seed": (read_done(seed_dir.parent / DONE_FILE) or {}).get("hash"), "tokens": tokens,
                      "train": train_hash(self.recipe)})
        if done and done.get("want") == want:
            self.log(f"[{JOINT}] finished earlier: left as it is")
            return True
        if done:
            (jdir / DONE_FILE).unlink()
        t0 = time.perf_counter()
        result = self._union_run(JOINT, seed_dir, tokens, domains, resume, max_steps)
        if result is None:
            return False
        write_json(jdir / DONE_FILE,
                   {"name": JOINT, "want": want, **result, "wall_s": round(time.perf_counter() - t0, 3)})
        return True


def check_branch(recipe: Recipe, only: list[str] | None, recipe_path: Path | None) -> None:
    """The recipe has experts, and ``only`` names some of them."""
    if not recipe.experts.domain:
        raise HoneError(f"{recipe_path or 'recipe'}: no [[experts.domain]] tables: nothing to branch")
    if not recipe.data.uses_pool:
        raise HoneError(f"{recipe_path or 'recipe'}: hone branch selects each expert's documents from the curated "
                        f"pool (data.packaged or data.inputs); [[data.sources]] alone are not supported yet")
    unknown = [n for n in (only or []) if n not in {d.name for d in recipe.experts.domain}]
    if unknown:
        known = ", ".join(d.name for d in recipe.experts.domain)
        raise HoneError(f"--only {unknown[0]!r}: no such expert in [experts] (known: {known})")


def run_branch(recipe: Recipe, workdir: Path, base, tok, eval_sets: dict[str, Path], *,
               recipe_path: Path | None = None, only: list[str] | None = None, resume: bool = False,
               with_joint: bool = False, max_steps: int | None = None, evaluate: bool = True,
               prepare_only: bool = False, log: Log = print) -> dict:
    """Branch, train (one expert after another), merge and compare; return experts/eval.json.

    The data stages have run (the curated corpus is in ``workdir``); ``base`` and ``tok`` are
    the recipe's model and tokenizer, ``eval_sets`` its evaluation sets."""
    check_branch(recipe, only, recipe_path)
    b = Brancher(recipe, workdir, recipe_path, log, base, tok, eval_sets)
    for spec in recipe.experts.domain:  # every domain's data, cheap: the seed phase and joint use them all
        b.data(spec)
    seed_dir = b.seed()
    todo = [s for s in recipe.experts.domain if not only or s.name in only]
    if prepare_only:
        for spec in todo:
            edir, _, _, finished = b.setup(spec, seed_dir)
            if not finished:
                cmds = expert_commands(str(edir), str(recipe_path) if recipe_path else None, str(workdir), spec.name)
                log(f"[{spec.name}] cluster job: {cmds['torchrun']}  (or sbatch {edir / 'launch' / 'slurm.sbatch'})")
                if cmds["finish"]:
                    log(f"[{spec.name}] afterwards: {cmds['finish']}")
        return {}
    complete = True
    for spec in todo:
        complete &= b.train_expert(spec, seed_dir, resume, max_steps)
    if with_joint and only:
        log("--with-joint is skipped with --only: the joint model needs every domain; run without --only")
    elif with_joint:
        complete &= b.joint(seed_dir, resume, max_steps)
    if not complete or not evaluate:
        return {}

    return compare_variants(b, seed_dir, log)
