"""smoe_lab.hf: Hugging Face MoE models (Switch Transformers, OLMoE, Qwen2/3-MoE, Mixtral) through calibrate,
reduce_model, save/from_pretrained, finetuning and rank classification. Tiny random models, no hub."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import hf_models as H  # noqa: E402
import transformers  # noqa: E402

from smoe_lab import checkpoint, hf  # noqa: E402
from smoe_lab.calibrate import calibrate  # noqa: E402
from smoe_lab.hf import families as fm  # noqa: E402
from smoe_lab.hf.seq2seq import from_causal  # noqa: E402
from smoe_lab.reduce import METHODS, bias_free_expert_forward, gated_expert_forward, permute_expert, reduce_model  # noqa: E402

FAMS = H.FAMILIES


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: H.save_folder(f, root / f) for f in FAMS}


def _stock(folder):
    """The stock transformers class of a folder's config, loaded with from_pretrained (no smoe_lab involved)."""
    cfg = json.loads((folder / "config.json").read_text())
    return getattr(transformers, cfg["architectures"][0]).from_pretrained(str(folder)).eval()


def _causal_rows(n=3, t=10, seed=0):
    """(idx, targets, mask) causal rows as smoe_lab's task code builds them: prompt, then an answer of 1-3 tokens."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.zeros(n, t, dtype=torch.long)
    targets = torch.full((n, t), -1, dtype=torch.long)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for b in range(n):
        n_p, n_a = 3 + b, 1 + b % 3
        seq = torch.randint(4, H.VOCAB, (n_p + n_a,), generator=g)
        idx[b, : n_p + n_a - 1] = seq[:-1]
        targets[b, n_p - 1 : n_p + n_a - 1] = seq[n_p:]
        mask[b, : n_p + n_a - 1] = True
    return idx, targets, mask


def _logits(model, idx, mask):
    """Switch without targets: the encoder reads the row, the decoder is teacher-forced on it (smoe_lab.hf.seq2seq)."""
    with torch.no_grad():
        return model(idx, mask=mask)


# -- the adapter ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMS)
def test_adapter_forward_matches_transformers(folders, family):
    model = hf.load(folders[family])
    ref = _stock(folders[family])
    idx, targets, mask = _causal_rows()
    with torch.no_grad():
        logits, loss, aux = model(idx, targets, mask=mask)
        for b in range(idx.shape[0]):
            n = int(mask[b].sum())
            if family == "switch":  # encoder: prompt + EOS; decoder: start + answer[:-1] (smoe_lab.hf.seq2seq)
                s = int((targets[b] != -1).nonzero()[0])
                answer = targets[b, s:n]
                enc = torch.cat([idx[b, : s + 1], torch.tensor([1])])[None]
                dec = torch.cat([torch.tensor([0]), answer[:-1]])[None]
                want = ref(input_ids=enc, decoder_input_ids=dec).logits[0]
                torch.testing.assert_close(logits[b, s:n], want, rtol=1e-5, atol=1e-5)
            else:
                ids = idx[b, :n][None]
                if family == "mixtral":  # Llama-style tokenizers start with BOS; the adapter adds it
                    ids = torch.cat([torch.tensor([[2]]), ids], 1)
                want = ref(input_ids=ids).logits[0, -n:]
                torch.testing.assert_close(logits[b, :n], want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loss) and torch.isfinite(aux) and aux > 0


@pytest.mark.parametrize("family", FAMS)
def test_router_hook_records_logits_and_topk_statistics(folders, family):
    """Telemetry from the router hook equals logits computed here from the router's input; calibration counts
    top-k selections, argmax counts and gate mass over real tokens only."""
    model = hf.load(folders[family])
    seen = {}

    def grab(i):
        def hook(module, args):
            seen[i] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    handles = [m.router.register_forward_pre_hook(grab(i)) for i, m in enumerate(model.moe_layers())]
    idx, mask = H.batches(1)[0]
    with torch.no_grad():
        _logits(model, idx, mask)
    for h in handles:
        h.remove()
    for i, m in enumerate(model.moe_layers()):
        t = m.telemetry
        n_real = int(mask.sum())
        assert t.num_tokens == n_real
        x = seen[i]
        if family == "mixtral":  # BOS first in every row
            x = x.reshape(idx.shape[0], -1, x.shape[-1])[:, 1:].reshape(-1, x.shape[-1])
        if family != "switch":  # the Switch encoder input has an EOS after each row; the decoder is shifted
            torch.testing.assert_close(t.router_logits, (x @ m.router.weight.T)[mask.reshape(-1)].float())
            p = F.softmax(t.router_logits, -1)
            top = torch.topk(p, m.top_k, -1).indices
            assert torch.equal(t.selected_counts, torch.bincount(top.reshape(-1), minlength=m.num_experts))
        assert int(t.selected_counts.sum()) == m.top_k * n_real and int(t.routed_counts.sum()) == n_real
    cal = calibrate(model, H.batches(3))
    n_tokens = sum(int(mk.sum()) for _, mk in H.batches(3))
    for s, m in zip(cal.layers, model.moe_layers()):
        assert s.n_tokens == n_tokens and s.top_k == m.top_k
        assert int(s.selected_counts.sum()) == m.top_k * n_tokens
        assert abs(float(s.frequencies.sum()) - 1) < 1e-9
        if m.normalize:  # renormalised top-k weights sum to 1 per token
            assert abs(float(s.gate_mass.sum()) - n_tokens) < 1e-3
        assert torch.allclose(s.gram, s.gram.T) and (s.gram.diagonal() > 0).all()


def test_adapter_structure_follows_the_tables(folders):
    sw = hf.load(folders["switch"])
    assert [m.block for m in sw.moe_layers()] == [1, 3]  # encoder block 1, decoder block 1 (after 2 encoder blocks)
    assert [m.stack for m in sw.moe_layers()] == ["encoder.block", "decoder.block"]
    assert sw.moe_layers()[0].router is sw.hf.encoder.block[1].layer[-1].mlp.router.classifier
    q2 = hf.load(folders["qwen2_moe"])
    assert all(m.router.weight.shape == (H.Z, 16) for m in q2.moe_layers())
    assert q2.config.top_k == [2, 2] and q2.num_active_params() < q2.num_params()
    cfg, meta = checkpoint.read_config(folders["olmoe"])  # without loading weights
    assert cfg.experts_per_layer == [H.Z, H.Z] and cfg.family == "olmoe" and meta == {}


# -- reduction ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMS)
def test_z_to_z_with_router_keep_is_the_identity(folders, family, tmp_path):
    model = hf.load(folders[family])
    new, report = reduce_model(model, "uncurl", H.Z, H.batches(3), router="keep")
    assert sorted(report.layers[0].centres) == list(range(H.Z))
    out = hf.save(new, tmp_path / "same", tokenizer=checkpoint.load_tokenizer(folders[family]))
    stock = _stock(out)
    idx, mask = H.batches(1, seed=5)[0]
    want = _logits(model, idx, mask)
    torch.testing.assert_close(_logits(hf.load(out), idx, mask), want, rtol=1e-5, atol=1e-5)
    ids = idx[:1, : int(mask[0].sum())]
    with torch.no_grad():
        if family == "switch":
            a = stock(input_ids=ids, decoder_input_ids=ids).logits
            b = _stock(folders[family])(input_ids=ids, decoder_input_ids=ids).logits
        else:
            a, b = stock(input_ids=ids).logits, _stock(folders[family])(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token == "</s>"


def _plant(model, seed=0):
    """Every MoE layer: experts {0, 2} and {1, 3} are hidden-unit permutations of two base experts; router rows
    are +w / -w inside a group with 1e-3 noise. Returns the bases per layer."""
    g = torch.Generator().manual_seed(seed)
    bases = []
    for m in model.moe_layers():
        experts = m.expert_weights()
        base = [experts[0], experts[1]]
        d_ff = experts[0][0].shape[0]
        planted = [permute_expert(base[z % 2], torch.randperm(d_ff, generator=g)) for z in range(H.Z)]
        w = torch.randn(m.router.weight.shape[1], generator=g)
        rows = torch.stack([(w if z % 2 == 0 else -w) + 1e-3 * torch.randn(w.shape, generator=g) for z in range(H.Z)])
        m.set_experts([type(p)(*(t.clone() for t in p)) for p in planted], rows)
        bases.append([type(b)(*(t.clone() for t in b)) for b in base])
    return bases


@pytest.mark.parametrize("family", FAMS)
def test_planted_groups_are_recovered_and_merged(folders, family):
    model = hf.load(folders[family])
    bases = _plant(model)
    new, report = reduce_model(model, "uncurl", 2, H.batches(4), router="merge")
    forward = bias_free_expert_forward if family == "switch" else gated_expert_forward
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    for lr, layer, base in zip(report.layers, new.moe_layers(), bases):
        labels = lr.labels
        assert labels[0] == labels[2] and labels[1] == labels[3] and labels[0] != labels[1]
        merged = layer.expert_weights()
        for group in (0, 1):
            f = forward(merged[int(labels[group])], x)
            want = forward(base[group], x)
            assert float((f - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("family", FAMS)
def test_half_reduction_saves_reloads_and_shrinks(folders, family, tmp_path):
    model = hf.load(folders[family])
    new, report = reduce_model(model, "uncurl", H.Z // 2, H.batches(3))
    assert new.num_params() < model.num_params() and report.num_experts == [2, 2]
    out = hf.save(new, tmp_path / "half")
    stock = _stock(out)
    counts = [
        fm.get_path(moe, fm.family_for(stock.config).router).weight.shape[0]
        for _, _, moe in fm.moe_blocks(new.family, stock)
    ]
    assert counts == [H.Z // 2] * 2
    assert sum(p.numel() for p in stock.parameters()) == new.num_params()
    assert (out / "model.safetensors").stat().st_size < (folders[family] / "model.safetensors").stat().st_size
    idx, mask = H.batches(1)[0]
    assert torch.isfinite(_logits(hf.load(out), idx, mask)).all()
    if family == "qwen2_moe":  # the shared expert passed through untouched
        a, b = model.hf.model.layers[0].mlp.shared_expert, stock.model.layers[0].mlp.shared_expert
        assert torch.equal(a.gate_proj.weight, b.gate_proj.weight)


@pytest.mark.parametrize("family", ["switch", "olmoe", "mixtral"])
def test_per_layer_counts_round_trip_through_hf_load(folders, family, tmp_path):
    model = hf.load(folders[family])
    new, _ = reduce_model(model, "freq_merge", [1, 3], H.batches(3), router="merge")
    assert new.config.top_k == ([1, 1] if family == "switch" else [1, 2])  # top-k lowered where D < k
    out = hf.save(new, tmp_path / "ragged", tokenizer=checkpoint.load_tokenizer(folders[family]))
    doc = json.loads((out / "config.json").read_text())
    assert doc["smoe_lab_experts_per_layer"] == [1, 3]
    back = checkpoint.load(out)  # dispatches to smoe_lab.hf.load
    assert back.config.experts_per_layer == [1, 3] and back.config.expert_map == new.config.expert_map
    idx, mask = H.batches(1, seed=3)[0]
    torch.testing.assert_close(_logits(back, idx, mask), _logits(new, idx, mask), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):  # the stock class cannot build different counts per layer
        _stock(out)


def test_uniform_d_below_k_lowers_top_k_in_the_saved_config(folders, tmp_path):
    model = hf.load(folders["qwen3_moe"])
    new, _ = reduce_model(model, "freq_prune", 1, H.batches(2), router="keep")
    out = hf.save(new, tmp_path / "one")
    doc = json.loads((out / "config.json").read_text())
    assert doc["num_experts_per_tok"] == 1 and doc["num_local_experts"] == 1  # Qwen3-MoE's name for num_experts
    assert "smoe_lab_experts_per_layer" not in doc
    stock = _stock(out)
    assert torch.isfinite(stock(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize("family", ["switch", "olmoe"])
def test_every_method_and_router_option(folders, family):
    """Every baseline works for top-1 (Switch) and top-k (OLMoE) models."""
    model = hf.load(folders[family])
    cal = calibrate(model, H.batches(3))
    idx, mask = H.batches(1)[0]
    for method in METHODS:
        for router in ("reinit", "merge", "keep"):
            new, report = reduce_model(model, method, 2, cal, router=router)
            assert new.config.experts_per_layer == [2, 2] and report.method == method
            assert torch.isfinite(_logits(new, idx, mask)).all()
    new, report = reduce_model(model, "uncurl", 2, cal, frequency="gate_mass")
    assert report.frequency == "gate_mass" and abs(report.layers[0].frequencies.sum() - 1) < 1e-9


def test_calibration_must_come_from_the_same_model(folders):
    model = hf.load(folders["olmoe"])
    cal = calibrate(model, H.batches(2))
    other = hf.load(folders["qwen3_moe"])
    with pytest.raises(ValueError, match="another checkpoint"):
        reduce_model(other, "uncurl", 2, cal)


# -- sources and errors -------------------------------------------------------------------------------------------
def test_sources(folders, tmp_path):
    assert hf.is_hub_id("google/switch-base-8") and not hf.is_hub_id(str(folders["olmoe"]))
    assert hf.is_hf_folder(folders["olmoe"]) and not hf.is_hf_source(tmp_path / "nope")
    assert (
        hf.checkpoint_name(tmp_path / "models--google--switch-base-8" / "snapshots" / "abc") == "google--switch-base-8"
    )
    assert (
        hf.checkpoint_hash(folders["olmoe"])
        == hf.checkpoint_hash(folders["olmoe"])
        != hf.checkpoint_hash(folders["qwen3_moe"])
    )
    with pytest.raises(FileNotFoundError, match="smoe-lab-test/no-such-model"):
        hf.load("smoe-lab-test/no-such-model")


def test_unsupported_and_dense_models_are_clear_errors(tmp_path):
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=32, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4)
    )
    t5.save_pretrained(str(tmp_path / "t5"))
    with pytest.raises(ValueError, match="unsupported Hugging Face model_type 't5'"):
        hf.load(tmp_path / "t5")
    dense = transformers.Qwen2MoeForCausalLM(
        H.hf_config("qwen2_moe").__class__(**{**H.hf_config("qwen2_moe").to_dict(), "mlp_only_layers": [0, 1]})
    )
    dense.save_pretrained(str(tmp_path / "dense"))
    with pytest.raises(ValueError, match="no MoE blocks"):
        hf.load(tmp_path / "dense")


# -- the causal rows of the task code as encoder-decoder batches ----------------------------------------------------
def test_causal_rows_become_prompt_and_answer():
    idx, targets, mask = _causal_rows(n=2, t=8)
    b = from_causal(idx, targets, mask, eos_id=1, start_id=0, pad_id=0)
    for r in range(2):
        s = int((targets[r] != -1).nonzero()[0])
        n = int(mask[r].sum())
        assert b.input_ids[r, : s + 2].tolist() == idx[r, : s + 1].tolist() + [1]
        assert not b.encoder_stats[r, s + 1]  # the added EOS is not a calibration token
        answer = targets[r, s:n].tolist()
        assert b.labels[r, : len(answer)].tolist() == answer
        assert b.decoder_input_ids[r, : len(answer)].tolist() == [0] + answer[:-1]
    assert b.dst.tolist() == [int(t) for r in range(2) for t in (targets[r] != -1).nonzero().reshape(-1)]


def test_seq2seq_scores_are_log_p_answer_given_input(folders):
    """Rank classification of a Switch model scores each choice by the decoder's log p(answer | input)."""
    from smoe_lab.data.tasks import Example
    from smoe_lab.evaluate import choice_logprobs

    model = hf.load(folders["switch"])
    tok = checkpoint.load_tokenizer(folders["switch"])
    ex = [Example("t", 0, "is it an animal ? cat", [" yes", " no dog"], 0)]
    scores, lengths = choice_logprobs(model, tok, ex, batch_size=2)
    ref = _stock(folders["switch"])
    enc = torch.tensor([tok.encode("is it an animal ? cat") + [1]])
    for j, choice in enumerate(ex[0].choices):
        a = torch.tensor(tok.encode(choice))
        dec = torch.cat([torch.tensor([0]), a[:-1]])[None]
        with torch.no_grad():
            logp = F.log_softmax(ref(input_ids=enc, decoder_input_ids=dec).logits[0], -1)
        assert abs(scores[0][j] - float(logp.gather(1, a[:, None]).sum())) < 1e-4 and lengths[0][j] == len(a)


