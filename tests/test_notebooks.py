"""Notebooks are tested like code: structure, parameters, and an end-to-end papermill run with CI params."""

import ast
import json

import pytest

from smoe_lab import paths
from smoe_lab.config import load_yaml
from smoe_lab.notebook_params import NOTEBOOK_PARAMS
from smoe_lab.pipeline import pipeline_plan, run_pipeline
from smoe_lab.results import ResultsStore

NOTEBOOKS = sorted(paths.notebooks_dir().glob("*.ipynb"))


def _parameters_cell(nb_path):
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: needs exactly one cell tagged 'parameters'"
    return nb, "".join(cells[0]["source"])


def _literals(src):
    """name -> value of a parameters cell; fails unless every statement assigns a literal."""
    out = {}
    for stmt in ast.parse(src).body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, ast.unparse(stmt)
        out[stmt.targets[0].id] = ast.literal_eval(stmt.value)
    return out


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(nb_path):
    nb, src = _parameters_cell(nb_path)
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "committed with outputs"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    defaults = _literals(src)
    schema = NOTEBOOK_PARAMS[nb_path.stem]
    schema.check_keys(defaults)
    # the committed defaults are the CI set, so nbmake runs the notebook in seconds
    ci = load_yaml(paths.params_dir() / nb_path.stem / "ci.yaml")
    assert {k: v for k, v in defaults.items() if k != "out_dir"} == ci


@pytest.mark.parametrize("nb", sorted(NOTEBOOK_PARAMS))
@pytest.mark.parametrize("level", ["ci", "quick", "paper"])
def test_every_params_file_validates(nb, level):
    f = paths.params_dir() / nb / f"{level}.yaml"
    assert f.is_file(), f"missing {f}"
    schema = NOTEBOOK_PARAMS[nb]
    params = load_yaml(f)
    schema.check_keys(params)
    schema.from_dict(params)


EXTRA_PARAM_FILES = sorted(
    f
    for nb in NOTEBOOK_PARAMS
    for f in (paths.params_dir() / nb).glob("*.yaml")
    if f.stem not in ("ci", "quick", "paper")
)


@pytest.mark.parametrize("f", EXTRA_PARAM_FILES, ids=lambda f: f"{f.parent.name}/{f.stem}")
def test_every_other_params_file_validates(f):
    """Parameter sets beyond the three levels (e.g. 03_pruning/switch.yaml, 05_replication/science.yaml); the
    DeepSpeed pretraining files are `smoe-lab pretrain --params` files (PretrainParams), not a notebook's."""
    from smoe_lab.config import PretrainParams

    params = load_yaml(f)
    if f.name.startswith("paper_deepspeed"):  # paper_deepspeed.yaml, paper_deepspeed_smoke.yaml
        PretrainParams.from_dict(params)
        return
    schema = NOTEBOOK_PARAMS[f.parent.name]
    schema.check_keys(params)
    schema.from_dict(params)


