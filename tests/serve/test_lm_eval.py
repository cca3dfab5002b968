"""lm-evaluation-harness end to end: the real `lm_eval` CLI (`--model local-completions`) against `slm serve` on
loopback, with tasks written here (YAML + JSONL, `--include_path`; nothing from a hub, HF_*_OFFLINE=1).

The multiple-choice items are the default domain's next-line items (`slmkit.data.default_tasks`). lm-eval moves
a context's trailing whitespace into the continuation and splits `context + choice` after the context's own
tokens; slm eval's `encode_pair` does the same for trailing spaces, so the task file puts the context's trailing
newlines at the start of each choice and both score exactly the same token sequences. lm-eval's remote tokenizer
asks `/tokenize` for no special tokens, so it scores without a BOS token unless the task writes one: the task
`slm_next_line_bos` prefixes `<|bos|>` and equals `slm eval` on the same file (which conditions on BOS); the task
`slm_next_line` equals slmkit's scoring without BOS. Both compare accuracy exactly and every choice's
log-likelihood to 1e-4. A `generate_until` task must produce the model's greedy completion.

Needs `pip install 'lm-eval[api]==0.4.13'` (47 packages, about 645 MiB); skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmkit.checkpoint import load_checkpoint, save_checkpoint
from slmkit.data import default_tasks
from slmkit.data.tokenizer import BOS, special_token_ids, tokenizer_config, train_tokenizer
from slmkit.evaluate.suite import run_suite
from slmkit.evaluate.tasks import ChoiceItem, score_choice_task
from slmkit.model import CausalLM, ModelConfig
from slmkit.serve.chat_template import load_chat_template
from slmkit.serve.engine import Engine
from slmkit.serve.server import BackgroundServer, ServerConfig, create_app

INSTALL = "pip install 'lm-eval[api]==0.4.13'"
pytest.importorskip("lm_eval", reason=f"lm-evaluation-harness is not installed: {INSTALL}")
pytest.importorskip("tenacity", reason=f"lm-eval's API models need its [api] extra: {INSTALL}")

MODEL = "slm-domain-tiny"
KEY = "lm-eval-test-key"  # lm-eval sends it as OPENAI_API_KEY (completions) and auth_token (tokenizer endpoints)
CONTEXT = 512
ITEMS = 24

CHOICE_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{prefix}{{{{context}}}}"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""

GENERATE_YAML = """\
task: slm_function_body
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: reference
target_delimiter: ""
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


