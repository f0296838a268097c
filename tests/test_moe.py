import pytest
import torch
from required import need_module

from smoe_lab.moe import MoELayer, dispatch_combine, expert_capacity, gelu, moe_reference, top1_route


def test_capacity_matches_deepspeed_float32_rule():
    assert expert_capacity(100, 2, 1.2, 4) == 61  # 50 * 1.2f = 60.000002 -> 61
    assert expert_capacity(64, 8, 1.0, 4) == 8
    assert expert_capacity(8, 8, 1.0, 4) == 4  # min capacity
    assert expert_capacity(4096, 128, 1.2, 4) == 39


def test_route_hand_built_logits_keeps_first_tokens_in_order():
    # 6 tokens, 2 experts: tokens 0,1,2,4 prefer expert 0; 3,5 expert 1. capacity = max(ceil(3*0.5), 1) = 2
    logits = torch.tensor([[2.0, 0], [3, 0], [1, 0], [0, 1], [5, 0], [0, 2]])
    r = top1_route(logits, capacity_factor=0.5, min_capacity=1)
    assert r.capacity == 2
    assert r.expert_index.tolist() == [0, 0, 0, 1, 0, 1]
    assert r.kept.tolist() == [True, True, False, True, False, True]
    assert r.position.tolist() == [0, 1, 2, 0, 3, 1]
    assert r.routed_counts.tolist() == [4, 2]
    assert r.processed_counts.tolist() == [2, 2]
    gates = torch.softmax(logits, 1)
    f = torch.tensor([4 / 6, 2 / 6])
    assert torch.allclose(r.aux_loss, 2 * (gates.mean(0) * f).sum())
    # drop_tokens=False keeps everything
    r2 = top1_route(logits, capacity_factor=0.5, min_capacity=1, drop_tokens=False)
    assert r2.kept.all() and r2.capacity == 4


def test_padding_is_not_routed_and_not_in_aux_loss():
    torch.manual_seed(0)
    logits = torch.randn(10, 4)
    mask = torch.tensor([True] * 7 + [False] * 3)
    r = top1_route(logits, 1.0, 1, mask=mask)
    ref = top1_route(logits[:7], 1.0, 1)
    assert not r.kept[7:].any()
    assert torch.equal(r.kept[:7], ref.kept)
    assert torch.equal(r.routed_counts, ref.routed_counts)
    assert torch.allclose(r.aux_loss, ref.aux_loss)
    assert r.capacity == ref.capacity


@pytest.mark.parametrize("n,e,cf", [(100, 2, 1.2), (256, 8, 1.0), (333, 16, 1.2), (64, 32, 1.0), (4096, 128, 1.2)])
def test_top1_route_parity_with_deepspeed(n, e, cf):
    sharded_moe = need_module("deepspeed.moe.sharded_moe", "deepspeed")  # SMOE_LAB_REQUIRE: fail, not skip
    g = torch.Generator().manual_seed(n + e)
    logits = torch.randn(n, e, generator=g) * 2
    logits[:, 0] += 2.0  # imbalance so that drops happen
    l_aux, combine, dispatch, exp_counts = sharded_moe.top1gating(logits, cf, 4, drop_tokens=True, use_rts=False)
    r = top1_route(logits, cf, 4)
    assert r.capacity == combine.shape[2]
    assert torch.allclose(r.aux_loss, l_aux, rtol=1e-6)
    assert torch.equal(r.routed_counts, exp_counts)
    assert torch.equal(r.processed_counts, dispatch.sum(dim=(0, 2)))
    assert r.kept.sum() < n  # the test really exercises dropping
    # Which tokens a full expert keeps differs (DeepSpeed: topk tie order), but where both keep a token its
    # gate equals DeepSpeed's combine weight.
    ds_gate = combine.sum(dim=(1, 2))
    both = r.kept & (ds_gate > 0)
    assert both.sum() > 0
    assert torch.allclose(r.gate[both], ds_gate[both], rtol=1e-6)


