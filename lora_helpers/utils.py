"""Small utilities used by every notebook: seeding, device choice, versions.

Introduced in notebook 01 (``set_seed``, ``print_versions``); ``get_device`` in
notebook 03. ``check_int``, ``check_real``, ``check_choice`` and ``check_bool`` are the
one argument check every function uses: a bad value is refused by name, before
anything changes. ``check_can_write`` and ``write_files_atomically`` serve the
functions that write files (``save_adapter``, introduced in notebook 03;
``export_to_peft``; the command line). ``PeakMemory``, the process's peak memory while
training, is used by the training loop (notebook 03).
"""

from __future__ import annotations

import importlib.metadata
import math
import numbers
import os
import platform
import random
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

THREADS_ENV = "LORA_NUM_THREADS"  # set by conftest.py and tools/execute_notebooks.sh (to 2)


class ArgumentError(ValueError, TypeError):
    """A bad argument: a ``ValueError`` (and a ``TypeError``, for a value of the wrong kind) that names it."""


def _kind(value) -> str:
    """A value of the wrong kind, as ``type value`` (``str '16'``, ``float 2.0``)."""
    return f"{type(value).__name__} {value!r}"


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _refuse(name: str, kind: str, where: str, hint: str, got: str) -> ArgumentError:
    wanted = " ".join(x for x in (kind, where) if x)
    return ArgumentError(f"{name} must be {wanted}{f' ({hint})' if hint else ''}, got {got}")


def check_int(name: str, value: object, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """``value`` as an ``int`` if it is a whole number (NumPy's too; not ``bool``, not ``2.0``) in ``[low, high]``.

    ``hint``: what the number is, for the message (``"r must be a whole number in [1, 8] (...), got 9"``).
    """
    where = _range_text(low, high, False, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _refuse(name, "a whole number", where, hint, _kind(value))
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _refuse(name, "a whole number", where, hint, repr(value))
    return value


def check_real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a ``float`` if it is a finite real number (not ``bool``, not text) in the given range.

    ``low_open``/``high_open``: the bound itself is excluded (``check_real("lr", lr, 0, low_open=True)``: lr > 0).
    """
    where = _range_text(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        unquote = ": write it without quotes" if isinstance(value, str) else ""
        raise _refuse(name, "a number", where, hint, _kind(value) + unquote)
    x = float(value)
    bad = not math.isfinite(x)
    bad = bad or (low is not None and (x < low or (low_open and x == low)))
    bad = bad or (high is not None and (x > high or (high_open and x == high)))
    if bad:
        raise _refuse(name, "a finite number", where, hint, repr(value))
    return x


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices`` (compared exactly: a misspelling is refused, never guessed)."""
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{name} must be one of {choices}, got {_kind(value)}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is ``True`` or ``False`` (NumPy's too); the text ``"false"`` is refused, not read as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(f"{name} must be true or false, got {_kind(value)}")
    return bool(value)


def _threads_from_env() -> int | None:
    """``LORA_NUM_THREADS`` as a thread count, or None when it is unset or empty."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ValueError(
            f"{THREADS_ENV} must be a positive whole number of threads, got {value!r}: "
            f"unset it to let torch use every core, or set e.g. {THREADS_ENV}=2"
        )
    return int(value)


def set_seed(seed: int = 0, deterministic: bool = True, num_threads: int | None = None) -> None:
    """Seed Python, NumPy and torch so that a run repeats exactly on the same machine.

    Thread count: reductions split over a different number of threads add
    floats in a different order, so the last digits of a CPU training run
    depend on how many threads torch uses. By default ``set_seed`` leaves that
    count alone, so your machine keeps all its cores. It pins it only when asked:

    * ``num_threads=n`` pins ``n`` threads;
    * otherwise the environment variable ``LORA_NUM_THREADS`` (if set) pins that
      many. The test suite (``conftest.py``) and ``tools/execute_notebooks.sh``
      set it to 2, so that the committed notebook outputs are the same on every
      machine that checks them.
    """
    if num_threads is None:
        num_threads = _threads_from_env()
    else:
        num_threads = check_int("num_threads", num_threads, 1, hint="None leaves torch's thread count alone")
    seed = check_int("seed", seed, 0, 2**32 - 1, hint="NumPy's generator takes seeds below 2**32")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def get_device(prefer: str | None = None) -> torch.device:
    """``cuda`` if available, then Apple's ``mps``, else ``cpu`` (or ``prefer``)."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def versions(packages: Iterable[str] = ("torch", "transformers", "datasets", "peft", "numpy", "matplotlib")) -> dict:
    """Installed versions of the libraries the series uses (and Python's)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def print_versions(
    packages: Iterable[str] = ("torch", "transformers", "datasets", "peft", "numpy", "matplotlib"),
) -> None:
    """Print one line per library: the first cell of every notebook."""
    for name, version in versions(packages).items():
        print(f"{name:>12}: {version}")


# ------------------------------------------------------------------ writing files safely
# Used by adapters.save_adapter, peft_interop.export_to_peft and the command line.


def check_can_write(path: str | os.PathLike, kind: str = "file") -> Path:
    """Check, without changing anything, that ``path`` can be written as a ``kind`` ("file" or "folder").

    Raises a clear ``OSError`` when ``path`` is the wrong kind of thing (a folder where
    a file is to go, or the reverse), lies under a file, or under a folder that is
    not writable. Missing folders on the way are fine (they will be created).
    Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    if kind == "file" and path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a file name is needed here (e.g. {path / 'results.json'})")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; a folder is needed here (e.g. {path.with_suffix('')}_dir)")
    for parent in path.parents:  # the nearest existing folder above must be a writable folder
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"cannot write {path}: the folder {parent} is not writable")
            break
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"cannot write {path}: it is not writable")
    return path


