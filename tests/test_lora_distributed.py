"""LoRA under torchrun: 2 FSDP2 processes on the CPU (gloo) train the same adapters and embeddings
as 1 process (within 1e-5), checkpoints hold only what trains, and both runs export the merged
final/ and the PEFT-format final-adapter/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from hone.recipe import load_recipe
from tiny_runs import hone_process, tiny_recipe_text

STEPS = 6
LORA = '[train.lora]\nr = 4\nalpha = 8\ntrain_embeddings = true\nembedding_lr_ratio = 0.5\n'


@pytest.fixture(scope="module")
def prepared(tiny12):
    """The shared run directory whose data stages are done (tiny12), and the LoRA recipe."""
    root = tiny12.root
    text = tiny_recipe_text(root / "base", steps=STEPS)
    (root / "lora.toml").write_text(text.replace("\n[eval]", "\n" + LORA + "\n[eval]", 1))
    return root


def _copy(prepared: Path, name: str) -> Path:
    shutil.copytree(prepared / "base", prepared / name)
    return prepared / name


def test_two_process_fsdp_lora_matches_one_process(prepared):
    from hone.pipeline import run_recipe

    one, two = _copy(prepared, "lora_one"), _copy(prepared, "lora_fsdp2")
    run_recipe(load_recipe(prepared / "lora.toml"), one, fresh_training=True, log=lambda m: None)  # in this process
    hone_process("train", prepared / "lora.toml", "--workdir", two, "--fresh", "--nproc", 2, timeout=300)
    assert json.loads((two / "train_summary.json").read_text())["world_size"] == 2
    ma, mb = ([json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()] for wd in (one, two))
    assert [m["batch"] for m in ma] == [m["batch"] for m in mb] and len(ma) == STEPS
    for x, y in zip(ma, mb):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
    for part in ("final/model.safetensors", "final-adapter/adapter_model.safetensors"):
        wa, wb = load_file(str(one / part)), load_file(str(two / part))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] - wb[k]).abs().max() < 1e-5, (part, k)
    assert not any("lora" in k for k in load_file(str(two / "final" / "model.safetensors")))  # merged
    adapter = load_file(str(two / "final-adapter" / "adapter_model.safetensors"))
    assert len([k for k in adapter if ".lora_A." in k]) == 2 * 7
    assert "base_model.model.model.embed_tokens.weight" in adapter
    config = json.loads((two / "final-adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["embed_tokens"]
    # The 2-rank checkpoint: adapters and the (tied) embedding, never a frozen base matrix.
    ckpt = sorted((two / "checkpoints").glob("step_*"))[-1]
    keys = [k for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert keys and all(".lora_" in k or k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in keys)