def _layer(e, d=16, f=32, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(d, f, e, capacity_factor_train=1.2, capacity_factor_eval=1.0, min_capacity=4)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_single_expert_equals_dense_ffn():
    layer = _layer(1).eval()
    x = torch.randn(2, 9, 16)
    dense = gelu(x @ layer.experts.w_in[0] + layer.experts.b_in[0]) @ layer.experts.w_out[0] + layer.experts.b_out[0]
    assert torch.allclose(layer(x), dense, atol=1e-6)
    assert layer.telemetry.dropped_fraction == 0.0


@pytest.mark.parametrize("path", ["grouped", "padded", "grouped_mm"])
@pytest.mark.parametrize("e", [2, 8, 32])
def test_fast_dispatch_equals_reference_forward_and_backward(e, path):
    layer = _layer(e).train()
    x = torch.randn(200, 16, requires_grad=True)
    logits, r = layer.route(x)
    assert e == 2 or not r.kept.all()  # drops happen (std 0.3 router)
    y_fast = dispatch_combine(layer.experts, x, r, path=path)
    g = torch.randn_like(y_fast)
    grads_fast = torch.autograd.grad((y_fast * g).sum(), [x, *layer.parameters()], allow_unused=True)
    logits, r = layer.route(x)
    y_ref = moe_reference(layer.experts, x, r)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *layer.parameters()], allow_unused=True)
    assert torch.allclose(y_fast, y_ref, atol=1e-5)
    for a, b in zip(grads_fast, grads_ref):
        assert torch.allclose(a, b, atol=1e-4)


def test_dropped_tokens_output_zero_and_telemetry():
    layer = _layer(4)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0  # everything prefers expert 2
    layer.eval()
    x = torch.rand(1, 40, 16) + 0.1  # positive inputs -> expert 2 wins for all
    y = layer(x)
    t = layer.telemetry
    cap = expert_capacity(40, 4, 1.0, 4)
    assert t.routed_counts.tolist() == [0, 0, 40, 0]
    assert t.processed_counts.tolist() == [0, 0, cap, 0]
    assert t.dropped_fraction == pytest.approx(1 - cap / 40)
    assert torch.all(y[0, cap:] == 0) and torch.all(y[0, :cap].abs().sum(-1) > 0)
    assert t.router_logits.shape == (40, 4)


def test_capacity_factor_follows_train_eval_mode():
    layer = _layer(4)
    assert layer.train().capacity_factor == 1.2
    assert layer.eval().capacity_factor == 1.0


@pytest.mark.parametrize("path", ["grouped", "padded", "grouped_mm"])
def test_paths_with_padding_mask_and_empty_experts(path):
    layer = _layer(8).train()
    with torch.no_grad():
        layer.router.weight[5:] = -10.0  # with positive inputs experts 5-7 get no token
    layer.expert_path = path
    x = (torch.rand(2, 30, 16) + 0.1).requires_grad_()
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    y = layer(x, mask)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])
    _, r = layer.route(x.reshape(-1, 16), mask.reshape(-1))
    y_ref = moe_reference(layer.experts, x.reshape(-1, 16), r).reshape(y.shape)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *layer.parameters()])
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.all(y[1, 20:] == 0)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.all(grads[2][5:] == 0)  # w_in gradient of the experts without tokens
    t = layer.telemetry
    assert t.router_logits.shape == (50, 8) and t.processed_counts[5:].sum() == 0


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op, and flags the ones that read a device value on the host (a CUDA sync)."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount", "aten.unique")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or []
        )
        if (
            name.startswith(self.SYNCING)
            or bool_index
            or (name.startswith("aten.repeat_interleave") and "output_size" not in (kwargs or {}))
        ):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def test_sync_detector_sees_item_and_boolean_indexing():
    t = torch.arange(5)
    with _RecordOps() as rec:
        int(t.sum())
        _ = t[t > 2]
        torch.bincount(t)
    assert len(rec.syncs) == 3


