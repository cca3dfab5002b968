"""Distillation through the shared loop: online, cached, on-policy, hidden states, student init, sequence-level."""

import json

import pytest
import torch

from slmkit.checkpoint import load_checkpoint
from slmkit.data import TokenizerMismatchError
from slmkit.distill import KDConfig, KDError
from slmkit.distill.run import distill
from slmkit.distill.sequence import distill_sequence
from slmkit.distill.student import evenly_spaced_layers
from slmkit.distill.teacher_cache import TeacherCacheError, build_teacher_cache
from slmkit.train import TrainConfig
from slmkit.train.pretrain import pretrain

STUDENT_YAML = "hidden_size: 16\nintermediate_size: 32\nnum_hidden_layers: 1\nnum_attention_heads: 2\nnum_key_value_heads: 1\n"


def cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=0, save_every=3,
                log_every=1, precision="fp32", eval_tokens=512, seed=3)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(tiny_dataset, tiny_model_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "t"
    pretrain(tiny_dataset, tiny_model_yaml, out, cfg(steps=30, save_every=0), quiet=True)
    return out


@pytest.fixture(scope="module")
def student_yaml(tmp_path_factory):
    f = tmp_path_factory.mktemp("s") / "student.yaml"
    f.write_text(STUDENT_YAML)
    return f


def log(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_online_distillation_trains_and_records_provenance(teacher, student_yaml, tiny_dataset, tmp_path, loss):
    out = tmp_path / "s"
    res = distill(teacher, student_yaml, tiny_dataset, out, cfg(), KDConfig(loss=loss, temperature=2.0), quiet=True)
    assert res.steps == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    stage = load_checkpoint(out).provenance["stages"][-1]
    assert stage["stage"] == "distill" and stage["kd"]["loss"] == loss and stage["kd"]["temperature"] == 2.0
    assert len(stage["teacher"]["weights_sha256"]) == 64 and stage["tokens_seen"] == res.tokens
    assert "teacher_sha256" in (out / "README.md").read_text()


def test_student_from_teacher_layers_keeps_those_weights(teacher, tiny_dataset, tmp_path):
    assert evenly_spaced_layers(8, 3) == [0, 4, 7] and evenly_spaced_layers(2, 1) == [1]
    out = tmp_path / "s"
    distill(teacher, "teacher:1", tiny_dataset, out, cfg(steps=1, lr=1e-12, warmup_steps=0), KDConfig(), quiet=True)
    t, s = load_checkpoint(teacher).model, load_checkpoint(out).model
    assert s.config.num_hidden_layers == 1
    assert torch.allclose(s.model.layers[0].mlp.up_proj.weight, t.model.layers[1].mlp.up_proj.weight, atol=1e-6)
    with pytest.raises(KDError, match="teacher has 2 layers"):
        distill(teacher, "teacher:0,5", tiny_dataset, tmp_path / "bad", cfg(), KDConfig(), quiet=True)


def test_student_without_the_least_influential_teacher_layers(teacher, tiny_dataset, tmp_path):
    """`teacher:drop=N`: the kept layer is the one of highest block influence, its weights copied; the influence
    of every teacher layer is recorded; an impossible drop is refused by name."""
    out = tmp_path / "s"
    distill(teacher, "teacher:drop=1", tiny_dataset, out, cfg(steps=1, lr=1e-12, warmup_steps=0), KDConfig(),
            quiet=True)
    init = load_checkpoint(out).provenance["stages"][-1]["student"]
    bi = init["block_influence"]
    assert len(bi) == 2 and init["layers"] == [max(range(2), key=lambda i: (bi[i], -i))]
    t, s = load_checkpoint(teacher).model, load_checkpoint(out).model
    kept = init["layers"][0]
    assert s.config.num_hidden_layers == 1
    assert torch.allclose(s.model.layers[0].self_attn.q_proj.weight, t.model.layers[kept].self_attn.q_proj.weight,
                          atol=1e-6)
    with pytest.raises(KDError, match=r"teacher:drop=2: the teacher has 2 layers; drop between 1 and 1"):
        distill(teacher, "teacher:drop=2", tiny_dataset, tmp_path / "bad", cfg(), KDConfig(), quiet=True)


def test_cached_distillation_matches_its_inputs_and_refuses_others(teacher, student_yaml, tiny_dataset, tmp_path):
    cache = build_teacher_cache(teacher, tiny_dataset, tmp_path / "cache", k=8, seq_len=32, progress=False)
    out = tmp_path / "s"
    res = distill(teacher, student_yaml, tiny_dataset, out, cfg(), KDConfig(alpha=0.8), cache=cache, quiet=True)
    assert res.steps == 6 and load_checkpoint(out).provenance["stages"][-1]["cache"] == str(cache.resolve())
    with pytest.raises(TeacherCacheError, match="temperature"):
        distill(teacher, student_yaml, tiny_dataset, tmp_path / "x", cfg(), KDConfig(temperature=2.0), cache=cache,
                quiet=True)
    with pytest.raises(KDError, match="seq_len=32"):
        distill(teacher, student_yaml, tiny_dataset, tmp_path / "x", cfg(seq_len=16), KDConfig(), cache=cache,
                quiet=True)
    with pytest.raises(KDError, match="needs the teacher online"):
        distill(teacher, student_yaml, tiny_dataset, tmp_path / "x", cfg(), KDConfig(on_policy=0.5), cache=cache,
                quiet=True)


def test_on_policy_and_hidden_state_distillation_resume_exactly(teacher, student_yaml, tiny_dataset, tmp_path):
    kd = KDConfig(loss="jsd", on_policy=0.5, on_policy_tokens=8, hidden_weight=1.0)
    straight = tmp_path / "a"
    distill(teacher, student_yaml, tiny_dataset, straight, cfg(), kd, quiet=True)
    from slmkit.distill.steps import KDStep

    chooser = KDStep(KDConfig(on_policy=0.5), load_checkpoint(teacher).model, seed=3)
    assert 0 < sum(chooser.is_on_policy(s) for s in range(6)) < 6  # a mix of on-policy and dataset batches
    crashed = tmp_path / "b"

    def crash(step, _):
        if step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        distill(teacher, student_yaml, tiny_dataset, crashed, cfg(), kd, on_step_end=crash, quiet=True)
    assert (crashed / "last" / "extra.safetensors").exists()  # the learned hidden-state maps are in the state
    distill(teacher, student_yaml, tiny_dataset, crashed, cfg(), kd, resume=True, quiet=True)
    la = [r["loss"] for r in log(straight) if "loss" in r]
    lb = [r["loss"] for r in log(crashed) if "loss" in r]
    assert lb == pytest.approx(la, rel=1e-5)


def test_refusals_before_training(teacher, student_yaml, tiny_dataset, tmp_path):
    from slmkit.data import build_dataset

    other = tmp_path / "other_ds"
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, words in enumerate(["completely different words", "for another tokenizer", "with its own merges"]):
        (corpus / f"{i}.txt").write_text((words + " ") * 200)
    build_dataset([str(corpus)], other, vocab_size=300, val_fraction=0.1, progress=False)
    with pytest.raises(TokenizerMismatchError, match="--mode sequence"):
        distill(teacher, student_yaml, other, tmp_path / "x", cfg(), KDConfig(), quiet=True)
    with pytest.raises(KDError, match="temperature"):
        KDConfig(temperature=0)
    with pytest.raises(KDError, match="student has 1 layers|out of range|names"):
        distill(teacher, student_yaml, tiny_dataset, tmp_path / "x", cfg(),
                KDConfig(hidden_weight=1.0, layer_map="0:1,3:1"), quiet=True)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()  # nothing started


def test_sequence_level_distillation_across_tokenizers(teacher, student_yaml, tmp_path):
    from slmkit.data import build_dataset

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.py").write_text("def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n" * 100)
    (corpus / "b.md").write_text("Notes about the code and how to call f.\n" * 100)
    ds = tmp_path / "student_ds"  # its own tokenizer, unlike the teacher's
    build_dataset([str(corpus)], ds, vocab_size=280, val_fraction=0.5, progress=False)
    out = tmp_path / "s"
    res = distill_sequence(teacher, student_yaml, ds, out, cfg(steps=4, save_every=0), prompts=6, prompt_tokens=8,
                           new_tokens=12, quiet=True)
    lines = (out / "teacher_corpus.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(ln)["text"] for ln in lines)
    assert res.steps == 4 and load_checkpoint(out).provenance["stages"][-1]["mode"] == "sequence"


def test_distilling_into_a_pruned_student_keeps_it_sparse_and_loadable(teacher, tiny_dataset, tmp_path):
    """Prune, then distill (KD recovery): the student's zeros stay, and its passes travel with it."""
    from slmkit.compress.base import count_parameters
    from slmkit.compress.run import compress, parse_pass

    pruned = tmp_path / "pruned"
    compress(teacher, pruned, [parse_pass("prune.magnitude:sparsity=0.5")], speed=False)
    before = count_parameters(load_checkpoint(pruned).model)
    out = tmp_path / "recovered"
    distill(teacher, pruned, tiny_dataset, out, cfg(steps=3, save_every=0), KDConfig(), quiet=True)
    ck = load_checkpoint(out)
    assert [p["name"] for p in ck.provenance["passes"]] == ["prune.magnitude"]
    assert [s["stage"] for s in ck.provenance["stages"]] == ["train", "compress", "distill"]
    assert count_parameters(ck.model) == before


@pytest.mark.parametrize("extra", ["num_local_experts: 4\nnum_experts_per_tok: 2\n",
                                   "attention_type: linformer\nlinformer_block: 8\nlinformer_k: 2\n"])
def test_efficient_architectures_distill(teacher, tiny_dataset, tmp_path, extra):
    """MoE and Linformer students train under the KD step like any other (aux loss included for MoE)."""
    student = tmp_path / "student.yaml"
    student.write_text(STUDENT_YAML + extra)
    out = tmp_path / "s"
    res = distill(teacher, student, tiny_dataset, out, cfg(steps=3, save_every=0), KDConfig(), quiet=True)
    assert res.steps == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in res.history)
    if "experts" in extra:
        assert all("aux_loss" in r for r in res.history)
    ck = load_checkpoint(out)
    x = torch.randint(0, ck.config.vocab_size, (1, 20))
    with torch.no_grad():
        full = ck.model(x)
        cache = ck.model.new_cache(1, 24)
        steps = [ck.model(x[:, :12], cache=cache)] + [ck.model(x[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.slow
def test_ddp_distillation_on_two_processes_matches_one(teacher, student_yaml, tiny_dataset, tmp_path):
    """torchrun with gloo, hidden-state maps (synced by hand) and on-policy batches: same losses as one process
    running the same global batch as two accumulation steps."""
    import os
    import subprocess
    import sys

    common = ["distill", "--teacher", str(teacher), "--student", str(student_yaml), "--data", str(tiny_dataset),
              "--steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "32", "--precision",
              "fp32", "--eval-every", "0", "--save-every", "0", "--seed", "5", "--hidden-weight", "1.0",
              "--on-policy", "0.5", "--on-policy-tokens", "8", "--loss", "jsd"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "slmkit.cli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "slmkit.cli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    la = [(r["step"], r["loss"]) for r in log(tmp_path / "one") if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in log(tmp_path / "two") if "loss" in r]
    assert la[-1][0] == lb[-1][0] == 4 and lb[-1][1] == pytest.approx(la[-1][1], rel=1e-4)
    a, b = load_checkpoint(tmp_path / "one").model.state_dict(), load_checkpoint(tmp_path / "two").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the same student after 4 steps


def test_alpha_zero_is_cross_entropy_without_a_teacher_forward():
    """alpha=0 (healing a pruned student on the data alone): the teacher is never run and the loss is the
    student's next-token cross-entropy."""
    from slmkit.distill.steps import KDStep
    from slmkit.model import CausalLM, resolve_model_config

    class NoForward(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("the teacher ran")

    torch.manual_seed(0)
    student = CausalLM(resolve_model_config("micro", vocab_size=64))
    ids = torch.randint(0, 64, (2, 12))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loss, metrics = KDStep(KDConfig(alpha=0.0), NoForward())(student, batch)
    ce = torch.nn.functional.cross_entropy(student(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(loss, ce, atol=1e-6) and float(metrics["kd"]) == 0.0
    loss.backward()
    assert student.lm_head.weight.grad is not None
