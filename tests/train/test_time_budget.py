"""A time budget sets the number of steps from measured step times, and cuts it when the machine slows down
so the run still ends near the budget (never lengthening it)."""

import time

import torch

from slmkit.model import CausalLM, ModelConfig
from slmkit.train import TrainConfig, Trainer


class RandomBatches:
    def batch(self, step, rows):
        g = torch.Generator().manual_seed(step)
        return {"input_ids": torch.randint(0, 64, (rows.stop - rows.start, 9), generator=g)}


def run(tmp_path, slow_from: int | None, budget: float = 1.0):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1))
    calls = {"n": 0}

    def step(m, batch):
        calls["n"] += 1
        time.sleep(0.004 if slow_from is None or calls["n"] < slow_from else 0.04)  # the machine slows down
        ids = batch["input_ids"]
        logits = m(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()), {}

    cfg = TrainConfig(steps=100_000, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=0, eval_every=0,
                      save_every=0, log_every=1000, time_budget_s=budget, device="cpu")
    trainer = Trainer(model, step, RandomBatches(), cfg, tmp_path / "out", quiet=True)
    t0 = time.perf_counter()
    result = trainer.fit()
    return result, time.perf_counter() - t0, trainer


def test_budget_holds_when_steps_slow_down(tmp_path):
    steady, steady_s, _ = run(tmp_path / "a", slow_from=None)
    slowed, slowed_s, trainer = run(tmp_path / "b", slow_from=10)  # after the probes (steps 3 and 8)
    # Without the cut the slowed run would keep the step count planned at the fast start: over 2x the budget.
    assert slowed.steps < steady.steps
    assert slowed.seconds < 1.35 and steady.seconds < 1.35  # the training loop itself; the budget is 1 s
    assert slowed_s < 2.0  # fit() also saves the final state
    assert trainer.total_steps == slowed.steps