@pytest.mark.parametrize("path", ["padded", "grouped_mm"])
def test_training_forward_and_backward_read_nothing_back(path):
    """The CUDA paths: no .item()/int() of a tensor, no nonzero, no boolean-mask indexing, no bincount, forward
    (routing, dispatch, experts, combine, telemetry) and backward, with drops. Checked on CPU by recording the
    aten ops; on CUDA the same code runs under torch.cuda.set_sync_debug_mode("error") in benchmarks/gpu.sh."""
    layer = _layer(8).train()
    layer.expert_path = path
    x = torch.randn(4, 50, 16, requires_grad=True)
    with _RecordOps() as rec:
        y = layer(x)
        (y.sum() + layer.aux_loss).backward()
    assert rec.syncs == []
    t = layer.telemetry
    assert all(
        isinstance(v, torch.Tensor) for v in (t.router_logits, t.router_probs, t.routed_counts, t.processed_counts)
    )
    assert isinstance(t.capacity, int) and t.processed_counts.sum() < 200  # drops happened


def test_expert_path_switch(monkeypatch):
    from smoe_lab.moe import resolve_path

    assert resolve_path(None, torch.device("cpu")) == "grouped"
    assert resolve_path(None, torch.device("cuda")) == "padded"
    monkeypatch.setenv("SMOE_LAB_MOE_PATH", "padded")
    assert resolve_path(None, torch.device("cpu")) == "padded"
    assert resolve_path("grouped_mm", torch.device("cpu")) == "grouped_mm"
    monkeypatch.setenv("SMOE_LAB_MOE_PATH", "fast")
    with pytest.raises(ValueError, match="unknown MoE expert path 'fast'"):
        resolve_path(None, torch.device("cpu"))


def test_pooled_gradients_never_overwrite_a_gradient_the_caller_keeps():
    layer = _layer(4).train()
    x = torch.randn(64, 16)
    layer(x).sum().backward()
    kept = layer.experts.w_in.grad
    kept_copy = kept.clone()
    layer.experts.w_in.grad = None
    layer(2 * x).sum().backward()  # the pool must not reuse the storage of `kept`
    assert torch.equal(kept, kept_copy)
    assert layer.experts.w_in.grad.data_ptr() != kept.data_ptr()
    # Set to None and forgotten: the next step reuses the buffer, and its values are still right.
    del kept
    ptr = layer.experts.w_in.grad.data_ptr()
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()
    assert layer.experts.w_in.grad.data_ptr() == ptr
    assert torch.allclose(layer.experts.w_in.grad, kept_copy)
    # Accumulation over micro-batches still adds up.
    layer(x).sum().backward()
    assert torch.allclose(layer.experts.w_in.grad, 2 * kept_copy)
    layer.eval()
    assert not layer.experts.pool.buffers


