"""Document masks (train.doc_mask): in a packed sequence A|B every token of B gets the logits of B
alone and A's are untouched; sliding windows compose; flex_attention's block mask equals the CPU's
boolean mask; the transformers backend equals Hone's Llama; doc_mask off is today's forward; and the
GPU defaults (bf16, compile) resolve by device with the recipe's value winning."""

from __future__ import annotations

import pytest
import torch

from hone.model import documents
from hone.model.documents import document_positions, set_doc_eos_id
from hone.model.llama import Llama, LlamaConfig
from hone.recipe import TrainConfig, device_settings
from hone.train.data import MixtureLoader, TokenStream
from hone.train.loop import doc_masks
from hone.train.run import plan_from_recipe

EOS = 0
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def _doc(n: int, seed: int) -> torch.Tensor:
    """A document of ``n`` tokens ending in EOS (its body never contains EOS)."""
    body = torch.randint(1, TINY["vocab_size"], (1, n - 1), generator=torch.Generator().manual_seed(seed))
    return torch.cat([body, torch.full((1, 1), EOS)], dim=1)


def _logits(model: Llama, ids: torch.Tensor, packed: bool) -> torch.Tensor:
    """Logits of ``ids``, its documents kept apart when ``packed`` (the training forward's inputs)."""
    if not packed:
        return model(ids)
    pos, doc = document_positions(ids, EOS)
    return model.lm_head(model.model(ids, position_ids=pos, document_ids=doc))


def _model(**over) -> Llama:
    return Llama(LlamaConfig(**{**TINY, **over})).init_weights(std=0.2, seed=0).eval()


def test_document_positions_restart_after_each_eos():
    ids = torch.tensor([[5, 0, 3, 4, 0, 0, 7], [1, 2, 3, 4, 5, 6, 0]])
    pos, doc = document_positions(ids, EOS)
    # Row 0 starts inside a document (position 0 there); an empty document (a lone EOS) is one token.
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 1, 2, 3, 4, 5, 6]]
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("over", [{}, {"model_type": "mistral", "sliding_window": 3},
                                  {"model_type": "qwen2", "sliding_window": 3,
                                   "layer_types": ["full_attention", "sliding_attention"]}],
                         ids=["llama-gqa", "mistral-window", "qwen2-mixed-layers"])
def test_packed_documents_give_each_document_its_own_logits(over):
    model = _model(**over)
    a, b = _doc(6, 1), _doc(9, 2)
    packed = torch.cat([a, b], dim=1)
    with torch.no_grad():
        got = _logits(model, packed, packed=True)
        alone_a, alone_b = model(a), model(b)
        plain = model(packed)
    torch.testing.assert_close(got[:, 6:], alone_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[:, :6], alone_a, rtol=0, atol=1e-5)
    assert (plain[:, 6:] - alone_b).abs().max() > 1e-3  # without the mask B sees A: the test can fail


