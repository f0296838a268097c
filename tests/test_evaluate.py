import math

import pytest
import torch

from smoe_lab.config import ModelConfig
from smoe_lab.data.tasks import Example
from smoe_lab.data.tokenizer import ByteBPETokenizer
from smoe_lab.evaluate import (
    accuracy,
    chance_baseline,
    evaluate_task,
    majority_baseline,
    predictions,
    score_choices,
)
from smoe_lab.model import GPT

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "yes no maybe", "red green blue"] * 5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes a step
    ~100x slower; run these tests single-threaded and restore the suite's setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return ByteBPETokenizer.train(TEXTS, vocab_size=300)


def _model(tok, **kw):
    cfg = ModelConfig.preset(
        "tiny", n_layer=2, d_model=32, n_head=2, d_ff=64, vocab_size=tok.vocab_size, block_size=24, **kw
    )
    return GPT(cfg, seed=0).eval()


EXAMPLES = [
    Example("t", 0, "the cat sat on the", [" mat", " park", " blue sky"], 0),
    Example("t", 1, "a dog ran in the", [" park", " mat"], 0),
    Example("t", 2, "yes or no?", [" yes", " no", " maybe"], 2),
    Example("t", 3, "red green blue " * 10 + "red", [" green", " cat"], 0),
]


@torch.no_grad()
def hand_scores(model, tok, ex, block):
    """One forward pass per choice, log-softmax by hand, prompt cut from the left to fit `block`."""
    out = []
    for choice in ex.choices:
        p, a = tok.encode(ex.input), tok.encode(choice)
        p = p[-(block + 1 - len(a)) :]
        ids = p + a
        logits = model(torch.tensor([ids[:-1]]))[0]  # (T, V)
        logp = logits - logits.logsumexp(-1, keepdim=True)
        out.append(sum(float(logp[t, ids[t + 1]]) for t in range(len(p) - 1, len(ids) - 1)))
    return out


@pytest.mark.parametrize("kw", [{}, {"num_experts": 4, "drop_tokens": False}])
def test_scores_equal_a_hand_computation(tok, kw):
    model = _model(tok, **kw)
    assert len(tok.encode(EXAMPLES[3].input)) > 24  # exercises left truncation
    got = score_choices(model, tok, EXAMPLES, batch_size=3)  # padded, mixed-length batches
    want = [hand_scores(model, tok, e, 24) for e in EXAMPLES]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    assert predictions(got) == [max(range(len(w)), key=w.__getitem__) for w in want]


def test_moe_with_token_drops_matches_by_hand_one_sequence_at_a_time(tok):
    model = _model(tok, num_experts=4)  # drop_tokens=True, eval capacity factor 1.0
    got = score_choices(model, tok, EXAMPLES[:2], batch_size=1)
    for g, e in zip(got, EXAMPLES[:2]):
        assert g == pytest.approx(hand_scores(model, tok, e, 24), abs=1e-4)


def test_evaluate_task_accuracy_and_loss(tok):
    model = _model(tok).train()
    r = evaluate_task(model, tok, EXAMPLES, batch_size=4)
    assert model.training  # mode restored
    scores = [hand_scores(model.eval(), tok, e, 24) for e in EXAMPLES]
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
    assert r["accuracy"] == pytest.approx(sum(p == e.label for p, e in zip(preds, EXAMPLES)) / 4)
    tokens = sum(len(tok.encode(e.target)) for e in EXAMPLES)
    assert r["loss"] == pytest.approx(-sum(s[e.label] for s, e in zip(scores, EXAMPLES)) / tokens, abs=1e-5)
    assert r["n"] == 4 and r["seconds"] > 0


def test_record_accuracy_counts_any_correct_entity():
    rec = Example("record", 0, "q", [" A", " B", " C", " D"], 2, answers=(2, 3))
    plain = Example("rte", 1, "q", [" Yes", " No"], 0)
    assert accuracy([rec, plain], [3, 0]) == 1.0
    assert accuracy([rec, plain], [0, 1]) == 0.0
    assert predictions([[-1.0, -0.5, -0.5]]) == [1]  # ties: the first best
    with pytest.raises(ValueError):
        accuracy([rec], [])


def test_baselines():
    train = [Example("t", i, "x", [" Yes", " No"], lab) for i, lab in enumerate([1, 1, 0, 1])]
    val = [Example("t", i, "x", [" Yes", " No"], lab) for i, lab in enumerate([1, 0, 0, 0, 1])]
    assert majority_baseline(train, val) == pytest.approx(2 / 5)
    cb = [Example("cb", 0, "x", [" Yes", " No", " Maybe"], 2)]
    rec = [Example("record", 0, "x", [" A", " B", " C", " D"], 0, answers=(0, 1))]
    assert chance_baseline(val) == 0.5 and chance_baseline(cb) == pytest.approx(1 / 3)
    assert chance_baseline(rec) == 0.5 and math.isclose(chance_baseline(val + cb), (5 * 0.5 + 1 / 3) / 6)
