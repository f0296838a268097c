"""Notebook-level stages: each notebook cell calls one of these and draws what it returns. One file per notebook:
pretraining (01), calibration (02), pruning (03), tables (04); every name is importable from here.

Stages are idempotent: a result whose cache key (`smoe_lab.cachekey`: the package source, the data's content and
every setting) matches the one stored beside it is reused, so `smoe-lab run` skips work that is up to date and an
interrupted run resumes. Keys: a pretrained variant (`train.pretrain_key`), a calibration artifact (the batches'
content + the checkpoint's hash), a reduced checkpoint (base hash, calibration key, method, D, router, seed), a
finetuning (checkpoint hash, config, the examples' content).
"""

from __future__ import annotations

from .calibration import (  # noqa: F401
    calibration_artifact,
    calibration_batches_for,
    checkpoint_name,
    cluster_summary,
    find_checkpoint,
    pretrain_dir,
    reference_checkpoints,
    variant_tag,
)
from .pretraining import (  # noqa: F401
    _finished,
    _health_columns,
    _partial,
    _same_run,
    load_curves,
    pretrain_variants,
    router_health_table,
    save_table,
    summarize_run,
    variant_label,
)
from .pruning import (  # noqa: F401
    _done,
    _per_base_studies,
    finetune_and_record,
    pruning_study,
    reduced_checkpoint,
    results_store,
    stage1_checkpoint,
    task_baselines,
)
from .tables import (  # noqa: F401
    TABLES,
    inference_profile,
    paper_tables,
    pretrain_runs,
    pretrained_variants,
)
