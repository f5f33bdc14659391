"""Time one training step of notebook 05's LLaVA model (SmolLM2-135M with LoRA) per precision and attention.

Each setting runs the same batch: ``--batch`` conversations of ``--length`` tokens (the first
``--image-tokens`` are image placeholders, a few right-padded rows), loss on a few answer
positions, forward and backward. Settings:

- precision: ``fp32``, or ``bf16`` (``torch.autocast`` on the CPU, parameters stay float32).
  bf16 is skipped, with a note, on a CPU without bf16 matrix instructions, where it is emulated.
- attention: transformers' ``sdpa`` (PyTorch's fused kernel) or ``eager`` (plain matrix products).

Prints the median seconds per step and each setting's speed-up over fp32 + sdpa.

    python benchmarks/bench_llava_step.py
    python benchmarks/bench_llava_step.py --length 86

It compares settings of one model, not the course against a library, so it prints its table
only (``run_all.py`` keeps that output) and has no ``--json`` option.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch

from course_utils.env import cpu_has_native_bf16
from course_utils.pretrained import load_language_model
from course_utils.vlm import llava


def make_batch(batch: int, length: int, image_tokens: int, image_token_id: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(100, 20000, (batch, length), generator=generator)
    input_ids[:, 3 : 3 + image_tokens] = image_token_id
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[: batch // 4, length - length // 8 :] = 0  # a quarter of the rows are right-padded
    labels = torch.full((batch, length), llava.IGNORE_INDEX)
    answers = torch.arange(length // 2, length - length // 8, 10)
    labels[:, answers] = input_ids[:, answers]
    features = torch.randn(batch, image_tokens, 1280, generator=generator)
    return input_ids, attention_mask, labels, features


def time_setting(precision: str, attention: str, args, batch) -> float:
    language_model, tokenizer = load_language_model("cpu", attn_implementation=attention)
    model = llava.MiniLlava(language_model, vision_dim=1280, image_token_id=llava.image_placeholder_id(tokenizer))
    model.add_lora(rank=args.rank, alpha=2 * args.rank, target_modules=args.targets.split(","))
    model.train()
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    input_ids, attention_mask, labels, features = batch

    def step() -> None:
        with context():
            loss = model(input_ids, attention_mask, features, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="conversations per step (notebook 05 cpu: 16)")
    parser.add_argument("--length", type=int, default=130, help="tokens per conversation (notebook 05 cpu: about 130)")
    parser.add_argument("--image-tokens", type=int, default=16, help="image tokens per conversation (4x4 grid: 16)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (notebook 05: 8)")
    parser.add_argument("--targets", default="q_proj,v_proj",
                        help="comma-separated LoRA target modules (notebook 05: q_proj,v_proj)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.length <= args.image_tokens + 8:
        parser.error(f"--length {args.length} leaves no room for text after {args.image_tokens} image tokens; "
                     f"use at least {args.image_tokens + 9}.")

    torch.manual_seed(0)
    _, tokenizer = load_language_model("cpu")
    batch = make_batch(args.batch, args.length, args.image_tokens, llava.image_placeholder_id(tokenizer))
    native_bf16 = cpu_has_native_bf16()
    print(f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU bf16 instructions: {'yes' if native_bf16 else 'no'}")
    print(f"batch {args.batch} x {args.length} tokens ({args.image_tokens} image tokens), "
          f"LoRA rank {args.rank} on {args.targets}")

    rows = []
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not native_bf16:
            print("bf16: skipped, this CPU has no bf16 matrix instructions (autocast would emulate them)")
            continue
        for attention in ("sdpa", "eager"):
            seconds = time_setting(precision, attention, args, batch)
            rows.append({"precision": precision, "attention": attention, "seconds_per_step": seconds})
            print(f"{precision:>5} + {attention:<6} {seconds:7.3f} s/step", flush=True)
    baseline = rows[0]["seconds_per_step"]
    for row in rows:
        row["speedup_vs_fp32_sdpa"] = baseline / row["seconds_per_step"]
    print("speed-up over fp32 + sdpa: " + ", ".join(
        f"{row['precision']} + {row['attention']} {row['speedup_vs_fp32_sdpa']:.2f}x" for row in rows))


if __name__ == "__main__":
    main()
