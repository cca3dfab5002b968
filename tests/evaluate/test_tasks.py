"""Task scoring: multiple choice by log-likelihood (against a hand-computed forward), ROUGE-L, task files."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from slmkit.data import load_tokenizer
from slmkit.evaluate.tasks import (ChoiceItem, TaskError, encode_pair, load_task_file, loglikelihoods, rouge_l,
                                   score_choice_task, score_generation_task, GenerationItem)
from slmkit.model import CausalLM, ModelConfig


@pytest.fixture(scope="module")
def tok(tiny_dataset):
    return load_tokenizer(tiny_dataset)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.token_to_id("<|bos|>"), eos_token_id=tok.token_to_id("<|eos|>"),
                      pad_token_id=tok.token_to_id("<|pad|>"))
    return CausalLM(cfg).eval()


def hand_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1]).float(), -1)[0]
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def test_loglikelihood_matches_a_direct_forward(model, tok):
    reqs = [encode_pair(tok, "def add(a, b):", "\n    return a + b"),
            encode_pair(tok, "import os\n", "import sys"),
            encode_pair(tok, "x = 1", " + 2")]
    got = loglikelihoods(model, reqs, batch_size=2)  # padding across a batch must not change a score
    for (ctx, cont), (ll, greedy) in zip(reqs, got):
        assert ll == pytest.approx(hand_loglikelihood(model, ctx, cont), abs=1e-4)
        assert isinstance(greedy, bool)


def test_encode_pair_moves_the_context_space_to_the_choice(tok):
    ctx, cont = encode_pair(tok, "return ", "value")
    assert tok.decode(ctx) == "return"
    assert tok.decode(cont) == " value"


def test_choice_accuracy_and_length_normalisation(model, tok):
    items = [ChoiceItem("for i in range(10):", [" pass", " print(i)", " x"], 1),
             ChoiceItem("import", [" os", " sys"], 0)]
    res = score_choice_task(model, tok, items)
    lls = res["loglikelihoods"]
    for item, row in zip(items, lls):
        for choice, ll in zip(item.choices, row):
            ctx, cont = encode_pair(tok, item.context, choice)
            assert ll == pytest.approx(hand_loglikelihood(model, ctx, cont), abs=1e-4)
    acc = sum(max(range(len(r)), key=r.__getitem__) == it.gold for it, r in zip(items, lls)) / 2
    norm = sum(max(range(len(r)), key=lambda c: r[c] / len(it.choices[c].encode())) == it.gold
               for it, r in zip(items, lls)) / 2
    assert res["acc"] == acc and res["acc_norm"] == norm
    assert res["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_a_long_context_is_cut_from_the_left(model, tok):
    ctx = tok.encode("x = 1\n" * 200).ids
    (ll, _), = loglikelihoods(model, [(ctx, tok.encode(" y").ids)])
    assert ll == pytest.approx(hand_loglikelihood(model, ctx[-63:], tok.encode(" y").ids), abs=1e-4)


def test_batched_choice_scoring_equals_one_request_at_a_time(model, tok):
    """Shared-context batches (a context prefilled once, its cache repeated per choice, left-padded contexts
    and right-padded choices in one forward) give the scores of unbatched, unpadded forwards."""
    bos = model.config.bos_token_id
    items = [ChoiceItem("def add(a, b):\n", ["    return a + b", "    pass", "x", "    return sum([a, b, 0, 0])"], 0),
             ChoiceItem("import", [" os", " sys.path as p"], 0),
             ChoiceItem("for i in range(10):\n    total += i\n", ["print(total)", "    break"], 0),
             ChoiceItem("x = 1 " * 20, [" + 2", " - y * 3 + z"], 0),  # context cut: scored as plain rows
             ChoiceItem("#", [" a comment", "!"], 0)]
    requests = [encode_pair(tok, it.context, c) for it in items for c in it.choices]
    one_by_one = [loglikelihoods(model, [r], batch_size=1, bos_id=bos, share_context=False)[0] for r in requests]
    seen = []
    for batch_size in (1, 3, 16):
        got = loglikelihoods(model, requests, batch_size=batch_size, bos_id=bos, progress=seen.append)
        for (ll, greedy), (ref, ref_greedy) in zip(got, one_by_one):
            assert abs(ll - ref) < 1e-5 and greedy == ref_greedy
        assert sum(seen) == len(requests)
        seen.clear()
    for (ctx, cont), (ref, _) in zip(requests, one_by_one):  # and the unbatched path is the hand-computed one
        prefix = [bos] + ctx
        if len(prefix) + len(cont) <= 65:
            assert ref == pytest.approx(hand_loglikelihood(model, prefix, cont), abs=1e-4)


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "x y") == 0.0
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 of 6 each way
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert rouge_l("a b", "a x b y") == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def test_task_file_reports_bad_lines_and_sniffs_the_kind(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text("\n".join([
        json.dumps({"context": "1 + 1 =", "choices": [" 2", " 3"], "gold": 0}),
        "{not json",
        json.dumps({"context": "x", "choices": [" a"], "gold": 0}),
        json.dumps({"context": "x", "choices": [" a", " b"], "gold": 5}),
    ]) + "\n")
    task = load_task_file(f)
    assert task.kind == "choice" and len(task.items) == 1
    assert [s.split(": ")[0] for s in task.skipped] == [f"{f}:2", f"{f}:3", f"{f}:4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "choices": [" a", " b"], "gold": "0"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl: no valid task lines.*gold"):
        load_task_file(bad)
    with pytest.raises(TaskError, match="no such task file"):
        load_task_file(tmp_path / "missing.jsonl")


def test_generation_scored_by_rouge(model, tok):
    items = [GenerationItem("def f(x):", "return x"), GenerationItem("import", "os")]
    res = score_generation_task(model, tok, items, max_new_tokens=4)
    assert res["items"] == 2 and 0.0 <= res["score"] <= 1.0
    for o, it in zip(res["outputs"], items):
        assert o["score"] == pytest.approx(rouge_l(o["completion"], it.reference))
    with pytest.raises(TaskError, match="reference"):
        score_generation_task(model, tok, [GenerationItem("x")], max_new_tokens=2)
