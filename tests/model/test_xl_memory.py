"""Transformer-XL segment memory: equivalence with one pass over the concatenation, stop-gradient,
positions, errors, consecutive-segment batches, training and evaluation with memory."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slmkit.model import CausalLM, ConfigError, ModelConfig
from slmkit.model.xl_memory import XLMemory

torch.set_num_threads(1)


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, memory_length=64)
    return ModelConfig(**{**base, **kw})


def model_of(**kw) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(tiny(**kw)).eval()


def forward_with_mask(model: CausalLM, ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Reference: one pass over `ids` (B, N) where query i may attend key j iff allowed[i, j] (N, N)."""
    B, N = ids.shape
    pos = torch.arange(N).expand(B, N)
    x = model.model.embed_tokens(ids)
    rope = model.model.rotary_emb(pos, x.dtype)
    for layer in model.model.layers:
        x = layer(x, rope, allowed[None, None])
    return model.lm_head(model.model.norm(x))


def xl_span_mask(N: int, T: int, M: int) -> torch.Tensor:
    """Query p of the segment starting at s = (p // T) * T sees keys max(0, s - M) <= j <= p."""
    p = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    seg_start = (p // T) * T
    return (j <= p) & (j >= (seg_start - M).clamp(min=0))


def by_segments(model, ids, T, memory):
    return torch.cat([model(ids[:, s:s + T], memory=memory) for s in range(0, ids.shape[1], T)], dim=1)


# -- equivalence ------------------------------------------------------------------------------------


def test_memory_spanning_all_earlier_segments_equals_one_full_pass():
    model = model_of(memory_length=64)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(ids)
        mem = model.new_memory(2)
        seg1 = model(ids[:, :12], memory=mem)
        seg2 = model(ids[:, 12:30], memory=mem)  # segments need not have equal lengths
    assert (seg1 - full[:, :12]).abs().max() < 1e-5
    assert (seg2 - full[:, 12:]).abs().max() < 1e-5
    assert mem.length == 30 and mem.offset == 30


@pytest.mark.parametrize("M", [3, 6, 10])  # shorter than, equal to and longer than a segment
def test_short_memory_equals_full_pass_restricted_to_its_span(M):
    model = model_of(memory_length=M)
    ids, T = torch.randint(0, 97, (2, 24)), 6
    with torch.no_grad():
        got = by_segments(model, ids, T, model.new_memory(2))
        want = forward_with_mask(model, ids, xl_span_mask(24, T, M))
        unrestricted = model(ids)
    assert (got - want).abs().max() < 1e-5
    assert (got - unrestricted).abs().max() > 1e-3  # the restriction matters: the test can tell them apart


def test_memory_length_zero_is_exactly_the_plain_model():
    model = model_of(memory_length=0)
    ids = torch.randint(0, 97, (2, 16))
    mem = model.new_memory(2)
    with torch.no_grad():
        for s in (0, 8):
            assert torch.equal(model(ids[:, s:s + 8], memory=mem), model(ids[:, s:s + 8]))
    assert mem.length == 0 and mem.keys == [None, None]  # nothing kept (positions restart each segment)


def test_reset_forgets_the_past():
    model = model_of()
    a, b = torch.randint(0, 97, (1, 8)), torch.randint(0, 97, (1, 8))
    mem = model.new_memory(1)
    with torch.no_grad():
        model(a, memory=mem)
        with_past = model(b, memory=mem)
        mem.reset()
        assert mem.length == 0 and mem.offset == 0
        fresh = model(b, memory=mem)
    assert torch.equal(fresh, model(b)) and not torch.allclose(with_past, fresh, atol=1e-4)


# -- positions --------------------------------------------------------------------------------------


def test_positions_continue_from_the_offset():
    model = model_of(memory_length=4)
    seen = []
    rotary_forward = model.model.rotary_emb.forward
    model.model.rotary_emb.forward = lambda pos, dtype: (seen.append(pos.clone()), rotary_forward(pos, dtype))[1]
    mem = model.new_memory(2)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 97, (2, 5)), memory=mem)
    assert [p[0].tolist() for p in seen] == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]
    assert torch.equal(seen[1][0], seen[1][1])  # rows share positions
    assert mem.offset == 15 and mem.length == 4


