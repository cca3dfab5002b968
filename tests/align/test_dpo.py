"""Preference data, packed batches, the reference cache and `slm dpo` end to end on a tiny checkpoint."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from slmkit.align.dpo import dpo
from slmkit.align.lora import LoRAConfig
from slmkit.align.preference_data import (PreferenceDataError, PreferenceDataWarning, PromptFormat,
                                          load_preference_pairs, split_pairs)
from slmkit.align.preference_losses import PreferenceConfig
from slmkit.align.preference_step import PreferenceBatches, collate_pairs, sequence_logps, unpack
from slmkit.align.reference_cache import reference_identity, reference_logps
from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.distill.teacher_cache import teacher_identity
from slmkit.model import CausalLM, ModelConfig
from slmkit.train import TrainConfig

WORDS = "apple river stone cloud paper window garden silver market letter".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_dataset):
    from slmkit.data import open_dataset

    ds = open_dataset(tiny_dataset)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=ds.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=ds.bos_token_id,
                      eos_token_id=ds.eos_token_id, pad_token_id=ds.pad_token_id, max_position_embeddings=128)
    return save_checkpoint(CausalLM(cfg), tmp_path_factory.mktemp("dpo") / "base", tokenizer_from=ds.path)


def fmt_of(ckpt):
    return PromptFormat.from_checkpoint(ckpt, load_checkpoint(ckpt).tokenizer())


def write_pairs(path, n=48, seed=0):
    """An easy preference: the chosen completion is always the same short pattern."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(4))
            f.write(json.dumps({"prompt": prompt, "chosen": " return True",
                                "rejected": " " + " ".join(rng.choice(WORDS) for _ in range(2))}) + "\n")
    return path


def test_malformed_lines_are_reported_by_line_number_and_identical_pairs_dropped(tmp_path, base):
    f = tmp_path / "pairs.jsonl"
    good = {"prompt": "a", "chosen": " b", "rejected": " c"}
    f.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"prompt": "a", "chosen": "b"}), "",
                            json.dumps({"prompt": "a", "chosen": " same", "rejected": " same"}),
                            json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"}),
                            json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "x",
                                        "rejected": "y"}),
                            json.dumps(good)]) + "\n")
    seen = []
    examples, stats = load_preference_pairs(f, fmt_of(base), seq_len=64, warn=seen.append)
    assert len(examples) == 2 and stats.identical == 1 and stats.lines == 7
    assert stats.problems[0].startswith(f"{f}:2: invalid JSON")
    assert stats.problems[1] == f"{f}:3: missing field(s) 'rejected'; " + stats.problems[1].split("; ", 1)[1]
    assert stats.problems[2].startswith(f"{f}:6: 'chosen' must be string(s)")
    assert stats.problems[3].startswith(f"{f}:7: 'chosen' must be a non-empty list of messages")
    assert any("skipped 4 of 7 line(s)" in m for m in seen) and any("dropped 1 pair" in m for m in seen)

    f.write_text("{broken\n" + json.dumps({"prompt": "a", "chosen": " x", "rejected": " x"}) + "\n")
    with pytest.raises(PreferenceDataError, match="no usable preference pair .1 line.s. skipped, 1 identical"):
        load_preference_pairs(f, fmt_of(base), seq_len=64, warn=lambda m: None)


def test_long_prompts_lose_their_start_with_a_warning_and_completions_stay_whole(tmp_path, base):
    f = tmp_path / "long.jsonl"
    long_prompt = " ".join(WORDS * 20)
    f.write_text(json.dumps({"prompt": long_prompt, "chosen": " return True", "rejected": " return False"}) + "\n")
    fmt = fmt_of(base)
    with pytest.warns(PreferenceDataWarning, match="1 prompt.s. longer than the context .seq_len=32.*truncated from the left"):
        (ex,), stats = load_preference_pairs(f, fmt, seq_len=32)
    tok = fmt.tokenizer
    full_prompt = [fmt.bos_id] + tok.encode(long_prompt, add_special_tokens=False).ids
    assert stats.prompts_truncated == 1 and stats.completions_truncated == 0
    assert ex.prompt.tolist() == full_prompt[-len(ex.prompt):]  # the end of the prompt is kept
    assert len(ex.prompt) + max(len(ex.chosen), len(ex.rejected)) == 32
    assert tok.decode(ex.chosen.tolist()) == " return True" and ex.chosen[-1] == fmt.eos_id


def test_chat_records_use_the_template_with_an_exact_boundary(tmp_path, base):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Sum 2 and 2?"}],
                             "chosen": [{"role": "assistant", "content": "4"}],
                             "rejected": [{"role": "assistant", "content": "5"}]}) + "\n")
    fmt = fmt_of(base)
    (ex,), _ = load_preference_pairs(f, fmt, seq_len=64)
    decode = lambda ids: fmt.tokenizer.decode(ids.tolist(), skip_special_tokens=False)  # noqa: E731
    assert decode(ex.prompt).endswith("<|user|>\nSum 2 and 2?<|end|>\n<|assistant|>\n")
    assert decode(ex.prompt).startswith("<|bos|><|system|>\nBe brief.")
    assert (decode(ex.chosen), decode(ex.rejected)) == ("4<|end|>", "5<|end|>")


