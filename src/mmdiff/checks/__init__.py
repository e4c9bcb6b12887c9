"""`mmdiff run --dry-run`: every file a study config names, checked without loading any weights.

`check_study(cfg)` returns one message per problem, each saying where in the config it is, what was
expected, what was found and what to do. It reads only small files: config.json / JSON sidecars,
the JSON header of safetensors files (8-byte length + header, checked against the file size so a
truncated download is caught), the .npy headers inside .npz archives, a few records of each
dataset through the dataset's own loader (their images must exist), and the analysis dataset as
the stats stage reads it, to see that every task split has records (read_records=False skips
the record reads). Hub ids are looked up in the local Hugging Face cache only; nothing is
downloaded, and no repository code runs.

One file per kind of check: `models`, `saes`, `datasets`, `references`; `headers` reads weight
headers, `hub_cache` looks hub ids up in the local cache; `study` runs them all.
"""

from mmdiff.checks.datasets import SAMPLE_RECORDS, check_analysis_splits, check_dataset
from mmdiff.checks.headers import TensorHeader, read_npz_header, read_safetensors_header
from mmdiff.checks.models import (
    BIN_INDEX,
    PROCESSOR_FILES,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    ModelFacts,
    check_model,
    check_models,
)
from mmdiff.checks.references import check_references
from mmdiff.checks.saes import SAEFacts, check_base_saes, probe_sae
from mmdiff.checks.study import check_study

__all__ = [
    "BIN_INDEX",
    "PROCESSOR_FILES",
    "SAFETENSORS_INDEX",
    "SAMPLE_RECORDS",
    "TOKENIZER_FILES",
    "ModelFacts",
    "SAEFacts",
    "TensorHeader",
    "check_analysis_splits",
    "check_base_saes",
    "check_dataset",
    "check_model",
    "check_models",
    "check_references",
    "check_study",
    "probe_sae",
    "read_npz_header",
    "read_safetensors_header",
]
