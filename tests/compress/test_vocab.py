"""prune.vocab: the trimmed tokenizer is lossless and tokenizes the domain as before, the trimmed model's
logits are the original's at the kept ids, and the checkpoint loads, generates and exports (HF, GGUF)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from slmkit.checkpoint import load_checkpoint
from slmkit.compress.base import PassError, make_config
from slmkit.compress.run import compress, parse_pass
from slmkit.compress.vocab import (VocabConfig, _merge_pairs, apply_vocab, kept_ids_of, kept_token_mask,
                                   old_to_new_ids, remap_ids, token_counts,
                                   write_trimmed_tokenizer)
from slmkit.data import build_dataset, open_dataset
from slmkit.train import TrainConfig
from slmkit.train.pretrain import pretrain

# A narrow domain: a few kinds of sentences, so it uses a fraction of a tokenizer trained on Python source.
DOMAIN = [
    "The patient reported mild pain in the left knee after walking {n} miles. Follow-up in {n} weeks.",
    "Blood pressure was {n}/{m} mmHg; the patient was advised to rest and drink water.",
    "No fever. The knee was examined and showed mild swelling; ice twice a day for {n} days.",
]


@pytest.fixture(scope="module")
def domain_ds(tiny_dataset, tmp_path_factory):
    src = tmp_path_factory.mktemp("notes")
    rng = random.Random(0)
    for d in range(40):
        lines = [rng.choice(DOMAIN).format(n=rng.randint(1, 99), m=rng.randint(40, 99)) for _ in range(12)]
        (src / f"note{d:02d}.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("dds") / "ds"
    build_dataset([str(src)], out, tokenizer=tiny_dataset, val_fraction=0.2, progress=False)
    return open_dataset(out)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tiny_model_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "m"
    pretrain(tiny_dataset, tiny_model_yaml, out, TrainConfig(steps=10, batch_size=4, seq_len=32, eval_every=0,
                                                             save_every=0, precision="fp32"), quiet=True)
    return out


@pytest.fixture(scope="module")
def trimmed(trained, domain_ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("tr") / "t"
    rows = compress(trained, out, [parse_pass("prune.vocab")], data=domain_ds.path, calib_samples=4,
                    calib_seq_len=32, eval_tokens=1024, speed=False)
    return out, rows


def _tokenizer_json(ds) -> dict:
    return json.loads(ds.tokenizer_path.read_text())


def _documents(ds, split: str) -> list[np.ndarray]:
    """Document bodies of a split (each stored as [bos] + ids + [eos])."""
    stream = ds.split(split)
    ids = stream.window(0, len(stream))
    bounds = np.flatnonzero(ids == ds.eos_token_id)
    docs, start = [], 0
    for b in bounds:
        docs.append(ids[start + 1:b])  # drop bos
        start = b + 1
    return docs


def test_kept_set_holds_used_byte_and_special_tokens_closed_under_merges(domain_ds):
    tj = _tokenizer_json(domain_ds)
    counts = token_counts(domain_ds.split("train"), 384)
    mask, kept_by = kept_token_mask(tj, counts)
    vocab = tj["model"]["vocab"]
    assert mask[counts > 0].all() and kept_by["used"] == int((counts > 0).sum())
    assert all(mask[vocab[ch]] for ch in __import__("tokenizers").pre_tokenizers.ByteLevel.alphabet() if ch in vocab)
    assert all(mask[t["id"]] for t in tj["added_tokens"])
    for a, b in _merge_pairs(tj["model"]):
        if mask[vocab[a + b]]:
            assert mask[vocab[a]] and mask[vocab[b]], (a, b)
    assert 256 < mask.sum() < len(mask)  # the domain needs a fraction of the tokens
    strict, _ = kept_token_mask(tj, counts, min_count=int(np.median(counts[counts > 0])))
    assert strict.sum() < mask.sum() and not (strict & ~mask).any()
    extra = max((t for t, i in vocab.items() if not mask[i]), key=len)  # a long removed token
    kept_extra, _ = kept_token_mask(tj, counts, keep=(extra,))
    assert kept_extra[vocab[extra]] and kept_extra.sum() > mask.sum()
    with pytest.raises(PassError, match="does not have"):
        kept_token_mask(tj, counts, keep=("not-a-token",))


def test_trimmed_tokenizer_is_lossless_on_any_text(domain_ds, tmp_path):
    tj = _tokenizer_json(domain_ds)
    mask, _ = kept_token_mask(tj, token_counts(domain_ds.split("train"), 384))
    kept = np.flatnonzero(mask)
    new = Tokenizer.from_file(str(write_trimmed_tokenizer(domain_ds.path, kept, tmp_path) / "tokenizer.json"))
    assert new.get_vocab_size(with_added_tokens=True) == len(kept)
    rng = random.Random(1)
    pieces = ["def f(x):\n    return x ** 2\n", "\t\tindent  ", "Café naïve résumé", "東京タワー", "😀🚀", "\r\n",
              "<|eos|>", "<|user|>hi<|end|>", "  ", "ñ", "\u200b", "0123456789", "{[()]}", "__init__"]
    texts = []
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(0, 12)):
            kind = rng.random()
            if kind < 0.4:
                parts.append(rng.choice(pieces))
            elif kind < 0.7:
                parts.append("".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(1, 8))))
            else:  # any code point but surrogates (not encodable as UTF-8)
                cps = [rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]) for _ in range(3)]
                parts.append("".join(map(chr, cps)))
        texts.append("".join(parts))
    for text in texts:
        ids = new.encode(text, add_special_tokens=False).ids
        assert all(0 <= i < len(kept) for i in ids)
        assert new.decode(ids, skip_special_tokens=False) == text, repr(text)


def test_training_text_tokenizes_identically(domain_ds, tmp_path):
    tj = _tokenizer_json(domain_ds)
    kept = np.flatnonzero(kept_token_mask(tj, token_counts(domain_ds.split("train"), 384))[0])
    table = old_to_new_ids(kept, 384)
    old = domain_ds.tokenizer()
    new = Tokenizer.from_file(str(write_trimmed_tokenizer(domain_ds.path, kept, tmp_path) / "tokenizer.json"))
    docs = _documents(domain_ds, "train")
    assert len(docs) > 10
    for doc in docs:
        text = old.decode(doc.tolist())
        assert new.encode(text, add_special_tokens=False).ids == table[doc].tolist()
    # Held-out text with tokens outside the kept set is re-encoded, and spells the same text.
    val = domain_ds.split("val").window(0, len(domain_ds.split("val")))
    out = remap_ids(val, kept, old, new)
    assert new.decode(out.tolist(), skip_special_tokens=False) == old.decode(val.tolist(), skip_special_tokens=False)


@pytest.mark.parametrize("tied", [True, False])
def test_trimmed_logits_are_the_original_logits_at_kept_ids(trained, domain_ds, tied):
    model = load_checkpoint(trained).model
    if not tied:  # an untied head: its own rows must be kept, not the embedding's
        model.config = model.config.replace(tie_word_embeddings=False)
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
        torch.nn.init.normal_(head.weight, std=0.5)
        model.lm_head = head
    ids = torch.from_numpy(domain_ds.split("train").window(0, 3 * 64).reshape(3, 64))  # (B, T)
    with torch.no_grad():
        before = model(ids)  # (B, T, V)
    model, report = apply_vocab(model, make_config("prune.vocab", {}), domain_ds)
    kept = torch.from_numpy(kept_ids_of(report))
    table = torch.from_numpy(old_to_new_ids(kept.numpy(), 384))
    with torch.no_grad():
        after = model(table[ids])  # (B, T, V')
    assert after.shape[-1] == len(kept) == model.config.vocab_size == report["vocab"]["after"]
    assert torch.equal(after, before[..., kept])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    v = report["vocab"]
    assert v["before"] == 384 and v["after"] < 384 and report["bytes_after"] < report["bytes_before"]
    assert report["parameters_before"] - report["parameters_after"] == (384 - v["after"]) * 32 * (1 if tied else 2)


def test_compress_writes_a_checkpoint_that_loads_generates_and_reports(trimmed, trained, domain_ds):
    out, rows = trimmed
    assert [r["pass"] for r in rows] == ["(input)", "prune.vocab"]
    assert rows[1]["bytes"] < rows[0]["bytes"] and rows[1]["parameters"] < rows[0]["parameters"]
    assert all(np.isfinite(r["bits_per_byte"]) for r in rows)
    ck = load_checkpoint(out)
    tok = ck.tokenizer()
    V = ck.config.vocab_size
    assert tok.get_vocab_size(with_added_tokens=True) == V < 384
    rec = ck.provenance["passes"][-1]
    assert rec["name"] == "prune.vocab" and rec["report"]["vocab"]["after"] == V
    # Special-token ids follow the tokens: the config, generation_config and tokenizer agree.
    gen = json.loads((out / "generation_config.json").read_text())
    for role, name in (("bos", "<|bos|>"), ("eos", "<|eos|>"), ("pad", "<|pad|>")):
        assert getattr(ck.config, f"{role}_token_id") == gen[f"{role}_token_id"] == tok.token_to_id(name)
    # Save -> load is the identity, and the reloaded model decodes greedily into text.
    again = load_checkpoint(out)
    x = torch.tensor([tok.encode("The patient reported").ids])
    with torch.no_grad():
        assert torch.equal(ck.model(x), again.model(x))
        for _ in range(8):
            x = torch.cat([x, ck.model(x)[:, -1:].argmax(-1)], dim=1)
    assert tok.decode(x[0].tolist()).startswith("The patient reported")


def test_exports_to_hf_with_logit_and_tokenizer_parity(trimmed, tmp_path):
    transformers = pytest.importorskip("transformers")
    from slmkit.export import export_hf

    out, _ = trimmed
    hf = export_hf(out, tmp_path / "hf")
    ck = load_checkpoint(out)
    tok = ck.tokenizer()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    texts = ["The knee was examined.", "def f(x): return 東京 😀", "Blood pressure was 120/80 mmHg;"]
    for text in texts:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    ids = torch.tensor([tok.encode(" ".join(texts)).ids])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        ours, theirs = ck.model(ids), hf_model(ids).logits
    assert theirs.shape[-1] == ck.config.vocab_size
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_exports_to_gguf_with_the_trimmed_vocabulary(trimmed, tmp_path):
    gguf = pytest.importorskip("gguf")
    from slmkit.export.gguf import export_gguf

    out, _ = trimmed
    path = export_gguf(out, tmp_path / "m.gguf", type="f32").path
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    ck = load_checkpoint(out)
    tok = ck.tokenizer()
    V = ck.config.vocab_size
    assert meta["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(V)]
    stored = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in stored]
    assert meta["tokenizer.ggml.eos_token_id"] == ck.config.eos_token_id
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    got = torch.from_numpy(np.array(emb.data, dtype=np.float32)).reshape(V, -1)
    assert torch.equal(got, ck.model.model.embed_tokens.weight.detach())


def test_cli_compress_with_data(trained, domain_ds, tmp_path):
    from typer.testing import CliRunner

    from slmkit.cli import app

    result = CliRunner().invoke(app, ["compress", str(trained), "--out", str(tmp_path / "c"), "--pass",
                                      "prune.vocab:min_count=2", "--data", str(domain_ds.path), "--no-speed",
                                      "--eval-tokens", "512", "--calib-seq-len", "32", "--calib-samples", "2"])
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(tmp_path / "c")
    assert ck.config.vocab_size == ck.tokenizer().get_vocab_size(with_added_tokens=True) < 384
    assert ck.provenance["passes"][-1]["config"]["min_count"] == 2


def test_later_calibrated_passes_see_trimmed_ids(trained, domain_ds, tmp_path):
    rows = compress(trained, tmp_path / "c", [parse_pass("prune.vocab"), parse_pass("prune.wanda:sparsity=0.5"),
                                              parse_pass("quant.int8")],
                    data=domain_ds.path, calib_samples=4, calib_seq_len=32, eval_tokens=512, speed=False)
    assert [r["pass"] for r in rows] == ["(input)", "prune.vocab", "prune.wanda", "quant.int8"]
    ck = load_checkpoint(tmp_path / "c")  # replays all three passes on the trimmed vocabulary
    x = torch.tensor([ck.tokenizer().encode("No fever.").ids])
    with torch.no_grad():
        assert ck.model(x).shape[-1] == ck.config.vocab_size


def test_refusals(trained, domain_ds, tmp_path):
    with pytest.raises(PassError, match="min_count"):
        VocabConfig(min_count=0)
    with pytest.raises(PassError, match="quantize last"):
        compress(trained, tmp_path / "q", [parse_pass("quant.int8"), parse_pass("prune.vocab")], data=domain_ds.path,
                 speed=False)
    with pytest.raises(PassError, match="--data"):
        compress(trained, tmp_path / "n", [parse_pass("prune.vocab")], speed=False)
    model = load_checkpoint(trained).model
    model, _ = apply_vocab(model, VocabConfig(), domain_ds)
    with pytest.raises(PassError, match="already trimmed"):  # the dataset's ids are not this model's any more
        apply_vocab(model, VocabConfig(), domain_ds)
    assert not (tmp_path / "q").exists() and not (tmp_path / "n").exists()


def test_non_byte_level_tokenizers_are_refused(domain_ds):
    from slmkit.compress.vocab import check_byte_level_bpe

    tj = _tokenizer_json(domain_ds)
    check_byte_level_bpe(tj, "tokenizer.json")
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    with pytest.raises(PassError, match="byte-level BPE"):
        check_byte_level_bpe(tj, "tokenizer.json")


# -- the teacher-logit cache ------------------------------------------------------------------------

def test_teacher_topk_remap_is_the_teacher_conditioned_on_kept_tokens():
    from slmkit.compress.vocab_remap import remap_teacher_topk
    from slmkit.distill.teacher_cache import FP16_MIN, teacher_topk

    g = torch.Generator().manual_seed(0)
    V, k = 50, 8
    logits = 3 * torch.randn(4, 6, V, generator=g)  # (B, T, V)
    ids, logprobs, tail = (t.numpy() for t in teacher_topk(logits, k))
    kept = np.array([i for i in range(V) if i % 3 != 1])  # drop a third of the ids
    table = old_to_new_ids(kept, V)
    fillers = table[kept[:2 * k]]  # any distinct kept ids serve (the pass uses unused special tokens)
    new_ids, new_lp, new_tail = remap_teacher_topk(ids, logprobs, tail, table, fillers)
    p = torch.log_softmax(logits.double(), -1).numpy()  # (B, T, V)
    in_topk = np.zeros_like(p, dtype=bool)
    np.put_along_axis(in_topk, ids, True, axis=-1)
    # Z: mass of the kept top-k entries plus the tail (removed ids below the top-k stay inside the tail).
    z = np.log(np.where(in_topk & (table >= 0)[None, None], np.exp(p), 0).sum(-1) + np.exp(tail.astype(np.float64)))
    for b in range(4):
        for t in range(6):
            row_ids, row_lp = new_ids[b, t], new_lp[b, t]
            assert len(set(row_ids.tolist())) == k  # distinct, so the KD buckets partition the vocabulary
            n_kept = int((table[ids[b, t]] >= 0).sum())
            want = [table[i] for i in ids[b, t] if table[i] >= 0]
            assert row_ids[:n_kept].tolist() == want  # kept entries first, in the teacher's order
            np.testing.assert_allclose(row_lp[:n_kept], p[b, t, kept[want]] - z[b, t], atol=1e-5)
            assert (row_lp[n_kept:] == FP16_MIN).all()
            np.testing.assert_allclose(new_tail[b, t], tail[b, t] - z[b, t], atol=1e-5)
            total = np.exp(row_lp[:n_kept].astype(np.float64)).sum() + np.exp(float(new_tail[b, t]))
            assert abs(total - 1) < 1e-5


def test_teacher_cache_and_dataset_follow_the_trimmed_vocabulary(trimmed, trained, domain_ds, tmp_path):
    from slmkit.compress.vocab_remap import remap_dataset, remap_teacher_cache
    from slmkit.data import check_same_tokenizer
    from slmkit.distill.teacher_cache import CachedKDBatches, build_teacher_cache, open_teacher_cache

    out, _ = trimmed
    cache = open_teacher_cache(build_teacher_cache(trained, domain_ds, tmp_path / "cache", k=4, seq_len=32,
                                                   max_chunks=12, progress=False))
    ds2 = remap_dataset(domain_ds, out, tmp_path / "ds2")
    check_same_tokenizer(ds2, out / "tokenizer.json")  # the trimmed model may train and be scored on it
    kept = kept_ids_of(load_checkpoint(out).provenance["passes"][-1]["report"])
    table = old_to_new_ids(kept, 384)
    train = domain_ds.split("train")
    assert np.array_equal(ds2.split("train").window(0, len(train)), table[train.window(0, len(train))])
    assert ds2.eos_token_id == table[domain_ds.eos_token_id] and ds2.vocab_size == len(kept)

    new = open_teacher_cache(remap_teacher_cache(cache, out, ds2, tmp_path / "cache2"), dataset=ds2)
    assert new.vocab_size == len(kept) and new.num_chunks == cache.num_chunks
    ids, lp, tail = new.chunk_arrays(np.arange(new.num_chunks))
    old_ids, old_lp, old_tail = cache.chunk_arrays(np.arange(cache.num_chunks))
    assert ids.max() < len(kept)
    for row in range(0, ids.shape[1], 7):
        n = int((table[old_ids[0, row]] >= 0).sum())
        assert ids[0, row, :n].tolist() == [table[i] for i in old_ids[0, row] if table[i] >= 0]
    mass = np.exp(np.where(lp > -60000, lp, -np.inf)).sum(-1) + np.exp(tail)
    np.testing.assert_allclose(mass, 1.0, atol=2e-3)  # fp16 log-probs
    batch = CachedKDBatches(new, ds2.split("train"), global_batch=2, seed=0).batch(0, slice(None))
    assert batch["teacher_topk_ids"].max() < len(kept) and batch["input_ids"].max() < len(kept)


def test_evaluation_reads_the_original_dataset_in_a_trimmed_checkpoints_ids(trimmed, trained, domain_ds,
                                                                              tiny_dataset):
    """`slm eval`/`slm select` of a trimmed checkpoint on the dataset it was trimmed with: the held-out split is
    carried into the trimmed ids (cached beside the dataset), so the trimmed model scores what the compress
    table measured for it, beside the untrimmed model on the same text; another tokenizer is still refused."""
    import shutil

    from slmkit.compress.vocab_remap import dataset_for_checkpoint
    from slmkit.data import TokenizerMismatchError
    from slmkit.evaluate.suite import SuiteConfig, evaluate_checkpoint

    out, rows = trimmed
    shutil.rmtree(domain_ds.path / ".vocab-remap", ignore_errors=True)
    cfg = SuiteConfig(max_tokens=1024, seq_len=32)
    before = evaluate_checkpoint(trained, ["lm"], data=domain_ds.path, cfg=cfg)["summary"]["bits_per_byte"]
    after = evaluate_checkpoint(out, ["lm"], data=domain_ds.path, cfg=cfg)["summary"]["bits_per_byte"]
    assert after == pytest.approx(rows[1]["bits_per_byte"], rel=1e-5)
    assert before == pytest.approx(rows[0]["bits_per_byte"], rel=1e-5)
    remapped = dataset_for_checkpoint(domain_ds, out)
    assert remapped.path.parent == domain_ds.path / ".vocab-remap" and list(remapped.splits) == ["val"]
    assert dataset_for_checkpoint(domain_ds, out).path == remapped.path  # reused, not rebuilt
    assert dataset_for_checkpoint(domain_ds, trained) is domain_ds
    src = domain_ds.path.parent / "other-src"
    src.mkdir(exist_ok=True)
    for i in range(4):
        (src / f"{i}.txt").write_text("\n".join(DOMAIN) * (i + 5))
    build_dataset([str(src)], domain_ds.path.parent / "other", vocab_size=300, val_fraction=0.5,
                          progress=False)
    with pytest.raises(TokenizerMismatchError, match="is not the tokenizer dataset"):
        dataset_for_checkpoint(open_dataset(domain_ds.path.parent / "other"), out)


def test_a_trimmed_checkpoint_compresses_and_evaluates_with_the_original_dataset(trimmed, domain_ds, tmp_path):
    """Quantizing a trimmed checkpoint later (`slm compress OUT --data DS`) and `slm eval --tasks lm` read the
    dataset it was trimmed from, carried into its ids, instead of refusing the tokenizer."""
    import subprocess
    import sys

    out, rows = trimmed
    q = compress(out, tmp_path / "q", [parse_pass("quant.int8")], data=domain_ds.path, calib_samples=4,
                 calib_seq_len=32, eval_tokens=1024, speed=False)
    assert q[0]["bits_per_byte"] == pytest.approx(rows[1]["bits_per_byte"], rel=1e-5)  # the same text, same ids
    assert abs(q[1]["bits_per_byte"] - q[0]["bits_per_byte"]) < 0.05
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", "eval", str(tmp_path / "q"), "--data", str(domain_ds.path),
                        "--tasks", "lm", "--max-tokens", "1024", "--seq-len", "32", "--json", str(tmp_path / "e.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["bits_per_byte"] == pytest.approx(q[1]["bits_per_byte"],
                                                                                          rel=1e-4)


def test_a_student_of_a_trimmed_teachers_layers_trains_in_the_trimmed_vocabulary(trimmed, domain_ds, tmp_path):
    """`slm distill -t TRIMMED -s teacher:drop=N -d ORIGINAL`: the dataset is carried into the trimmed ids, the
    student inherits the vocabulary record (so it evaluates and compresses with the original dataset too) and
    shares the teacher's tokenizer; the first layers' weights are the teacher's."""
    from slmkit.distill import KDConfig
    from slmkit.distill.run import distill

    out, rows = trimmed
    s = tmp_path / "s"
    res = distill(out, "teacher:drop=1", domain_ds.path, s,
                  TrainConfig(steps=2, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=0, eval_every=0, save_every=0,
                              precision="fp32", eval_tokens=512), KDConfig(alpha=0.5), quiet=True)
    assert res.steps == 2
    ck, teacher = load_checkpoint(s), load_checkpoint(out)
    assert ck.config.vocab_size == teacher.config.vocab_size < domain_ds.vocab_size
    assert (s / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    passes = ck.provenance["passes"]
    assert [p["name"] for p in passes] == ["prune.vocab"] and passes == teacher.provenance["passes"]
    q = compress(s, tmp_path / "q", [parse_pass("quant.int8")], data=domain_ds.path, calib_samples=2,
                 calib_seq_len=32, eval_tokens=512, speed=False)
    assert q[0]["bits_per_byte"] > 0 and abs(q[1]["bits_per_byte"] - q[0]["bits_per_byte"]) < 0.05
    assert load_checkpoint(tmp_path / "q").config.vocab_size == ck.config.vocab_size