def test_rebasing_past_max_positions_keeps_relative_positions():
    # Same weights; one model rebases its memory every few segments (max_position_embeddings=12).
    ref, small = model_of(memory_length=6), model_of(memory_length=6, max_position_embeddings=12)
    small.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 97, (2, 40))
    m_ref, m_small = ref.new_memory(2), small.new_memory(2)
    with torch.no_grad():
        want = by_segments(ref, ids, 5, m_ref)
        got = by_segments(small, ids, 5, m_small)
    assert m_ref.offset == 40 and m_small.offset <= 12
    assert (got - want).abs().max() < 1e-4


# -- gradients --------------------------------------------------------------------------------------


def test_no_gradient_flows_into_the_memory():
    model = model_of(memory_length=8)
    model.train()
    ids = torch.randint(0, 97, (2, 16))

    def grads_of_segment2(seg1_grad: bool):
        model.zero_grad()
        mem = model.new_memory(2)
        with torch.set_grad_enabled(seg1_grad):
            model(ids[:, :8], memory=mem)
        assert all(not k.requires_grad and k.grad_fn is None for k in mem.keys + mem.values)
        loss = F.cross_entropy(model(ids[:, 8:15], memory=mem).flatten(0, 1), ids[:, 9:16].flatten())
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    with_graph, without = grads_of_segment2(True), grads_of_segment2(False)
    for name in with_graph:
        assert torch.allclose(with_graph[name], without[name], atol=1e-7), name
    # ...and the memory did matter for the gradient: compare with no memory at all.
    model.zero_grad()
    F.cross_entropy(model(ids[:, 8:15]).flatten(0, 1), ids[:, 9:16].flatten()).backward()
    q = model.model.layers[1].self_attn.q_proj.weight
    assert not torch.allclose(q.grad, with_graph["model.layers.1.self_attn.q_proj.weight"], atol=1e-6)


# -- errors -----------------------------------------------------------------------------------------


def test_memory_with_cache_is_refused():
    model = model_of()
    with pytest.raises(ValueError, match="memory and cache cannot be used together"):
        model(torch.randint(0, 97, (1, 4)), memory=model.new_memory(1), cache=model.new_cache(1, 8))


def test_memory_with_another_batch_size_is_refused():
    model = model_of()
    with pytest.raises(ValueError, match="batch size 2, got a batch of 3"):
        model(torch.randint(0, 97, (3, 4)), memory=model.new_memory(2))


def test_memory_with_linformer_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="memory_length"):
        tiny(attention_type="linformer", linformer_k=4, linformer_block=8)
    with pytest.raises(ConfigError, match="attention_type='full'"):
        XLMemory(tiny(memory_length=0, attention_type="linformer", linformer_k=4, linformer_block=8), 1, 8)


# -- consecutive-segment batches and the step function ----------------------------------------------


class ArrayStream:
    def __init__(self, a):
        self.a = np.asarray(a)

    def __len__(self):
        return len(self.a)

    def window(self, start, length):
        return self.a[start:start + length]


