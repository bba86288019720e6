"""Sharded loading and saving: a model built on the meta device, parallelized, materialized and
loaded by name holds exactly the single-process weights on gloo ranks (FSDP2, FSDP2 x TP);
a sharded export (several files + index) loads in transformers with identical logits; a
missing tensor is one line naming the file."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import run_hone
from hone.errors import HoneError
from hone.model.hf import load_hf, meta_hf, save_hf
from hone.model.llama import Llama, LlamaConfig
from hone.model.weights import SafetensorsDir, TensorDict, load_weights, materialize
from hone.train.dry_run import dry_run


def _config(tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=255, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def _reference(tied: bool) -> Llama:
    return Llama(_config(tied)).init_weights(seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def _assert_rank0_holds(out: Path, want) -> None:
    """Rank 0's gathered weights (written to ``out`` by _rank_main) equal ``want``'s exactly, and
    its per-token losses on a fixed batch equal ``want``'s."""
    got = torch.load(out, weights_only=True)
    for name, t in want.state_dict().items():
        assert torch.equal(got["state"][name], t), name
    ids = torch.arange(24).view(2, 12) % 255
    with torch.no_grad():
        _, per_token = want(ids, (ids + 1) % 255)
    torch.testing.assert_close(got["per_token"], per_token, rtol=1e-5, atol=1e-6)

def _rank_main(rank: int, world: int, tp: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from hone.recipe import TrainConfig
    from hone.train.loop import make_optimizer
    from hone.train.parallelize import ParallelPlan, init_distributed, parallelize

    plan = ParallelPlan(dp=world // tp, tp=tp, data_parallel="fsdp")
    ctx = init_distributed(plan, "cpu")
    try:
        def load(materialized: torch.nn.Module) -> None:
            # materialized after sharding: this rank allocated only its part of every parameter
            assert all(p.to_local().numel() < p.numel() for p in materialized.parameters())
            load_weights(materialized, SafetensorsDir(model_dir))

        model = parallelize(meta_hf(model_dir), plan, ctx, load=load)
        ids = torch.arange(24).view(2, 12) % 255
        with torch.no_grad():
            loss, per_token = model(ids, (ids + 1) % 255)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"state": {k: v.clone() for k, v in full.items()}, "per_token": per_token}, out)
        # what this rank really holds after a training step, for the dry run's figures
        optimizer = make_optimizer(model, TrainConfig())
        model(ids, (ids + 1) % 255)[0].backward()
        optimizer.step()
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        held = {"params": sum(local(p).numel() * 4 for p in model.parameters()),
                "grads": sum(local(p.grad).numel() * 4 for p in model.parameters()),
                "optimizer": sum(local(v).numel() * 4 for st in optimizer.state.values()
                                 for k, v in st.items() if k != "step")}
        Path(f"{out}.{rank}.json").write_text(json.dumps(held))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,tp,tied", [(2, 1, True), (4, 2, False)])
def test_sharded_load_on_gloo_ranks_equals_one_process(tmp_path: Path, world: int, tp: int, tied: bool) -> None:
    ref = _reference(tied)
    model_dir = tmp_path / "m"
    save_hf(ref, None, model_dir, max_shard_bytes=40_000)  # several shards, read through the index
    assert (model_dir / "model.safetensors.index.json").is_file()
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(world, tp, _free_port(), str(model_dir), str(out)), nprocs=world)
    _assert_rank0_holds(out, ref)
    # `hone train --dry-run` for the same layout, without processes: each rank's bytes as held
    held = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]
    report = dry_run(_hf_recipe(tmp_path, model_dir, tp=tp, batch_size=world), world, log=lambda m: None)
    assert report["ranks"] == held
    assert len({json.dumps(h) for h in held}) > 1  # uneven FSDP chunks: the ranks differ, and the dry run says how


def _hf_recipe(tmp_path: Path, model_dir: Path, **train):
    from hone.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "src/hone/recipes/tiny-cpu.toml")
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"source": "hf", "path": str(model_dir)}),
                                     "train": recipe.train.model_copy(update=train)})


