"""Generation engine: KV-cache law, batching invariance, sampling, stop strings and streaming."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slmkit.model import CausalLM, KVCache, ModelConfig
from slmkit.serve.generate import SamplingParams, generate, left_pad, sample_next

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Un café crème, s'il vous plaît. Déjà vu à Zürich.",
    "日本語のテキストと中文文本。🙂 emoji 🚀 too.",
    "import os\nimport sys\nprint(os.path.join('a', 'b'))\n",
] * 4

PROMPTS = ["def add(a, b):", "The quick", "Un café crème, s'il vous plaît and more words"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    assert [tok.token_to_id(t) for t in ("<|pad|>", "<|bos|>", "<|eos|>")] == [0, 1, 2]
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    m = CausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init so greedy outputs vary and logits are not near-ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


# -- KV-cache law ----------------------------------------------------------------------------------

@torch.inference_mode()
def test_cached_decode_equals_full_forward(model):
    seq = torch.randint(3, model.config.vocab_size, (1, 20))
    full = model(seq)  # (1, 20, V)
    cache = model.new_cache(1, 20)
    steps = [model(seq[:, :8], cache=cache)]
    for t in range(8, 20):
        steps.append(model(seq[:, t:t + 1], cache=cache, last_only=True))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_cached_decode_left_padded_batch_equals_each_row_alone(model):
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (4, 11, 7)]
    extra = torch.randint(3, V, (3, 5), generator=g)  # the same tokens fed to every row while decoding
    ids, mask, pos = left_pad(prompts, model.config.pad_token_id)
    cache = model.new_cache(3, ids.shape[1] + 5)
    got = [model(ids, position_ids=pos, attention_mask=mask, cache=cache, last_only=True)]
    for t in range(5):
        mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
        pos = pos[:, -1:] + 1
        got.append(model(extra[:, t:t + 1], position_ids=pos, attention_mask=mask, cache=cache, last_only=True))
    got = torch.cat(got, dim=1)  # (3, 6, V): last prompt position, then each decode step
    for r, p in enumerate(prompts):
        alone = model(torch.cat([torch.tensor(p), extra[r]])[None])  # (1, len + 5, V)
        torch.testing.assert_close(got[r], alone[0, len(p) - 1:], atol=1e-5, rtol=0)


# -- greedy and batching ---------------------------------------------------------------------------

def test_greedy_batched_equals_alone(model, tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[])
    batched = generate(model, tokenizer, PROMPTS, params)
    for prompt, res in zip(PROMPTS, batched):
        alone = generate(model, tokenizer, prompt, params)[0]
        assert res.token_ids == alone.token_ids
        assert res.text == alone.text
        assert res.finish_reason == "length" and res.completion_tokens == 12
        assert res.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False).ids) + 1


def test_rows_finishing_early_are_dropped_without_changing_others(model, tokenizer):
    greedy = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    ref = generate(model, tokenizer, PROMPTS, greedy)
    # Make row 1 stop early on a token no other row produces: the other rows must continue as before.
    row, others = ref[1].token_ids, set(ref[0].token_ids) | set(ref[2].token_ids)
    k = next((k for k in range(1, len(row)) if row[k] not in row[:k] and row[k] not in others), None)
    assert k is not None, "no usable stop token in the reference output"
    res = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0,
                                                             stop_token_ids=[row[k]]))
    assert res[1].finish_reason == "stop" and res[1].token_ids == row[:k]
    assert res[1].completion_tokens == k + 1
    assert [res[0].token_ids, res[2].token_ids] == [ref[0].token_ids, ref[2].token_ids]


def test_eos_is_default_stop_token(model, tokenizer):
    res = generate(model, tokenizer, "x", SamplingParams(max_new_tokens=5, temperature=0))[0]
    ref = generate(model, tokenizer, "x", SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[]))[0]
    eos = model.config.eos_token_id
    if eos in ref.token_ids:
        assert res.finish_reason == "stop" and res.token_ids == ref.token_ids[:ref.token_ids.index(eos)]
    else:
        assert res.token_ids == ref.token_ids


# -- sampling --------------------------------------------------------------------------------------

def test_seeds(model, tokenizer):
    def run(seed):
        p = SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed, stop_token_ids=[])
        return generate(model, tokenizer, PROMPTS[:2], p)

    a, b, c = run(123), run(123), run(456)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_top_k_1_and_tiny_top_p_equal_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        res = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, seed=3,
                                                                 stop_token_ids=[], **kw))
        assert [r.token_ids for r in res] == [r.token_ids for r in greedy], kw


def test_sample_next_stays_inside_top_k_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    before = logits.clone()
    allowed = torch.topk(logits, 5, dim=-1).indices
    for _ in range(100):
        pick = sample_next(logits, SamplingParams(top_k=5, temperature=2.0), g)
        assert pick.shape == (4,)
        assert (allowed == pick[:, None]).any(dim=-1).all()
    torch.testing.assert_close(logits, before)  # pure
    # top_p: only the smallest prefix of the sorted distribution reaching p can be drawn.
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    n_keep = ((sorted_p.cumsum(-1) - sorted_p) < 0.5).sum(-1)  # (4,)
    for _ in range(100):
        pick = sample_next(logits, SamplingParams(top_p=0.5), g)
        rank = (order == pick[:, None]).int().argmax(-1)
        assert (rank < n_keep).all()
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0)), logits.argmax(-1))


def test_repetition_penalty_changes_output(model, tokenizer):
    base = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[])
    plain = generate(model, tokenizer, PROMPTS[0], base)[0]
    strong = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[], repetition_penalty=1e3)
    res = generate(model, tokenizer, PROMPTS[0], strong)[0]
    prompt_ids = set(tokenizer.encode(PROMPTS[0], add_special_tokens=False).ids)
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # the plain greedy output repeats itself
    assert len(set(res.token_ids)) == len(res.token_ids)  # ... and under a huge penalty nothing repeats
    assert not prompt_ids & set(res.token_ids)


@pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-1),
                                dict(max_new_tokens=0), dict(repetition_penalty=0.0), dict(stop=[""]),
                                dict(seed=2**64), dict(seed=-2**63 - 1)])
def test_invalid_params_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_too_long_raises(model, tokenizer):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, tokenizer, "hello", SamplingParams(max_new_tokens=model.config.max_position_embeddings))


# -- stop strings and streaming --------------------------------------------------------------------

def _clean_window(text: str, length: int = 3, start: int = 4) -> str | None:
    for i in range(start, len(text) - length):
        w = text[i:i + length]
        if "\ufffd" not in w and text.find(w) == i:
            return w
    return None


def test_stop_string_truncates_and_streams(model, tokenizer):
    params = SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[])
    full = generate(model, tokenizer, PROMPTS, params)
    stops = [_clean_window(r.text) for r in full]
    assert all(stops), [r.text for r in full]
    # Each row gets its own stop string; any of them ends any row, so the expected cut is the earliest.
    deltas: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    res = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[],
                                                              stop=stops),
                   on_token=lambda i, d: deltas[i].append(d))
    for i, (r, f) in enumerate(zip(res, full)):
        cut = min(j for j in (f.text.find(s) for s in stops) if j >= 0)
        assert r.text == f.text[:cut]
        assert r.finish_reason == "stop"
        assert "".join(deltas[i]) == r.text
        assert not any(s in r.text for s in stops)
        assert r.token_ids == f.token_ids[:len(r.token_ids)]


def test_streaming_deltas_concatenate_to_text(model, tokenizer):
    deltas: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    res = generate(model, tokenizer, PROMPTS, SamplingParams(max_new_tokens=20, seed=0, stop=["zz"]),
                   on_token=lambda i, d: deltas[i].append(d))
    for i, r in enumerate(res):
        assert "".join(deltas[i]) == r.text
        assert all(deltas[i])


class ScriptedLM(nn.Module):
    """Emits a fixed token sequence regardless of input: exercises streaming on chosen byte tokens."""

    def __init__(self, config: ModelConfig, script: list[int]):
        super().__init__()
        self.config, self.script = config, script
        self.dummy = nn.Parameter(torch.zeros(1))

    def new_cache(self, batch_size, max_length, dtype=None):
        return KVCache(self.config, batch_size, max_length)

    def forward(self, input_ids, *, position_ids=None, attention_mask=None, cache=None, last_only=False):
        B, T = input_ids.shape
        cache.advance(T)
        step = cache.length - self.prompt_len
        logits = torch.zeros(B, 1, self.config.vocab_size)
        logits[:, 0, self.script[min(step, len(self.script) - 1)]] = 1.0
        return logits


def test_streaming_holds_back_split_multibyte_characters(model, tokenizer):
    text = "aé日🙂b"
    # The byte-level pre-tokenizer spells each UTF-8 byte as one character, and each is a token.
    byte_chars = "".join(piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text))
    assert len(byte_chars) == len(text.encode())
    script = [tokenizer.token_to_id(c) for c in byte_chars] + [model.config.eos_token_id]
    lm = ScriptedLM(model.config, script)
    lm.prompt_len = 1 + len(tokenizer.encode("hi", add_special_tokens=False).ids)
    deltas = []
    res = generate(lm, tokenizer, "hi", SamplingParams(max_new_tokens=30, temperature=0),
                   on_token=lambda i, d: deltas.append(d))[0]
    assert res.text == text and res.finish_reason == "stop"
    assert res.completion_tokens == len(script) and res.token_ids == script[:-1]
    assert deltas == ["a", "é", "日", "🙂", "b"]  # one delta per complete character, none with U+FFFD