def test_grouped_path_with_frozen_experts_trains_only_the_router():
    layer = _layer(4).train()
    layer.experts.requires_grad_(False)  # router-only warm-up
    x = torch.randn(64, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_in.grad is None and x.grad is not None


# -- router options (docs/routers.md) ------------------------------------------------------------------------------
def test_router_z_loss_is_st_moe_and_enters_aux_with_its_coefficient(tiny_cfg):
    from smoe_lab.model import GPT
    from smoe_lab.moe import router_z_loss

    logits = torch.randn(10, 4)
    assert torch.allclose(router_z_loss(logits), (torch.logsumexp(logits, 1) ** 2).mean())
    mask = torch.tensor([True] * 6 + [False] * 4)
    assert torch.allclose(router_z_loss(logits, mask), (torch.logsumexp(logits[:6], 1) ** 2).mean())
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = GPT(tiny_cfg.replace(num_experts=4), seed=0)
    _, _, aux0 = plain(idx, idx)
    assert plain.moe_layers()[0].z_loss is None  # off by default: nothing computed
    z = GPT(tiny_cfg.replace(num_experts=4, router_z_loss_coef=1e-3), seed=0)
    _, loss, aux = z(idx, idx)
    layer = z.moe_layers()[0]
    assert torch.allclose(aux, aux0 + 1e-3 * layer.z_loss)
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_router_jitter_perturbs_the_router_input_in_training_only(tiny_cfg):
    from smoe_lab.model import GPT

    layer = GPT(tiny_cfg.replace(num_experts=4, router_jitter=0.1), seed=0).moe_layers()[0]
    x = torch.randn(20, tiny_cfg.d_model)
    layer.eval()
    logits, _ = layer.route(x)
    assert torch.equal(logits, layer.router(x))
    layer.train()
    torch.manual_seed(3)
    logits, _ = layer.route(x)
    torch.manual_seed(3)
    noise = torch.empty_like(x).uniform_(0.9, 1.1)
    assert torch.allclose(logits, layer.router(x * noise)) and not torch.allclose(logits, layer.router(x))


def test_router_init_std_scales_the_router_draws_only(tiny_cfg):
    from smoe_lab.model import GPT

    a = GPT(tiny_cfg.replace(num_experts=4), seed=0).state_dict()
    b = GPT(tiny_cfg.replace(num_experts=4, router_init_std=0.2), seed=0).state_dict()
    for k in a:
        if k.endswith("router.weight"):
            assert torch.allclose(b[k], 10 * a[k])
        else:
            assert torch.equal(a[k], b[k]), k


def _grads(layer, xs, g):
    """Gradients of sum_i <layer(x_i), g> over the inputs (one graph, every call before the backward)."""
    loss = sum((layer(x) * g).sum() for x in xs)
    return torch.autograd.grad(loss, [*xs, *layer.parameters()])


def _reference_grads(layer, xs, g):
    outs = []
    for x in xs:
        _, r = layer.route(x)
        outs.append((moe_reference(layer.experts, x, r) * g).sum())
    return torch.autograd.grad(sum(outs), [*xs, *layer.parameters()])


def test_pooled_activations_survive_two_calls_before_one_backward():
    """A layer called twice before the backward (two micro-batches in one graph, a shared layer): the second call
    must not reuse the buffers the first call saved, and a no-grad call in between must not touch them either."""
    layer = _layer(8).train()
    xs = [torch.randn(120, 16, requires_grad=True) for _ in range(2)]
    g = torch.randn(120, 16)
    loss = (layer(xs[0]) * g).sum()
    with torch.no_grad():
        layer(torch.randn(120, 16))  # scratch buffers, not the saved ones
    loss = loss + (layer(xs[1]) * g).sum()
    grads = torch.autograd.grad(loss, [*xs, *layer.parameters()])
    for a, b in zip(grads, _reference_grads(layer, xs, g)):
        assert torch.allclose(a, b, atol=1e-4)


def test_pooled_buffers_with_a_retained_graph_and_repeated_steps():
    layer = _layer(8).train()
    x = torch.randn(150, 16, requires_grad=True)
    g = torch.randn(150, 16)
    ref = _reference_grads(layer, [x], g)
    y = layer(x)
    first = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()], retain_graph=True)
    layer(2 * x).sum().backward()  # another step in between: the retained graph's activations stay intact
    second = torch.autograd.grad((y * g).sum(), [x, *layer.parameters()])
    for a, b, c in zip(first, second, ref):
        assert torch.allclose(a, c, atol=1e-4) and torch.allclose(b, c, atol=1e-4)
    for _ in range(3):  # steady state: the same buffers every step, the same gradients
        assert all(torch.allclose(a, c, atol=1e-4) for a, c in zip(_grads(layer, [x], g), ref))
    pooled = {k: b.data_ptr() for k, b in layer.experts.pool.buffers.items()}
    _grads(layer, [x], g)
    assert {"xs", "h", "a", "ys", "w_in", "w_out"} <= set(pooled)
    assert pooled == {k: b.data_ptr() for k, b in layer.experts.pool.buffers.items()}
    layer.eval()
    assert not layer.experts.pool.buffers


def _route_loss(r, gg, gz):
    return (r.gate * r.kept * gg).sum() + 0.7 * r.aux_loss + (r.gates * gz).sum()


