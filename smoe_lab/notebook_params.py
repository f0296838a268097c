"""Validated parameter sets of the notebooks.

Each notebook has exactly one `parameters` cell of literals; the cell after it builds one of these dataclasses
from those names, so a wrong type or value fails loudly in the notebook, and `smoe-lab run` rejects unknown
keys in a params YAML before papermill starts (papermill itself only warns about them).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MODEL_PRESETS, ModelConfig, TrainConfig, _FromDict, load_yaml
from .finetune import FinetuneConfig
from .inference.ep_profile import ProfileConfig
from .paths import resolve_out_dir
from .reduce.methods import METHODS, ROUTER_OPTIONS

WARMUP_DATA = ("task", "instructions")
log = logging.getLogger("smoe_lab")


def _err(nb: str, name: str, msg: str) -> None:
    raise ValueError(f"notebook parameter {nb}.{name}: {msg}")


# A router recipe (docs/routers.md) names ModelConfig / TrainConfig fields; {} = the paper's settings.
ROUTER_MODEL_FIELDS = ("router_init_std", "router_z_loss_coef", "router_jitter", "aux_loss_coef")
ROUTER_TRAIN_FIELDS = ("router_lr_mult", "router_weight_decay")


def split_router_recipe(nb: str, recipe: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """{field: value} -> (ModelConfig overrides, TrainConfig overrides); an unknown key fails naming the known ones."""
    if not isinstance(recipe, dict):
        _err(nb, "router_recipe", f"must be a mapping of router options, got {recipe!r}")
    unknown = sorted(set(recipe) - set(ROUTER_MODEL_FIELDS) - set(ROUTER_TRAIN_FIELDS))
    if unknown:
        _err(
            nb,
            "router_recipe",
            f"unknown option(s) {unknown}; known: {list(ROUTER_MODEL_FIELDS + ROUTER_TRAIN_FIELDS)}",
        )
    model = {k: v for k, v in recipe.items() if k in ROUTER_MODEL_FIELDS}
    train = {k: v for k, v in recipe.items() if k in ROUTER_TRAIN_FIELDS}
    return model, train


@dataclass
class NotebookParams(_FromDict):
    """Base: from_namespace picks this dataclass's fields out of a notebook's globals()."""

    NOTEBOOK = ""

    @classmethod
    def from_namespace(cls, ns: dict[str, Any]):
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in ns]
        if missing:
            raise ValueError(f"notebook {cls.NOTEBOOK}: parameters cell is missing {missing}")
        return cls(**{n: ns[n] for n in names})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any):
        return cls.from_dict({**load_yaml(path), **overrides})

    def _check_types(self) -> None:
        """Every parameter has its annotated type (a YAML `"8"` where 8 is meant fails here, naming the field)."""
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,)}
        for f in dataclasses.fields(self):
            base = str(f.type).split("[", 1)[0].strip()
            want, v = kinds.get(base), getattr(self, f.name)
            if want is None:
                continue
            if (isinstance(v, bool) and base != "bool") or not isinstance(v, want):
                _err(self.NOTEBOOK, f.name, f"must be {base}, got {type(v).__name__} {v!r}")

    @classmethod
    def check_keys(cls, keys) -> None:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keys) - names)
        if unknown:
            raise ValueError(f"notebook {cls.NOTEBOOK}: unknown parameter(s) {unknown}; known: {sorted(names)}")


@dataclass
class PretrainSettings(NotebookParams):
    """The pretraining recipe's parameters, shared by 01_pretrain and 05_replication (which runs 01 per seed):
    model preset and overrides, the variants (1 = dense, E > 1 = E experts per MoE layer), tokens per model, the
    optimiser schedule, the periodic evaluation, the corpus. Validated by PretrainNotebook.

    router_recipe: router options (ModelConfig router_init_std / router_z_loss_coef / router_jitter / aux_loss_coef,
    TrainConfig router_lr_mult / router_weight_decay) for every variant; {} = the paper's settings (docs/routers.md).
    """

    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    variants: list[int] = field(default_factory=lambda: [1, 8, 32])
    tokens: int = 2_000_000
    batch_size: int = 32
    micro_batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_batches: int = 16
    corpus: str = "tiny"
    router_recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class PretrainNotebook(PretrainSettings):
    """01_pretrain: train each variant (1 = dense, E > 1 = E experts per MoE layer) on the same tokens."""

    NOTEBOOK = "01_pretrain"
    seed: int = 0
    out_dir: str = "runs/quickstart"
    progress: bool = True
    # workers: variants trained at once, each in its own process with cores // workers threads (1 = one after
    # another in the notebook's process). Results do not depend on it beyond float rounding of the thread count.
    workers: int = 1

    def __post_init__(self) -> None:
        self._check_types()
        nb = self.NOTEBOOK
        self.out_dir = str(resolve_out_dir(self.out_dir))
        split_router_recipe(nb, self.router_recipe)
        if self.preset not in MODEL_PRESETS:
            _err(nb, "preset", f"unknown preset {self.preset!r}; known: {sorted(MODEL_PRESETS)}")
        if not isinstance(self.variants, list) or not self.variants:
            _err(nb, "variants", f"must be a non-empty list of expert counts, got {self.variants!r}")
        for v in self.variants:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _err(nb, "variants", f"expert counts must be integers >= 1 (1 = dense), got {v!r}")
        if len(set(self.variants)) != len(self.variants):
            _err(nb, "variants", f"has duplicates: {self.variants}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            _err(nb, "tokens", f"must be a positive integer, got {self.tokens!r}")
        if self.workers < 1:
            _err(nb, "workers", f"must be >= 1, got {self.workers}")
        for v in self.variants:  # validates model_overrides and the train settings now, not mid-run
            self.model_config(v)
        self.train_config()

    def model_config(self, num_experts: int) -> ModelConfig:
        recipe, _ = split_router_recipe(self.NOTEBOOK, self.router_recipe)
        return ModelConfig.preset(self.preset, **{**self.model_overrides, **recipe, "num_experts": num_experts})

    def train_config(self) -> TrainConfig:
        block = ModelConfig.preset(self.preset, **self.model_overrides).block_size
        steps = max(1, -(-self.tokens // (self.batch_size * block)))
        if self.warmup_steps > steps:  # the steps are derived from the token budget: clamp, and say so
            log.warning(
                "notebook parameter %s.warmup_steps: %d exceeds the %d steps of %d tokens; warming up over %d steps",
                self.NOTEBOOK,
                self.warmup_steps,
                steps,
                self.tokens,
                steps,
            )
        _, recipe = split_router_recipe(self.NOTEBOOK, self.router_recipe)
        return TrainConfig(
            **recipe,
            max_steps=steps,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=min(self.warmup_steps, steps),
            weight_decay=self.weight_decay,
            eval_every=min(self.eval_every, steps) if self.eval_every else 0,
            eval_batches=self.eval_batches,
            log_every=max(1, min(10, steps // 20)),
            seed=self.seed,
        )


def _check_task(nb: str, name: str, task: str) -> None:
    if not isinstance(task, str) or not task:
        _err(nb, name, f"must be a task name (boolq, rte, cloze-news, ...) or 'corpus:<split>', got {task!r}")


@dataclass
class ClustersNotebook(NotebookParams):
    """02_clusters: calibrate one checkpoint on task data and explore UNCURL's clusters per MoE layer."""

    NOTEBOOK = "02_clusters"
    variant: str = "32e"  # a variant label of notebook 01 (under out_dir/pretrain) or a checkpoint folder
    seed: int = 0
    task: str = "boolq"  # task name, or 'corpus:val_<domain>' for raw corpus text
    split: str = "train"
    corpus: str = "tiny"
    max_examples: int = 256
    max_tokens: int = 0  # 0 = no cap
    batch_size: int = 16
    target_D: int = 8
    methods: list[str] = field(default_factory=lambda: ["uncurl", "freq_merge", "mcsmoe"])
    stability_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    interactive: bool = False
    out_dir: str = "runs/quickstart"

    def __post_init__(self) -> None:
        self._check_types()

        nb = self.NOTEBOOK
        self.out_dir = str(resolve_out_dir(self.out_dir))
        _check_task(nb, "task", self.task)
        for name in ("target_D", "batch_size", "max_examples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _err(nb, name, f"must be an integer >= 1, got {v!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            _err(nb, "max_tokens", f"must be an integer >= 0 (0 = no cap), got {self.max_tokens!r}")
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad:
            _err(nb, "methods", f"unknown method(s) {bad}; known: {list(METHODS)}")
        if len(self.stability_seeds) < 2:
            _err(nb, "stability_seeds", f"needs at least two seeds, got {self.stability_seeds!r}")
        if not isinstance(self.interactive, bool):
            _err(nb, "interactive", f"must be true or false, got {self.interactive!r}")


@dataclass
class PruningNotebook(NotebookParams):
    """03_pruning: reduce the base model with every method to each target D, finetune, evaluate, store."""

    NOTEBOOK = "03_pruning"
    backbone: str = "tiny"  # the backbone's name in tables ("354M" in the paper)
    # a notebook 01 variant, a checkpoint folder or a Hugging Face folder / hub id; a list: one study per base, each
    # reduced to the targets below its expert count (e.g. google/switch-base-8 ... -128)
    base_variant: str | list[str] = "32e"
    reference_variants: list[str] = field(default_factory=lambda: ["dense", "8e"])
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: ["boolq"])
    corpus: str = "tiny"
    targets: list[int] = field(default_factory=lambda: [16, 8])
    methods: list[str] = field(default_factory=lambda: ["uncurl", "freq_prune", "freq_merge", "mcsmoe", "hybrid"])
    router: str = "reinit"
    # the data of a reduced model's router-only warm-up: "task" (its train split, the paper's A4) or "instructions"
    router_warmup_data: str = "task"
    calibration_examples: int = 256
    batch_size: int = 16
    max_train_examples: int = 512
    max_eval_examples: int = 256
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields of the task finetune (stage 2)
    stage1: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields of stage 1 ({} = no stage 1)
    workers: int = 1  # threads aligning experts in a reduction
    # finetune_workers: finetunings run at once, each in its own process with cores // finetune_workers threads
    finetune_workers: int = 1
    progress: bool = False
    out_dir: str = "runs/quickstart"
    # Low-noise readouts (smoe_lab.readouts), no finetuning: per domain, calibrate on its held-out documents, reduce
    # with router readout_router (merge | keep), LM loss on its validation stream + per-layer reconstruction error.
    readout_domains: list[str] = field(default_factory=list)  # [] = off; e.g. ["news", "biomed"]
    readout_router: str = "merge"
    readout_calibration_tokens: int = 16384
    readout_eval_windows: int = 0  # 0 = every window of the domain's validation stream

    def __post_init__(self) -> None:
        self._check_types()

        nb = self.NOTEBOOK
        self.out_dir = str(resolve_out_dir(self.out_dir))
        bases = self.base_variant if isinstance(self.base_variant, list) else [self.base_variant]
        if not bases or any(not isinstance(b, str) or not b for b in bases):
            _err(
                nb,
                "base_variant",
                f"must be a variant, checkpoint or hub id, or a list of them, got {self.base_variant!r}",
            )
        if not isinstance(self.reference_variants, list) or any(
            not isinstance(v, str) for v in self.reference_variants
        ):
            _err(
                nb, "reference_variants", f"must be a list of variants or checkpoints, got {self.reference_variants!r}"
            )
        if not self.tasks:
            _err(nb, "tasks", "needs at least one task")
        for t in self.tasks:
            _check_task(nb, "tasks", t)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            _err(nb, "methods", f"unknown method(s) {bad}; known: {list(METHODS)}")
        if self.router not in ROUTER_OPTIONS:
            _err(nb, "router", f"must be one of {list(ROUTER_OPTIONS)}, got {self.router!r}")
        if self.router_warmup_data not in WARMUP_DATA:
            _err(nb, "router_warmup_data", f"must be one of {list(WARMUP_DATA)}, got {self.router_warmup_data!r}")
        if not self.targets or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.targets):
            _err(nb, "targets", f"must be a non-empty list of expert counts >= 1, got {self.targets!r}")
        for name in (
            "calibration_examples", "batch_size", "max_train_examples", "max_eval_examples", "workers",
            "finetune_workers",
        ):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _err(nb, name, f"must be an integer >= 1, got {v!r}")
        try:
            FinetuneConfig.from_dict({**self.finetune, "seed": self.seed})
        except ValueError as e:
            _err(nb, "finetune", str(e))
        if not isinstance(self.readout_domains, list) or not all(
            isinstance(d, str) and d for d in self.readout_domains
        ):
            _err(nb, "readout_domains", f"must be a list of corpus domain names, got {self.readout_domains!r}")
        if self.readout_router not in ("merge", "keep"):
            _err(nb, "readout_router", f"must be 'merge' or 'keep' (no training after it), got {self.readout_router!r}")
        for name, lo in (("readout_calibration_tokens", 1), ("readout_eval_windows", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                _err(nb, name, f"must be an integer >= {lo}, got {v!r}")
        if self.stage1:
            try:
                FinetuneConfig.from_dict({**self.stage1, "stage": "stage1", "seed": self.seed})
            except ValueError as e:
                _err(nb, "stage1", str(e))


@dataclass
class ResultsNotebook(NotebookParams):
    """04_results: the paper's tables from the results store, loss curves, and the inference-cost picture."""

    NOTEBOOK = "04_results"
    tasks: list[str] = field(default_factory=list)  # [] = every task in the store
    seed: int = 0
    latency_batch_size: int = 1
    latency_seq_len: int = 128
    latency_reps: int = 10
    # expert-parallel profile (smoe_lab.inference): ProfileConfig fields ({} = the paper's protocol: ranks 1 and 2,
    # ep_size 2, batch 2 per rank, 256 tokens, 5 warm-up + 10 timed passes)
    ep_profile: dict[str, Any] = field(default_factory=dict)
    ep_scaling_ranks: list[int] = field(default_factory=list)  # Fig 5's rank counts ([] = ep_profile's ranks)
    payoff_methods: list[str] = field(default_factory=lambda: ["uncurl"])  # notebook 03 reductions to profile
    out_dir: str = "runs/quickstart"

    def __post_init__(self) -> None:
        self._check_types()
        nb = self.NOTEBOOK
        self.out_dir = str(resolve_out_dir(self.out_dir))
        for t in self.tasks:
            _check_task(nb, "tasks", t)
        for name in ("latency_batch_size", "latency_seq_len", "latency_reps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _err(nb, name, f"must be an integer >= 1, got {v!r}")
        self.profile_config()
        if self.ep_scaling_ranks:
            try:
                self.profile_config().replace(ranks=list(self.ep_scaling_ranks))
            except ValueError as e:
                _err(nb, "ep_scaling_ranks", str(e))

        bad = [m for m in self.payoff_methods if m not in METHODS]
        if bad:
            _err(nb, "payoff_methods", f"unknown method(s) {bad}; known: {list(METHODS)}")

    def profile_config(self):
        """The validated smoe_lab.inference.ep_profile.ProfileConfig of `ep_profile`."""
        if not isinstance(self.ep_profile, dict):
            _err(self.NOTEBOOK, "ep_profile", f"must be a mapping of ProfileConfig fields, got {self.ep_profile!r}")
        try:
            return ProfileConfig.from_dict(dict(self.ep_profile))
        except (TypeError, ValueError) as e:
            _err(self.NOTEBOOK, "ep_profile", str(e))


@dataclass
class ReplicationNotebook(PretrainSettings):
    """05_replication: the paper's claims (a)-(e) on a small budget, over several seeds, with mechanical verdicts.

    Pretrains every variant for every seed (like 01), reduces the largest variant with every method to each target
    and finetunes (like 03, per seed), then writes a report generated from the results store (smoe_lab.replication).
    Everything lives under out_dir/replication, apart from the report (`report`: "" = out_dir/replication/
    replication.md; else a path, relative ones against the checkout) and its PNG figures (a folder named as the
    report, without .md, beside it).
    """

    NOTEBOOK = "05_replication"
    # PretrainSettings' fields (preset ... corpus) apply to every seed; variants: the largest is the base reduced
    tokens: int = 1_200_000
    backbone: str = "tiny"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_batch_size: int = 32  # pretraining losses: fixed val windows in stream order, batches of this size
    eval_windows: int = 0  # 0 = every non-overlapping window of the validation split; else that many, spread evenly
    ablation_capacity_factors: list[float] = field(default_factory=lambda: [1.25, 2.0])
    ablation_batch_sizes: list[int] = field(default_factory=lambda: [8, 128])
    ablation_tokens: list[int] = field(default_factory=list)  # budget ablation: dense + base, first 2 seeds
    zero_shot_tasks: list[str] = field(default_factory=list)  # task-claim ablation: no finetuning (subset of tasks)
    tasks: list[str] = field(default_factory=lambda: ["boolq", "cloze-news", "cloze-biomed"])
    targets: list[int] = field(default_factory=lambda: [16, 8, 4, 2])
    methods: list[str] = field(default_factory=lambda: ["uncurl", "freq_prune", "freq_merge", "mcsmoe", "hybrid"])
    router: str = "reinit"
    calibration_examples: int = 256
    calibration_batch_size: int = 16
    max_train_examples: int = 512
    max_eval_examples: int = 256
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneConfig fields
    # Low-noise readouts without finetuning (smoe_lab.readout_study, per seed): per domain, the base calibrated on its
    # held-out documents, reduced with every method to every target (router readout_router: merge | keep), LM loss on
    # the domain's validation stream against the unreduced base and the scratch models, per-layer reconstruction.
    readout_domains: list[str] = field(default_factory=list)  # [] = off; e.g. ["news", "biomed"]
    readout_router: str = "merge"
    readout_calibration_tokens: int = 16384
    readout_eval_windows: int = 0  # 0 = every window of the domain's validation stream
    workers: int = 1
    se_factor: float = 2.0  # verdict: a mean difference beyond se_factor standard errors decides
    margin: float = 1.0  # "competitive" (non-inferiority) margin in accuracy points
    budget_note: str = ""  # how the budget was chosen, quoted in the report
    report: str = ""
    progress: bool = False
    out_dir: str = "runs/quickstart"

    def __post_init__(self) -> None:
        self._check_types()
        nb = self.NOTEBOOK
        self.out_dir = str(resolve_out_dir(self.out_dir))
        if not isinstance(self.seeds, list) or not self.seeds or len(set(self.seeds)) != len(self.seeds):
            _err(nb, "seeds", f"must be a non-empty list of distinct seeds, got {self.seeds!r}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                _err(nb, "seeds", f"seeds must be integers >= 0, got {s!r}")
        self.pretrain_notebook(self.seeds[0])  # validates preset, variants, tokens and the training settings
        base = max(self.variants)
        if base < 2:
            _err(nb, "variants", f"needs an SMoE variant (> 1 expert) to reduce, got {self.variants}")
        bad = [d for d in self.targets if isinstance(d, int) and not isinstance(d, bool) and d >= base]
        if bad:
            _err(nb, "targets", f"must be below the base's {base} experts, got {bad}")
        self.pruning_notebook(self.seeds[0])  # validates tasks, targets, methods, router, finetune, sizes, readouts
        for v in self.ablation_capacity_factors:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                _err(nb, "ablation_capacity_factors", f"capacity factors must be numbers > 0, got {v!r}")
        for name, values in (
            ("eval_batch_size", [self.eval_batch_size]),
            ("ablation_batch_sizes", self.ablation_batch_sizes),
        ):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                _err(nb, name, f"batch sizes must be integers >= 1, got {values!r}")
        if isinstance(self.eval_windows, bool) or not isinstance(self.eval_windows, int) or self.eval_windows < 0:
            _err(nb, "eval_windows", f"must be an integer >= 0 (0 = every window), got {self.eval_windows!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.ablation_tokens):
            _err(nb, "ablation_tokens", f"token budgets must be integers >= 1, got {self.ablation_tokens!r}")
        if not isinstance(self.zero_shot_tasks, list) or not set(self.zero_shot_tasks) <= set(self.tasks):
            _err(nb, "zero_shot_tasks", f"must be a list of tasks from `tasks`, got {self.zero_shot_tasks!r}")
        for name in ("se_factor", "margin"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                _err(nb, name, f"must be a number >= 0, got {v!r}")
        if not isinstance(self.budget_note, str) or not isinstance(self.report, str):
            _err(nb, "report", "report and budget_note must be strings")

    @property
    def study_dir(self) -> str:
        """Where the study's models, calibrations, finetunes and results store live (apart from 01-04's)."""
        return str(Path(self.out_dir) / "replication")

    def pretrain_notebook(self, seed: int) -> PretrainNotebook:
        """Notebook 01's settings for one seed of this study (same tokens for every variant of that seed)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(PretrainSettings)}
        return PretrainNotebook(**shared, seed=seed, out_dir=self.study_dir, progress=self.progress)

    def pruning_notebook(self, seed: int) -> PruningNotebook:
        """Notebook 03's settings for one seed: the largest variant reduced, every other variant a reference."""
        base = max(self.variants)
        refs = [("dense" if v == 1 else f"{v}e") for v in sorted(self.variants) if v != base]
        names = ["backbone", "tasks", "corpus", "targets", "methods", "router", "calibration_examples"]
        names += ["max_train_examples", "max_eval_examples", "finetune", "workers", "progress"]
        names += ["readout_domains", "readout_router", "readout_calibration_tokens", "readout_eval_windows"]
        return PruningNotebook(
            **{n: getattr(self, n) for n in names},
            base_variant=f"{base}e",
            reference_variants=refs,
            seed=seed,
            batch_size=self.calibration_batch_size,
            out_dir=self.study_dir,
        )


NOTEBOOK_PARAMS: dict[str, type[NotebookParams]] = {
    ResultsNotebook.NOTEBOOK: ResultsNotebook,
    PruningNotebook.NOTEBOOK: PruningNotebook,
    PretrainNotebook.NOTEBOOK: PretrainNotebook,
    ClustersNotebook.NOTEBOOK: ClustersNotebook,
    ReplicationNotebook.NOTEBOOK: ReplicationNotebook,
}
