"""Does the MoE layer's training step read device values on the host? One line per expert path.

CUDA: forward + backward of MoELayer under torch.cuda.set_sync_debug_mode("error") (any synchronising call
raises). CPU: the same step under a TorchDispatchMode that records the aten ops that would synchronise on CUDA
(_local_scalar_dense, i.e. .item()/int(); nonzero; masked_select; bincount; boolean-mask indexing).

    python benchmarks/check_sync.py                   # d_model 1024, d_ff 4096, 8 and 64 experts, 16384 tokens
    python benchmarks/check_sync.py --quick           # d_model 64, d_ff 256, 512 tokens
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from smoe_lab.moe import MoELayer

SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.bincount", "aten.unique")


class RecordSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        indices = args[1] if len(args) > 1 and name.startswith(("aten.index.", "aten.index_put")) else []
        if name.startswith(SYNCING) or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def check(path: str, e: int, args, device) -> str:
    torch.manual_seed(0)
    layer = MoELayer(args.d_model, args.d_ff, e).to(device).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer.expert_path = path
    x = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        with amp:
            y = layer(x)
        (y.float().sum() + layer.aux_loss).backward()

    step()  # warm-up: first calls may initialise libraries
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as err:
            return f"SYNCS ({str(err).splitlines()[0][:100]})"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return "no host sync"
    with RecordSyncs() as rec:
        step()
    return "no host sync" if not rec.syncs else f"SYNCS ({', '.join(sorted(set(rec.syncs)))})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--paths", nargs="+", default=["padded", "grouped_mm", "grouped"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.d_model, args.d_ff, args.tokens = 64, 256, 512
    device = torch.device(args.device)
    how = "torch.cuda.set_sync_debug_mode('error')" if device.type == "cuda" else "aten ops recorded (CPU)"
    print(f"host syncs in MoELayer forward + backward, {device}, {args.tokens} tokens, {how}:")
    for path in args.paths:
        for e in args.experts:
            expect = " [by design this path reads the per-expert counts (.tolist(), invisible to the CPU op record)]"
            expect = expect if path == "grouped" else ""
            print(f"  path {path:<10} E {e:>3}: {check(path, e, args, device)}{expect}")


if __name__ == "__main__":
    main()
