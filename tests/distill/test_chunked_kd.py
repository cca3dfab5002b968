"""KDStep's fused, chunked loss equals its plain path over full logits — value, metrics and every gradient —
for each divergence, online and from a top-k cache, at several temperatures, alphas and chunk sizes (dividing
B*T or not), with masked labels, tied embeddings and bf16 autocast; and it stands aside where it must."""

import pytest
import torch
from torch import nn

from slmkit.distill import KDConfig, KDError, KDStep
from slmkit.distill.teacher_cache import teacher_topk
from slmkit.model import CausalLM, ModelConfig
from slmkit.train.chunked_losses import ENV_ENABLE, ENV_ROWS, output_head

V = 97


def config(hidden=32, layers=2, **kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2)
    return ModelConfig(**{**base, **kw})


def models(tied=True, **kw):
    torch.manual_seed(0)
    student = CausalLM(config(tie_word_embeddings=tied, **kw))
    teacher = CausalLM(config(hidden=48, layers=2, tie_word_embeddings=False))
    with torch.no_grad():  # a sharper teacher than init gives, so the divergences are far from 0
        teacher.lm_head.weight.mul_(20)
    return student, teacher


def batch(B=3, T=10, seed=0, teacher=None, k=None, temperature=1.0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=gen)
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    labels[2, -1] = -100
    b = {"input_ids": ids[:, :-1], "labels": labels}
    if k is not None:
        with torch.no_grad():
            top_ids, top_lp, tail = teacher_topk(teacher(b["input_ids"]), k, temperature)
        b.update(teacher_topk_ids=top_ids.to(torch.int32), teacher_topk_logprobs=top_lp.half(),
                 teacher_tail_logprob=tail)
    return b


def run(step, model, b, *, autocast=False):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        loss, metrics = step(model, b)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(step, model, b, monkeypatch, *, rows="7", autocast=False, rtol=1e-5, atol=1e-6):
    monkeypatch.setenv(ENV_ROWS, rows)
    monkeypatch.setenv(ENV_ENABLE, "1")
    assert step._fused_head(model) is not None  # this arm takes the fused path
    got = run(step, model, b, autocast=autocast)
    monkeypatch.setenv(ENV_ENABLE, "0")
    ref = run(step, model, b, autocast=autocast)
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert got[1].keys() == ref[1].keys()
    for key in ref[1]:
        torch.testing.assert_close(got[1][key].float(), ref[1][key].float(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"metric {key}: {m}")
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.7), (0.5, 1.0)])
@pytest.mark.parametrize("rows", ["1", "7", "30", "4096"])
def test_online_kd_matches_plain(loss, temperature, alpha, rows, monkeypatch):
    student, teacher = models()
    step = KDStep(KDConfig(loss=loss, temperature=temperature, alpha=alpha, beta=0.3), teacher,
                  student_config=student.config)
    compare(step, student, batch(), monkeypatch, rows=rows)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature,alpha,k", [(1.0, 0.5, 8), (2.0, 0.8, 5), (1.0, 1.0, V)])
@pytest.mark.parametrize("rows", ["1", "7", "30"])
def test_cached_topk_kd_matches_plain(loss, temperature, alpha, k, rows, monkeypatch):
    student, teacher = models(tied=False)
    step = KDStep(KDConfig(loss=loss, temperature=temperature, alpha=alpha), None, student_config=student.config)
    b = batch(teacher=teacher, k=k, temperature=temperature)
    compare(step, student, b, monkeypatch, rows=rows)


def test_confident_rows_take_the_exact_tail_in_both_paths(monkeypatch):
    student, teacher = models()
    with torch.no_grad():  # a student that puts nearly all mass on few tokens: the top-k's exact-tail branch
        student.lm_head.weight.mul_(400)
    step = KDStep(KDConfig(loss="forward_kl", alpha=0.5), None, student_config=student.config)
    compare(step, student, batch(teacher=teacher, k=16), monkeypatch, rows="4", rtol=1e-4, atol=1e-5)


