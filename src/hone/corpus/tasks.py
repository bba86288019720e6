"""The demo's two multiple-choice tasks, built from held-out documents the run never trains on,
written as lm-evaluation-harness task files (a YAML config beside its JSON-lines data).

    hone_go_term     domain:  which Gene Ontology term does this definition describe? (4 choices)
    hone_wiki_title  general: which Wikipedia article is this summary from? (4 choices)

Each item is one held-out document; its three wrong choices are the answers of other documents
of the same set, drawn with the run's seed, and the right answer's place among the four is drawn
too, so a run's tasks are the same on every machine. The answer's own words are masked out of
its question ("___"): a summary that opens with its title would otherwise give it away.

    build_packaged_tasks(workdir / "heldout", workdir / "tasks", items=100, seed=0)
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hone.errors import HoneError
from hone.rundir import read_jsonl, write_jsonl, write_text

CHOICES = 4
MASK = "___"
QUESTION_CHARS = 300  # a question is cut here (at a word boundary): scoring stays cheap on a CPU


@dataclass(frozen=True)
class TaskSpec:
    """One packaged task: its held-out set, how a document becomes (question, answer), the prompt."""

    name: str
    heldout: str
    answer: Callable[[dict], str]
    question: Callable[[dict], str]
    prompt: str  # lm-eval doc_to_text (Jinja over the item's fields)
    description: str


def _go_definition(doc: dict) -> str:
    term = doc["meta"]["term"]
    text = doc["text"]
    return text[len(term) + 2:] if text.startswith(term + ": ") else text


PACKAGED_TASKS = (
    TaskSpec("hone_go_term", "domain", lambda d: d["meta"]["term"], _go_definition,
             "Definition: {{question}}\nGene Ontology term:",
             "pick the Gene Ontology term a held-out definition describes, out of 4 (domain)"),
    TaskSpec("hone_wiki_title", "general", lambda d: d["meta"]["title"], lambda d: d["text"],
             "Summary: {{question}}\nWikipedia article:",
             "pick the Wikipedia article a held-out summary belongs to, out of 4 (general)"),
)


def mask_answer(text: str, answer: str) -> str:
    """``text`` with every case-insensitive occurrence of ``answer`` replaced by ``___``."""
    return re.sub(re.escape(answer), MASK, text, flags=re.IGNORECASE) if answer else text


def cut_question(text: str, max_chars: int = QUESTION_CHARS) -> str:
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = head.rfind(" ")
    return (head[:cut] if cut > max_chars // 2 else head).rstrip() + " ..."


def choice_items(docs: list[dict], spec: TaskSpec, n: int, seed: int) -> list[dict]:
    """Up to ``n`` items ``{id, question, choices, label}`` from ``docs``: each document's answer
    and three other documents' answers, in a seeded order; ``label`` is the answer's index."""
    rng = random.Random(f"{seed}:{spec.name}")
    answers = sorted({spec.answer(d) for d in docs})
    if len(answers) < CHOICES:
        raise HoneError(f"task {spec.name}: {len(answers)} distinct answers in held-out set '{spec.heldout}'; "
                        f"need at least {CHOICES}")
    chosen = rng.sample(docs, min(n, len(docs)))
    items = []
    for doc in chosen:
        answer = spec.answer(doc)
        wrong = rng.sample([a for a in answers if a != answer], CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = wrong[:label] + [answer] + wrong[label:]
        question = cut_question(mask_answer(spec.question(doc), answer))
        items.append({"id": doc["id"], "question": question, "choices": choices, "label": label})
    return items


def task_yaml(name: str, data_file: Path, prompt: str, description: str) -> str:
    """An lm-eval multiple-choice task config over a local JSON-lines file (JSON is valid YAML:
    every string is quoted as JSON quotes it)."""
    q = json.dumps
    return "\n".join([
        f"# {description}; built by Hone from held-out documents",
        f"task: {q(name)}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {q(str(Path(data_file).resolve()))}}}}}",
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {q(prompt)}",
        "doc_to_choice: choices",
        "doc_to_target: label",
        'target_delimiter: " "',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}",
        "",
    ])


def write_task(out_dir: Path, name: str, items: list[dict], prompt: str, description: str) -> Path:
    """``NAME.jsonl`` and ``NAME.yaml`` in ``out_dir``; returns the YAML file."""
    out_dir = Path(out_dir)
    data = out_dir / f"{name}.jsonl"
    write_jsonl(data, items)
    yaml = out_dir / f"{name}.yaml"
    write_text(yaml, task_yaml(name, data, prompt, description))
    return yaml


def build_packaged_tasks(heldout_dir: Path, out_dir: Path, items: int, seed: int) -> dict[str, int]:
    """Both packaged tasks from ``heldout_dir/{domain,general}.jsonl`` into ``out_dir``; returns
    items per task (a task whose held-out set is absent is skipped)."""
    built = {}
    for spec in PACKAGED_TASKS:
        path = Path(heldout_dir) / f"{spec.heldout}.jsonl"
        if not path.exists():
            continue
        chosen = choice_items(list(read_jsonl(path)), spec, items, seed)
        write_task(out_dir, spec.name, chosen, spec.prompt, spec.description)
        built[spec.name] = len(chosen)
    return built
