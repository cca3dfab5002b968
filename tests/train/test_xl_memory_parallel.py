"""Transformer-XL memory under DDP (two gloo processes via torchrun) and under `torch.compile`: each process
reads its own lanes in order with its own memory, the losses equal a single-process run with the same global
batch, and the compiled model keeps and uses the memory exactly like the eager one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slmkit.checkpoint import load_checkpoint

SPY = Path(__file__).with_name("xl_lane_spy.py")
SEQ, MEMORY = 16, 16
MODEL_YAML = ("hidden_size: 64\nintermediate_size: 128\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
              f"num_key_value_heads: 2\nmemory_length: {MEMORY}\n")


@pytest.fixture(scope="module")
def memory_yaml(tmp_path_factory):
    f = tmp_path_factory.mktemp("xl") / "memory.yaml"
    f.write_text(MODEL_YAML)
    return f


def train_args(data, model, out, steps=4):
    return ["train", "--data", data, "--model", model, "--out", out, "--steps", steps, "--batch-size", 4,
            "--micro-batch-size", 2, "--seq-len", SEQ, "--precision", "fp32", "--eval-every", 0, "--save-every", 0,
            "--seed", 7]


def run_spied(launcher: list[str], args: list, log_dir: Path) -> dict[int, list[dict]]:
    log_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XL_LANE_LOG": str(log_dir)}
    r = subprocess.run([sys.executable, *launcher, str(SPY), *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return {int(f.stem.removeprefix("rank")): [json.loads(ln) for ln in f.read_text().splitlines()]
            for f in sorted(log_dir.glob("rank*.jsonl"))}


def assert_reads_in_order(records: list[dict]) -> None:
    """Every slice of lanes continues its text from one step to the next, its memory growing to MEMORY."""
    for lanes in {tuple(r["lanes"]) for r in records}:
        rows = [r for r in records if tuple(r["lanes"]) == lanes]
        for prev, nxt in zip(rows, rows[1:]):
            assert nxt["first"] == prev["last_label"], lanes
        assert [r["offset"] for r in rows] == [SEQ * (i + 1) for i in range(len(rows))]
        assert all(r["length"] == min(MEMORY, r["offset"]) and all(r["keys_held"]) for r in rows)


def losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(ln)]


@pytest.mark.slow
def test_ddp_ranks_read_their_own_consecutive_lanes(tiny_dataset, memory_yaml, tmp_path):
    one = run_spied([], train_args(tiny_dataset, memory_yaml, tmp_path / "one"), tmp_path / "log1")
    two = run_spied(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                    train_args(tiny_dataset, memory_yaml, tmp_path / "two"), tmp_path / "log2")
    assert sorted(two) == [0, 1]
    assert {tuple(r["lanes"]) for r in two[0]} == {(0, 1)} and {tuple(r["lanes"]) for r in two[1]} == {(2, 3)}
    assert len(two[0]) == len(two[1]) == 4  # one micro-batch of 2 rows per rank and step
    for rank in (0, 1):
        assert_reads_in_order(two[rank])
    # The same segments and memories as one process reading all four lanes (two micro-batches per step)...
    single = {lanes: [r for r in one[0] if tuple(r["lanes"]) == lanes] for lanes in ((0, 1), (2, 3))}
    assert [r["first"] for r in two[0]] == [r["first"] for r in single[(0, 1)]]
    assert [r["first"] for r in two[1]] == [r["first"] for r in single[(2, 3)]]
    assert two[0][0]["first"] != two[1][0]["first"]  # the ranks read different text
    # ...hence the same losses (DDP averages the ranks' gradients exactly as accumulation does).
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    ck = load_checkpoint(tmp_path / "two")
    assert ck.config.memory_length == MEMORY


@pytest.mark.slow
def test_compiled_training_keeps_and_uses_the_memory(tiny_dataset, memory_yaml, tmp_path):
    """`slm train --compile` (inductor; needs a C++ compiler, as torch.compile on CPU always does) with memory:
    the memory object is mutated by the compiled forward (dynamo replays its side effects), and the losses match
    eager training step for step. The graph is compiled once for the empty memory and once for the full one."""
    args = train_args(tiny_dataset, memory_yaml, tmp_path / "eager", steps=3)
    eager = run_spied([], args, tmp_path / "log_eager")
    compiled_args = train_args(tiny_dataset, memory_yaml, tmp_path / "compiled", steps=3) + ["--compile"]
    compiled = run_spied([], compiled_args, tmp_path / "log_compiled")
    assert_reads_in_order(compiled[0])
    assert [r["first"] for r in compiled[0]] == [r["first"] for r in eager[0]]
    assert [r["loss"] for r in compiled[0]] == pytest.approx([r["loss"] for r in eager[0]], rel=1e-4)
    assert load_checkpoint(tmp_path / "compiled").config.memory_length == MEMORY
    assert torch.isfinite(torch.tensor(losses(tmp_path / "compiled"))).all()


@pytest.mark.slow
def test_ddp_and_compile_together(tiny_dataset, memory_yaml, tmp_path):
    """Two compiled DDP processes with memory: each rank still reads its own lanes in order, and the losses
    match one eager process with the same global batch."""
    eager = run_spied([], train_args(tiny_dataset, memory_yaml, tmp_path / "eager", steps=3), tmp_path / "log1")
    both = run_spied(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                     train_args(tiny_dataset, memory_yaml, tmp_path / "both", steps=3) + ["--compile"],
                     tmp_path / "log2")
    assert sorted(both) == [0, 1]
    for rank, lanes in ((0, (0, 1)), (1, (2, 3))):
        assert {tuple(r["lanes"]) for r in both[rank]} == {lanes}
        assert_reads_in_order(both[rank])
        assert [r["first"] for r in both[rank]] == [r["first"] for r in eager[0] if tuple(r["lanes"]) == lanes]
    assert losses(tmp_path / "both") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_compile_runs_the_memory_step_in_process(memory_yaml):
    """The same path in process, small enough for every run: a compiled model reading six segments with memory
    gives the eager logits and memory, and stops recompiling once the memory is full (dynamo compiles for the
    empty memory, specialises the first filled one, then marks the position offset dynamic)."""
    import numpy as np
    import torch._dynamo
    from torch._dynamo.utils import counters

    from slmkit.model import CausalLM, resolve_model_config

    torch.manual_seed(0)
    model = CausalLM(resolve_model_config(memory_yaml, vocab_size=97)).eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 97, (2, 6 * SEQ)))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")  # dynamo + AOT autograd, no C++ toolchain needed
    mem_c, mem_e = model.new_memory(2), model.new_memory(2)
    graphs = []
    with torch.no_grad():
        for s in range(0, 6 * SEQ, SEQ):
            got = compiled(ids[:, s:s + SEQ], memory=mem_c)
            want = model(ids[:, s:s + SEQ], memory=mem_e)
            assert torch.allclose(got, want, atol=1e-5)
            assert mem_c.offset == mem_e.offset == s + SEQ and mem_c.length == mem_e.length == min(s + SEQ, MEMORY)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[-1] <= 3  # no recompilation per segment once the memory is full
    torch._dynamo.reset()
