"""Prompt-prefix reuse: with the prefix cache on, every request gets the tokens and logprobs it gets with it off
(shared prefixes of 0 tokens, part of a block, one block, many blocks; a prompt cached whole; concurrent
requests; eviction under a tiny budget; echo prompt logprobs; bf16; an int8 model), models whose cache is not a
plain KV cache bypass it, and the store keeps its LRU and budget laws.

Tolerance: logprobs agree to 1e-5 absolute in fp32. The reused K/V rows are bitwise the ones an earlier prefill
stored; what differs is only the shape of the remaining computation (the suffix's queries over a cache instead
of the whole prompt at once), which changes float summation order in the matmuls and attention, as chunked
prefill does (tests/serve/test_engine.py holds chunked prefill to the same 1e-5; measured about 1.5e-6). Under bf16
autocast the same reordering rounds at bf16's precision: 1e-2. Greedy tokens must be equal."""

from __future__ import annotations

import copy
import logging
import threading
import time

import pytest
import torch

from slmkit.model import CausalLM, ModelConfig
from slmkit.serve.engine import Engine, EngineRequest, Finished
from slmkit.serve.generate import SamplingParams
from slmkit.serve.prefix_cache import PrefixCache, block_keys

BLOCK = 8
TOL = 1e-5
CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."] * 4


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def make_model(vocab: int, **kw) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **kw)
    m = CausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init: greedy outputs vary and logits are not near-ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.get_vocab_size())


def ids(n: int, seed: int, vocab: int = 300) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int = 6) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=[])