def domain_checkpoint(out: Path) -> Path:
    """A 2-layer model with a byte-level BPE tokenizer trained on a slice of the default domain."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for _, p in default_tasks.heldout_files()[:6]]
    tok_dir = out.parent / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, vocab_size=512, min_frequency=2)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, special_token_ids(tok))))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)
    model = CausalLM(cfg)
    with torch.no_grad():  # larger weights than the init: choices get clearly different scores
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return save_checkpoint(model, out, tokenizer_from=tok_dir)


def choice_items(tokenizer) -> tuple[list[ChoiceItem], int]:
    """Next-line items with the context's trailing whitespace moved into every choice (see the module
    docstring); items whose context tokens are not a prefix of `context + choice`'s are left out (lm-eval has no
    fallback for them). Returns the items and how many were left out."""
    items, dropped = [], 0
    for raw in default_tasks.next_line_items(limit=ITEMS, seed=0, context_lines=4):
        context = raw.context.rstrip()
        tail = raw.context[len(context):]
        item = ChoiceItem(context, [tail + c for c in raw.choices], raw.answer)
        ctx = tokenizer.encode(context).ids
        if all(tokenizer.encode(context + c).ids[:len(ctx)] == ctx for c in item.choices):
            items.append(item)
        else:
            dropped += 1
    return items, dropped


def greedy_ids(model, prompt: list[int], n: int, eos: int | None) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            if t == eos:
                break
            ids.append(t)
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ck = load_checkpoint(domain_checkpoint(tmp_path_factory.mktemp("lm_eval") / "ckpt"))
    tok = ck.tokenizer()
    engine = Engine(ck.model, tok, max_concurrent=4, max_waiting=64).start()
    config = ServerConfig(model_name=MODEL, api_key=KEY, max_body_bytes=1 << 20)
    with BackgroundServer(create_app(engine, config, load_chat_template(ck.path))) as srv:
        yield ck, tok, srv
    engine.close()


def run_lm_eval(srv, tasks: list[str], include: Path, out: Path, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp / "hf"), "HF_DATASETS_CACHE": str(tmp / "hf" / "datasets"), "OMP_NUM_THREADS": "1",
           "OPENAI_API_KEY": KEY, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    model_args = (f"base_url={srv.url}/v1/completions,model={MODEL},max_length={CONTEXT},max_retries=1,"
                  f"auth_token={KEY}")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", ",".join(tasks), "--include_path", str(include), "--output_path", str(out), "--log_samples",
           "--batch_size", "1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def samples(out: Path, task: str) -> list[dict]:
    prefix = f"samples_{task}_"
    files = sorted(f for f in out.rglob(prefix + "*.jsonl") if f.name[len(prefix)].isdigit())  # not {task}_bos
    assert files, f"lm_eval wrote no samples for {task} under {out}"
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["doc_id"])


@pytest.mark.slow  # a fresh interpreter imports lm_eval, datasets and torch: 15-40 s on a busy 2-core machine
def test_lm_eval_local_completions_equals_slm_eval(served, tmp_path):
    ck, tok, srv = served
    items, dropped = choice_items(tok)
    assert len(items) >= ITEMS // 2, f"only {len(items)} of {ITEMS} items kept ({dropped} dropped)"
    data = tmp_path / "next_line.jsonl"
    default_tasks.write_jsonl([{"context": it.context, "choices": it.choices, "gold": it.gold} for it in items], data)
    functions = default_tasks.function_prompts(limit=2, seed=0)
    gen_data = tmp_path / "functions.jsonl"
    default_tasks.write_jsonl([{"prompt": f.prompt, "reference": f.body} for f in functions], gen_data)
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "slm_next_line.yaml").write_text(CHOICE_YAML.format(task="slm_next_line", data=data, prefix=""))
    (include / "slm_next_line_bos.yaml").write_text(CHOICE_YAML.format(task="slm_next_line_bos", data=data,
                                                                        prefix=BOS))
    (include / "slm_function_body.yaml").write_text(GENERATE_YAML.format(data=gen_data))

    out = tmp_path / "out"
    r = run_lm_eval(srv, ["slm_next_line", "slm_next_line_bos", "slm_function_body"], include, out, tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    log = r.stdout + r.stderr
    assert "Using remote tokenizer" in log or "remote tokenizer" in log.lower(), log[-3000:]
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]

    # slmkit's own scoring, in this process: without BOS (as lm-eval asks /tokenize), and `slm eval` itself.
    bos = ck.config.bos_token_id
    plain = score_choice_task(ck.model, tok, items, bos_id=None)
    suite = run_suite(ck.model, tok, [str(data)])
    with_bos = score_choice_task(ck.model, tok, items, bos_id=bos)
    assert suite["summary"]["next_line_acc"] == with_bos["acc"]

    assert results["slm_next_line"]["acc,none"] == plain["acc"]
    assert results["slm_next_line_bos"]["acc,none"] == suite["summary"]["next_line_acc"]
    for task, ref in (("slm_next_line", plain), ("slm_next_line_bos", with_bos)):
        rows = samples(out, task)
        assert len(rows) == len(items)
        for row, lls in zip(rows, ref["loglikelihoods"]):
            got = [float(resp[0][0]) for resp in row["resps"]]
            assert got == pytest.approx(lls, abs=1e-4), (task, row["doc_id"])

    # generate_until: lm-eval sends the prompt's token ids (no BOS), greedy, at most 16 tokens, until "\n\n".
    rows = samples(out, "slm_function_body")
    assert len(rows) == len(functions)
    for row, f in zip(rows, functions):
        ids = greedy_ids(ck.model, tok.encode(f.prompt).ids, 16, ck.config.eos_token_id)
        expected = tok.decode(ids).split("\n\n")[0]
        assert row["resps"][0][0] == expected
    assert "exact_match,none" in results["slm_function_body"]
    print(f"\nlm-eval acc {results['slm_next_line_bos']['acc,none']:.4f} == slm eval acc "
          f"{suite['summary']['next_line_acc']:.4f} on {len(items)} next-line items ({dropped} left out); "
          f"without BOS {results['slm_next_line']['acc,none']:.4f} == {plain['acc']:.4f}")
