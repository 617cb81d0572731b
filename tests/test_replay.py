"""`spd.replay.FixedPrefix`: passes over fixed batches by copies of a target that differ only in some modules
replay what runs before those modules, with the same outputs and gradients as running everything."""

from __future__ import annotations

import copy

import pytest
import torch

from spd.ablate import chunks
from spd.model import target_output
from spd.replay import FixedPrefix, batch_key
from spd.units import Unit, unit_effects
from tests.lm_helpers import SEQ, VOCAB, tiny_llama

DOWN = "model.layers.2.mlp.down_proj"


def counting_first_layer(monkeypatch, model):
    """A list that grows by one each time the model's first decoder layer runs."""
    first = model.model.layers[0]
    calls: list[int] = []
    orig = type(first).forward

    def forward(self, *args, **kwargs):
        calls.extend([1] if self is first else [])
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(type(first), "forward", forward)
    return calls


def test_copies_edited_in_the_changing_module_replay_the_prefix_and_match_plain_passes(monkeypatch):
    torch.manual_seed(0)
    target = tiny_llama(n_layers=3).eval()
    x = {"input_ids": torch.randint(0, VOCAB, (8, SEQ))}
    prefix = FixedPrefix(target, [DOWN])
    calls = counting_first_layer(monkeypatch, target)
    edited = copy.deepcopy(target)
    with torch.no_grad():
        edited.get_submodule(DOWN).weight.mul_(-2.0)
        want, want_edited = target_output(target, x), target_output(edited, x)
    calls.clear()
    with torch.no_grad():
        got = prefix.output(target, x)
        got_edited = prefix.output(edited, x)
        again = prefix.output(target, x)
    assert calls == [1]  # the first layer ran in the recording pass only
    assert torch.equal(got, want) and torch.equal(again, want)
    torch.testing.assert_close(got_edited, want_edited, rtol=0, atol=1e-6)
    assert (got_edited - got).abs().max() > 1e-2  # the edit shows: the changing module was recomputed
    # a slice taken again is the same batch; a different slice is recorded anew
    a, b = chunks(x, 4)
    assert batch_key(a) == batch_key(chunks(x, 4)[0]) != batch_key(b)
    calls.clear()
    with torch.no_grad():
        assert torch.equal(prefix.output(target, b), target_output(target, b))
        torch.testing.assert_close(prefix.output(edited, chunks(x, 4)[1]), target_output(edited, b), rtol=0, atol=1e-6)
    assert len(calls) == 2  # b recorded (and one plain pass of the target), then replayed for the copy


def test_gradients_through_a_replayed_pass_equal_plain_ones():
    torch.manual_seed(0)
    target = tiny_llama(n_layers=3).eval()
    x = {"input_ids": torch.randint(0, VOCAB, (4, SEQ))}
    prefix = FixedPrefix(target, [DOWN])
    w = target.get_submodule(DOWN).weight
    grads = []
    for run in (lambda: target_output(target, x), lambda: prefix.output(target, x), lambda: prefix.output(target, x)):
        w.grad = None
        run().pow(2).mean().backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-5, atol=1e-8)


def test_modules_tied_to_a_changing_module_are_not_replayed():
    """With tied embeddings, editing the unembedding edits the embedding too: the embedding must run every time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    target = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=True,
                    attn_implementation="eager")
    ).eval()  # fmt: skip
    assert target.lm_head.weight is target.model.embed_tokens.weight
    prefix = FixedPrefix(target, ["lm_head"])
    assert "model.embed_tokens" not in prefix._prefix and "model.embed_tokens" in prefix._changing_raw
    x = {"input_ids": torch.randint(0, VOCAB, (4, SEQ))}
    edited = copy.deepcopy(target)
    with torch.no_grad():
        prefix.output(target, x)
        edited.lm_head.weight.mul_(3.0)
        torch.testing.assert_close(prefix.output(edited, x), target_output(edited, x), rtol=0, atol=1e-5)


def test_unit_effects_with_a_replayed_prefix_equal_plain_ones():
    torch.manual_seed(0)
    target = tiny_llama(n_layers=3).eval()
    x = {"input_ids": torch.randint(0, VOCAB, (6, SEQ))}
    units = [Unit(DOWN, j) for j in (0, 5, 31)]
    plain = unit_effects(target, units, x, 4)
    replayed = unit_effects(target, units, x, 4, FixedPrefix(target, [DOWN]))
    torch.testing.assert_close(replayed, plain, rtol=1e-5, atol=1e-9)
    assert plain.min() > 0
    with pytest.raises(ValueError, match="outside the replay's changing modules"):
        unit_effects(target, [Unit("model.layers.0.mlp.up_proj", 0)], x, 4, FixedPrefix(target, [DOWN]))
    with pytest.raises(ValueError, match="not modules of the target"):
        FixedPrefix(target, ["model.layers.9.mlp.down_proj"])


def test_a_new_batch_never_takes_a_dropped_batch_replay():
    """Batches are keyed by their memory; a batch freed and another allocated in its place must not replay the
    first one's outputs (the replay holds every batch it keyed)."""
    torch.manual_seed(0)
    target = tiny_llama(n_layers=2).eval()
    prefix = FixedPrefix(target, ["model.layers.1.mlp.down_proj"])
    with torch.no_grad():
        for _ in range(6):
            x = {"input_ids": torch.randint(0, VOCAB, (4, SEQ))}
            torch.testing.assert_close(prefix.output(target, x), target_output(target, x), rtol=0, atol=1e-6)
            del x
