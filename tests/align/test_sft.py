"""SFT: exact assistant-only masks, packing, malformed lines, batches, the step, and `slm sft` end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from align_helpers import tiny_ckpt  # noqa: F401 - fixture

from slmkit.align.chat import chat_template_of
from slmkit.align.sft import SFTBatches, evaluate_assistant_tokens, sft, sft_step
from slmkit.align.sft_data import (ChatFormat, SFTDataError, SFTExample, SFTRecord, SFTStats, build_examples,
                                   make_rows, read_sft_records, row_inputs_and_labels, split_records, tokenize_record)
from slmkit.checkpoint import load_checkpoint
from slmkit.train import TrainConfig

CONVO = [{"role": "system", "content": "You write Python."},
         {"role": "user", "content": "Add two numbers."},
         {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
         {"role": "user", "content": "Now <|end|> subtract."},
         {"role": "assistant", "content": " lambda a, b: a - b\n"}]


@pytest.fixture(scope="module")
def fmt(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    template, variables = chat_template_of(tiny_ckpt)
    return ChatFormat(template, variables, ck.tokenizer(), ck.config.bos_token_id, ck.config.eos_token_id)


def spans(ids, target):
    """Contiguous runs of labelled tokens."""
    runs, cur = [], []
    for i, t in zip(ids, target):
        if t:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_mask_labels_exactly_the_assistant_contents_and_end_markers(fmt):
    ids, target = tokenize_record(SFTRecord("x", messages=CONVO), fmt)
    tok = fmt.tokenizer
    labelled = [tok.decode(run, skip_special_tokens=False) for run in spans(ids, target)]
    assert labelled == ["def add(a, b):\n    return a + b<|end|>", " lambda a, b: a - b\n<|end|>"]
    # Everything together is <bos> + the rendered conversation, token for token.
    from slmkit.align.chat import render_chat

    assert ids[0] == fmt.bos_id and not target[0]
    assert tok.decode(ids[1:], skip_special_tokens=False) == render_chat(fmt.template, CONVO)
    unlabelled = tok.decode([i for i, t in zip(ids, target) if not t], skip_special_tokens=False)
    assert "Add two numbers." in unlabelled and "<|assistant|>" in unlabelled and "return" not in unlabelled


def test_prompt_completion_labels_completion_and_eos(fmt):
    ids, target = tokenize_record(SFTRecord("x", prompt="def f(x):\n", completion="    return x  # <|end|>\n"), fmt)
    (run,) = spans(ids, target)
    assert run[-1] == fmt.eos_id
    assert fmt.tokenizer.decode(run[:-1], skip_special_tokens=False) == "    return x  # <|end|>\n"
    assert fmt.tokenizer.token_to_id("<|end|>") not in ids  # inside plain text it is text, not a control token


def test_template_that_is_not_prefix_stable_is_refused_by_message(fmt, tmp_path):
    # Renders the last message differently: the prefix up to message 2 is not a prefix of the whole.
    template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    bad = ChatFormat(template, {}, fmt.tokenizer, fmt.bos_id, fmt.eos_id)
    stats = SFTStats()
    assert build_examples([SFTRecord("f.jsonl:3", messages=CONVO)], bad, 256, stats) == []
    assert stats.problems[0].startswith("f.jsonl:3: message 2 (role 'assistant'): the chat template is not "
                                        "prefix-stable")


def test_malformed_lines_are_reported_by_line_number(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join([
        json.dumps({"messages": CONVO}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"prompt": "p"}),
        "",
        json.dumps([1, 2]),
        json.dumps({"prompt": "p", "completion": "c"}),
    ]) + "\n")
    f.open("ab").write(b"\xff\xfe\n")
    records, problems = read_sft_records([f])
    assert [r.where for r in records] == [f"{f}:1", f"{f}:8"]
    assert [p.split(": ", 1)[0] for p in problems] == [f"{f}:{n}" for n in (2, 3, 4, 5, 7, 9)]
    assert "invalid JSON" in problems[0] and "no assistant message" in problems[1]
    assert "message 0 needs" in problems[2] and "not UTF-8" in problems[5]


def test_nothing_valid_left_is_an_error_naming_the_lines(tiny_ckpt, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("{oops\n" + json.dumps({"messages": [{"role": "tool", "content": "x"},
                                                       {"role": "assistant", "content": "y"}]}) + "\n")
    with pytest.raises(SFTDataError, match=rf"no usable training examples.*{f}:1: invalid JSON"):
        sft(tiny_ckpt, [f], tmp_path / "out", TrainConfig(steps=1, batch_size=1, seq_len=32), val_fraction=0)
    with pytest.raises(SFTDataError, match="no such file"):
        read_sft_records([tmp_path / "missing.jsonl"])


def test_truncation_is_counted_and_examples_without_targets_dropped(fmt):
    long = SFTRecord("a", prompt="x " * 200, completion="y")
    short = SFTRecord("b", prompt="p", completion="c " * 100)
    stats = SFTStats()
    examples = build_examples([long, short], fmt, 16, stats)
    assert stats.truncated == 2 and stats.no_target == 1 and [e.where for e in examples] == ["b"]
    assert len(examples[0].ids) == 17


def example(n, start, labelled_from):
    ids = np.arange(start, start + n, dtype=np.int64)
    return SFTExample(f"e{start}", ids, np.arange(n) >= labelled_from)


def test_packing_keeps_examples_whole_and_masks_exact():
    exs = [example(5, 100, 2), example(4, 200, 1), example(6, 300, 3), example(3, 400, 1)]
    rows = make_rows(exs, seq_len=9, pad_id=0, pack=True)  # rows of 10 tokens
    assert rows.examples_per_row.tolist() == [2, 2] and rows.tokens.shape == (2, 10)
    assert rows.tokens[0].tolist() == [100, 101, 102, 103, 104, 200, 201, 202, 203, 0]
    assert rows.target[0].tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 1, 0]
    assert rows.tokens[1].tolist() == [300, 301, 302, 303, 304, 305, 400, 401, 402, 0]
    inputs, labels = row_inputs_and_labels(rows.tokens, rows.target)
    # Labels are the next token exactly where it is a target: never across examples, never on padding.
    assert labels[0].tolist() == [-100, 102, 103, 104, -100, 201, 202, 203, -100]
    assert inputs[0].tolist() == rows.tokens[0, :-1].tolist()
    assert rows.fill == pytest.approx(18 / 20)


def test_no_pack_pads_one_example_per_row():
    rows = make_rows([example(5, 100, 2), example(3, 200, 1)], seq_len=9, pad_id=7, pack=False)
    assert rows.examples_per_row.tolist() == [1, 1]
    assert rows.tokens[1].tolist() == [200, 201, 202] + [7] * 7 and rows.target[1, 3:].sum() == 0


def test_batches_are_deterministic_cover_each_epoch_and_cut_padding():
    rows = make_rows([example(n, 10 * n, 1) for n in range(2, 9)], seq_len=9, pad_id=0, pack=False)
    b = SFTBatches(rows, global_batch=3, seed=5)
    seen = np.concatenate([b.indices(s) for s in range(7)])  # 21 draws = 3 epochs of 7 rows
    for epoch in range(3):
        assert sorted(seen[7 * epoch:7 * epoch + 7]) == list(range(7))
    assert np.array_equal(SFTBatches(rows, 3, 5).indices(4), b.indices(4))
    batch = b.batch(0, slice(0, 3))
    longest = max(int(rows.real[i].sum()) for i in b.indices(0))
    assert batch["input_ids"].shape == (3, longest - 1)
    assert b.target_tokens(1) == int(rows.target[b.indices(0)][:, 1:].sum())


def test_step_loss_is_cross_entropy_over_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [1, -100, -100, -100, 2]])
    loss, metrics = sft_step(lambda ids: logits, {"input_ids": torch.zeros(2, 5, dtype=torch.long), "labels": labels})
    keep = labels != -100
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], labels[keep]).item())
    assert metrics["assistant_tokens"].item() == 4


def test_split_is_by_content_and_never_empty():
    records = [SFTRecord(f"f:{i}", prompt=f"p{i}", completion="c") for i in range(20)]
    train, val = split_records(records, 0.2)
    assert len(train) + len(val) == 20 and val
    train2, val2 = split_records(list(reversed(records)), 0.2)
    assert {r.where for r in val} == {r.where for r in val2}
    assert len(split_records(records[:2], 0.01)[1]) == 1


def test_eval_on_assistant_tokens(tiny_ckpt, fmt):
    ck = load_checkpoint(tiny_ckpt)
    exs = build_examples([SFTRecord("x", messages=CONVO)], fmt, 128, SFTStats())
    rows = make_rows(exs, 128, 0, pack=True)
    from slmkit.data import token_byte_lengths

    res = evaluate_assistant_tokens(ck.model, rows, token_byte_lengths(fmt.tokenizer))
    assert res["tokens"] == int(rows.target[:, 1:].sum()) and res["loss"] > 0 and res["bits_per_byte"] > 0


def chat_file(path, n=40):
    lines = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                              {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}))
    path.write_text("\n".join(lines) + "\n{broken\n")
    return path


def test_slm_sft_end_to_end(tiny_ckpt, tmp_path):
    data = chat_file(tmp_path / "chat.jsonl")
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "sft", str(tiny_ckpt), "--data", str(data), "--out",
                        str(out), "--steps", "16", "--batch-size", "4", "--seq-len", "64", "--lr", "3e-3",
                        "--precision", "fp32", "--val-fraction", "0.1", "--eval-every", "0"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{data}:41: invalid JSON" in r.stderr
    stage = json.loads((out / "slmkit.json").read_text())["stages"][-1]
    assert stage["stage"] == "sft" and stage["data"]["train"]["skipped"] == 1 and stage["data"]["pack"]
    assert stage["assistant_tokens"] > 0 and "assistant tokens trained on" in r.stdout
    assert stage["metrics"]["val_loss"] < stage["metrics"]["start_val_loss"]
    assert load_checkpoint(out).config.hidden_size == 32


def test_sft_with_lora_writes_adapter_and_merged_checkpoint(tiny_ckpt, tmp_path):
    from slmkit.align.lora import LoRAConfig

    data = chat_file(tmp_path / "chat.jsonl", n=12)
    out = tmp_path / "sft-lora"
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=64, lr=1e-2, precision="fp32", eval_every=0, save_every=0)
    sft(tiny_ckpt, [data], out, cfg, pack=False, val_fraction=0.2, lora=LoRAConfig(rank=2, targets=("q_proj",)),
        quiet=True)
    stage = json.loads((out / "slmkit.json").read_text())["stages"][-1]
    assert stage["lora"]["trainable_parameters"] < stage["lora"]["total_parameters"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged, base = load_checkpoint(out).model, load_checkpoint(tiny_ckpt).model
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # merged back to a plain Linear
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_packed_rows_compute_exactly_what_each_example_alone_would():
    from slmkit.align.sft import SFTBatches
    from slmkit.align.sft_data import packed_inputs
    from slmkit.model import CausalLM, ModelConfig

    exs = [example(5, 10, 2), example(4, 20, 1), example(6, 30, 3), example(3, 40, 1)]
    rows = make_rows(exs, seq_len=9, pad_id=0, pack=True)
    assert rows.document[0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 0]
    packed = packed_inputs(rows.document[:, :-1])
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).eval()
    batch = SFTBatches(rows, global_batch=2, seed=0).batch(0, slice(0, 2))
    assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"}
    with torch.no_grad():
        out = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        leaky = model(batch["input_ids"])  # the old packing: attention crosses examples
        for r, row in enumerate(batch["input_ids"]):
            docs = batch["document_ids"][r]
            for d in docs.unique().tolist():
                if d == 0:
                    continue
                at = (docs == d).nonzero().flatten()
                alone = model(row[at][None])[0]  # the example on its own row
                assert torch.allclose(out[r, at], alone, atol=1e-5)
                if at[0] > 0:
                    assert not torch.allclose(leaky[r, at], alone, atol=1e-3)


def test_document_ids_bad_input():
    from slmkit.model import CausalLM, ModelConfig

    model = CausalLM(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2))
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="document_ids has shape"):
        model(ids, document_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not with a cache"):
        model(ids, document_ids=torch.zeros(2, 5, dtype=torch.long), cache=model.new_cache(2, 8))


def test_unpacked_batches_carry_no_document_inputs():
    from slmkit.align.sft import SFTBatches

    rows = make_rows([example(5, 10, 2), example(3, 20, 1)], seq_len=9, pad_id=7, pack=False)
    assert set(SFTBatches(rows, 2, 0).batch(0, slice(0, 2))) == {"input_ids", "labels"}
