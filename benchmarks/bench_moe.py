"""MoE layer speed: dense FFN vs an ideal stacked-expert layer vs smoe_lab's MoELayer vs DeepSpeed-MoE.

Forward + backward on `--tokens` tokens (fp32 on CPU, bf16 autocast with --bf16 on CUDA), gradients set to None
each step as in training (weight gradients are freshly allocated, as an optimizer step would see them). Each round
times every implementation back to back (interleaved, the order rotated every round) and takes the best of
`--reps` steps per implementation; the table gives the median over rounds and, in brackets, the min-max over
rounds. Ratios are taken within a round (both sides measured seconds apart), then summarised the same way.

    dense      one GPT-2 MLP (c_fc, gelu, c_proj) on all tokens: what the MoE costs on top of a dense model
    ideal      tokens pre-split evenly into E groups, no router, no dispatch: two batched matmuls (the floor)
    native     smoe_lab.moe.MoELayer as configured (path from $SMOE_LAB_MOE_PATH or the device default)
    grouped / padded / grouped_mm   the native layer forced onto one expert path (see smoe_lab.moe.resolve_path)
    deepspeed  deepspeed.moe.layer.MoE (k=1, same capacity factor, use_rts=False): einsum one-hot dispatch

    python benchmarks/bench_moe.py                      # 4096 and 16384 tokens, E in 8 32 128: the README table
    python benchmarks/bench_moe.py --quick              # CI-style smoke run: 4096 tokens, 3 rounds of 2
    python benchmarks/bench_moe.py --clock cpu          # process CPU time instead of wall time (busy machines)
    python benchmarks/bench_moe.py --impls ideal grouped padded   # compare the expert paths
    python benchmarks/bench_moe.py --memory             # also peak RSS of each implementation (subprocesses)
    python benchmarks/bench_moe.py --routing            # the router alone: top1_route vs top1_route_reference
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

try:
    from benchmarks._table import markdown_table
except ImportError:  # run as a script: benchmarks/ is on sys.path, not its parent
    from _table import markdown_table
from smoe_lab.moe import MoELayer, gelu, top1_route, top1_route_reference


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
    path: str | None = None  # None: the layer's own choice

    def __init__(self, e: int, d: int, f: int):
        super().__init__()
        self.moe = MoELayer(d, f, e, capacity_factor_train=1.2, min_capacity=4)
        for p in self.moe.parameters():
            nn.init.normal_(p, std=0.02)
        self.moe.record_logits = False
        self.moe.expert_path = self.path

    def forward(self, x):
        return self.moe(x)


class NativeGrouped(Native):
    path = "grouped"


class NativePadded(Native):
    path = "padded"


class NativeGroupedMM(Native):
    path = "grouped_mm"


def _init_deepspeed():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    import deepspeed

    from smoe_lab.ds import jit

    if not torch.distributed.is_initialized():
        jit.prepare()  # no stale JIT build lock (DeepSpeed would wait for it for ever), ninja on PATH
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
        "grouped_mm": lambda: NativeGroupedMM(e, d, f),
        "deepspeed": lambda: DeepSpeedMoE(e, d, f),
    }[impl]
    return cls().to(device).train()


def step(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    y = module(x)
    y.backward(g)


def time_steps(module, x, g, reps: int, clock=time.perf_counter) -> float:
    """Best of `reps` steps, in seconds of `clock` (wall: perf_counter; cpu: process_time, all threads)."""
    return best_of(lambda: step(module, x, g), reps, x.device, clock)


def best_of(fn, reps: int, device, clock=time.perf_counter) -> float:
    """The fastest of `reps` calls of fn(), in seconds of `clock` (CUDA synchronised around each call)."""
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
    return best


def peak_rss_mb(impl: str, e: int, tokens: int, args) -> float:
    """Peak RSS of a fresh process doing a few steps of one implementation (includes the Python baseline)."""
    code = (
        "import sys, resource, torch; sys.argv=['x'];"
        "from benchmarks.bench_moe import build, step;"
        f"torch.set_num_threads({torch.get_num_threads()});"
        f"m=build('{impl}', {e}, {args.d_model}, {args.d_ff}, 'cpu');"
        f"x=torch.randn({tokens}, {args.d_model}, requires_grad=True); g=torch.randn_like(x);"
        "[step(m, x, g) for _ in range(3)];"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(impls: list[str], e: int, x, g, args, device) -> dict[str, list[float]]:
    """Seconds per round of each implementation at E experts (rounds interleaved, order rotated)."""
    torch.manual_seed(e)
    mods = {i: build(i, e, args.d_model, args.d_ff, device) for i in impls}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    per_round: dict[str, list[float]] = {i: [] for i in impls}
    with ctx:
        for m in mods.values():  # warm-up
            step(m, x, g)
        for r in range(args.rounds):
            names = impls[r % len(impls) :] + impls[: r % len(impls)]
            for i in names:
                per_round[i].append(time_steps(mods[i], x, g, args.reps, clock))
    return per_round


def routing_rows(args, device) -> list[list]:
    """Router matmul + top1_route forward and backward (gate and aux-loss gradients) vs the autograd reference."""
    rows = []
    for n in args.tokens:
        for e in args.experts:
            torch.manual_seed(e)
            x = torch.randn(n, args.d_model, device=device, requires_grad=True)
            router = nn.Linear(args.d_model, e, bias=False).to(device)
            gg = torch.randn(n, device=device)

            def run(fn):
                router.weight.grad = x.grad = None
                r = fn(router(x), 1.2, 4)
                ((r.gate * r.kept * gg).sum() + 0.01 * r.aux_loss).backward()

            fns = {"top1_route": top1_route, "reference": top1_route_reference}
            t = {k: [] for k in fns}
            for fn in fns.values():
                run(fn)
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    t[k].append(best_of(lambda: run(fn), args.reps, device))
            ratio = [a / b for a, b in zip(t["top1_route"], t["reference"])]
            rows.append([n, e, *(summary([1e3 * v for v in t[k]], ".3f") for k in fns), summary(ratio)])
    return rows


def summary(values: list[float], fmt: str = ".2f") -> str:
    """'median (min-max)'."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impls", nargs="+", default=["dense", "ideal", "native", "deepspeed"])
    ap.add_argument("--quick", action="store_true", help="4096 tokens, 3 rounds of 2 steps")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time (busy machines)")
    ap.add_argument("--memory", action="store_true", help="peak RSS per implementation (fresh subprocesses)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--routing", action="store_true", help="time the router alone: top1_route vs its reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds, args.reps = [4096], 3, 2
    device = torch.device(args.device)
    if args.routing:
        print(
            f"router + top1_route forward + backward, d_model {args.d_model}, {torch.get_num_threads()} threads; "
            f"median (min-max) over {args.rounds} interleaved rounds of best-of-{args.reps}\n"
        )
        header = ["tokens", "E", "top1_route ms", "reference ms", "top1_route/reference"]
        print(markdown_table(header, routing_rows(args, device)))
        return
    impls = [i for i in args.impls if i != "deepspeed" or _has_deepspeed()]
    base = "ideal" if "ideal" in impls else None
    print(
        f"device {device}, {torch.get_num_threads()} threads, d_model {args.d_model}, d_ff {args.d_ff}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, forward + backward, grads None each step, {args.clock} clock; "
        f"per cell: median (min-max) over {args.rounds} interleaved rounds of best-of-{args.reps} steps\n"
    )
    header = ["tokens", "E", *(f"{i} ms" for i in impls)]
    others = [i for i in impls if i not in ("dense", "ideal")]
    if base:
        header += [f"{i}/ideal" for i in others]
    if "native" in impls and "deepspeed" in impls:
        header.append("native/deepspeed")
    if args.memory:
        header += [f"{i} MB" for i in impls]
    rows, goal, fastest = [], [], []
    for n in args.tokens:
        torch.manual_seed(0)
        x = torch.randn(n, args.d_model, device=device, requires_grad=True)
        g = torch.randn_like(x)
        for e in args.experts:
            t = measure(impls, e, x, g, args, device)
            if n == args.tokens[-1]:
                fastest.append((e, t))
            row = [n, e, *(summary([1000 * v for v in t[i]]) for i in impls)]
            ratio = lambda a, b: [p / q for p, q in zip(t[a], t[b])]  # noqa: E731  per round
            if base:
                row += [summary(ratio(i, base)) for i in others]
            if "native" in impls and "deepspeed" in impls:
                row.append(summary(ratio("native", "deepspeed")))
                nat = statistics.median(ratio("native", "ideal")) if base else float("nan")
                goal.append((n, e, nat, statistics.median(ratio("native", "deepspeed"))))
            if args.memory:
                row += [f"{peak_rss_mb(i, e, n, args):.0f}" for i in impls]
            rows.append(row)
            print(f"  measured tokens {n}, E {e}", file=sys.stderr, flush=True)
    print(markdown_table(header, rows))
    paths = [i for i in ("padded", "grouped_mm", "grouped") if i in impls]
    if len(paths) > 1:
        best = [f"E {e}: {min(paths, key=lambda i: statistics.median(t[i]))}" for e, t in fastest]
        print(f"\nfastest native expert path (median; at the last token count): {', '.join(best)}")
    if goal:
        met = [f"{n}/{e}" for n, e, a, b in goal if a <= 1.10 and b <= 1.0]
        missed = [
            f"{n}/{e} ({a:.2f}x ideal, {b:.2f}x deepspeed)" for n, e, a, b in goal if not (a <= 1.10 and b <= 1.0)
        ]
        print(f"\ngoal native <= 1.10 x ideal and <= deepspeed (medians): met at tokens/E {', '.join(met) or 'none'}")
        if missed:
            print(f"missed at {', '.join(missed)}")


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("deepspeed not installed: skipping it")
        return False
    return True


if __name__ == "__main__":
    main()
