"""The IMDb movie-review data set (Maas et al., 2011), wherever it can be found.

Introduced in notebook 03 (``03_lora_distilbert_imdb.ipynb``). It offers

* ``load_imdb(...)``: a ``datasets.DatasetDict`` with splits ``train`` and
  ``test`` and columns ``text`` (str) and ``label`` (0 = negative, 1 = positive),
  optionally a seeded, label-balanced subset of each split;
* ``clean_text(s)``: drops the ``<br />`` markup of the raw reviews;
* ``describe_imdb(ds)``: a short summary (source, sizes, label balance);
* ``hub_reachable()``: a fast check whether the Hugging Face Hub can be reached.

Sources, tried in this order (the first that exists wins):

1. the ``data_dir`` argument, else the environment variable ``LORA_IMDB_DIR``;
2. ``<repo>/data/imdb/`` holding ``train.parquet`` and ``test.parquet``;
3. ``<repo>/data/aclImdb/``, the unpacked original tarball;
4. the Hub dataset ``stanfordnlp/imdb`` (only when online).

A copy kept anywhere else is configuration: point ``LORA_IMDB_DIR`` at it.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from .utils import check_int

# Module-level so that tests (or you) can point them elsewhere.
REPO_ROOT = Path(__file__).resolve().parent.parent
HUB_DATASET = "stanfordnlp/imdb"
TARBALL_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
SPLITS = ("train", "test")
# the same column types as the Hub's stanfordnlp/imdb
FEATURES = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})

_BR_TAG = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def clean_text(s: str) -> str:
    """Replace ``<br />``-style line breaks with a space and collapse whitespace."""
    return " ".join(_BR_TAG.sub(" ", s).split())


# --------------------------------------------------------------------------- Hub
def offline_env_var() -> str | None:
    """The name of the set variable (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) that forbids the Hub, else None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hub is allowed (no offline variable) and answers a TCP connection within ``timeout`` s.

    A plain Hub request without internet spends ~50 s on retries; this check
    takes at most ``timeout`` seconds (a thread also bounds a slow DNS lookup).
    """
    if offline_env_var():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    address = (url.hostname, url.port or (80 if url.scheme == "http" else 443))
    answered = []

    def try_connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=try_connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered)


# ---------------------------------------------------------------- reading files
def _check_rows(df: pd.DataFrame, where) -> pd.DataFrame:
    """A split must hold reviews, each with a text; say where it does not."""
    if df.empty:
        raise ValueError(f"{where} holds no reviews: an IMDb split needs reviews of both labels.")
    missing = [i for i, t in enumerate(df["text"]) if not isinstance(t, str)]
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} review(s) have no text (rows {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}); fill in or drop those rows."
        )
    return df


def _read_parquet(path: Path) -> pd.DataFrame:
    """One split from a parquet file; it must have ``text`` and ``label`` columns."""
    df = pd.read_parquet(path)
    missing = {"text", "label"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} must have columns 'text' and 'label'; it has {list(df.columns)}.")
    labels = set(df["label"].unique().tolist())
    if not labels <= {0, 1}:
        raise ValueError(f"{path}: column 'label' must hold 0 (negative) and 1 (positive); found {sorted(labels)}.")
    return _check_rows(df[["text", "label"]], path)


def _read_acl_split(split_dir: Path) -> pd.DataFrame:
    """One split of the tarball layout: ``pos/*.txt`` (label 1) and ``neg/*.txt`` (label 0)."""
    rows = []
    for label, sub in ((0, "neg"), (1, "pos")):
        files = sorted((split_dir / sub).glob("*.txt"))
        if not files:
            raise FileNotFoundError(
                f"{split_dir / sub} has no .txt reviews: the aclImdb layout needs one review "
                "per .txt file in train/pos, train/neg, test/pos and test/neg."
            )
        for f in files:
            try:
                rows.append((f.read_text(encoding="utf-8"), label))
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{f} is not UTF-8 text (byte {err.start}: {err.reason}); IMDb's reviews are UTF-8. "
                    "Convert it, e.g. iconv -f latin1 -t utf-8, or remove it"
                ) from None
    return pd.DataFrame(rows, columns=["text", "label"])


def _read_folder(folder: Path) -> tuple[dict[str, pd.DataFrame], str]:
    """Both splits from a parquet folder or an aclImdb-layout folder; clear error otherwise."""
    if all((folder / f"{s}.parquet").is_file() for s in SPLITS):
        return {s: _read_parquet(folder / f"{s}.parquet") for s in SPLITS}, f"{folder} (parquet)"
    for root in (folder, folder / "aclImdb"):
        if all((root / s / sub).is_dir() for s in SPLITS for sub in ("pos", "neg")):
            return {s: _read_acl_split(root / s) for s in SPLITS}, f"{root} (aclImdb text files)"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())[:12]
    raise FileNotFoundError(
        f"{folder} is not an IMDb folder. Expected either train.parquet + test.parquet "
        f"(columns text, label) or the aclImdb layout train/pos, train/neg, test/pos, test/neg "
        f"with .txt reviews. Found: {found or 'an empty folder'}."
    )


def _read_hub() -> tuple[dict[str, pd.DataFrame], str]:
    """Both splits of ``stanfordnlp/imdb`` from the Hugging Face Hub."""
    from datasets import load_dataset

    hub = load_dataset(HUB_DATASET)
    return {s: hub[s].to_pandas()[["text", "label"]] for s in SPLITS}, f"Hugging Face Hub ({HUB_DATASET})"


def _no_source_error() -> FileNotFoundError:
    return FileNotFoundError(
        "No IMDb data found. Get it in one of these ways:\n"
        f"  (a) put train.parquet and test.parquet (columns text, label) in {REPO_ROOT / 'data' / 'imdb'}/, "
        "or point the environment variable LORA_IMDB_DIR at such a folder;\n"
        f"  (b) download and unpack the aclImdb tarball ({TARBALL_URL}) into {REPO_ROOT / 'data'}/ "
        "(giving data/aclImdb/train/pos, ...);\n"
        f"  (c) go online, so that '{HUB_DATASET}' can be downloaded from the Hugging Face Hub "
        "(and leave HF_HUB_OFFLINE unset)."
    )


def _read_raw(data_dir) -> tuple[dict[str, pd.DataFrame], str]:
    """Try the sources in order; an explicitly given folder must be right (no silent fall-through)."""
    explicit = data_dir or os.environ.get("LORA_IMDB_DIR")
    if explicit:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            origin = "data_dir" if data_dir else "LORA_IMDB_DIR"
            raise FileNotFoundError(f"{origin}={str(explicit)!r} is not an existing folder.")
        return _read_folder(folder)
    for folder in (REPO_ROOT / "data" / "imdb", REPO_ROOT / "data" / "aclImdb"):
        if folder.is_dir():
            return _read_folder(folder)
    if hub_reachable():
        return _read_hub()
    raise _no_source_error()


# ------------------------------------------------------------------- subsetting
def _balanced_subset(df: pd.DataFrame, n: int | None, seed: int, split: str) -> pd.DataFrame:
    """``n // 2`` rows of label 0 and ``n - n // 2`` of label 1 (all rows if n is None), seeded and shuffled.

    The rows are sorted by text first, so the subset depends on the seed only,
    not on the order in which the files were read.
    """
    rng = np.random.default_rng(seed)
    if not {0, 1} <= set(df["label"].unique().tolist()):
        raise ValueError(f"the {split} split has reviews of one label only ({len(df)} reviews); IMDb has both.")
    df = df.sort_values(["label", "text"], kind="stable").reset_index(drop=True)
    by_label = {label: df.index[df["label"] == label].to_numpy() for label in (0, 1)}
    if n is None:
        wanted = {label: len(idx) for label, idx in by_label.items()}
    else:
        wanted = {0: n // 2, 1: n - n // 2}
        if any(wanted[label] > len(by_label[label]) for label in (0, 1)):
            raise ValueError(
                f"n_{split}={n} asks for {wanted[0]} negative and {wanted[1]} positive reviews, but the "
                f"{split} split has {len(df)} ({len(by_label[0])} negative, {len(by_label[1])} positive)."
            )
    chosen = np.concatenate([rng.choice(by_label[label], wanted[label], replace=False) for label in (0, 1)])
    return df.loc[rng.permutation(chosen)].reset_index(drop=True)


def describe_imdb(ds: DatasetDict) -> str:
    """A few lines: where the data came from, the size and label balance of each split."""
    lines = [f"IMDb reviews from {ds['train'].info.description}"]
    for split, part in ds.items():
        n_pos = int(sum(part["label"]))
        lines.append(f"  {split:<5}: {len(part):>6,} reviews ({len(part) - n_pos:,} negative / {n_pos:,} positive)")
    return "\n".join(lines)


def _check_size(n, name: str):
    """``None`` or a whole number >= 1 (NumPy integers too); anything else is a clear error."""
    return None if n is None else check_int(name, n, 1, hint="reviews; None: the whole split")


def load_imdb(
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    clean: bool = True,
    verbose: bool = True,
) -> DatasetDict:
    """IMDb as a ``DatasetDict`` (``train``/``test``; columns ``text``, ``label``).

    ``n_train``/``n_test``: size of a seeded, label-balanced subset (None = the
    whole split; otherwise a whole number >= 1). ``clean`` removes ``<br />`` tags.
    The source used is kept in ``ds["train"].info.description``; ``verbose``
    prints ``describe_imdb(ds)``. A source with an empty split, a split of one
    label, or a review without text is an error naming the file or folder.
    """
    sizes = {"n_train": _check_size(n_train, "n_train"), "n_test": _check_size(n_test, "n_test")}
    raw, source = _read_raw(data_dir)
    ds = DatasetDict()
    for split, n in zip(SPLITS, sizes.values()):
        df = _balanced_subset(raw[split], n, seed, split)
        if clean:
            df["text"] = df["text"].map(clean_text)
        ds[split] = Dataset.from_pandas(df, features=FEATURES, preserve_index=False)
        ds[split].info.description = source
    if verbose:
        print(describe_imdb(ds))
    return ds
