#!/usr/bin/env python
"""Where the benchmark's decoder time goes on a GPU: kernels launched and GPU-busy time.

One training pass (``train_batches`` optimiser steps of the benchmark's fixed work) and one
beam-3 and one greedy decode of its 32 images for 20 steps, each timed (median of 3 after two
warm-ups) and then profiled once with ``torch.profiler``: ``kernels`` launched, ``kernel_busy_ms``
(the sum of their GPU times) against ``wall_ms``. Busy far under wall means the GPU waits for
the host to launch work (launch-bound); near wall, the kernels themselves are the cost::

    python scripts/profile_kernels.py --json profile.json [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import (FULL, build_decoder, decode_library, library_adam,  # noqa: E402
                       make_work, ours_loss, train_pass)


def measure(fn, device: torch.device, repeats: int = 3) -> dict[str, float]:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"wall_ms": sorted(times)[repeats // 2] * 1e3, "kernels": len(kernels),
            "kernel_busy_ms": sum(e.device_time for e in kernels) / 1e3}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=None, help="default 32 (the fixed work)")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit("profile_kernels: needs a CUDA device")
    s = replace(FULL, batch=args.batch) if args.batch else FULL
    work = make_work(s, device)
    decoder = build_decoder(s).to(device)
    optimizer = library_adam(decoder.parameters())
    out = {
        "train": {**measure(lambda: train_pass(decoder, optimizer, work, ours_loss), device),
                  "optimiser_steps": s.train_batches},
        "beam3": measure(lambda: decode_library(decoder, work.annotations, 3, s.steps), device),
        "greedy": measure(lambda: decode_library(decoder, work.annotations, 1, s.steps), device),
    }
    for name, figures in out.items():
        figures["busy_fraction"] = figures["kernel_busy_ms"] / figures["wall_ms"]
        print(name, json.dumps({k: round(v, 3) for k, v in figures.items()}))
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "batch": s.batch, **out}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