def test_meta_build_then_load_equals_the_model(tmp_path: Path, monkeypatch) -> None:
    """One process, the path load_base_model takes: bf16 files become fp32 parameters (read a few
    rows at a time here, as a large tensor is)."""
    import hone.model.weights

    monkeypatch.setattr(hone.model.weights, "READ_CHUNK_BYTES", 200)
    ref = _reference(tied=True)
    save_hf(ref.to(torch.bfloat16), None, tmp_path / "m")
    model = meta_hf(tmp_path / "m")
    materialize(model, "cpu")
    load_weights(model, SafetensorsDir(tmp_path / "m"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, t in ref.state_dict().items():
        assert model.state_dict()[name].dtype == torch.float32
        assert torch.equal(model.state_dict()[name], t.float()), name


def test_sharded_export_loads_in_transformers_with_identical_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ref = _reference(tied=False)
    save_hf(ref, None, tmp_path / "m", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in ref.state_dict().values())
    assert not (tmp_path / "m" / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    ours, _ = load_hf(tmp_path / "m")
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref(ids))
        assert torch.equal(ours(ids), ref(ids))


def test_small_export_is_one_file(tmp_path: Path) -> None:
    save_hf(_reference(tied=True), None, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not (tmp_path / "m" / "model.safetensors.index.json").exists()


def test_missing_tensor_is_one_line_naming_file_and_tensor(tmp_path: Path) -> None:
    ref = _reference(tied=False)
    save_hf(ref, None, tmp_path / "m", max_shard_bytes=40_000)
    index_path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    # the tensor stays in its shard file: drop the whole shard it lives in from the map instead
    shard = json.loads(index_path.read_text())["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index_path.write_text(json.dumps(index))
    (tmp_path / "m" / shard).unlink()
    model = materialize(meta_hf(tmp_path / "m"), "cpu")
    with pytest.raises(HoneError) as e:
        load_weights(model, SafetensorsDir(tmp_path / "m"))
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors.index.json: no tensor 'model." in msg and "missing" in msg


def test_extra_and_misshaped_tensors_are_one_line(tmp_path: Path) -> None:
    ref = _reference(tied=True)
    state = ref.state_dict()
    model = materialize(meta_hf_like(ref), "cpu")
    with pytest.raises(HoneError, match=r"^src: tensor 'extra.weight' is not in the model"):
        load_weights(model, TensorDict({**state, "extra.weight": torch.zeros(2)}, "src"))
    bad = {**state, "model.norm.weight": torch.ones(7)}
    with pytest.raises(HoneError, match=r"^src: tensor 'model.norm.weight' has shape \(7,\), the model wants \(32,\)"):
        load_weights(model, TensorDict(bad, "src"))


def meta_hf_like(ref: Llama) -> Llama:
    with torch.device("meta"):
        return Llama(ref.config)


def test_random_base_is_the_seeded_init(tmp_path: Path) -> None:
    """Random init through materialize + load by name gives today's weights for the seed."""
    from hone.model.load import base_meta_model, base_weights, random_model_config
    from hone.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "src/hone/recipes/tiny-cpu.toml")
    recipe = recipe.model_copy(update={"run": recipe.run.model_copy(update={"seed": 5})})
    assert recipe.model.source == "random"

    class Tok:
        def get_vocab_size(self) -> int:
            return 300

    model = materialize(base_meta_model(recipe, Tok()), "cpu")
    load_weights(model, base_weights(recipe, tmp_path, Tok()))
    want = Llama(random_model_config(recipe, Tok())).init_weights(seed=5)
    for name, t in want.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


def _transformers_dir(tmp_path: Path, family: str) -> Path:
    """A tiny random model of a family the transformers backend builds, as transformers saves it."""
    tf = pytest.importorskip("transformers")
    common = dict(vocab_size=255, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    config = {"gemma2": lambda: tf.Gemma2Config(**common, head_dim=8, sliding_window=4, final_logit_softcapping=1.0,
                                                initializer_range=0.1),
              "phi": lambda: tf.PhiConfig(**common),  # a bias on the LM head
              "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)}[family]()
    torch.manual_seed(0)
    path = tmp_path / family
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("family", ["gemma2", "phi", "mixtral"])
def test_transformers_backend_meta_load_equals_from_pretrained(tmp_path: Path, family: str) -> None:
    """The transformers backend's base through the meta-device path; Mixtral's files name its experts
    apart while transformers fuses them: those weights come whole through transformers instead."""
    from hone.model.hf_backend import HFCausalLM
    from hone.model.load import base_weights

    path = _transformers_dir(tmp_path, family)
    want = HFCausalLM.from_pretrained(path, torch.float32)
    model = materialize(meta_hf(path), "cpu")
    recipe = _hf_recipe(tmp_path, path)
    source = base_weights(recipe, tmp_path)
    assert isinstance(source, TensorDict if family == "mixtral" else SafetensorsDir)
    load_weights(model, source)
    assert model.fused_head == want.fused_head  # decided by the probe once the weights are there
    ids = torch.arange(20).view(2, 10) % 255
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want(ids), rtol=0, atol=0)
        torch.testing.assert_close(model(ids, ids)[1], want(ids, ids)[1], rtol=0, atol=0)


def test_transformers_backend_on_two_fsdp_ranks(tmp_path: Path) -> None:
    from hone.model.hf_backend import HFCausalLM

    path = _transformers_dir(tmp_path, "gemma2")
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(2, 1, _free_port(), str(path), str(out)), nprocs=2)
    _assert_rank0_holds(out, HFCausalLM.from_pretrained(path, torch.float32))


def test_cli_dry_run_starts_nothing_and_reads_no_data(tmp_path: Path, capsys) -> None:
    recipe = Path(__file__).parents[1] / "src/hone/recipes/tiny-cpu.toml"
    code, out, err = run_hone(capsys, "train", recipe, "--workdir", tmp_path / "wd", "--dry-run", "--nproc", 2)
    assert code == 0, err
    assert "dry run: 2 processes, dp=2 x tp=1 (fsdp)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0-1", "planner"))]
    assert [r[0] for r in rows] == ["0-1", "planner"] and rows[0][1:5] == rows[1][1:5]  # FSDP, even: equal
    assert not (tmp_path / "wd").exists()
