"""Micro-benchmark: the course's CLIP loss against transformers' CLIP loss path, side by side.

``course_utils.vlm.clip.clip_loss`` is timed against the loss path of transformers'
``CLIPModel.forward`` (L2-normalize with ``_get_vector_norm``, scaled text-image logits,
``image_text_contrastive_loss``), forward plus backward, on the same inputs in the same
process. The two are timed in alternating rounds so that a busy machine slows both alike;
the reported time is the median over rounds, and ``ratio`` is course / transformers (below 1
means the course's version is faster).

Usage::

    python benchmarks/bench_clip_loss.py [--device cpu|cuda] [--quick] [--json FILE]

It prints a markdown table; ``--json`` also writes the rows (the format ``run_all.py`` reads).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_utils.vlm.clip import LOGIT_SCALE_INIT, clip_loss  # noqa: E402

BENCHMARK = "clip_loss"
# (batch, dim): a notebook-sized batch, a typical CLIP batch per device, a large one.
SIZES = [(64, 256), (256, 512), (1024, 512)]
QUICK_SIZES = [(64, 256)]


def transformers_loss_functions():
    """Return transformers' vector-norm and symmetric contrastive-loss functions of its CLIP model."""
    from transformers.models.clip import modeling_clip

    # transformers 5 renamed clip_loss to image_text_contrastive_loss.
    loss = getattr(modeling_clip, "image_text_contrastive_loss", None) or modeling_clip.clip_loss
    return modeling_clip._get_vector_norm, loss


def make_transformers_clip_loss():
    vector_norm, contrastive = transformers_loss_functions()

    def transformers_clip_loss(image_features, text_features, logit_scale):
        # The same steps as CLIPModel.forward with return_loss=True, after the two towers.
        image_embeds = image_features / vector_norm(image_features)
        text_embeds = text_features / vector_norm(text_features)
        logits_per_text = text_embeds @ image_embeds.t() * logit_scale.exp()  # (B, B)
        return contrastive(logits_per_text)

    return transformers_clip_loss


def make_inputs(batch: int, dim: int, device: torch.device, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(batch * 1000 + dim)
    image = torch.randn(batch, dim, generator=generator).to(device, dtype).requires_grad_()
    text = torch.randn(batch, dim, generator=generator).to(device, dtype).requires_grad_()
    scale = torch.tensor(LOGIT_SCALE_INIT, device=device, dtype=dtype, requires_grad=True)
    return image, text, scale


def forward_backward(loss_fn, image, text, scale):
    image.grad = text.grad = scale.grad = None
    loss = loss_fn(image, text, scale)
    loss.backward()
    return loss


def check_agreement(course_fn, library_fn, image, text, scale) -> float:
    """Return the largest absolute difference of loss and gradients; raise if they disagree."""
    course_loss = forward_backward(course_fn, image, text, scale)
    course_grads = [image.grad.clone(), text.grad.clone(), scale.grad.clone()]
    library_loss = forward_backward(library_fn, image, text, scale)
    library_grads = [image.grad.clone(), text.grad.clone(), scale.grad.clone()]
    differences = [(course_loss - library_loss).abs().max().item()]
    differences += [(a - b).abs().max().item() for a, b in zip(course_grads, library_grads)]
    tolerance = 1e-4 if image.dtype == torch.float32 else 5e-2
    if max(differences) > tolerance:
        raise AssertionError(f"clip_loss and transformers' loss path disagree: max difference {max(differences):.3g} > {tolerance:g}")
    return max(differences)


def time_side_by_side(functions: dict, inputs, rounds: int, min_run_time: float) -> dict[str, float]:
    """Return the median seconds per call of each function, timing them in alternating rounds."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            timer = benchmark.Timer(
                stmt="forward_backward(fn, image, text, scale)",
                globals={"forward_backward": forward_backward, "fn": fn, "image": inputs[0], "text": inputs[1], "scale": inputs[2]},
            )
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return {name: statistics.median(values) for name, values in samples.items()}


def run(device: torch.device, quick: bool = False) -> list[dict]:
    course_fn, library_fn = clip_loss, make_transformers_clip_loss()
    rows = []
    sizes = QUICK_SIZES if quick else SIZES
    rounds, min_run_time = (3, 0.05) if quick else (5, 0.2)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        for batch, dim in sizes:
            inputs = make_inputs(batch, dim, device, dtype)
            difference = check_agreement(course_fn, library_fn, *inputs)
            medians = time_side_by_side({"course": course_fn, "library": library_fn}, inputs, rounds, min_run_time)
            rows.append({
                "benchmark": BENCHMARK,
                "case": f"B={batch}, D={dim}, {str(dtype).replace('torch.', '')}, forward+backward",
                "device": str(device),
                "reference_ms": medians["course"] * 1e3,
                "library": "transformers CLIPModel loss path",
                "library_ms": medians["library"] * 1e3,
                "ratio": medians["course"] / medians["library"],
                "max_abs_diff": difference,
            })
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| benchmark | case | device | course (ms) | library | library (ms) | ratio course/library |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['benchmark']} | {row['case']} | {row['device']} | {row['reference_ms']:.3f} | {row['library']} "
            f"| {row['library_ms']:.3f} | {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to time on (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="one small size and short timing rounds (for tests)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested, but torch sees no CUDA device.")
    rows = run(device, quick=args.quick)
    print(f"# {BENCHMARK}: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(markdown_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
