"""The function-exec task: held-out functions judged by running them (python-exec), end to end on a tiny model."""

from __future__ import annotations

from slmkit.evaluate.report import candidates_table
from slmkit.evaluate.suite import SuiteConfig, builtin_task, evaluate_checkpoint, parse_tasks


def test_items_are_held_out_unambiguous_and_judged_by_their_reference():
    from slmkit.data.default_tasks import function_part, heldout_files

    task = builtin_task("function-exec", SuiteConfig(items=4), 0.05)
    assert len(task.items) == 4 and task.verifier is not None
    refs = task.verifier._references
    held = {doc_id for doc_id, _ in heldout_files(0.05)}
    assert all(refs[it.prompt].task_id.rsplit(":", 2)[0] in held for it in task.items)
    assert all(function_part(refs[it.prompt].task_id) == "eval" for it in task.items)
    assert len({it.prompt for it in task.items}) == 4
    prompts = [it.prompt for it in task.items]
    real = task.verifier.score_batch(prompts, [it.reference for it in task.items])
    assert all(v.passed for v in real), [v.reason for v in real]
    trivial = task.verifier.score_batch(prompts * 2, ["\n    pass\n"] * 4 + ["\n    return 0\n"] * 4)
    assert not any(v.passed for v in trivial)


def test_eval_reports_the_exec_pass_rate(ckpt, tiny_dataset):
    assert parse_tasks("function-exec:2") == ["function-exec:2"]
    res = evaluate_checkpoint(ckpt, ["function-parse:2", "function-exec:2"], data=tiny_dataset,
                              cfg=SuiteConfig(max_new_tokens=8))
    out = res["tasks"]["function-exec"]
    assert out["items"] == 2 and out["scorer"] == "python-exec"
    assert all(o["reason"] for o in out["outputs"])  # an untrained model's text fails, with a reason
    assert 0.0 <= res["summary"]["exec_pass_rate"] <= 1.0 and "parse_rate" in res["summary"]
    header, _ = candidates_table({"candidates": {"tiny": res["summary"]}})
    assert "exec pass rate" in header and "parse rate" in header
