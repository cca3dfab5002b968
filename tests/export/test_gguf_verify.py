"""`slm export gguf --verify DATA`: the written file scored by llama.cpp beside the checkpoint scored by slmkit on
the same held-out windows; an exact export of int4 codes agrees within 0.5%, and without llama.cpp the slmkit
figure is still given with the reason."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from llama_cpp_node import llama_cpp  # noqa: F401  (the tests' policy: skip, or fail under SLMKIT_REQUIRE_LLAMA_CPP)

from slmkit.cli import app
from slmkit.export.verify import verify_gguf
from slmkit.llamacpp import ENV, unavailable


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_dataset):
    work = tmp_path_factory.mktemp("verify")
    (work / "m.yaml").write_text("hidden_size: 64\nintermediate_size: 128\nnum_hidden_layers: 2\n"
                                 "num_attention_heads: 4\nnum_key_value_heads: 2\n")
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--data", str(tiny_dataset), "--model", str(work / "m.yaml"), "--out",
                            str(work / "f"), "--steps", "8", "--batch-size", "4", "--seq-len", "32",
                            "--eval-every", "0", "--lr", "3e-3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compress", str(work / "f"), "--pass", "quant.int4:format=q4_0,group_size=32",
                            "--out", str(work / "q")])
    assert r.exit_code == 0, r.output
    return work / "q"


def test_export_verify_agrees_with_llama_cpp(quantized, tiny_dataset, tmp_path):
    if unavailable():
        llama_cpp(tmp_path / "none.gguf")  # skips with the reason, or fails in CI
    r = CliRunner().invoke(app, ["export", "gguf", str(quantized), str(tmp_path / "m.gguf"), "--verify",
                                 str(tiny_dataset), "--verify-tokens", "512"])
    assert r.exit_code == 0, r.output
    assert "llama.cpp" in r.output and ": agree" in r.output
    v = verify_gguf(tmp_path / "m.gguf", quantized, tiny_dataset, tokens=512)
    assert v["agrees"] and abs(v["relative_difference"]) <= 0.005 and v["tokens"] > 0


def test_export_verify_without_llama_cpp_says_why(quantized, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "no-node-llama-cpp-here"))
    r = CliRunner().invoke(app, ["export", "gguf", str(quantized), str(tmp_path / "m.gguf"), "--verify",
                                 str(tiny_dataset), "--verify-tokens", "256"])
    assert r.exit_code == 0, r.output
    assert "slmkit" in r.output and "not run" in r.output and "node-llama-cpp is not installed" in r.output
