"""Continuous-batching engine: batched equals alone (rows joining mid-decode), seeds, logprobs, stop strings,
cancellation and the bounded queue."""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from slmkit.model import CausalLM, ModelConfig
from slmkit.serve.engine import Delta, Engine, EngineBusy, EngineRequest, Failed, Finished
from slmkit.serve.generate import SamplingParams, generate

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "Un café crème, s'il vous plaît. Déjà vu à Zürich. 日本語 🙂",
] * 4

PROMPTS = ["def add(a, b):", "The quick", "Un café crème, s'il vous plaît and more words", "x"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    m = CausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init: greedy outputs vary and logits are not near-ties
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return m


@pytest.fixture()
def engine(model, tokenizer):
    with Engine(model, tokenizer, max_concurrent=4, max_waiting=8) as eng:
        yield eng


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=[], **kw)


def wait_idle(engine: Engine, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def until_done(events: queue.SimpleQueue, timeout: float = 20.0) -> list:
    """A request's events up to its Finished or Failed; fails the test if that never comes."""
    seen, deadline = [], time.monotonic() + timeout
    while not seen or not isinstance(seen[-1], (Finished, Failed)):
        try:
            seen.append(events.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"no Finished or Failed within {timeout} s after {len(seen)} events") from None
    return seen


def test_rows_joining_mid_decode_equal_each_prompt_alone(engine, model, tokenizer):
    lengths = [20, 9, 14, 6]  # different lengths: rows retire at different steps, the cache is compacted
    alone = [generate(model, tokenizer, p, greedy(n))[0] for p, n in zip(PROMPTS, lengths)]
    results: dict[int, Finished] = {}
    done = threading.Event()
    steps_at_join = []

    def listener(i):
        def on_event(ev):
            if isinstance(ev, Finished):
                results[i] = ev
                if len(results) == len(PROMPTS):
                    done.set()
            # Row 0 has decoded 3 tokens: the others join a running, differently padded batch.
            if i == 0 and isinstance(ev, Delta) and engine.steps >= 2 and not steps_at_join:
                steps_at_join.append(engine.steps)
                for j in range(1, len(PROMPTS)):
                    engine.submit(EngineRequest(engine.encode(PROMPTS[j]), greedy(lengths[j])), listener(j))
        return on_event

    engine.submit(EngineRequest(engine.encode(PROMPTS[0]), greedy(lengths[0])), listener(0))
    assert done.wait(30)
    assert steps_at_join and steps_at_join[0] >= 2
    for i, ref in enumerate(alone):
        assert results[i].token_ids == ref.token_ids, f"prompt {i} changed when batched"
        assert results[i].text == ref.text and results[i].finish_reason == "length"
        assert results[i].prompt_tokens == ref.prompt_tokens
    assert wait_idle(engine)["running"] == 0


def test_concurrent_threads_equal_alone_and_deltas_concatenate(engine, model, tokenizer):
    alone = [generate(model, tokenizer, p, greedy(10))[0].text for p in PROMPTS]
    got: list[str | None] = [None] * len(PROMPTS)

    def client(i):
        text = ""
        for ev in engine.stream(EngineRequest(engine.encode(PROMPTS[i]), greedy(10))):
            if isinstance(ev, Delta):
                text += ev.text
            elif isinstance(ev, Finished):
                assert ev.text == text
                got[i] = text

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got == alone


def test_seeded_sampling_does_not_depend_on_the_batch(engine, model, tokenizer):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    ref = generate(model, tokenizer, PROMPTS[1], params)[0].token_ids
    alone = engine.run(EngineRequest(engine.encode(PROMPTS[1]), params)).token_ids
    others = [engine.stream(EngineRequest(engine.encode(p), SamplingParams(max_new_tokens=12, temperature=1.0)))
              for p in (PROMPTS[0], PROMPTS[2])]
    first = [next(o) for o in others]  # both are running now
    beside = engine.run(EngineRequest(engine.encode(PROMPTS[1]), params)).token_ids
    for o in others:
        list(o)
    assert all(isinstance(f, Delta) for f in first)
    assert alone == ref and beside == ref


@torch.inference_mode()
def test_prompt_and_token_logprobs_equal_a_direct_forward(engine, model, tokenizer):
    ids = engine.encode(PROMPTS[2])
    res = engine.run(EngineRequest(ids, greedy(3), logprobs=3, prompt_logprobs=2))
    full = model(torch.tensor([ids + res.token_ids[:-1]])).float().log_softmax(-1)[0]  # (T, V)
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(ids)
    for t in range(1, len(ids)):
        e = res.prompt_logprobs[t]
        assert e.token_id == ids[t] and abs(e.logprob - full[t - 1, ids[t]].item()) < 1e-4
        assert [i for i, _ in e.top] == full[t - 1].topk(2).indices.tolist()
    for k, e in enumerate(res.logprobs):  # generated tokens: greedy, so each is its own top-1
        pos = len(ids) - 1 + k
        assert e.token_id == res.token_ids[k] == e.top[0][0]
        assert abs(e.logprob - full[pos, e.token_id].item()) < 1e-4 and len(e.top) == 3


def test_score_only_generates_nothing(engine):
    res = engine.run(EngineRequest(engine.encode("The quick"), greedy(1), prompt_logprobs=0, score_only=True))
    assert res.token_ids == [] and res.completion_tokens == 0 and len(res.prompt_logprobs) == res.prompt_tokens


def test_stop_strings_match_generate(engine, model, tokenizer):
    ref = generate(model, tokenizer, PROMPTS[0], greedy(16))[0].text
    stop = next(ref[i:i + 2] for i in range(3, len(ref) - 1) if ref[i:i + 2].strip() and ref.find(ref[i:i + 2]) == i)
    expected = generate(model, tokenizer, PROMPTS[0], greedy(16, stop=[stop]))[0]
    got = engine.run(EngineRequest(engine.encode(PROMPTS[0]), greedy(16, stop=[stop])))
    assert got.text == expected.text == ref[:ref.find(stop)] and got.finish_reason == "stop"


def test_cancel_frees_the_slot(model, tokenizer):
    with Engine(model, tokenizer, max_concurrent=1, max_waiting=1) as engine:
        events: queue.SimpleQueue = queue.SimpleQueue()
        long = engine.submit(EngineRequest(engine.encode("x"), greedy(100)), events.put)
        assert isinstance(events.get(timeout=10), Delta)  # running
        waiting = engine.stream(EngineRequest(engine.encode("The quick"), greedy(5)))
        with pytest.raises(EngineBusy):  # one running, one waiting: the queue is full
            engine.submit(EngineRequest(engine.encode("y"), greedy(5)), lambda ev: None)
        long.cancel()
        assert isinstance(list(waiting)[-1], Finished)  # the waiting request got the slot
        wait_idle(engine)
        seen = []
        while not events.empty():
            seen.append(events.get())
        assert not any(isinstance(e, Finished) for e in seen) and len(seen) < 100


def test_leaving_a_stream_early_stops_its_decoding(model, tokenizer):
    with Engine(model, tokenizer, max_concurrent=1) as eng:
        stream = eng.stream(EngineRequest(eng.encode("x"), greedy(120)))
        next(stream), next(stream)  # decoding has begun
        stream.close()  # the generator's cleanup cancels the request
        at_close = eng.steps
        wait_idle(eng)
        # The step under way when it was cancelled may end; uncancelled, it would run ~115 more.
        assert eng.steps - at_close <= 2, f"{eng.steps - at_close} decode steps after the cancel"


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(model, tokenizer):
    with Engine(model, tokenizer, max_concurrent=1, max_waiting=1) as eng:
        holding, release = threading.Event(), threading.Event()

        def hold(ev):  # the scheduler waits here: the running request holds the only slot until released
            holding.set()
            release.wait(30)

        running = eng.submit(EngineRequest(eng.encode("x"), greedy(120)), hold)
        try:
            assert holding.wait(10)
            waiting = eng.submit(EngineRequest(eng.encode("The quick"), greedy(5)), lambda ev: None)
            assert eng.stats()["waiting"] == 1
            waiting.cancel()
            assert eng.stats()["waiting"] == 0  # not when a slot frees up for it
            third: queue.SimpleQueue = queue.SimpleQueue()
            eng.submit(EngineRequest(eng.encode("y"), greedy(3)), third.put)  # the queue has room: no EngineBusy
        finally:
            running.cancel()
            release.set()
        assert isinstance(until_done(third)[-1], Finished)


@pytest.mark.parametrize("ids, n, match", [([], 1, "no tokens"), ([1, 10**6], 1, "outside the vocabulary"),
                                           ([1, 5], 127, "exceeds the model's context")])
def test_bad_requests_raise(engine, ids, n, match):
    with pytest.raises(ValueError, match=match):
        engine.submit(EngineRequest(ids, greedy(n)), lambda ev: None)


def test_newcomers_ending_at_their_first_token_leave_the_batch_intact(engine, model, tokenizer):
    ref = generate(model, tokenizer, PROMPTS[0], greedy(12))[0].token_ids
    stream = engine.stream(EngineRequest(engine.encode(PROMPTS[0]), greedy(12)))
    got = next(stream).token_ids  # running
    short = [engine.run(EngineRequest(engine.encode(p), greedy(1))) for p in PROMPTS[1:]]
    for ev in stream:
        got += ev.token_ids if isinstance(ev, Delta) else []
    assert got == ref and all(r.completion_tokens == 1 for r in short)
    wait_idle(engine)


def collect(engine: Engine, requests: list[EngineRequest]) -> list[Finished]:
    """Queue `requests` at once with `submit_all` and wait for all of them."""
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
    assert done.wait(30)
    return [results[i] for i in range(len(requests))]


def test_identical_prompts_queued_together_are_prefilled_once(engine, model, tokenizer):
    # The n choices of one request: 3 seeded samples of PROMPTS[2] and a greedy one, beside another prompt.
    ids = engine.encode(PROMPTS[2])
    params = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 2, 3)] + [greedy(8)]
    requests = [EngineRequest(ids, p, prompt_logprobs=2) for p in params]
    requests.append(EngineRequest(engine.encode(PROMPTS[0]), greedy(8)))
    wait_idle(engine)
    before = engine.prefill_rows
    got = collect(engine, requests)
    assert engine.prefill_rows - before == 2  # two distinct prompts
    for p, res in zip(params[:3], got[:3]):  # each sample as if alone, with the shared prefill
        assert res.token_ids == generate(model, tokenizer, PROMPTS[2], p)[0].token_ids
    assert len({tuple(r.token_ids) for r in got[:3]}) > 1  # the samples differ
    assert got[3].token_ids == generate(model, tokenizer, PROMPTS[2], greedy(8))[0].token_ids
    assert got[4].token_ids == generate(model, tokenizer, PROMPTS[0], greedy(8))[0].token_ids
    # Prompt logprobs are read from the one prefill for every copy.
    first = [(t.token_id, round(t.logprob, 5)) for t in got[0].prompt_logprobs[1:]]
    assert all([(t.token_id, round(t.logprob, 5)) for t in r.prompt_logprobs[1:]] == first for r in got[1:4])
    engine.share_prefill = False
    before = engine.prefill_rows
    unshared = collect(engine, requests)
    assert engine.prefill_rows - before == 5
    assert [r.token_ids for r in unshared] == [r.token_ids for r in got]