def test_training_forward_loss_is_the_sum_of_documents_and_gradients_flow():
    model = _model()
    a, b = _doc(5, 3), _doc(7, 4)
    ya, yb = _doc(5, 5), _doc(7, 6)
    set_doc_eos_id(model, EOS)
    loss, per_token = model(torch.cat([a, b], 1), torch.cat([ya, yb], 1), token_weight=1.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    set_doc_eos_id(model, None)
    (model(a, ya, token_weight=1.0)[0] + model(b, yb, token_weight=1.0)[0]).backward()
    for n, p in model.named_parameters():
        assert torch.isfinite(grads[n]).all(), n
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_doc_mask_off_is_todays_forward_bit_for_bit():
    ids, targets = torch.cat([_doc(5, 7), _doc(11, 8)], 1), _doc(16, 9)
    model = _model()
    untouched = _model()
    set_doc_eos_id(model, EOS)
    masked = model(ids, targets)[1]
    set_doc_eos_id(model, None)
    loss, per_token = model(ids, targets)
    ref_loss, ref = untouched(ids, targets)
    assert torch.equal(per_token, ref) and torch.equal(loss, ref_loss)
    assert not torch.equal(masked, ref)


def test_activation_checkpointing_keeps_the_document_masks():
    model = _model(model_type="mistral", sliding_window=3)
    ids, targets = torch.cat([_doc(5, 10), _doc(8, 11)], 1), _doc(13, 12)
    set_doc_eos_id(model, EOS)
    ref = model(ids, targets)[1]
    model.model.activation_checkpointing = True
    model.train()
    torch.testing.assert_close(model(ids, targets)[1], ref, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")  # eager flex_attention warns that it is slow
@pytest.mark.parametrize("window", [None, 3])
def test_flex_attention_block_mask_equals_the_boolean_mask(monkeypatch, window):
    """The GPU's path (flex_attention + block mask, here its eager reference on the CPU) against the CPU's."""
    over = {"model_type": "mistral", "sliding_window": window} if window else {}
    model = _model(**over)
    ids = torch.cat([_doc(4, 13), _doc(7, 14), _doc(5, 15)], 1).repeat(2, 1)
    ids[1, :3] = 9  # row 1 starts inside a longer document
    with torch.no_grad():
        dense = _logits(model, ids, packed=True)
        monkeypatch.setattr(documents, "FLEX_DEVICES", ("cpu",))
        built = []
        block_mask = documents._block_mask
        monkeypatch.setattr(documents, "_block_mask", lambda *a: built.append(a) or block_mask(*a))
        flex = _logits(model, ids, packed=True)
    assert len(built) == 1  # the flex path ran: one block mask, every layer's window alike
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("over", [{}, {"model_type": "mistral", "sliding_window": 3}], ids=["llama", "mistral"])
def test_transformers_backend_equals_hone_with_doc_masks(over):
    transformers = pytest.importorskip("transformers")
    from hone.model.hf_backend import HFCausalLM

    ours = _model(**over)
    hf_cfg = transformers.AutoConfig.for_model(**ours.config.to_hf_dict())
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    hf.load_state_dict(ours.state_dict(), strict=False)
    theirs = HFCausalLM(hf).eval()
    assert theirs.packed_documents_refusal() is None
    ids = torch.cat([_doc(6, 16), _doc(9, 17), _doc(5, 18)], 1).repeat(2, 1)
    ids[1, :4] = 5
    targets = torch.randint(0, 64, ids.shape, generator=torch.Generator().manual_seed(19))
    for eos in (EOS, None):
        set_doc_eos_id(ours, eos)
        assert set_doc_eos_id(theirs, eos) is None
        with torch.no_grad():
            loss, per_token = ours(ids, targets)
            ref_loss, ref = theirs(ids, targets)
        torch.testing.assert_close(per_token, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


def _loader(eos: int | None) -> MixtureLoader:
    tokens = torch.cat([_doc(7, s) for s in range(8)], 1)[0].numpy()
    return MixtureLoader({"d": TokenStream(tokens, 8, eos_id=eos)}, domain="d", general=[], batch_size=2, ratio=1.0)


def test_trainer_sets_the_streams_eos_id_and_says_so():
    model = _model()
    assert doc_masks(model, TrainConfig(), _loader(EOS)) == "document masks on (end of document: id 0)"
    assert model.doc_eos_id == EOS
    assert doc_masks(model, TrainConfig(doc_mask=False), _loader(EOS)) == \
        "document masks off (train.doc_mask = false)"
    assert model.doc_eos_id is None
    assert "name no end-of-document id" in doc_masks(model, TrainConfig(), _loader(None))


def test_a_model_that_cannot_keep_documents_apart_says_so_in_one_line():
    class Refusing(torch.nn.Module):
        def packed_documents_refusal(self) -> str:
            return "transformers' FooForCausalLM (attention 'custom') does not keep packed documents apart"

    model = Refusing()
    line = doc_masks(model, TrainConfig(), _loader(EOS))
    assert line.startswith("document masks off: transformers' FooForCausalLM") and "\n" not in line
    assert getattr(model, "doc_eos_id", None) is None


def test_gpu_defaults_resolve_by_device_and_the_recipe_pins_them():
    t = TrainConfig()
    gpu, why = device_settings(t, "cuda")
    assert (gpu.mixed_precision, gpu.compile) == ("bf16", True)
    assert why == "mixed precision bf16 (default on cuda), compile on (default on cuda)"
    cpu, _ = device_settings(t, "cpu")
    assert (cpu.mixed_precision, cpu.compile) == ("fp32", False)
    pinned, why = device_settings(TrainConfig(mixed_precision="fp32", compile=False), "cuda")
    assert (pinned.mixed_precision, pinned.compile) == ("fp32", False)
    assert why == "mixed precision fp32 (pinned by the recipe), compile off (pinned by the recipe)"
    assert device_settings(TrainConfig(compile=True), "cpu")[0].compile is True
    plan = plan_from_recipe(gpu, 1)
    assert (plan.mixed_precision, plan.compile) == ("bf16", True)
    assert (plan_from_recipe(t, 1).mixed_precision, plan_from_recipe(t, 1).compile) == ("fp32", False)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_path_under_bf16_autocast_matches_the_boolean_mask(monkeypatch):
    """Autocast leaves flex_attention alone: its inputs are cast to one dtype, as SDPA's autocast does."""
    model = _model()
    ids, targets = torch.cat([_doc(6, 20), _doc(10, 21)], 1), _doc(16, 22)
    set_doc_eos_id(model, EOS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(ids, targets)[1]
        monkeypatch.setattr(documents, "FLEX_DEVICES", ("cpu",))
        dtypes = []
        eager = documents._flex_fn(False)

        def flex_fn(compiled):  # the compiled kernel refuses mixed dtypes; the eager reference does not
            return lambda q, k, v, **kw: dtypes.append({q.dtype, k.dtype, v.dtype}) or eager(q, k, v, **kw)

        monkeypatch.setattr(documents, "_flex_fn", flex_fn)
        flex = model(ids, targets)[1]
    assert dtypes == [{torch.bfloat16}] * 2
    torch.testing.assert_close(flex, dense, rtol=2e-2, atol=2e-2)


def test_the_start_line_says_what_was_chosen_and_why(tmp_path):
    from hone.train.loop import train

    lines = []
    train(_model(), _loader(EOS), TrainConfig(seq_len=8, batch_size=2, log_every=100), tmp_path, total_steps=1,
          log=lines.append)
    assert "train: mixed precision fp32 (default on cpu), compile off (default on cpu); document masks on " \
           "(end of document: id 0)" in lines