@pytest.mark.parametrize("e", [2, 8, 15, 16, 64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("drop", [True, False])
def test_top1_route_equals_the_autograd_reference(e, masked, drop):
    """The closed-form backward and the [E, N] layout (few experts) give the reference's routing and gradients."""
    from smoe_lab.moe import top1_route_reference

    g = torch.Generator().manual_seed(e)
    n = 301
    logits = (torch.randn(n, e, generator=g) * 2).requires_grad_(True)
    with torch.no_grad():
        logits[:, 0] += 1.5  # imbalance: drops happen
    mask = torch.rand(n, generator=g) > 0.25 if masked else None
    gg, gz = torch.randn(n, generator=g), torch.randn(n, e, generator=g)
    got = []
    for fn in (top1_route, top1_route_reference):
        logits.grad = None
        r = fn(logits, 1.0, 2, drop, mask)
        _route_loss(r, gg, gz).backward()
        got.append((r, logits.grad.clone()))
    (r, grad), (ref, ref_grad) = got
    for k in ("expert_index", "kept", "routed_counts", "processed_counts"):
        assert torch.equal(getattr(r, k), getattr(ref, k)), k
    valid = ref.kept if mask is None else mask
    assert torch.equal(r.position[valid], ref.position[valid])  # a padding token's position is unspecified
    assert r.capacity == ref.capacity and r.num_real == ref.num_real
    if drop:
        assert (~r.kept & (mask if masked else True)).any()  # the case really drops tokens
    for k in ("gate", "gates", "aux_loss"):
        assert torch.allclose(getattr(r, k), getattr(ref, k), atol=1e-6), k
    assert torch.allclose(grad, ref_grad, atol=1e-6)


@pytest.mark.parametrize("e", [3, 32])  # the [E, N] and the [N, E] layout
def test_top1_softmax_backward_passes_gradcheck(e):
    from smoe_lab.moe_routing import _Top1Softmax

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(23, e, generator=g, dtype=torch.float64, requires_grad=True)
    valid = torch.rand(23, generator=g) > 0.3
    for v, denom in ((None, 23), (valid, int(valid.sum()))):

        def gates_gate_me(lo):  # the three differentiable outputs (expert_index is not)
            gates, gate, _, me = _Top1Softmax.apply(lo, v, denom)
            return gates, gate, me

        assert torch.autograd.gradcheck(gates_gate_me, (logits,))


@pytest.mark.parametrize("e", [4, 32])
def test_top1_route_breaks_ties_to_the_first_expert_and_keeps_bf16_logits_fp32(e):
    logits = torch.zeros(6, e)
    logits[:, 1] = logits[:, 2] = 1.0  # experts 1 and 2 tie on every token
    r = top1_route(logits.bfloat16(), 1.0, 1)
    assert r.expert_index.tolist() == [1] * 6 and r.gate.dtype == torch.float32 and r.gates.dtype == torch.float32


@pytest.mark.parametrize("e", [5, 40])
def test_queue_position_counts_each_expert_in_token_order(e):
    from smoe_lab.moe import queue_position

    g = torch.Generator().manual_seed(e)
    idx = torch.randint(0, e, (500,), generator=g)
    valid = torch.rand(500, generator=g) > 0.2
    pos = queue_position(idx, e, valid)
    for j in range(e):
        sel = valid & (idx == j)
        assert pos[sel].tolist() == list(range(int(sel.sum())))


@pytest.mark.parametrize("e", [4, 32])
def test_top1_route_under_autocast_keeps_the_masked_aux_loss_in_fp32(e):
    g = torch.Generator().manual_seed(e)
    logits = torch.randn(64, e, generator=g)
    mask = torch.rand(64, generator=g) > 0.3
    ref = top1_route(logits, 1.0, 1, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = top1_route(logits, 1.0, 1, mask=mask)
    assert r.aux_loss.dtype == torch.float32
    assert torch.allclose(r.aux_loss, ref.aux_loss, rtol=1e-6)