def test_submit_all_is_all_or_nothing(model, tokenizer):
    with Engine(model, tokenizer, max_concurrent=1, max_waiting=2) as eng:
        ids = eng.encode(PROMPTS[0])
        with pytest.raises(EngineBusy, match="4 more do not fit"):
            eng.submit_all([(EngineRequest(ids, greedy(4)), lambda ev: None) for _ in range(4)])
        assert eng.stats()["waiting"] == 0  # nothing of the refused request was queued
        assert len(collect(eng, [EngineRequest(ids, greedy(4)) for _ in range(3)])) == 3


def test_chunked_prefill_equals_whole_prompt_prefill(model, tokenizer):
    # Mixed lengths (padding), a repeated prompt (shared prefill), seeds and prompt logprobs, prefilled 3 tokens
    # at a time, against whole prompts.
    texts = [PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    params = [greedy(6), SamplingParams(max_new_tokens=6, temperature=1.0, seed=5), greedy(6), greedy(3)]
    results = {}
    for chunk in (3, None):
        with Engine(model, tokenizer, max_concurrent=4, prefill_chunk=chunk) as eng:
            reqs = [EngineRequest(eng.encode(t), p, prompt_logprobs=1) for t, p in zip(texts, params)]
            results[chunk] = collect(eng, reqs)
    for a, b in zip(results[3], results[None]):
        assert a.token_ids == b.token_ids
        assert [t.token_id for t in a.prompt_logprobs[1:]] == [t.token_id for t in b.prompt_logprobs[1:]]
        assert [t.logprob for t in a.prompt_logprobs[1:]] == pytest.approx([t.logprob for t in b.prompt_logprobs[1:]],
                                                                           abs=1e-5)


def test_running_rows_decode_between_the_chunks_of_a_long_prompt(model, tokenizer):
    with Engine(model, tokenizer, max_concurrent=2, prefill_chunk=4) as eng:
        long_ids = eng.encode(" ".join([PROMPTS[2]] * 3))  # about ten chunks of 4 tokens
        chunks = -(-len(long_ids) // 4)
        marks = {}
        done = threading.Event()

        def on_long(ev):
            if isinstance(ev, Delta) and "first" not in marks:
                marks["first"] = eng.steps
            if isinstance(ev, Finished):
                done.set()

        def on_short(ev):
            if isinstance(ev, Delta) and eng.steps >= 2 and "submit" not in marks:
                marks["submit"] = eng.steps
                eng.submit(EngineRequest(long_ids, greedy(2)), on_long)

        short = eng.submit(EngineRequest(eng.encode(PROMPTS[1]), greedy(60)), on_short)
        assert done.wait(30)
        short.cancel()
    # One decode step of the running row per chunk, instead of none until the whole prompt is in.
    assert chunks >= 8 and marks["first"] - marks["submit"] >= chunks - 1


def test_linformer_rows_leaving_the_batch_keep_their_block_summaries(tokenizer):
    # A Linformer cache carries each row's block summaries; rows of equal length (no padding) that finish at
    # different steps are dropped from it, and every remaining row must keep its own summaries.
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attention_type="linformer", linformer_k=2, linformer_block=4, linformer_window=1)
    model = CausalLM(cfg).eval()
    prompts = torch.randint(3, cfg.vocab_size, (3, 6), generator=torch.Generator().manual_seed(4)).tolist()
    lengths = [20, 7, 13]
    with Engine(model, tokenizer, max_concurrent=3) as eng:
        got = collect(eng, [EngineRequest(p, greedy(n)) for p, n in zip(prompts, lengths)])
        assert eng.prefill_rows == 3 and eng.steps == max(lengths) - 1  # admitted together, one batch
    for p, n, res in zip(prompts, lengths, got):
        with torch.no_grad():
            cache = model.new_cache(1, 32)
            logits, ids = model(torch.tensor([p]), cache=cache), []
            for _ in range(n):
                ids.append(int(logits[0, -1].argmax()))
                logits = model(torch.tensor([ids[-1:]]), cache=cache)
        assert res.token_ids == ids


# -- faults: a failing forward fails exactly the rows whose work it was -------------------------------

class FaultyForward:
    """The real model with one injected fault: on the `nth` prefill chunk (input of several columns) or
    decode step (one column) after `arm`, the forward raises, or returns NaN logits for the rows `rows`."""

    def __init__(self, model):
        self.model, self.rule, self.count = model, None, 0
        self.fired = threading.Event()

    def __getattr__(self, name):  # config, parameters(), new_cache(...): the real model's
        return getattr(self.model, name)

    def arm(self, *, prefill: bool, nth: int, effect: str, rows: list[int] | None = None) -> None:
        self.count, self.rule = 0, (prefill, nth, effect, rows)

    def __call__(self, input_ids, **kw):
        logits = self.model(input_ids, **kw)
        if self.rule is not None:
            prefill, nth, effect, rows = self.rule
            if (input_ids.shape[1] > 1) == prefill:
                self.count += 1
                if self.count == nth:
                    self.rule = None
                    self.fired.set()
                    if effect == "raise":
                        raise RuntimeError("injected forward failure")
                    logits = logits.clone()
                    logits[rows if rows is not None else slice(None)] = float("nan")
        return logits


@pytest.mark.parametrize("effect", ["raise", "nan"])
def test_a_failed_chunked_prefill_fails_its_rows_and_the_running_stream_goes_on(model, tokenizer, effect):
    # A prompt admitted while another stream runs is prefilled over several iterations; its second chunk's
    # forward raises, or its last chunk's logits are NaN (sampled at temperature 1: multinomial would raise
    # after the prefill left the scheduler's hands).
    ref = generate(model, tokenizer, PROMPTS[1], greedy(60))[0].token_ids
    faulty = FaultyForward(model)
    with Engine(faulty, tokenizer, max_concurrent=2, prefill_chunk=4) as eng:
        long_ids = eng.encode(" ".join([PROMPTS[2]] * 2))
        chunks = -(-len(long_ids) // 4)
        assert chunks >= 3 and len(long_ids) % 4 != 1  # every chunk has several columns
        running: queue.SimpleQueue = queue.SimpleQueue()
        eng.submit(EngineRequest(eng.encode(PROMPTS[1]), greedy(60)), running.put)
        first = running.get(timeout=10)
        assert isinstance(first, Delta)
        faulty.arm(prefill=True, nth=2 if effect == "raise" else chunks, effect=effect)
        failing: queue.SimpleQueue = queue.SimpleQueue()
        eng.submit(EngineRequest(long_ids, SamplingParams(max_new_tokens=5, temperature=1.0, stop_token_ids=[])),
                   failing.put)
        out = until_done(failing)
        assert faulty.fired.is_set()
        assert isinstance(out[-1], Failed) and len(out) == 1, out
        assert ("injected forward failure" if effect == "raise" else "non-finite logits") in out[-1].message
        rest = until_done(running)
        assert isinstance(rest[-1], Finished), rest[-1]
        assert first.token_ids + [t for ev in rest[:-1] for t in ev.token_ids] == rest[-1].token_ids == ref
        wait_idle(eng)
        assert eng.run(EngineRequest(long_ids, greedy(3))).completion_tokens == 3  # and it serves on


def test_nan_logits_in_a_decode_step_fail_only_that_row(model, tokenizer):
    ref = generate(model, tokenizer, PROMPTS[1], greedy(60))[0].token_ids
    faulty = FaultyForward(model)
    with Engine(faulty, tokenizer, max_concurrent=2) as eng:
        a: queue.SimpleQueue = queue.SimpleQueue()
        b: queue.SimpleQueue = queue.SimpleQueue()
        eng.submit(EngineRequest(eng.encode(PROMPTS[1]), greedy(60)), a.put)
        assert isinstance(a.get(timeout=10), Delta)
        eng.submit(EngineRequest(eng.encode(PROMPTS[0]), greedy(40)), b.put)
        assert isinstance(b.get(timeout=10), Delta)  # b joins as row 1 of the batch
        faulty.arm(prefill=False, nth=1, effect="nan", rows=[1])
        got_b = until_done(b)
        assert isinstance(got_b[-1], Failed) and "non-finite logits" in got_b[-1].message, got_b[-1]
        assert all(isinstance(ev, Delta) for ev in got_b[:-1])
        got_a = until_done(a)
        assert isinstance(got_a[-1], Finished) and got_a[-1].token_ids == ref
        wait_idle(eng)


def test_bfloat16_serving_casts_float_weights_once_and_keeps_quantized_codes(model, tokenizer):
    """`slm serve --dtype bfloat16`: a float model's weights are cast once (rotary frequencies stay fp32) and the
    engine runs it without autocast, greedy tokens as `generate` on the same bf16 model; a quantized model keeps
    its stored codes and scales and runs under autocast."""
    import copy

    import slmkit.compress.quantize  # noqa: F401 (registers the quant passes)
    from slmkit.compress.base import get_pass, make_config
    from slmkit.serve.server import inference_dtype

    m = copy.deepcopy(model)
    dtype, how = inference_dtype(m, torch.bfloat16)
    assert dtype is None and "cast once" in how
    assert m.model.embed_tokens.weight.dtype is torch.bfloat16 and m.lm_head.weight.dtype is torch.bfloat16
    assert m.model.rotary_emb.inv_freq.dtype is torch.float32
    ref = generate(m, tokenizer, PROMPTS[0], greedy(12))[0]
    with Engine(m, tokenizer, max_concurrent=2, dtype=dtype) as eng:
        events = queue.SimpleQueue()
        eng.submit(EngineRequest(eng.encode(PROMPTS[0]), greedy(12)), events.put)
        assert until_done(events)[-1].token_ids == ref.token_ids
    q, _ = get_pass("quant.int8").apply(copy.deepcopy(model), make_config("quant.int8", {}))
    scales = {n: b.clone() for n, b in q.named_buffers() if n.endswith("scales")}
    dtype, how = inference_dtype(q, torch.bfloat16)
    assert dtype is torch.bfloat16 and "autocast" in how
    assert all(torch.equal(b, scales[n]) for n, b in q.named_buffers() if n in scales)
    assert inference_dtype(model, None) == (None, None)
