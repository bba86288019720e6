"""Start-up and exit cost of `hone` processes, lazy CLI against every subcommand loaded, as JSON.

Each row times fresh processes (median of --repeat): the lazy CLI (`python -m hone.cli ...`,
which loads the one subcommand and skips the final garbage collection) against the same
command through an app with every subcommand loaded and a plain exit, which is how `hone`
started before; and the training worker's import with and without that exit.

    python benchmarks/cli_start.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "tie_word_embeddings": False}
EVERY_COMMAND = "import sys; from hone.cli import build_app; build_app()(sys.argv[1:], prog_name='hone')"


def seconds(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv[1:])}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "llama3-8b").mkdir()
        (tmp / "llama3-8b" / "config.json").write_text(json.dumps(LLAMA3_8B))
        mixture = ROOT / "recipes" / "demo-biomed.mixture.json"
        (tmp / "r.toml").write_text(
            f'[data.packaged]\nwikipedia = 10\n[curate.domain]\nkeywords = ["gene"]\n[model]\nsource = "hf"\n'
            f'path = "{tmp / "llama3-8b"}"\n[train]\nseq_len = 8192\nbatch_size = 256\nmixture = "{mixture}"\n'
            f'[cluster]\nspec = "4x8xH100"\n[budget]\ngpu_hours = 2000\n')
        commands = {
            "hone plan --recipe (Llama-3-8B config, 4x8xH100, 2000 GPU-h)":
                ["plan", "--recipe", str(tmp / "r.toml"), "-o", str(tmp / "d.json")],
            "hone plan --model llama3-70b --cluster 8x8xH100 --global-batch 64":
                ["plan", "--model", "llama3-70b", "--cluster", "8x8xH100", "--global-batch", "64", "--out", ""],
            "hone recipe fields": ["recipe", "fields"],
            "hone --help": ["--help"],
        }
        rows = []
        for name, cmd in commands.items():
            lazy = seconds([py, "-m", "hone.cli", *cmd], args.repeat)
            before = seconds([py, "-c", EVERY_COMMAND, *cmd], args.repeat)
            rows.append({"command": name, "lazy_s": round(lazy, 2), "every_command_s": round(before, 2),
                         "ratio": round(before / lazy, 2)})
        plain = seconds([py, "-c", "import hone.train.worker"], args.repeat)
        fast = seconds([py, "-c", "import gc, hone.train.worker; gc.freeze()"], args.repeat)
        rows.append({"command": "import hone.train.worker, then exit", "lazy_s": round(fast, 2),
                     "every_command_s": round(plain, 2), "ratio": round(plain / fast, 2),
                     "note": "lazy_s: exit without the final garbage collection (hone.errors.fast_exit)"})
    print(json.dumps({"repeat": args.repeat, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