def test_packed_batches_are_deterministic_count_real_tokens_and_label_only_completions(tmp_path, base):
    examples, _ = load_preference_pairs(write_pairs(tmp_path / "p.jsonl", n=10), fmt_of(base), seq_len=64)
    train, val = split_pairs(examples, 0.2)
    assert val and set(train).isdisjoint(val) and split_pairs(examples, 0.2) == (train, val)
    batches = PreferenceBatches(examples, train, None, global_batch=4, seed=7)
    b0 = batches.batch(3, slice(0, 4))
    assert all(torch.equal(b0[k], batches.batch(3, slice(0, 4))[k]) for k in b0)
    seen = [i for s in range(len(train) // 4) for i in batches.pair_ids(s)]
    assert len(set(seen)) == len(seen) and set(seen) <= set(train)  # one epoch: no pair twice
    assert b0["input_ids"].numel() == int(b0["seq_lens"].sum())  # the loop's token count is real tokens
    ids, labels = unpack(b0)
    pairs = [examples[i] for i in batches.pair_ids(3)]
    for r, e in enumerate(pairs + pairs):
        completion = e.chosen if r < len(pairs) else e.rejected
        assert labels[r][labels[r] != -100].tolist() == completion.tolist()
        assert ids[r, :len(e.prompt)].tolist() == e.prompt.tolist()


def test_reference_cache_equals_on_the_fly_log_probs_and_is_keyed(tmp_path, base):
    pairs = write_pairs(tmp_path / "p.jsonl", n=9)
    ck = load_checkpoint(base)
    examples, _ = load_preference_pairs(pairs, fmt_of(base), seq_len=64)
    ident = reference_identity(pairs, teacher_identity(ck), seq_len=64, amp_dtype=None)
    cpu = torch.device("cpu")
    cached, reused = reference_logps(tmp_path / "ref.safetensors", ident, ck.model, examples, batch_size=4,
                                     device=cpu, amp_dtype=None)
    assert not reused and cached.shape == (9, 2)
    with torch.no_grad():  # on the fly, one pair per forward (no padding at all)
        for i, e in enumerate(examples):
            logp, ntok = sequence_logps(ck.model, collate_pairs([e], None))
            torch.testing.assert_close(cached[i], logp.float(), atol=1e-5, rtol=1e-5)
            assert ntok.tolist() == [len(e.chosen), len(e.rejected)]
    again, reused = reference_logps(tmp_path / "ref.safetensors", ident, None, examples, batch_size=4, device=cpu,
                                    amp_dtype=None)
    assert reused and torch.equal(again, cached)
    write_pairs(pairs, n=9, seed=1)  # other pairs: another key, so the cache is rebuilt, never reused
    ident2 = reference_identity(pairs, teacher_identity(ck), seq_len=64, amp_dtype=None)
    examples2, _ = load_preference_pairs(pairs, fmt_of(base), seq_len=64)
    _, reused = reference_logps(tmp_path / "ref.safetensors", ident2, ck.model, examples2, batch_size=4,
                                device=cpu, amp_dtype=None)
    assert not reused


def slm(*args):
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}, timeout=300)


@pytest.mark.slow
def test_slm_dpo_raises_held_out_preference_accuracy(tmp_path, base):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "dpo"
    r = slm("dpo", base, "--pairs", pairs, "--out", out, "--steps", 16, "--batch-size", 8, "--seq-len", 48,
            "--lr", 2e-3, "--warmup-steps", 2, "--eval-every", 8, "--val-fraction", 0.25, "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "held-out preference accuracy 0.000 ->" in r.stdout
    stage = load_checkpoint(out).provenance["stages"][-1]  # an ordinary, loadable checkpoint
    m = stage["metrics"]
    assert stage["stage"] == "dpo" and stage["pairs"]["val"] >= 6 and stage["reference"]["reused"] is False
    assert m["start_preference_accuracy"] == 0.0 and m["start_preference_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert m["val_preference_accuracy"] >= 0.9 and m["val_preference_loss"] < 0.5
    log = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(rec for rec in log if "reward_accuracy" in rec)
    assert {"reward_margin", "logps_chosen", "logps_rejected", "kl_chosen", "chosen_reward"} <= set(step)
    assert (out / "reference_logps.safetensors").is_file()

    r = slm("dpo", base, "--pairs", tmp_path / "missing.jsonl", "--out", tmp_path / "x", "--seq-len", 48)
    assert r.returncode == 2 and "missing.jsonl: no such file" in r.stderr


@pytest.mark.slow
def test_lora_simpo_run_saves_adapter_and_merged_checkpoint(tmp_path, base):
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=24)
    out = tmp_path / "simpo"
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=48, lr=1e-2, warmup_steps=1, eval_every=0, save_every=3,
                      precision="fp32")
    dpo(base, pairs, out, cfg, PreferenceConfig(loss="simpo"), lora=LoRAConfig(rank=2, targets=("q_proj", "v_proj")),
        quiet=True)
    assert not (out / "reference_logps.safetensors").exists()  # SimPO needs no reference
    stage = load_checkpoint(out).provenance["stages"][-1]
    lora = stage["lora"]
    assert lora["trainable_parameters"] == 2 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2)  # 2 layers; q: 32->32, v: 32->16
    assert lora["peak_rss_bytes"] > 0 and (out / "adapter" / "adapter_model.safetensors").is_file()
    r = slm("merge-lora", base, out / "adapter", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    a, b = load_checkpoint(out).model, load_checkpoint(tmp_path / "merged").model
    ids = torch.arange(20).view(2, 10)
    torch.testing.assert_close(a(ids), b(ids), atol=1e-5, rtol=0)