def settled(engine: Engine, timeout: float = 20.0) -> dict:
    """The engine's stats once its scheduler is idle: a prefill's blocks are stored after its rows' first tokens
    (and so possibly after a one-token request has finished), within the same scheduler iteration."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.005)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def collect(engine: Engine, requests: list[EngineRequest]) -> list[Finished]:
    """Queue `requests` at once (admitted together) and wait for all of them."""
    results: dict[int, Finished] = {}
    done = threading.Event()

    def listener(i):
        def on_event(ev):
            if isinstance(ev, Finished):
                results[i] = ev
                if len(results) == len(requests):
                    done.set()
        return on_event

    engine.submit_all([(r, listener(i)) for i, r in enumerate(requests)])
    assert done.wait(60)
    return [results[i] for i in range(len(requests))]


def run_batches(model, tokenizer, batches: list[list[EngineRequest]], **kw) -> tuple[list[list[Finished]], list]:
    """Every batch in turn (each admitted together) on an engine with the prefix cache on, then off."""
    out, stats = [], []
    for mb in (4.0, 0):
        with Engine(model, tokenizer, max_concurrent=8, prefix_cache_mb=mb, prefix_block=BLOCK, **kw) as eng:
            out.append([collect(eng, [copy.copy(r) for r in batch]) for batch in batches])
            stats.append(settled(eng))
    return out, stats


def assert_same(cached: list[Finished], plain: list[Finished], tol: float = TOL) -> None:
    for a, b in zip(cached, plain):
        assert a.token_ids == b.token_ids
        if b.logprobs is not None:
            assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=tol)
            assert [[i for i, _ in t.top] for t in a.logprobs] == [[i for i, _ in t.top] for t in b.logprobs]
        if b.prompt_logprobs is not None:
            assert [t.token_id for t in a.prompt_logprobs[1:]] == [t.token_id for t in b.prompt_logprobs[1:]]
            assert [t.logprob for t in a.prompt_logprobs[1:]] == pytest.approx(
                [t.logprob for t in b.prompt_logprobs[1:]], abs=tol)


# -- the engine: cached equals uncached --------------------------------------------------------------

@pytest.mark.parametrize("shared", [0, 5, BLOCK, 5 * BLOCK], ids=["none", "part-block", "one-block", "many-blocks"])
def test_a_shared_prefix_gives_the_same_tokens_and_logprobs(model, tokenizer, shared):
    prefix = ids(shared, 1)
    first = EngineRequest(prefix + ids(7, 2), greedy(), logprobs=2)
    later = [EngineRequest(prefix + ids(k, 10 + k), greedy(), logprobs=2) for k in (1, 3, 11)]
    (cached, plain), (on, off) = run_batches(model, tokenizer, [[first]] + [[r] for r in later])
    for a, b in zip(cached, plain):
        assert_same(a, b)
    reused = shared // BLOCK * BLOCK  # whole blocks only
    assert on["prefix_cache_tokens_reused"] == 3 * reused
    assert on["prefix_cache_hits"] == (3 if reused else 0)
    assert off["prefix_cache_lookups"] == 0 and off["prefix_cache_bytes"] == 0


@pytest.mark.parametrize("n", [3 * BLOCK, 3 * BLOCK + 1])
def test_a_prompt_cached_whole_still_computes_its_last_token(model, tokenizer, n):
    prompt = ids(n, 3)
    batches = [[EngineRequest(prompt, greedy(), logprobs=1)] for _ in range(3)]
    (cached, plain), (on, _) = run_batches(model, tokenizer, batches)
    for a, b in zip(cached, plain):
        assert_same(a, b)
    assert on["prefix_cache_tokens_reused"] == 2 * ((n - 1) // BLOCK * BLOCK)  # at least one token left


@pytest.mark.parametrize("chunk", [None, 3])
def test_concurrent_requests_with_different_reuse_equal_the_uncached_run(model, tokenizer, chunk):
    # Admitted together after a warm-up: rows reusing 4, 2 or 0 blocks, a row shorter than the others' cached
    # part, a seeded sample, two copies of one prompt (the n choices) and an echo row, in one padded prefill.
    prefix = ids(4 * BLOCK + 3, 4)
    warm = [EngineRequest(prefix + ids(5, 5), greedy()), EngineRequest(ids(2 * BLOCK, 6) + ids(9, 7), greedy())]
    seeded = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7, stop_token_ids=[])
    together = [EngineRequest(prefix + ids(2, 8), greedy(), logprobs=1),
                EngineRequest(ids(2 * BLOCK, 6) + ids(20, 9), greedy(), logprobs=1),
                EngineRequest(ids(13, 10), greedy(), logprobs=1),
                EngineRequest(prefix[:2 * BLOCK + 1], greedy(), logprobs=1),
                EngineRequest(prefix + ids(6, 11), seeded),
                EngineRequest(prefix + ids(6, 11), seeded),
                EngineRequest(prefix + ids(4, 12), greedy(), prompt_logprobs=1)]
    # First batch: the row with nothing cached (13 tokens) waits for the others' prefill, which starts at column
    # 21 of 41 (the second row's first uncached column): three prompts reuse 17, 16 and 21 tokens, the fourth
    # none. Second batch: the echo row (which never reads the cache) waits, every other prompt has cached blocks
    # by now, and the prefill starts at column 36: 32, 31, 8, 12 and 36 tokens reused.
    (cached, plain), (on, _) = run_batches(model, tokenizer, [warm, together[:-1], together], prefill_chunk=chunk)
    for a, b in zip(cached, plain):
        assert_same(a, b)
    assert cached[1][4].token_ids == cached[1][5].token_ids  # same seed, same prompt
    assert on["prefix_cache_hits"] == 3 + 5
    assert on["prefix_cache_tokens_reused"] == (17 + 16 + 21) + (32 + 31 + 8 + 12 + 36)


def test_rows_with_a_cached_prefix_are_not_held_back_by_a_cold_one(model, tokenizer):
    # A long prompt with nothing cached, queued together with one whose prefix is cached: admitted in one padded
    # prefill, the second would recompute its prefix. It goes first; the cold one waits for that short prefill.
    prefix = ids(4 * BLOCK, 22)
    cold = EngineRequest(ids(6 * BLOCK, 23), greedy(), logprobs=1)
    warm_hit = EngineRequest(prefix + ids(3, 24), greedy(), logprobs=1)
    batches = [[EngineRequest(prefix + ids(5, 25), greedy())], [cold, warm_hit]]
    (cached, plain), (on, _) = run_batches(model, tokenizer, batches)
    for a, b in zip(cached, plain):
        assert_same(a, b)
    assert on["prefix_cache_tokens_reused"] == 4 * BLOCK and on["prefix_cache_lookups"] == 3


def test_eviction_under_a_tiny_budget_keeps_outputs_and_the_budget(model, tokenizer):
    block_bytes = 2 * 2 * 2 * BLOCK * 16 * 4  # (k, v) x layers x kv heads x tokens x head_dim x fp32
    mb = 3.5 * block_bytes / 2**20  # three blocks
    prompts = [ids(2 * BLOCK, s) + ids(3, 100 + s) for s in (20, 21, 22)]
    order = [0, 1, 0, 2, 1, 0, 2, 2]
    outs = []
    for budget in (mb, 0):
        with Engine(model, tokenizer, prefix_cache_mb=budget, prefix_block=BLOCK) as eng:
            outs.append([eng.run(EngineRequest(prompts[i], greedy(), logprobs=1)) for i in order])
            stats = settled(eng)
            if budget:
                assert stats["prefix_cache_evictions"] > 0 and stats["prefix_cache_hits"] > 0
                assert stats["prefix_cache_bytes"] <= 3 * block_bytes and stats["prefix_cache_blocks"] <= 3
    assert_same(outs[0], outs[1])


def test_echo_rows_never_read_the_cache_but_fill_it(model, tokenizer):
    prefix = ids(3 * BLOCK, 13)
    with Engine(model, tokenizer, prefix_cache_mb=4, prefix_block=BLOCK) as on, \
            Engine(model, tokenizer, prefix_cache_mb=0) as off:
        echo = EngineRequest(prefix + ids(4, 14), greedy(1), prompt_logprobs=3, logprobs=1)
        first = on.run(echo)
        assert settled(on)["prefix_cache_blocks"] == 3  # an echo prefill stores its blocks
        again = on.run(echo)  # its prefix is cached now, but every prompt position needs its logits
        assert settled(on)["prefix_cache_tokens_reused"] == 0
        ref = off.run(echo)
        assert_same([first, again], [ref, ref])
        assert len(again.prompt_logprobs) == len(echo.prompt_ids) and again.prompt_logprobs[0] is None
        score = EngineRequest(prefix + ids(2, 15), greedy(1), prompt_logprobs=0, score_only=True)
        assert_same([on.run(score)], [off.run(score)])
        plain = EngineRequest(prefix + ids(2, 16), greedy(), logprobs=1)  # a normal row reuses what echo stored
        assert_same([on.run(plain)], [off.run(plain)])
        assert settled(on)["prefix_cache_tokens_reused"] == 3 * BLOCK


def test_bf16_engine_reuses_its_own_dtype_rows(model, tokenizer):
    # Stored rows are in the cache's dtype (bf16 here), the dtype the prefix would be cached in anyway; the
    # suffix's bf16 matmuls in another shape round differently (bf16 keeps 8 significant bits, about 4e-3
    # relative), hence 1e-2 on logprobs instead of 1e-5 (measured here: about 1e-3).
    prefix = ids(3 * BLOCK + 2, 17)
    batches = [[EngineRequest(prefix + ids(k, 18 + k), greedy(), logprobs=1)] for k in (3, 5, 1)]
    (cached, plain), (on, _) = run_batches(model, tokenizer, batches, dtype=torch.bfloat16)
    for a, b in zip(cached, plain):
        assert_same(a, b, tol=1e-2)
    assert on["prefix_cache_tokens_reused"] == 2 * 3 * BLOCK


def test_an_int8_model_reuses_float_rows(model, tokenizer):
    from slmkit.compress import get_pass

    p = get_pass("quant.int8")
    q, _ = p.apply(copy.deepcopy(model), p.config_cls())
    prefix = ids(2 * BLOCK + 1, 19)
    batches = [[EngineRequest(prefix + ids(k, 20 + k), greedy(), logprobs=1)] for k in (2, 6)]
    (cached, plain), (on, _) = run_batches(q, tokenizer, batches)
    # On CPUs with native bf16 a quantized model's prompt rows multiply in bf16 (qlinear.prompt_prefill): the
    # uncached prefill takes that path for the whole prompt, the cached one only for the stored prefix.
    from slmkit.train.loop import cpu_has_fast_bf16

    for a, b in zip(cached, plain):
        assert_same(a, b, tol=1e-2 if cpu_has_fast_bf16() else TOL)
    assert on["prefix_cache_tokens_reused"] == 2 * BLOCK


@pytest.mark.parametrize("kw, why", [
    (dict(attention_type="linformer", linformer_k=4, linformer_block=8), "attention_type='linformer'"),
    (dict(memory_length=16), "memory_length=16"),
])
def test_models_without_a_plain_kv_cache_bypass_it_and_say_why(tokenizer, caplog, kw, why):
    m = make_model(tokenizer.get_vocab_size(), **kw)
    prompt = ids(3 * BLOCK, 21)
    with caplog.at_level(logging.WARNING, logger="slmkit.serve.engine"):
        eng = Engine(m, tokenizer, prefix_cache_mb=4, prefix_block=BLOCK)
    assert eng.prefix_cache is None
    assert [r.getMessage() for r in caplog.records if "prefix cache off" in r.getMessage() and why in r.getMessage()]
    with eng:
        a = eng.run(EngineRequest(prompt, greedy()))
        b = eng.run(EngineRequest(prompt, greedy()))
        assert a.token_ids == b.token_ids and settled(eng)["prefix_cache_lookups"] == 0


def test_options_are_checked(model, tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="prefix_cache_mb"):
        Engine(model, tokenizer, prefix_cache_mb=-1)
    with pytest.raises(ValueError, match="prefix_block"):
        Engine(model, tokenizer, prefix_block=0)
    monkeypatch.setenv("SLM_PREFIX_CACHE_MB", "0")
    assert Engine(model, tokenizer).prefix_cache is None
    monkeypatch.setenv("SLM_PREFIX_CACHE_MB", "2")
    assert Engine(model, tokenizer).prefix_cache.budget_bytes == 2 * 2**20
    monkeypatch.setenv("SLM_PREFIX_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="SLM_PREFIX_CACHE_MB"):
        Engine(model, tokenizer)


# -- the store ---------------------------------------------------------------------------------------

def fake_rows(ids_: list[int]):
    """rows(a, b) for a prompt: a (2, 1, 1, b - a, 1) tensor holding the token ids, so blocks are checkable."""
    t = torch.tensor(ids_, dtype=torch.float32)
    return lambda a, b: torch.stack([t[a:b], -t[a:b]])[:, None, None, :, None]


def test_keys_name_the_whole_prefix():
    a, b = [1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 5, 6]
    ka, kb = block_keys(a, 3, 2), block_keys(b, 3, 2)
    assert ka[0] != kb[0] and ka[1] != kb[1]  # the same second block after a different first one
    assert block_keys(a + [7], 3, 2) == ka


def test_lookup_reuses_the_longest_leading_run_and_leaves_a_token():
    store = PrefixCache(block_size=2, budget_bytes=1 << 20)
    prompt = [5, 6, 7, 8, 9, 10]
    store.insert(prompt, fake_rows(prompt))
    assert len(store) == 3
    assert store.cached_blocks(prompt) == 2 and store.cached_blocks([5, 6, 0, 8, 9]) == 1
    got = store.lookup(prompt)  # 6 tokens, 3 blocks held: 2 used, the last token computed
    assert [b[0, 0, 0, :, 0].tolist() for b in got] == [[5, 6], [7, 8]]
    assert len(store.lookup(prompt + [1])) == 3
    assert store.lookup([5, 6, 0, 8, 9, 10, 1])[0][0, 0, 0, :, 0].tolist() == [5, 6]
    assert len(store.lookup([5, 6, 0, 8, 9, 10, 1])) == 1
    assert store.lookup([6, 5, 7, 8, 9]) == []


def test_the_budget_holds_and_parents_outlive_their_children():
    block_bytes = 2 * 2 * 4  # (2, 1, 1, 2, 1) fp32
    store = PrefixCache(block_size=2, budget_bytes=4 * block_bytes)
    shared = [1, 2, 3, 4]
    for tail in ([10, 11, 12, 13], [20, 21, 22, 23], [30, 31]):
        store.insert(shared + tail, fake_rows(shared + tail))
        assert store.bytes <= store.budget_bytes and store.bytes == len(store) * block_bytes
    # The shared blocks were touched by every insert, so the evicted ones are the deepest of older prompts.
    assert len(store.lookup(shared + [30, 31, 0])) == 3
    assert len(store.lookup(shared + [0])) == 2
    assert store.evictions == 3
    tiny = PrefixCache(block_size=2, budget_bytes=block_bytes - 1)  # not one block fits
    tiny.insert(shared, fake_rows(shared))
    assert len(tiny) == 0 and tiny.bytes == 0


def test_server_metrics_export_the_prefix_cache_counters():
    from slmkit.serve.metrics import ServerMetrics

    stats = {"running": 0, "waiting": 0, "max_concurrent": 4, "max_waiting": 8, "prefix_cache_lookups": 5,
             "prefix_cache_hits": 3, "prefix_cache_tokens_reused": 192, "prefix_cache_bytes": 4096,
             "prefix_cache_blocks": 2, "prefix_cache_evictions": 1}
    text = ServerMetrics(lambda: stats).render()
    assert "slmkit_prefix_cache_hits_total 3" in text
    assert "slmkit_prefix_cache_reused_tokens_total 192" in text
    assert "slmkit_prefix_cache_bytes 4096" in text
    assert "slmkit_prefix_cache_lookups_total 5" in text
    assert "slmkit_prefix_cache_hits_total 0" in ServerMetrics(lambda: {k: v for k, v in stats.items()
                                                                         if not k.startswith("prefix")}).render()


def test_slm_serve_passes_prefix_cache_mb_to_the_engine(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import slmkit.serve.server as server
    from slmkit.cli import app

    seen = {}
    monkeypatch.setattr(server, "serve", lambda *a, **kw: seen.setdefault("mb", kw["prefix_cache_mb"]))
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--prefix-cache-mb", "64"])
    assert r.exit_code == 0, r.output
    assert seen["mb"] == 64.0
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--prefix-cache-mb", "-1"])
    assert r.exit_code == 2 and "prefix-cache-mb" in r.output


def test_the_http_server_reuses_prefixes_and_reports_them(tmp_path):
    # Through /v1/completions (token-id prompts, echo logprobs as lm-eval sends them) and /metrics, against a
    # server whose engine has the cache off.
    import httpx

    from slmkit.checkpoint import load_checkpoint
    from slmkit.serve.server import BackgroundServer, ServerConfig, create_app
    from tests.serve.test_server import MODEL, make_checkpoint

    ck = load_checkpoint(make_checkpoint(tmp_path / "ckpt"))
    tok, V = ck.tokenizer(), ck.model.config.vocab_size
    prefix = ids(3 * BLOCK, 30, V)
    bodies = [{"model": MODEL, "prompt": prefix + ids(4, 31 + k, V), "max_tokens": 5, "temperature": 0,
               "logprobs": 2} for k in range(3)]
    bodies.append({"model": MODEL, "prompt": prefix + ids(3, 40, V), "max_tokens": 1, "temperature": 0,
                   "logprobs": 1, "echo": True})
    answers, metrics = [], []
    for mb in (4, 0):
        engine = Engine(ck.model, tok, prefix_cache_mb=mb, prefix_block=BLOCK).start()
        try:
            with BackgroundServer(create_app(engine, ServerConfig(model_name=MODEL), None)) as srv:
                got = []
                for body in bodies:
                    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
                    assert r.status_code == 200, r.text
                    got.append(r.json()["choices"][0])
                settled(engine)
                metrics.append(httpx.get(srv.url + "/metrics").text)
                answers.append(got)
        finally:
            engine.close()
    for a, b in zip(*answers):
        assert a["text"] == b["text"]
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        assert [x for x in a["logprobs"]["token_logprobs"] if x is not None] == pytest.approx(
            [x for x in b["logprobs"]["token_logprobs"] if x is not None], abs=TOL)
    assert f"slmkit_prefix_cache_reused_tokens_total {2 * 3 * BLOCK}" in metrics[0]
    assert "slmkit_prefix_cache_hits_total 2" in metrics[0]
    assert "slmkit_prefix_cache_reused_tokens_total 0" in metrics[1]
