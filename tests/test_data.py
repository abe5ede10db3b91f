"""Tests for lora_helpers.data: sources, errors, balanced subsets, cleaning."""

import pandas as pd
import pytest

from lora_helpers import data
from lora_helpers.data import clean_text, describe_imdb, hub_reachable, load_imdb


def reviews(split, label, k):
    word = "great" if label else "awful"
    return [f"{split} review {i}: a {word} film.<br /><br />Really {word}." for i in range(k)]


@pytest.fixture(autouse=True)
def no_fallbacks(tmp_path_factory, monkeypatch):
    """Every test starts with no source at all: an empty repository folder, no env var, offline."""
    empty = tmp_path_factory.mktemp("empty")
    monkeypatch.setattr(data, "REPO_ROOT", empty / "repo")
    monkeypatch.delenv("LORA_IMDB_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def parquet_dir(tmp_path):
    """train: 6 negative + 6 positive reviews; test: 3 + 3."""
    for split, k in (("train", 6), ("test", 3)):
        rows = [(t, label) for label in (0, 1) for t in reviews(split, label, k)]
        pd.DataFrame(rows, columns=["text", "label"]).to_parquet(tmp_path / f"{split}.parquet")
    return tmp_path


@pytest.fixture
def acl_dir(tmp_path):
    """The tarball layout aclImdb/{train,test}/{pos,neg}/*.txt, 4 reviews per folder."""
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        for label, sub in ((0, "neg"), (1, "pos")):
            (root / split / sub).mkdir(parents=True)
            for i, text in enumerate(reviews(split, label, 4)):
                (root / split / sub / f"{i}_{7 if label else 2}.txt").write_text(text, encoding="utf-8")
    return root


def test_parquet_folder(parquet_dir, capsys):
    ds = load_imdb(data_dir=parquet_dir)
    assert set(ds) == {"train", "test"} and ds["train"].column_names == ["text", "label"]
    assert (len(ds["train"]), len(ds["test"])) == (12, 6)
    assert sorted(ds["train"]["label"]) == [0] * 6 + [1] * 6
    out = capsys.readouterr().out
    assert str(parquet_dir) in out and "6 negative / 6 positive" in out
    assert str(parquet_dir) in ds["train"].info.description


def test_acl_layout_and_labels(acl_dir):
    for folder in (acl_dir, acl_dir.parent):  # the aclImdb folder itself, or the folder holding it
        ds = load_imdb(data_dir=folder, verbose=False)
        assert len(ds["train"]) == 8 and len(ds["test"]) == 8
        for row in ds["train"]:
            assert row["label"] == (1 if "great" in row["text"] else 0)


def test_env_var_and_repo_fallbacks(parquet_dir, acl_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_IMDB_DIR", str(parquet_dir))
    assert "parquet" in load_imdb(verbose=False)["train"].info.description
    monkeypatch.delenv("LORA_IMDB_DIR")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    acl_dir.rename(repo / "data" / "aclImdb")
    monkeypatch.setattr(data, "REPO_ROOT", repo)
    assert "aclImdb" in load_imdb(verbose=False)["train"].info.description


def test_a_copy_outside_the_repository_is_configuration(parquet_dir, monkeypatch):
    """The package knows no machine's layout: a copy elsewhere is found through LORA_IMDB_DIR only."""
    assert not hasattr(data, "SHARED_IMDB_DIR")
    monkeypatch.setenv("LORA_IMDB_DIR", str(parquet_dir))
    assert len(load_imdb(verbose=False)["train"]) == 12


def test_wrong_layout_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "reviews.csv").write_text("text,label\n")
    with pytest.raises(FileNotFoundError, match=r"train\.parquet.*reviews\.csv"):
        load_imdb(data_dir=tmp_path)
    monkeypatch.setenv("LORA_IMDB_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="LORA_IMDB_DIR"):
        load_imdb()


def test_parquet_without_columns(tmp_path):
    for split in ("train", "test"):
        pd.DataFrame({"review": ["x"], "sentiment": [1]}).to_parquet(tmp_path / f"{split}.parquet")
    with pytest.raises(ValueError, match="'text' and 'label'.*review"):
        load_imdb(data_dir=tmp_path)


def test_no_source_names_the_three_ways():
    with pytest.raises(FileNotFoundError) as info:
        load_imdb()
    message = str(info.value)
    assert "LORA_IMDB_DIR" in message and "data/imdb" in message.replace("\\", "/")
    assert "aclImdb_v1.tar.gz" in message and "stanfordnlp/imdb" in message


def test_balanced_seeded_subsets(parquet_dir, acl_dir):
    a = load_imdb(n_train=4, n_test=2, seed=3, data_dir=parquet_dir, verbose=False)
    b = load_imdb(n_train=4, n_test=2, seed=3, data_dir=parquet_dir, verbose=False)
    assert a["train"]["text"] == b["train"]["text"] and a["test"]["text"] == b["test"]["text"]
    assert sorted(a["train"]["label"]) == [0, 0, 1, 1] and sorted(a["test"]["label"]) == [0, 1]
    seeds = {tuple(load_imdb(4, 2, seed=s, data_dir=parquet_dir, verbose=False)["train"]["text"]) for s in range(5)}
    assert len(seeds) > 1


def test_subset_ignores_file_order(tmp_path):
    for folder, order in (("a", 1), ("b", -1)):
        (tmp_path / folder).mkdir()
        for split, k in (("train", 6), ("test", 3)):
            rows = [(t, label) for label in (0, 1) for t in reviews(split, label, k)][::order]
            pd.DataFrame(rows, columns=["text", "label"]).to_parquet(tmp_path / folder / f"{split}.parquet")
    a, b = (load_imdb(4, 2, seed=1, data_dir=tmp_path / f, verbose=False) for f in "ab")
    assert a["train"]["text"] == b["train"]["text"]


def test_too_many_rows(parquet_dir):
    with pytest.raises(ValueError, match=r"n_train=20.*has 12 \(6 negative, 6 positive\)"):
        load_imdb(n_train=20, data_dir=parquet_dir)


def test_cleaning(parquet_dir):
    assert clean_text("Good.<br /><br />Bad.<BR/>Ugly<br>  end ") == "Good. Bad. Ugly end"
    clean = load_imdb(data_dir=parquet_dir, verbose=False)
    raw = load_imdb(data_dir=parquet_dir, clean=False, verbose=False)
    assert not any("<br" in t for t in clean["train"]["text"])
    assert all("<br />" in t for t in raw["train"]["text"])
    assert "12 reviews" in describe_imdb(clean)


def test_hub_reachable_honours_offline(monkeypatch):
    assert hub_reachable() is False  # HF_HUB_OFFLINE=1 from the fixture
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert hub_reachable() is False


# ------------------------------------------------------------------ robustness (issue 14)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_train=0), ValueError, r"n_train must be a whole number >= 1 \(reviews; None: the whole split\), got 0"),
        (dict(n_train=-2), ValueError, "n_train must be a whole number .* got -2"),
        (dict(n_test=0), ValueError, "n_test must be a whole number .* got 0"),
        (dict(n_train=10.5), TypeError, "n_train must be a whole number .* got float 10.5"),
        (dict(n_train="10"), TypeError, "n_train must be a whole number .* got str '10'"),
        (dict(n_train=True), TypeError, "n_train must be a whole number .* got bool True"),
    ],
)
def test_bad_subset_sizes_are_refused(parquet_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_imdb(data_dir=parquet_dir, verbose=False, **kwargs)


def test_numpy_integer_sizes_are_accepted(parquet_dir):
    import numpy as np

    ds = load_imdb(n_train=np.int64(4), n_test=np.int32(2), data_dir=parquet_dir, verbose=False)
    assert (len(ds["train"]), len(ds["test"])) == (4, 2)


def test_an_acl_folder_without_reviews_is_an_error_naming_the_folder(acl_dir):
    for f in (acl_dir / "train" / "neg").glob("*.txt"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"train/neg has no \.txt reviews"):
        load_imdb(data_dir=acl_dir, verbose=False)


def test_an_empty_parquet_split_is_an_error(parquet_dir):
    pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=int)}).to_parquet(
        parquet_dir / "test.parquet"
    )
    with pytest.raises(ValueError, match=r"test\.parquet holds no reviews"):
        load_imdb(data_dir=parquet_dir, verbose=False)


def test_a_split_of_one_label_is_an_error(parquet_dir):
    pd.DataFrame({"text": ["good", "fine"], "label": [1, 1]}).to_parquet(parquet_dir / "test.parquet")
    with pytest.raises(ValueError, match="the test split has reviews of one label only"):
        load_imdb(data_dir=parquet_dir, verbose=False)


def test_a_review_without_text_is_an_error_naming_the_file_and_row(parquet_dir):
    rows = pd.read_parquet(parquet_dir / "train.parquet")
    rows.loc[3, "text"] = None
    rows.to_parquet(parquet_dir / "train.parquet")
    with pytest.raises(ValueError, match=r"train\.parquet: 1 review\(s\) have no text \(rows \[3\]\)"):
        load_imdb(data_dir=parquet_dir, verbose=False)