# -- finetuning and evaluation --------------------------------------------------------------------------------------
def animal_task(n, seed):
    r = np.random.default_rng(seed)
    animals, tools = "cat dog horse sheep goat mouse".split(), "hammer saw drill chisel wrench axe".split()
    from smoe_lab.data.tasks import Example

    out = []
    for i in range(n):
        w = str(r.choice(animals + tools))
        out.append(Example("animal", i, f"is it an animal ? {w}", [" no", " yes"], int(w in animals)))
    return out


@pytest.mark.parametrize("family", ["switch", "qwen3_moe"])
def test_finetune_and_rank_classification(folders, family, tmp_path):
    from smoe_lab.evaluate import evaluate_checkpoint, evaluate_task
    from smoe_lab.finetune import FinetuneConfig, finetune

    model = hf.load(folders[family])
    new, _ = reduce_model(model, "uncurl", 2, H.batches(2))  # a reduced model: the router warm-up runs first
    tok = checkpoint.load_tokenizer(folders[family])
    train, val = animal_task(48, 0), animal_task(16, 1)
    cfg = FinetuneConfig(
        steps=6,
        batch_size=8,
        micro_batch_size=8,
        lr=3e-3,
        warmup_steps=0,
        weight_decay=0.0,
        device="cpu",
        dtype="float32",
        router_warmup_steps=2,
        router_warmup_lr=1e-2,
        eval_every=3,
    )
    router_before = new.moe_layers()[0].router.weight.detach().clone()
    res = finetune(new, tok, train, val, cfg, tmp_path / "ft", progress=False)
    assert res.router_warmup["steps"] == 2 and not torch.equal(router_before, new.moe_layers()[0].router.weight)
    assert 0.0 <= res.accuracy <= 1.0 and np.isfinite(res.loss) and len(res.history) == 2 and res.n_report == 16
    best = tmp_path / "ft" / "best"  # selected on the dev split, reported once on `val`
    r = evaluate_task(checkpoint.load(best), tok, val)
    assert r["accuracy"] == res.accuracy and r["loss"] == res.loss and r["n"] == 16
    assert _stock(best) is not None  # the best checkpoint is a transformers folder
    again = evaluate_checkpoint(best, "boolq", max_examples=4, device="cpu")
    assert 0.0 <= again["accuracy"] <= 1.0
    ck = tmp_path / "ft" / "checkpoint"
    assert (ck / "train_state.pt").is_file() and checkpoint.read_config(ck)[1]["kind"] == "finetune"