def test_segment_batches_feed_each_lane_its_consecutive_segments():
    from slmkit.train.segments import SegmentBatches

    sb = SegmentBatches(ArrayStream(np.arange(1000)), seq_len=10, global_batch=4, seed=3)
    n = sb.segments_per_lane
    assert sb.lane_length == 250 and n == 24
    b0, b1 = sb.batch(0, slice(0, 4)), sb.batch(1, slice(0, 4))
    assert torch.equal(b1["input_ids"][:, 0], b0["input_ids"][:, -1] + 1)  # row i continues where it stopped
    assert torch.equal(b0["labels"], b0["input_ids"] + 1)
    lanes_first = b0["input_ids"][:, 0]
    assert torch.equal(lanes_first // 250, torch.arange(4))  # row i reads lane i, lanes are disjoint
    for step in range(2 * n):
        b = sb.batch(step, slice(0, 4))
        assert (b["input_ids"] // 250 == torch.arange(4)[:, None]).all()  # never leaves its lane
        assert bool(b["lane_reset"].all()) == (step % n == 0)
    assert torch.equal(sb.batch(n, slice(0, 4))["input_ids"], b0["input_ids"])  # wraps around
    part = sb.batch(5, slice(2, 4))
    assert torch.equal(part["input_ids"], sb.batch(5, slice(0, 4))["input_ids"][2:])
    assert part["lanes"].tolist() == [2, 3]
    again = SegmentBatches(ArrayStream(np.arange(1000)), 10, 4, seed=3).batch(7, slice(0, 4))
    assert torch.equal(again["input_ids"], sb.batch(7, slice(0, 4))["input_ids"])  # pure in (seed, step)
    with pytest.raises(ValueError, match="too few"):
        SegmentBatches(ArrayStream(np.arange(30)), seq_len=10, global_batch=4, seed=0)


def test_xl_step_keeps_memory_per_lane_slice_and_resets_on_wrap():
    from slmkit.train.segments import SegmentBatches, XLLMStep

    model = model_of(memory_length=8)
    sb = SegmentBatches(ArrayStream(np.arange(200) % 97), seq_len=8, global_batch=4, seed=0)
    step = XLLMStep()
    for s in range(sb.segments_per_lane + 1):
        for rows in (slice(0, 2), slice(2, 4)):  # two micro-batches per step
            loss, metrics = step(model, sb.batch(s, rows))
            assert torch.isfinite(loss) and "loss" in metrics
        if s == 1:
            assert all(m.offset == 16 and m.length == 8 for m in step.memories.values())
    assert sorted(step.memories) == [(0, 1), (2, 3)]
    assert all(m.offset == 8 for m in step.memories.values())  # reset at the wrap, then one segment read


# -- training, evaluation, generation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_with_memory(tmp_path_factory):
    from slmkit.data import build_dataset
    from slmkit.train import TrainConfig
    from slmkit.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("xl")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "memory", "segment", "token", "lane", "cache", "model"]
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 400)) + "\n")
    ds = root / "ds"
    build_dataset([str(corpus)], ds, vocab_size=300, val_fraction=0.2, progress=False)
    spec = root / "model.yaml"
    spec.write_text("hidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
                    "num_key_value_heads: 2\nmemory_length: 16\n")
    cfg = TrainConfig(steps=6, batch_size=4, micro_batch_size=2, seq_len=16, warmup_steps=1, eval_every=0,
                      save_every=0, log_every=1, precision="fp32", eval_tokens=256, seed=1)
    result = pretrain(ds, spec, root / "out", cfg, quiet=True)
    return ds, root / "out", result


def test_pretrain_with_memory_length_trains_on_segments(trained_with_memory):
    from slmkit.checkpoint import load_checkpoint

    _, out, result = trained_with_memory
    assert result.steps == 6 and result.tokens == 6 * 4 * 16
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) >= 6 and all(np.isfinite(losses))
    assert load_checkpoint(out).config.memory_length == 16


def test_kv_cache_generation_works_for_a_model_trained_with_memory(trained_with_memory):
    from slmkit.checkpoint import load_checkpoint

    model = load_checkpoint(trained_with_memory[1]).model.eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :6], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(6, 12)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_long_document_evaluation_with_and_without_memory(trained_with_memory):
    from slmkit.checkpoint import load_checkpoint
    from slmkit.data import open_dataset, token_byte_lengths
    from slmkit.evaluate.long_context import evaluate_long_documents, evaluate_sliding_window

    ds = open_dataset(trained_with_memory[0])
    val, lengths = ds.split("val"), token_byte_lengths(ds.tokenizer())
    model = load_checkpoint(trained_with_memory[1]).model
    kw = dict(segment_len=8, batch_size=2, max_tokens=96)
    with_mem = evaluate_long_documents(model, val, lengths, memory=True, **kw)
    without = evaluate_long_documents(model, val, lengths, memory=False, **kw)
    window0 = evaluate_sliding_window(model, val, lengths, context_len=0, **kw)
    assert with_mem["tokens"] == without["tokens"] == window0["tokens"] == 96
    assert abs(without["bits_per_byte"] - window0["bits_per_byte"]) < 1e-6  # no context == no memory
    assert abs(with_mem["bits_per_byte"] - without["bits_per_byte"]) > 1e-6
    # One layer: cached keys/values depend only on the tokens, so memory M == a recomputed window of M.
    one = CausalLM(model.config.replace(num_hidden_layers=1)).eval()
    a = evaluate_long_documents(one, val, lengths, memory=True, **kw)
    b = evaluate_sliding_window(one, val, lengths, context_len=16, **kw)
    c = evaluate_sliding_window(one, val, lengths, context_len=16, stride=1, **kw)
    assert abs(a["bits_per_byte"] - b["bits_per_byte"]) < 1e-5
    assert c["tokens"] == 96 and c["bits_per_byte"] != a["bits_per_byte"]  # stride 1 sees a full window per token
