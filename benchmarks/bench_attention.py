"""Time the course's reference attention against PyTorch's fused kernels, side by side.

Compares, on the same inputs in one run:

- ``course_utils.vlm.attention.scaled_dot_product_attention`` vs
  ``torch.nn.functional.scaled_dot_product_attention``;
- ``MultiHeadCrossAttention`` vs ``nn.MultiheadAttention`` holding the same weights.

Each pair is timed alternately (reference, torch, reference, torch, ...) so that both see the
same machine load, and the median of the rounds is reported. The ratio is reference time /
torch time: 1.0 means equally fast, 1.2 means the reference takes 20% longer.

Usage::

    python benchmarks/bench_attention.py                 # CPU, float32, forward and backward
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16
    python benchmarks/bench_attention.py --quick --json results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from course_utils.vlm.attention import (  # noqa: E402
    MultiHeadCrossAttention,
    as_nn_multihead_attention,
    padding_mask,
    scaled_dot_product_attention,
    to_nn_multihead_attention_mask,
)

# (batch, heads, query_len, key_len, head_dim): the course's VQA model, a captioning-size
# cross-attention, and a long-context case.
SHAPES = [
    (64, 4, 8, 64, 16),
    (16, 8, 64, 256, 64),
    (4, 8, 512, 1024, 64),
]
QUICK_SHAPES = SHAPES[:2]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(function: Callable[[], None], device: torch.device, repeats: int) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    _synchronize(device)
    return (time.perf_counter() - start) / repeats


def time_pair(reference: Callable[[], None], library: Callable[[], None], device: torch.device, rounds: int, target_s: float) -> tuple[float, float]:
    """Return the median seconds per call of ``reference`` and ``library``, timed alternately."""
    for function in (reference, library):  # warm-up: allocator, kernels, autograd graph
        function()
        function()
    single = max(_time_once(reference, device, 1), _time_once(library, device, 1), 1e-6)
    repeats = max(1, int(target_s / single))
    reference_times, library_times = [], []
    for _ in range(rounds):
        reference_times.append(_time_once(reference, device, repeats))
        library_times.append(_time_once(library, device, repeats))
    return statistics.median(reference_times), statistics.median(library_times)


def _make_inputs(shape, device, dtype, grad):
    batch, heads, query_len, key_len, head_dim = shape
    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensor(*size):
        value = torch.randn(*size, generator=generator).to(device=device, dtype=dtype)
        return value.requires_grad_(grad)

    q, k, v = tensor(batch, heads, query_len, head_dim), tensor(batch, heads, key_len, head_dim), tensor(batch, heads, key_len, head_dim)
    lengths = torch.randint(key_len // 2, key_len + 1, (batch,), generator=generator)
    mask = padding_mask(lengths, key_len).to(device).unsqueeze(1)  # (B, 1, 1, Lk)
    return q, k, v, mask


def bench_sdpa(shape, device, dtype, backward, with_mask, rounds, target_s):
    q, k, v, mask = _make_inputs(shape, device, dtype, grad=backward)
    mask = mask if with_mask else None

    # A dense upstream gradient, as inside a network. output.sum().backward() would pass a
    # stride-0 gradient, which sends the batched matmuls of the backward pass down a slow path.
    upstream = torch.randn(q.shape[:-1] + v.shape[-1:], generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def run(function):
        def call():
            output = function(q, k, v, mask)
            if backward:
                output.backward(upstream)
        return call

    def reference(q, k, v, mask):
        return scaled_dot_product_attention(q, k, v, mask)

    def library(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    context = torch.enable_grad() if backward else torch.inference_mode()
    with context:
        return time_pair(run(reference), run(library), device, rounds, target_s)


def bench_module(shape, device, dtype, backward, with_mask, rounds, target_s):
    batch, heads, query_len, key_len, head_dim = shape
    d_model = heads * head_dim
    d_context = d_model // 2 * 3  # a different width, as image features have
    module = MultiHeadCrossAttention(d_model, heads, d_context).to(device=device, dtype=dtype)
    torch_module = as_nn_multihead_attention(module)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, query_len, d_model, generator=generator).to(device, dtype)
    context = torch.randn(batch, key_len, d_context, generator=generator).to(device, dtype)
    mask = None
    torch_mask = None
    if with_mask:
        lengths = torch.randint(key_len // 2, key_len + 1, (batch,), generator=generator)
        mask = padding_mask(lengths, key_len).to(device)  # (B, 1, Lk)
        torch_mask = to_nn_multihead_attention_mask(mask, heads, query_len)

    upstream = torch.randn(batch, query_len, d_model, generator=generator).to(device, dtype)  # dense, as in bench_sdpa

    def reference():
        output = module(x, context, mask)
        if backward:
            output.backward(upstream)

    def library():
        output, _ = torch_module(x, context, context, attn_mask=torch_mask, need_weights=False)
        if backward:
            output.backward(upstream)

    if not backward:
        module.eval()
        torch_module.eval()
    context_manager = torch.enable_grad() if backward else torch.inference_mode()
    with context_manager:
        return time_pair(reference, library, device, rounds, target_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"], help="tensor dtype")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per pair; the median is reported")
    parser.add_argument("--target-ms", type=float, default=100.0, help="approximate duration of one timing round, in milliseconds")
    parser.add_argument("--quick", action="store_true", help="only the two smaller shapes")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs (default: leave torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    target_s = args.target_ms / 1000
    print(f"torch {torch.__version__} | device {device} | dtype {args.dtype} | threads {torch.get_num_threads()} | {platform.processor() or platform.machine()}")
    print(f"{'what':<10} {'shape (B,H,Lq,Lk,d)':<24} {'mask':<5} {'pass':<9} {'reference ms':>13} {'torch ms':>10} {'ratio':>6}")

    results = []
    for what, bench in (("sdpa", bench_sdpa), ("module", bench_module)):
        for shape in shapes:
            for with_mask in (False, True):
                for backward in (False, True):
                    reference_s, library_s = bench(shape, device, dtype, backward, with_mask, args.rounds, target_s)
                    ratio = reference_s / library_s
                    pass_name = "fwd+bwd" if backward else "forward"
                    print(
                        f"{what:<10} {str(shape):<24} {'yes' if with_mask else 'no':<5} {pass_name:<9} "
                        f"{reference_s * 1e3:>13.3f} {library_s * 1e3:>10.3f} {ratio:>6.2f}"
                    )
                    results.append({
                        "what": what, "shape": list(shape), "mask": with_mask, "pass": pass_name,
                        "reference_ms": reference_s * 1e3, "torch_ms": library_s * 1e3, "ratio": ratio,
                    })

    ratios = [r["ratio"] for r in results]
    print(f"ratio: median {statistics.median(ratios):.2f}, max {max(ratios):.2f}; the torch side is "
          "F.scaled_dot_product_attention for 'sdpa' and nn.MultiheadAttention for 'module'.")
    if args.json:
        payload = {
            "torch": torch.__version__, "device": str(device), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "machine": platform.platform(), "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
