"""Merge domain experts: parameter averaging into one HF checkpoint, or an ensemble manifest.

    average([Path("experts/bio/final"), Path("experts/legal/final")], Path("merged"), weights=[2, 1])
    ensemble([...], Path("ens"))            # ens/ensemble.json + tokenizer; `hone eval ens` scores it

Only safetensors are read and written (no pickles). Every expert must be a Hugging Face
directory with the same config and tokenizer: averaging needs identical shapes, and an
ensemble mixes next-token distributions over one vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from hone.errors import HoneError
from hone.model.hf import read_safetensors
from hone.rundir import atomic_dir, read_json, write_json

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "hone-ensemble"
MERGE_FILE = "merge.json"
# Files copied from the first expert into a merged directory (weights are written anew).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# config.json keys that may differ between experts without changing the architecture.
_CONFIG_FREE_KEYS = {"_name_or_path", "torch_dtype", "transformers_version", "architectures"}


def parse_weights(text: str | None, n: int, what: str = "--weights") -> list[float]:
    """Normalized weights from ``"w1,w2,..."`` (None: uniform); one-line errors."""
    if text is None or text == "":
        return [1.0 / n] * n
    try:
        raw = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise HoneError(f"{what} {text!r}: expected comma-separated numbers") from None
    return normalize_weights(raw, n, what)


def normalize_weights(raw: list[float], n: int, what: str = "--weights") -> list[float]:
    if len(raw) != n:
        raise HoneError(f"{what}: {len(raw)} weights for {n} experts")
    if any(not (w >= 0) or w == float("inf") for w in raw):  # also rejects NaN
        raise HoneError(f"{what}: weights must be finite and >= 0 (got {raw})")
    total = sum(raw)
    if total <= 0:
        raise HoneError(f"{what}: weights sum to 0")
    return [w / total for w in raw]


def is_ensemble(path: Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def _config(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise HoneError(f"{path}: expert directory not found")
    if is_ensemble(path):
        raise HoneError(f"{path}: is an ensemble; merge takes model directories (config.json + model.safetensors)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise HoneError(f"{cfg}: file not found (not a Hugging Face model directory?)")
    return read_json(cfg)


def _file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def check_out(paths: list[Path], out: Path) -> None:
    """The output directory is swapped in whole: it must not be (or hold) one of the inputs."""
    target = Path(out).resolve()
    for p in paths:
        if Path(p).resolve() == target or target in Path(p).resolve().parents:
            raise HoneError(f"-o {out}: would replace the expert {p}; choose another output directory")


def check_experts(paths: list[Path], same_shapes: bool) -> list[dict]:
    """Configs of the experts; HoneError naming the first difference that forbids merging."""
    if not paths:
        raise HoneError("merge: give at least one expert directory")
    configs = [_config(p) for p in paths]
    first, ref = paths[0], configs[0]
    tok_ref = _file_hash(first / "tokenizer.json")
    for path, cfg in zip(paths[1:], configs[1:]):
        keys = (set(ref) | set(cfg)) - _CONFIG_FREE_KEYS
        if not same_shapes:
            keys = {"vocab_size"}
        for key in sorted(keys):
            if ref.get(key) != cfg.get(key):
                raise HoneError(f"{path}: config.json {key} = {cfg.get(key)!r} differs from {first}'s "
                                f"{ref.get(key)!r}: experts must share one architecture")
        if _file_hash(path / "tokenizer.json") != tok_ref:
            raise HoneError(f"{path}: tokenizer.json differs from {first}'s: experts must share one tokenizer")
    return configs


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(Path(path))


def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float],
                        names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Σ w_i θ_i per tensor, accumulated in float64 and cast back to the stored dtype: identical
    experts come back bit for bit (the float64 error is far below one float32 ulp)."""
    names = names or [f"expert {i}" for i in range(len(states))]
    ref = states[0]
    for name, sd in zip(names[1:], states[1:]):
        if set(sd) != set(ref):
            extra = sorted(set(sd) ^ set(ref))[0]
            raise HoneError(f"{name}: weight names differ from {names[0]}'s (e.g. {extra!r})")
        for key, t in sd.items():
            if t.shape != ref[key].shape:
                raise HoneError(f"{name}: weight {key!r} has shape {tuple(t.shape)}, {names[0]}'s is "
                                f"{tuple(ref[key].shape)}")
    out = {}
    for key, t in ref.items():
        if not t.is_floating_point():  # integer buffers (none in Llama) cannot be averaged
            out[key] = t.clone()
            continue
        acc = torch.zeros(t.shape, dtype=torch.float64)
        for w, sd in zip(weights, states):
            acc.add_(sd[key].to(torch.float64), alpha=w)
        out[key] = acc.to(t.dtype).contiguous()
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def average(paths: list[Path], out: Path, weights: list[float] | None = None) -> Path:
    """Write the (weighted, normalized) parameter average of ``paths`` as an HF directory."""
    paths = [Path(p) for p in paths]
    weights = normalize_weights(list(weights), len(paths)) if weights is not None else [1 / len(paths)] * len(paths)
    configs = check_experts(paths, same_shapes=True)
    check_out(paths, out)
    states = [_read_weights(p) for p in paths]
    merged = average_state_dicts(states, weights, [str(p) for p in paths])
    with atomic_dir(Path(out)) as tmp:
        save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", configs[0])
        _copy_side_files(paths[0], tmp)
        write_json(tmp / MERGE_FILE, {"method": "average", "experts": [str(p.resolve()) for p in paths],
                                      "weights": weights})
    return Path(out)


def ensemble(paths: list[Path], out: Path, weights: list[float] | None = None, *,
             prefix_cap: int | None = None, smoothing: float = 0.0) -> Path:
    """Write an ensemble directory: ``ensemble.json`` (experts, prior, posterior settings) and
    the shared tokenizer. Expert paths are stored relative to ``out`` so a tree moves whole."""
    paths = [Path(p) for p in paths]
    prior = normalize_weights(list(weights), len(paths)) if weights is not None else [1 / len(paths)] * len(paths)
    if prefix_cap is not None and prefix_cap < 1:
        raise HoneError(f"--prefix-cap: must be >= 1 (got {prefix_cap})")
    if not 0.0 <= smoothing <= 1.0:
        raise HoneError(f"--smoothing: must be in [0, 1] (got {smoothing})")
    configs = check_experts(paths, same_shapes=False)
    check_out(paths, out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = _expert_names(paths)
    experts = [{"name": n, "path": os.path.relpath(p.resolve(), out.resolve()), "prior": w}
               for n, p, w in zip(names, paths, prior)]
    manifest = {"format": ENSEMBLE_FORMAT, "version": 1, "method": "ensemble", "experts": experts,
                "prefix_cap": prefix_cap, "smoothing": smoothing, "vocab_size": configs[0]["vocab_size"]}
    with atomic_dir(out) as tmp:
        write_json(tmp / ENSEMBLE_FILE, manifest)
        for name in TOKENIZER_FILES:
            if (paths[0] / name).is_file():
                shutil.copyfile(paths[0] / name, tmp / name)
    return out


def _expert_names(paths: list[Path]) -> list[str]:
    """A readable name per expert: the directory name, or its parent's for ``NAME/final``."""
    names = [(p.resolve().parent.name if p.resolve().name == "final" else p.resolve().name) for p in paths]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out