def test_alpha_zero_is_cross_entropy_only(monkeypatch):
    student, teacher = models()
    step = KDStep(KDConfig(alpha=0.0), teacher, student_config=student.config)
    loss, metrics, _ = compare(step, student, batch(), monkeypatch)
    assert float(metrics["kd"]) == 0.0 and torch.isclose(loss, metrics["ce"])


def test_moe_student_keeps_aux_loss(monkeypatch):
    student, teacher = models(num_local_experts=4, num_experts_per_tok=2)
    step = KDStep(KDConfig(loss="jsd", temperature=2.0), teacher, student_config=student.config)
    _, metrics, _ = compare(step, student, batch(), monkeypatch)
    assert "aux_loss" in metrics


@pytest.mark.parametrize("cached", [False, True])
def test_bf16_autocast_matches_plain_autocast(cached, monkeypatch):
    student, teacher = models()
    step = KDStep(KDConfig(loss="forward_kl", temperature=2.0), None if cached else teacher,
                  student_config=student.config)
    b = batch(teacher=teacher, k=8, temperature=2.0) if cached else batch()
    compare(step, student, b, monkeypatch, autocast=True, rtol=3e-2, atol=3e-3)


class OpaqueHead(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


def test_teacher_with_an_opaque_head_is_read_through_its_logits(monkeypatch):
    student, teacher = models()
    teacher.lm_head = OpaqueHead(teacher.lm_head)
    assert output_head(teacher) is None and output_head(student) is not None
    step = KDStep(KDConfig(loss="reverse_kl", temperature=2.0), teacher, student_config=student.config)
    compare(step, student, batch(), monkeypatch)


def test_vocabulary_mismatch_and_bad_cache_ids_raise(monkeypatch):
    monkeypatch.setenv(ENV_ENABLE, "1")
    student, _ = models()
    other = CausalLM(config(vocab_size=V + 3))
    with pytest.raises(KDError, match="vocabularies differ"):
        KDStep(KDConfig(), other, student_config=student.config)(student, batch())
    b = batch(teacher=student, k=4)
    b["teacher_topk_ids"][0, 0, 0] = V
    with pytest.raises(KDError, match="beyond the student's vocabulary"):
        KDStep(KDConfig(), None, student_config=student.config)(student, b)


def test_hidden_state_kd_and_on_policy_keep_the_plain_path(monkeypatch):
    monkeypatch.setenv(ENV_ENABLE, "1")
    student, teacher = models()
    hidden = KDStep(KDConfig(hidden_weight=1.0), teacher, student_config=student.config)
    assert hidden._fused_head(student) is None
    _, metrics = hidden(student, batch())
    assert "hidden" in metrics
    on_policy = KDStep(KDConfig(on_policy=1.0, on_policy_tokens=3), teacher, student_config=student.config)
    b = {**batch(), "on_policy": True, "step": 0}
    calls = []
    orig = on_policy._fused_step
    on_policy._fused_step = lambda *a, **k: calls.append(1) or orig(*a, **k)
    loss, _ = on_policy(student, b)
    assert torch.isfinite(loss) and not calls


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.0, 0.8), (1.0, 0.0), (0.7, 1.0)])
def test_closed_form_forward_kl_gradient_equals_autograd(cached, temperature, alpha, monkeypatch):
    from slmkit.distill.chunked_kd import KDObjective

    student, teacher = models()
    step = KDStep(KDConfig(loss="forward_kl", temperature=temperature, alpha=alpha), None if cached else teacher,
                  student_config=student.config)
    b = batch(teacher=teacher, k=8, temperature=temperature) if cached else batch()
    monkeypatch.setattr(KDObjective, "analytic", False)
    ref = compare(step, student, b, monkeypatch)
    monkeypatch.setattr(KDObjective, "analytic", True)
    got = compare(step, student, b, monkeypatch)
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-5, atol=1e-6)
