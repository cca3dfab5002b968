"""Default-domain tasks: held-out files only, deterministic, well-formed prompts and next-line items."""

import ast
import json
import re

import pytest

from slmkit.data import split_of
from slmkit.data.default_tasks import (file_function_tasks, function_prompts, heldout_files, next_line_items,
                                       write_function_prompts, write_next_line_items)

MODULE = '''"""A module."""
import os


def documented(path, *, mode="r"):
    """Open ``path``.

    More words.
    """
    with open(path, mode) as f:
        return f.read()


def undocumented(x):
    return x + 1


@staticmethod
def decorated():
    """Decorated."""
    return os.sep


def only_doc():
    """Nothing after the docstring."""


class Reader:
    """A class."""

    def read(self, n=1):
        """Read n items."""
        data = self.buf[:n]
        text = """
left of the def
"""
        return data

    async def fetch(self):
        """Fetch."""
        await self.sleep(0)
        return self.n
'''


def test_functions_and_methods_become_dedented_prompts_with_reference_bodies():
    tasks = {t.name: t for t in file_function_tasks("stdlib/m.py", MODULE)}
    assert set(tasks) == {"documented", "decorated", "Reader.fetch"}  # read(): a string left of its def
    t = tasks["documented"]
    assert t.id == "stdlib/m.py:5:documented"
    assert t.prompt == 'def documented(path, *, mode="r"):\n    """Open ``path``.\n\n    More words.\n    """'
    assert t.body == "\n    with open(path, mode) as f:\n        return f.read()\n"
    m = tasks["Reader.fetch"]
    assert m.prompt.startswith("async def fetch(self):\n") and m.body.startswith("\n    await")
    assert tasks["decorated"].prompt.startswith("def decorated")  # decorators dropped
    for task in tasks.values():
        ast.parse(task.prompt + task.body)
    loose = {t.name: t for t in file_function_tasks("stdlib/m.py", MODULE, require_docstring=False)}
    assert loose["undocumented"].prompt == "def undocumented(x):"
    assert loose["undocumented"].body == "\n    return x + 1\n"
    assert file_function_tasks("stdlib/bad.py", "def broken(:\n") == []


@pytest.fixture()
def fake_stdlib(tmp_path):
    """Twelve small modules; with val_fraction=0.5 about half are held out by the hash of their id."""
    files = []
    for i in range(12):
        p = tmp_path / f"mod{i}.py"
        body = "".join(f'def f{i}_{j}(x):\n    """Return x plus {j} in module {i}."""\n    y = x + {j}\n'
                       f'    return y * {i}  # line of module {i}\n\n\n' for j in range(4))
        p.write_text(body)
        files.append((f"stdlib/mod{i}.py", p))
    return files


def test_only_heldout_files_and_the_same_split_as_slm_data(fake_stdlib):
    held = heldout_files(0.5, fake_stdlib)
    assert held and len(held) < len(fake_stdlib)
    assert all(split_of(doc_id, 0.5) == "val" for doc_id, _ in held)
    held_ids = {doc_id for doc_id, _ in held}
    tasks = function_prompts(limit=1000, val_fraction=0.5, files=fake_stdlib)
    assert tasks and {t.id.rsplit(":", 2)[0] for t in tasks} <= held_ids
    items = next_line_items(limit=1000, val_fraction=0.5, files=fake_stdlib, context_lines=3)
    assert items and {i.id.rsplit(":", 1)[0] for i in items} <= held_ids
    # A smaller fraction holds out a subset of the same files.
    assert {d for d, _ in heldout_files(0.25, fake_stdlib)} <= held_ids
    with pytest.raises(ValueError, match="val_fraction"):
        heldout_files(0.0, fake_stdlib)


def test_deterministic_capped_and_seeded(fake_stdlib):
    a = function_prompts(limit=5, val_fraction=0.5, files=fake_stdlib)
    assert a == function_prompts(limit=5, val_fraction=0.5, files=list(reversed(fake_stdlib))) and len(a) == 5
    assert [t.id for t in a] != [t.id for t in function_prompts(limit=5, seed=1, val_fraction=0.5, files=fake_stdlib)]
    i1 = next_line_items(limit=6, val_fraction=0.5, files=fake_stdlib, context_lines=3)
    assert i1 == next_line_items(limit=6, val_fraction=0.5, files=fake_stdlib, context_lines=3) and len(i1) == 6


def test_next_line_items_real_line_and_reindented_distractors_from_other_files(fake_stdlib):
    paths = dict(fake_stdlib)
    for item in next_line_items(limit=20, val_fraction=0.5, files=fake_stdlib, context_lines=3):
        doc_id, line = item.id.rsplit(":", 1)
        lines = paths[doc_id].read_text().splitlines()
        real = lines[int(line) - 1]
        assert item.choices[item.answer] == real and len(item.choices) == 4 == len(set(item.choices))
        assert item.context == "".join(ln + "\n" for ln in lines[int(line) - 4:int(line) - 1])
        indent = real[:len(real) - len(real.lstrip())]
        module = doc_id.removeprefix("stdlib/mod").removesuffix(".py")
        for k, choice in enumerate(item.choices):
            assert choice.startswith(indent) and not choice[len(indent):].startswith(" ")
            if k != item.answer:  # distractors come from other files: they name another module
                assert not re.search(rf"module {module}\b", choice)
    answers = [i.answer for i in next_line_items(limit=40, val_fraction=0.5, files=fake_stdlib, context_lines=3)]
    assert len(set(answers)) > 1  # the answer's position is shuffled


def test_jsonl_writers(fake_stdlib, tmp_path):
    n = write_function_prompts(tmp_path / "f.jsonl", limit=3, val_fraction=0.5, files=fake_stdlib)
    rows = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert n == 3 == len(rows) and set(rows[0]) == {"id", "prompt", "body", "name"}
    write_next_line_items(tmp_path / "n.jsonl", limit=2, val_fraction=0.5, files=fake_stdlib, context_lines=3)
    row = json.loads((tmp_path / "n.jsonl").read_text().splitlines()[0])
    assert set(row) == {"id", "context", "choices", "answer"} and 0 <= row["answer"] < 4


def test_real_default_domain_is_heldout_and_parses():
    tasks = function_prompts(limit=20, val_fraction=0.02)
    assert len(tasks) == 20
    for t in tasks:
        doc_id = t.id.rsplit(":", 2)[0]
        assert doc_id.startswith("stdlib/") and split_of(doc_id, 0.02) == "val"
        assert t.prompt.startswith(("def ", "async def ")) and not t.prompt.endswith("\n")
        ast.parse(t.prompt + t.body)
    items = next_line_items(limit=10, val_fraction=0.02)
    assert len(items) == 10 and all(split_of(i.id.rsplit(":", 1)[0], 0.02) == "val" for i in items)


def test_eval_and_pairs_halves_are_disjoint_and_together_all(fake_stdlib):
    from slmkit.data.default_tasks import function_prompts

    every = {t.id for t in function_prompts(limit=1000, val_fraction=0.5, files=fake_stdlib)}
    ev = {t.id for t in function_prompts(limit=1000, val_fraction=0.5, files=fake_stdlib, part="eval")}
    pa = {t.id for t in function_prompts(limit=1000, val_fraction=0.5, files=fake_stdlib, part="pairs")}
    assert ev and pa and not ev & pa and ev | pa == every
    with pytest.raises(ValueError, match="part='test'"):
        function_prompts(limit=1, files=fake_stdlib, part="test")
