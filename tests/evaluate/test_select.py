"""`slmkit.evaluate.select.measure`: one candidate's quality and speed, with a bar per task and for the benchmark."""

from slmkit.evaluate.bench import BenchConfig, bench_runs
from slmkit.evaluate.select import MeasureConfig, measure
from slmkit.evaluate.suite import SuiteConfig


def test_measure_draws_a_bar_per_task_and_for_the_benchmark_named_after_the_candidate(ckpt, tiny_dataset, tmp_path):
    from progress_capture import record_bars

    bars, hook = record_bars()
    bench = BenchConfig(prompt_len=8, new_tokens=4, batch_sizes=(1,), repeats=1)
    cfg = MeasureConfig(tasks=["lm", "next-line:2"], suite=SuiteConfig(max_tokens=128, seq_len=64), bench=bench)
    row = measure(ckpt, tiny_dataset, cfg, tmp_path / "cache", log=lambda m: None, progress=hook, name="int8")
    assert row["bits_per_byte"] > 0 and row["decode_tok_s_b1"] > 0
    assert bars.pop("int8: lm (val bits/byte)") == [2, 2]
    assert bars.pop("int8: speed and memory (runs in a fresh process)") == [bench_runs(bench)] * 2
    (name, (total, done)), = bars.items()
    assert name.startswith("int8: next-line") and total == done > 0
    bars.clear()
    again = measure(ckpt, tiny_dataset, cfg, tmp_path / "cache", log=lambda m: None, progress=hook)
    assert again == row and bars == {}  # cached: nothing measured, nothing drawn