def test_bad_parameter_fails_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbase: ci\nnotebooks:\n  01_pretrain: {varients: [1, 8]}\n")
    with pytest.raises(ValueError, match="unknown parameter.*varients"):
        run_pipeline(params_file=str(bad), out_dir=str(tmp_path / "out"))
    bad.write_text("name: bad\nbase: ci\nnotebooks:\n  01_pretrain: {variants: [0]}\n")
    with pytest.raises(ValueError, match="01_pretrain.variants"):
        run_pipeline(params_file=str(bad), out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_quickstart_alias_plans_the_tour_and_levels_plan_everything():
    name, plan = pipeline_plan("quickstart", None)
    assert name == "quickstart" and list(plan) == ["01_pretrain", "02_clusters", "03_pruning", "04_results"]
    assert set(pipeline_plan("quick", None)[1]) == set(NOTEBOOK_PARAMS)
    assert set(pipeline_plan("ci", None)[1]) == set(NOTEBOOK_PARAMS)


def test_ci_pipeline_end_to_end(tmp_path):
    logs = []
    out = run_pipeline("ci", out_dir=str(tmp_path / "ci"), log=logs.append)
    for nb in NOTEBOOK_PARAMS:
        assert (out / f"{nb}.ipynb").is_file()
    assert (out / "figures" / "fig6_train_loss.png").stat().st_size > 10_000
    assert (out / "figures" / "fig6_train_loss.html").is_file()
    # 03 ran the paper's stage 1 (instruction mix) before each task finetune, with the ci parameters
    assert all((d / "checkpoint" / "config.json").is_file() for d in (out / "stage1").iterdir())
    assert len(list((out / "stage1").iterdir())) == 4  # base 4e, dense, and the two reductions
    # 04 drew the inference-cost picture under expert parallelism (2 gloo ranks) and the payoff table
    for fig in ("fig2a_loss_vs_latency", "fig2b_dense_equivalent", "fig4_all2all_vs_experts", "fig5_latency_vs_ranks"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 10_000, fig
    payoff = (out / "tables" / "ep_payoff.csv").read_text()
    assert "unreduced base" in payoff and "reduced (uncurl)" in payoff
    # a reduced model's router-only warm-up ran on the task's training examples (paper A4), before stage 1
    from smoe_lab import checkpoint

    warm = {
        d.name: checkpoint.read_config(d / "checkpoint")[1].get("router_warmup") for d in (out / "stage1").iterdir()
    }
    reduced = [n for n in warm if "-D2-" in n]
    assert len(reduced) == 2 and all(warm[n]["data"] == ["boolq"] for n in reduced)
    assert all(warm[n] is None for n in warm if n not in reduced)
    # the store holds the reported numbers and the selection numbers of every finetuning, under distinct names

    stored = ResultsStore(out / "results.sqlite").rows(stage="stage2")
    assert {"accuracy", "acc_norm", "loss", "dev_accuracy", "dev_loss"} <= set(stored["metric"])
    # `smoe-lab evaluate` on a selected checkpoint recomputes the stored report and selection numbers exactly
    from smoe_lab.cli import main

    best = next((out / "finetune" / "boolq").glob("*-uncurl-D2-*")) / "best"
    again = tmp_path / "again.sqlite"
    for split in ("validation", "dev"):
        assert (
            main(["evaluate", "--checkpoint", str(best), "--task", "boolq", "--split", split, "--store", str(again)])
            == 0
        )
    mine = stored[stored["method"].eq("uncurl")].set_index("metric")["value"]
    recomputed = ResultsStore(again).rows().set_index("metric")["value"]
    assert len(recomputed) == 6 and all(recomputed[m] == mine[m] for m in recomputed.index)
    # 01 drew router health; 03 stored the zero-shot readouts (LM loss on val_news, layer reconstruction)
    assert (out / "figures" / "router_entropy_ratio.png").is_file() and (out / "tables" / "router_health.csv").is_file()
    readouts = ResultsStore(out / "results.sqlite").rows(stage="zeroshot", task="corpus:val_news")
    assert {"lm_loss", "recon_routed", "recon_mapped"} <= set(readouts["metric"])
    assert len(readouts[readouts["metric"] == "recon_mapped"]) == 2  # uncurl and freq_prune, 4e -> 2e
    # 05 stored router health and the readouts per seed, and reported them
    rep = ResultsStore(out / "replication" / "results.sqlite").rows()
    assert set(rep[rep["stage"] == "router"]["d"]) == {2, 4} and (rep["task"] == "corpus:val_news").any()
    report = (out / "replication" / "replication.md").read_text()
    assert "## Router health of every model" in report and "## Readouts without finetuning" in report
    assert report.count("**What changed against the first study.**") == 5
    table = (out / "tables" / "pretrain.csv").read_text().splitlines()
    assert table[0].startswith("model,params,active_params") and len(table) == 3
    # a second run skips every notebook: outputs are up to date
    logs.clear()
    run_pipeline("ci", out_dir=str(out), log=logs.append)
    assert sum("up to date" in line for line in logs) == len(NOTEBOOK_PARAMS)