def write_files_atomically(folder: str | os.PathLike, files: dict, remove: Iterable[str] = ()) -> Path:
    """Write ``{file name: bytes}`` into ``folder`` all or nothing; returns the folder.

    Each file is first written to a temporary file in the same folder, and only
    when all are written are they renamed over their final names (a rename within
    one folder replaces the old file in one step). On any failure the temporary
    files are deleted and a folder this call created is removed again, so an older
    version of the files stays as it was. ``remove``: names of stale files to delete
    once the new ones are in place. Other files in the folder are left alone.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        _remove_orphans(folder, name)
    temporary = {}
    try:
        for name, data in files.items():
            tmp = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            temporary[name] = tmp
            with open(tmp, "xb") as f:  # "x": never over an existing file; the mode follows the umask
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in temporary.items():
            os.replace(tmp, folder / name)
    except BaseException:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        for p in created:  # innermost first; only folders this call made, and only if empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    for name in remove:
        if name not in files:
            (folder / name).unlink(missing_ok=True)
    return folder


ORPHAN_AGE_S = 600  # a temporary file untouched this long, whose writer is gone, was left by a crash


def _remove_orphans(folder: Path, name: str) -> None:
    """Delete the temporary files of ``name`` left by a writer that died mid-write (``kill -9``, power loss).

    Only our own pattern (``.<name>.<pid>.<8 hex>.tmp``), only on POSIX (where signal 0 asks whether a process
    runs), only when that process is gone *and* the file is older than ``ORPHAN_AGE_S``: on a folder shared
    between machines a live writer's pid means nothing here, but a save never takes ten minutes.
    """
    if os.name != "posix":
        return
    for tmp in folder.glob(f".{name}.*.tmp"):
        pid, _, rest = tmp.name[len(name) + 2 : -len(".tmp")].partition(".")
        if not (pid.isdigit() and len(rest) == 8 and all(c in "0123456789abcdef" for c in rest)):
            continue
        if int(pid) == os.getpid():
            continue
        try:
            if time.time() - tmp.stat().st_mtime < ORPHAN_AGE_S:
                continue
            os.kill(int(pid), 0)  # signal 0: does the writer still run?
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # it runs under another user, or the file went: not ours to remove


class PeakMemory:
    """Peak memory while the ``with`` block runs, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). On CPU (Linux):
    the process's peak resident set size, read from the kernel's high-water mark
    (``VmHWM`` in ``/proc/self/status``) after resetting it through
    ``/proc/self/clear_refs``; it includes everything the process holds, not only
    tensors. Where the mark cannot be reset, a background thread samples the RSS
    every 50 ms instead (a faster sampler competes with training for the GIL).
    Elsewhere the peak is reported as 0.
    """

    def __init__(self, device: str | torch.device):
        self.device, self.peak_mib, self._stop = torch.device(device), 0.0, threading.Event()
        self.kind = "cuda max allocated" if self.device.type == "cuda" else "process RSS"
        self._hwm = False

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:  # Linux; elsewhere we report 0
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    @staticmethod
    def _high_water_mib() -> float:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak_mib = max(self.peak_mib, self.rss_mib())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if not os.path.exists("/proc/self/statm"):
            return self
        self.peak_mib = self.rss_mib()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS to the current RSS
            self._hwm = True
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._hwm:
            self.peak_mib = max(self.peak_mib, self._high_water_mib())
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
        return False


def cpu_name() -> str:
    """The processor's model name (Linux: ``/proc/cpuinfo``; elsewhere what ``platform`` reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line naming the machine a result was measured on: CPU, cores, GPU, torch and its threads."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} with {threads} threads"
