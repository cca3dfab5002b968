"""`check_same_tokenizer`: a dataset is only usable with a model whose tokenizer.json made its token ids."""

import json
import shutil

import pytest

from slmkit.data import DataError, TokenizerMismatchError, build_dataset, check_same_tokenizer, open_dataset


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A tokenizer.json trained on other text (so other merges): a checkpoint directory holding only it."""
    root = tmp_path_factory.mktemp("other")
    (root / "corpus").mkdir()
    for i in range(3):
        (root / "corpus" / f"{i}.txt").write_text(f"entirely different words, batch {i}; " * 200)
    build_dataset([str(root / "corpus")], root / "ds", vocab_size=280, val_fraction=0.3, progress=False)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    shutil.copy(root / "ds" / "tokenizer.json", ckpt / "tokenizer.json")
    return ckpt / "tokenizer.json"


def test_the_tokenizer_that_built_the_dataset_passes(built, tmp_path):
    _, out = built
    ds = open_dataset(out)
    copy = tmp_path / "ckpt" / "tokenizer.json"  # a checkpoint carries a byte-identical copy
    copy.parent.mkdir()
    shutil.copy(out / "tokenizer.json", copy)
    check_same_tokenizer(ds, copy)
    check_same_tokenizer(ds, str(out / "tokenizer.json"))
    check_same_tokenizer(ds, None)  # a checkpoint without tokenizer.json: nothing to compare


def test_another_tokenizer_is_refused_naming_both_files_and_the_fix(built, other_tokenizer):
    _, out = built
    ds = open_dataset(out)
    with pytest.raises(TokenizerMismatchError) as e:
        check_same_tokenizer(ds, other_tokenizer)
    msg = str(e.value)
    assert str(other_tokenizer) in msg and str(out / "tokenizer.json") in msg
    assert f"--tokenizer {other_tokenizer.parent}`" in msg and "slm data" in msg
    assert ds.meta["tokenizer_sha256"][:12] in msg and " or " not in msg.rsplit(";", 1)[1]
    # one user error type: cli.py maps DataError (a ValueError) to exit code 2
    assert isinstance(e.value, DataError) and isinstance(e.value, ValueError)
    with pytest.raises(TokenizerMismatchError, match=r"--tokenizer .*`\) or use `slm distill --mode sequence`$"):
        check_same_tokenizer(ds, other_tokenizer, alternative="use `slm distill --mode sequence`")


def test_a_dataset_without_a_recorded_digest_is_checked_against_its_own_tokenizer_file(built, other_tokenizer,
                                                                                       tmp_path):
    _, out = built
    hand_made = tmp_path / "ds"
    shutil.copytree(out, hand_made)
    meta = json.loads((hand_made / "meta.json").read_text())
    del meta["tokenizer_sha256"]
    (hand_made / "meta.json").write_text(json.dumps(meta))
    ds = open_dataset(hand_made)
    assert ds.tokenizer_sha256 == open_dataset(out).tokenizer_sha256
    check_same_tokenizer(ds, out / "tokenizer.json")
    with pytest.raises(TokenizerMismatchError):
        check_same_tokenizer(ds, other_tokenizer)


def test_a_missing_tokenizer_file_is_an_error_not_a_pass(built, tmp_path):
    _, out = built
    with pytest.raises(FileNotFoundError):
        check_same_tokenizer(open_dataset(out), tmp_path / "nowhere" / "tokenizer.json")