def test_stage1_lm_mixing_is_refused(folders, tmp_path):
    from smoe_lab.finetune import FinetuneConfig, finetune

    model = hf.load(folders["olmoe"])
    tok = checkpoint.load_tokenizer(folders["olmoe"])
    cfg = FinetuneConfig(
        stage="stage1", steps=1, batch_size=4, micro_batch_size=4, warmup_steps=0, mix_ratio=0.5, device="cpu"
    )
    with pytest.raises(ValueError, match="a Hugging Face model has its own"):
        finetune(model, tok, animal_task(8, 0), animal_task(4, 1), cfg, tmp_path, np.zeros(100, dtype=np.uint16))


# -- the command line -----------------------------------------------------------------------------------------------
def test_cli_takes_an_hf_folder(folders, tmp_path, capsys):
    from smoe_lab.cli import main

    ck = str(folders["switch"])
    cal = tmp_path / "cal.safetensors"
    argv = ["calibrate", "--checkpoint", ck, "--task", "boolq", "--max-examples", "4", "--batch-size", "2"]
    assert main([*argv, "--out", str(cal), "--no-progress"]) == 0
    argv = ["reduce", "--checkpoint", ck, "--calibration", str(cal), "--method", "uncurl", "--experts", "2"]
    assert main([*argv, "--router", "merge", "--out", str(tmp_path / "red")]) == 0
    assert _stock(tmp_path / "red").config.num_experts == 2
    assert json.loads((tmp_path / "red.report.json").read_text())["num_experts"] == [2, 2]
    sets = ["steps=1", "batch_size=2", "micro_batch_size=2", "warmup_steps=0", "dev_max_examples=2", "device=cpu"]
    argv = ["finetune", "--checkpoint", str(tmp_path / "red"), "--task", "boolq", "--max-train-examples", "4"]
    argv += [x for kv in sets for x in ("--set", kv)]
    assert main([*argv, "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    argv = ["evaluate", "--checkpoint", str(tmp_path / "ft" / "best"), "--task", "boolq", "--max-examples", "4"]
    assert main([*argv, "--device", "cpu", "--no-progress", "--store", str(tmp_path / "r.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "boolq validation: accuracy" in out and "'method': 'uncurl', 'z': 4, 'd': 2" in out
    assert main(["calibrate", "--checkpoint", str(tmp_path / "missing"), "--task", "boolq", "--out", str(cal)]) == 2


# -- notebook 03 on Hugging Face bases -------------------------------------------------------------------------------
def test_pruning_study_over_several_hf_bases(tmp_path):
    """A list of bases (as params/03_pruning/switch.yaml): each is reduced to the targets below its own count and
    compared with the public model of that size; results go to the store like the native study's."""
    from smoe_lab.experiments import pruning_study, results_store
    from smoe_lab.notebook_params import PruningNotebook

    big = H.save_folder("switch", tmp_path / "switch-4e", num_experts=4)
    small = H.save_folder("switch", tmp_path / "switch-2e", seed=1, num_experts=2)
    p = PruningNotebook(
        backbone="tiny-switch",
        base_variant=[str(big), str(small)],
        reference_variants=[str(small)],
        tasks=["boolq"],
        targets=[2],
        methods=["uncurl"],
        calibration_examples=4,
        batch_size=2,
        max_train_examples=8,
        max_eval_examples=4,
        finetune={"steps": 1, "batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "device": "cpu"},
        out_dir=str(tmp_path / "out"),
    )
    rows = pruning_study(p)
    assert sorted(zip(rows["method"], rows["z"], rows["d"])) == [("none", 2, 2), ("none", 4, 4), ("uncurl", 4, 2)]
    assert (tmp_path / "out" / "calibration" / "switch-4e-boolq-train-n4.safetensors").is_file()
    assert len(results_store(tmp_path / "out").rows(metric="accuracy")) == 3
