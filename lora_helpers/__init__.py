"""lora_helpers: the reusable code of the notebook series "LoRA from scratch".

Each module is introduced by one notebook, where the idea is first written out
in full; later notebooks import it from here.

====================  ========================================================
module                introduced in
====================  ========================================================
``utils``             01 (set_seed, versions); 03 (get_device)
``svd``               01_svd_low_rank_intuition
``lora``              02_lora_linear_from_scratch
``adapters``          03_lora_distilbert_imdb (save_adapter, load_adapter)
``data``              03_lora_distilbert_imdb (load_imdb)
``backbone``          03_lora_distilbert_imdb (load_backbone, the offline stand-in); 01 (a pretrained W)
``profiles``          03_lora_distilbert_imdb (quick / cpu / gpu)
``banner``            03_lora_distilbert_imdb (what a notebook runs, its time on this machine)
``estimate``          the command line (FLOPs and time of a run on a T4, an A100 or a CPU)
``loop``              03_lora_distilbert_imdb (the training loop ``train``, evaluate, predict)
``analysis``          04_lora_vs_full_finetuning; 05_rank_and_what_lora_learns
``methods``           04_lora_vs_full_finetuning (the method registry: full, lora, lora-all, lora-nodrop, head)
``runner``            04_lora_vs_full_finetuning (one training run of any method; sweeps; McNemar)
``compare``           04_lora_vs_full_finetuning
``stats``             04_lora_vs_full_finetuning (seed-level verdicts, equivalence margin, gap recovered);
                      06 (median_interval)
``experiments``       05_rank_and_what_lora_learns
``planted``           05_rank_and_what_lora_learns (a planted update: a task with a known answer)
``peft_interop``      06_adapters_in_practice
``multi_adapter``     06_adapters_in_practice (many adapters in one batch)
``memory``            06_adapters_in_practice (activation estimate, what fits, checkpointing: 07)
``quant``             07_bigger_models (NF4, NF4Linear: QLoRA from scratch)
``distributed``       07_bigger_models (LoRA data-parallel on CPU processes)
====================  ========================================================
"""

from .adapters import load_adapter, lora_state_dict, read_adapter, save_adapter
from .backbone import BACKBONES, load_backbone
from .banner import print_banner
from .compare import committed_run
from .data import load_imdb
from .loop import evaluate, predict, train
from .lora import (
    LoRALinear,
    ParamCount,
    apply_lora,
    count_parameters,
    freeze_all_except,
    linear_names,
    lora_layers,
    mark_only_lora_trainable,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from .methods import METHODS, MethodSpec, method_spec, prepare_method
from .profiles import PROFILES, Profile, get_profile
from .runner import load_splits, run, tokenize
from .svd import energy_captured, low_rank_approx, plot_singular_values, truncated_svd
from .utils import get_device, print_versions, set_seed, versions

# The two layers (tests/test_layering.py): the lesson core is what the notebooks teach and a learner reads; it
# imports nothing from the lab, which runs the studies, comparisons and estimates on top of it.
LESSON_CORE = ["utils", "svd", "lora", "adapters", "peft_interop", "multi_adapter", "loop", "analysis", "quant"]
LAB = [
    "data",
    "backbone",
    "profiles",
    "banner",
    "methods",
    "runner",
    "stats",
    "compare",
    "experiments",
    "planted",
    "memory",
    "estimate",
    "distributed",
    "__main__",
]

__version__ = "0.1.0"

# The repository the notebooks' Colab badges and install cells point to: the one
# place it is defined (a placeholder until the project has its public home).
# `python tools/set_repo_url.py https://github.com/OWNER/REPO` changes it here and
# in every badge, install cell and the README, in one go.
REPO_URL = "https://github.com/learn-lora/lora-from-scratch"

__all__ = [
    "load_adapter",
    "lora_state_dict",
    "read_adapter",
    "save_adapter",
    "LoRALinear",
    "ParamCount",
    "apply_lora",
    "count_parameters",
    "freeze_all_except",
    "linear_names",
    "lora_layers",
    "mark_only_lora_trainable",
    "merge_and_unload",
    "merge_lora",
    "unmerge_lora",
    "BACKBONES",
    "load_backbone",
    "print_banner",
    "committed_run",
    "load_imdb",
    "PROFILES",
    "Profile",
    "get_profile",
    "energy_captured",
    "low_rank_approx",
    "plot_singular_values",
    "truncated_svd",
    "evaluate",
    "predict",
    "train",
    "METHODS",
    "MethodSpec",
    "method_spec",
    "prepare_method",
    "load_splits",
    "run",
    "tokenize",
    "get_device",
    "print_versions",
    "set_seed",
    "versions",
    "LESSON_CORE",
    "LAB",
    "REPO_URL",
    "__version__",
]
