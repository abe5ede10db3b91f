"""Test-wide settings, inherited by the notebook kernels that nbval starts.

The suite is offline and quick by design: the `quick` profile, no Hub
requests (a Hub request here retries for ~50 s before failing), and no
progress bars (their rates would differ between runs and break nbval's
output comparison), torch on 2 threads wherever ``set_seed`` runs (the
last digits of a CPU run depend on the thread count; see
``lora_helpers.utils.set_seed``), and passive OpenMP waits for the two test
workers. Each is a default: export another value to override.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the offline IMDb copy beside the repository on the project's machines (configuration, not package code)
_SHARED_IMDB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "imdb")
if os.path.isdir(_SHARED_IMDB):
    os.environ.setdefault("LORA_IMDB_DIR", os.path.normpath(_SHARED_IMDB))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LORA_PROFILE", "quick")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORA_NUM_THREADS", "2")
# Two test workers (pyproject.toml: -n 2) on two cores means four torch threads: idle OpenMP threads
# must sleep rather than spin, or the two workers slow each other down. Measured on the 2-core CI
# machine: two smoke LoRA runs side by side took 72 s, one alone 43 s (1.2x the throughput), with
# bit-identical losses (the thread count per process, which sets the last digits, is unchanged).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
