"""Small-scale replication of the paper's claims (notebook 05): several seeds, error bars, mechanical verdicts.

Stages (`stages.py`; each idempotent; they reuse smoe_lab.experiments and write into one results store under
out_dir/replication):

    pretrain_all(P)        every variant x seed: experiments.pretrain_variants with notebook 01's settings per seed
    pretraining_losses(P)  validation loss of every pretrained model under fixed evaluation protocols (the paper's
                           capacity factor 1.0 with drops, no drops, and the ablation protocols), the loss curves,
                           parameter counts and throughput, and each SMoE's router health per MoE layer -> results
                           store (stage "pretrain" / "curve" / "router")
    budget_ablation(P)     dense and the base variant retrained with other token budgets (claim (a)'s ablation)
    task_study(P)          experiments.pruning_study per seed (reduce the largest variant with every method to every
                           target, router warm-up, finetune, evaluate; every other variant finetuned as reference)
                           plus each task's chance / majority floor -> results store
    zero_shot_ablation(P)  every model evaluated without finetuning (the task claims' ablation)
    readouts(P)            the low-noise readouts without finetuning per seed (smoe_lab.readout_study): zero-shot
                           domain LM loss of every reduction, the unreduced base and the scratch models, per-layer
                           reconstruction error (task "corpus:val_<domain>", stage "zeroshot")
    evaluate_claims(df, P) claims (a)-(e) from the store's rows with the verdict rule below (`claims.py`)
    write_report(P)        the Markdown report + PNG figures, generated from the results store alone (`report.py`,
                           tables from `tables.py`, figures from `figures.py`)

Verdict rule (`stats.verdict`): a comparison is a set of per-seed differences oriented so that positive means "as
the paper claims" (seeds pair the models: the reduced model of seed s comes from the base pretrained with seed s and
is finetuned with seed s, like the scratch model of seed s). With mean m, sample standard deviation sd, n seeds and
SE = sd / sqrt(n): SUPPORTED when m - k SE > -margin, NOT SUPPORTED when m + k SE < -margin, INCONCLUSIVE otherwise
or when n < 2 (k = P.se_factor, 2 by default; margin 0 for directional claims, P.margin accuracy points for
"competitive"). A claim with several parts is supported when every part is, not supported when any part is not,
inconclusive otherwise. With n = 3 seeds "2 SE" is a screening rule, not a 95% test (a t-test would need ~4.3 SE).

Settings derived from the parameters and reading the store live in `study.py`; the report is one small function
per section (`report.py`), with the plain-language readings of the ablations in `diagnosis.py`, the readout and
router-health figures in `readout_figures.py`, and the first science run's verdicts ("what changed") in
`previous.py`.
"""

from .claims import (
    FLOOR_MARGIN,
    SETTLE,
    Claim,
    Part,
    claims_frame,
    compare,
    evaluate_claims,
    learnable_tasks,
    threshold_factors,
)
from .figures import figure_budget, figure_claims, figure_pretrain, figure_protocols, figure_task
from .previous import PREVIOUS, changed_paragraph
from .readout_figures import figure_readout_loss, figure_reconstruction, figure_router_health
from .report import render_report, write_report
from .stages import (
    budget_ablation,
    eval_windows,
    lm_loss,
    pretrain_all,
    pretraining_losses,
    readouts,
    task_study,
    zero_shot_ablation,
)
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Estimate, combine, seeds_needed, verdict
from .study import (
    PRETRAIN_TASK,
    RUN_TASK,
    Protocol,
    health_frame,
    label,
    load_store,
    pretrain_frame,
    protocols,
    readout_frame,
    reconstruction_layers,
    report_path,
    task_frame,
)
from .tables import (
    budget_gaps,
    budget_table,
    completeness,
    compute_used,
    floors_table,
    paper_layout_tables,
    pretrain_table,
    protocol_gaps,
    readout_loss_table,
    readout_recon_table,
    router_health_summary,
    router_health_table,
    router_warnings,
    threshold_table,
)

__all__ = [
    "Claim",
    "Estimate",
    "FLOOR_MARGIN",
    "INCONCLUSIVE",
    "NOT_SUPPORTED",
    "PRETRAIN_TASK",
    "PREVIOUS",
    "Part",
    "Protocol",
    "RUN_TASK",
    "SETTLE",
    "SUPPORTED",
    "budget_ablation",
    "budget_gaps",
    "budget_table",
    "changed_paragraph",
    "claims_frame",
    "combine",
    "compare",
    "completeness",
    "compute_used",
    "eval_windows",
    "evaluate_claims",
    "figure_budget",
    "figure_claims",
    "figure_pretrain",
    "figure_protocols",
    "figure_readout_loss",
    "figure_reconstruction",
    "figure_router_health",
    "figure_task",
    "floors_table",
    "health_frame",
    "label",
    "learnable_tasks",
    "lm_loss",
    "load_store",
    "paper_layout_tables",
    "pretrain_all",
    "pretrain_frame",
    "pretrain_table",
    "pretraining_losses",
    "protocol_gaps",
    "protocols",
    "readout_frame",
    "readout_loss_table",
    "readout_recon_table",
    "readouts",
    "reconstruction_layers",
    "render_report",
    "report_path",
    "router_health_summary",
    "router_health_table",
    "router_warnings",
    "seeds_needed",
    "task_frame",
    "task_study",
    "threshold_factors",
    "threshold_table",
    "verdict",
    "write_report",
    "zero_shot_ablation",
]
