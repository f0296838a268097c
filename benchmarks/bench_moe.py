"""MoE layer speed: dense FFN vs an ideal stacked-expert layer vs smoe_lab's MoELayer vs DeepSpeed-MoE.

Forward + backward on `--tokens` tokens (fp32 on CPU, bf16 with --bf16 on CUDA), gradients set to None each step
as in training (so weight gradients are freshly allocated, as an optimizer step would see them). Each round
times every implementation back to back (interleaved), takes the best of `--reps` steps per implementation, and
the table reports the median over rounds: noise on a shared machine hits all implementations alike.

    ideal     tokens pre-split evenly into E groups, no router, no dispatch: two batched matmuls (the floor)
    native    smoe_lab.moe.MoELayer: router + top-1 routing + index dispatch + baddbmm experts + gather combine
    deepspeed deepspeed.moe.layer.MoE (k=1, same capacity factor, use_rts=False): einsum one-hot dispatch

    python benchmarks/bench_moe.py                      # 4096 tokens, d_model 256, d_ff 1024, E in 8 32 128
    python benchmarks/bench_moe.py --quick              # fewer rounds
    python benchmarks/bench_moe.py --memory             # also peak RSS of each implementation (subprocesses)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

from smoe_lab.moe import MoELayer, dispatch_combine, gelu


class Dense(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.c_proj(gelu(self.c_fc(x)))


class Ideal(nn.Module):
    """E experts, N/E tokens each, already grouped: the cost floor of any top-1 layer with these weights."""

    def __init__(self, e: int, d: int, f: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(e, d, f) * 0.02)
        self.b_in = nn.Parameter(torch.zeros(e, f))
        self.w_out = nn.Parameter(torch.randn(e, f, d) * 0.02)
        self.b_out = nn.Parameter(torch.zeros(e, d))

    def forward(self, x):
        e = self.w_in.shape[0]
        xb = x.reshape(e, -1, x.shape[-1])  # [E, N/E, d]
        h = gelu(torch.baddbmm(self.b_in.unsqueeze(1), xb, self.w_in))
        return torch.baddbmm(self.b_out.unsqueeze(1), h, self.w_out).reshape(x.shape)


class Native(nn.Module):
    grouped: bool | None = None  # None: the layer's own choice

    def __init__(self, e: int, d: int, f: int):
        super().__init__()
        self.moe = MoELayer(d, f, e, capacity_factor_train=1.2, min_capacity=4)
        for p in self.moe.parameters():
            nn.init.normal_(p, std=0.02)
        self.moe.record_logits = False

    def forward(self, x):
        if self.grouped is None:
            return self.moe(x)
        _, r = self.moe.route(x)
        return dispatch_combine(self.moe.experts, x, r, grouped=self.grouped)


class NativeGrouped(Native):
    grouped = True


class NativePadded(Native):
    grouped = False


def _init_deepspeed():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl", verbose=False)


class DeepSpeedMoE(nn.Module):
    def __init__(self, e: int, d: int, f: int):
        super().__init__()
        _init_deepspeed()
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(nn.Linear(d, f), nn.GELU(approximate="tanh"), nn.Linear(f, d))
        self.moe = MoE(
            hidden_size=d,
            expert=expert,
            num_experts=e,
            ep_size=1,
            k=1,
            capacity_factor=1.2,
            eval_capacity_factor=1.0,
            min_capacity=4,
            drop_tokens=True,
            use_rts=False,
        )

    def forward(self, x):
        return self.moe(x.unsqueeze(0))[0].squeeze(0)


def build(impl: str, e: int, d: int, f: int, device) -> nn.Module:
    cls = {
        "dense": lambda: Dense(d, f),
        "ideal": lambda: Ideal(e, d, f),
        "native": lambda: Native(e, d, f),
        "grouped": lambda: NativeGrouped(e, d, f),
        "padded": lambda: NativePadded(e, d, f),
        "deepspeed": lambda: DeepSpeedMoE(e, d, f),
    }[impl]
    return cls().to(device).train()


def step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(g)


def time_steps(module, x, g, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(module, x, g)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_mb(impl: str, e: int, args) -> float:
    """Peak RSS of a fresh process doing a few steps of one implementation (includes the Python baseline)."""
    code = (
        "import sys, resource, torch; sys.argv=['x'];"
        "from benchmarks.bench_moe import build, step;"
        f"torch.set_num_threads({torch.get_num_threads()});"
        f"m=build('{impl}', {e}, {args.d_model}, {args.d_ff}, 'cpu');"
        f"x=torch.randn({args.tokens}, {args.d_model}, requires_grad=True); g=torch.randn_like(x);"
        "[step(m, x, g) for _ in range(3)];"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--impls", nargs="+", default=["dense", "ideal", "native", "deepspeed"])
    ap.add_argument("--quick", action="store_true", help="3 rounds of 3")
    ap.add_argument("--memory", action="store_true", help="peak RSS per implementation (fresh subprocesses)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.reps = 3, 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls = [i for i in args.impls if i != "deepspeed" or _has_deepspeed()]
    print(
        f"device {device}, threads {torch.get_num_threads()}, tokens {args.tokens}, d_model {args.d_model}, "
        f"d_ff {args.d_ff}, fp32{' + bf16 autocast' if args.bf16 else ''}, fwd+bwd, grads None each step; "
        f"median over {args.rounds} rounds of best-of-{args.reps}"
    )
    header = f"{'E':>5} " + " ".join(f"{i + ' ms':>12}" for i in impls)
    vs_ideal = [i for i in impls if i not in ("dense", "ideal")]
    ratios = [f"{i}/dense" for i in impls if i != "dense"] + [f"{i}/ideal" for i in vs_ideal]
    print(
        header
        + " "
        + " ".join(f"{r:>15}" for r in ratios)
        + (" " + " ".join(f"{i + ' MB':>13}" for i in impls) if args.memory else "")
    )
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    g = torch.randn_like(x)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else _null()
    for e in args.experts:
        mods = {i: build(i, e, args.d_model, args.d_ff, device) for i in impls}
        with ctx:
            for m in mods.values():  # warm-up
                step(m, x, g)
            per_round = {i: [] for i in impls}
            for _ in range(args.rounds):
                for i, m in mods.items():
                    per_round[i].append(time_steps(m, x, g, args.reps))
        ms = {i: 1000 * statistics.median(v) for i, v in per_round.items()}
        cells = [f"{ms[i]:>12.2f}" for i in impls]
        rat = [f"{ms[i] / ms['dense']:>15.2f}" for i in impls if i != "dense"]
        rat += [f"{ms[i] / ms['ideal']:>15.2f}" for i in vs_ideal]
        mem = [f"{peak_rss_mb(i, e, args):>13.0f}" for i in impls] if args.memory else []
        print(f"{e:>5} " + " ".join(cells) + " " + " ".join(rat) + (" " + " ".join(mem) if mem else ""))


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("deepspeed not installed: skipping it")
        return False
    return True


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
