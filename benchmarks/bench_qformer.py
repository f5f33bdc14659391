"""Time the course's Q-Former forward pass against transformers' ``Blip2QFormerModel``.

Both models get the same weights (copied with ``load_from_hf_qformer``), the same learned
queries, text tokens and image features, and run in inference mode. Two inputs are timed: the
queries alone (what BLIP-2 feeds the language model) and queries plus text under the ITM mask.
transformers is timed with its eager and its SDPA attention. The script prints the median time of
each and the ratio ours / transformers (above 1 = ours is slower).

Usage::

    python benchmarks/bench_qformer.py                 # CPU, batch 32
    python benchmarks/bench_qformer.py --device cuda --batch 128

Timings depend on the machine and on what else runs on it; report them with the hardware.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from course_utils.vlm.qformer import QFormer, load_from_hf_qformer, qformer_attention_mask, qformer_config_from_hf


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--queries", type=int, default=32, help="learned queries (default: 32, as in BLIP-2)")
    parser.add_argument("--image-tokens", type=int, default=49, help="image tokens per image (default: 49, a 7x7 grid)")
    parser.add_argument("--image-dim", type=int, default=1280, help="width of the image features (default: 1280, EfficientNet-Lite0)")
    parser.add_argument("--text-len", type=int, default=16, help="text tokens per caption (default: 16)")
    parser.add_argument("--hidden", type=int, default=256, help="Q-Former width (default: 256)")
    parser.add_argument("--layers", type=int, default=4, help="Q-Former layers (default: 4)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default: 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per model; the median is reported (default: 10)")
    return parser.parse_args()


def build_models(args: argparse.Namespace, attn_implementation: str):
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

    hf_config = Blip2QFormerConfig(
        vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, encoder_hidden_size=args.image_dim, cross_attention_frequency=2,
        max_position_embeddings=max(64, args.text_len), use_qformer_text_input=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    hf_config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    hf_qformer = Blip2QFormerModel(hf_config).eval().to(args.device)
    hf_embeddings = Blip2TextEmbeddings(hf_config).eval().to(args.device)
    query_tokens = 0.02 * torch.randn(1, args.queries, args.hidden, device=args.device)
    ours = QFormer(qformer_config_from_hf(hf_config, num_queries=args.queries)).eval().to(args.device)
    load_from_hf_qformer(ours, hf_qformer, query_tokens, hf_embeddings)
    return hf_qformer, hf_embeddings, query_tokens, ours


def median_seconds(run, device: str, repeats: int) -> float:
    for _ in range(2):  # warm-up
        run()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    generator = torch.Generator().manual_seed(1)
    image_features = torch.randn(args.batch, args.image_tokens, args.image_dim, generator=generator).to(args.device)
    input_ids = torch.randint(1, 1000, (args.batch, args.text_len), generator=generator).to(args.device)
    text_mask = torch.ones(args.batch, args.text_len, dtype=torch.bool, device=args.device)
    text_mask[: args.batch // 2, args.text_len // 2 :] = False  # half the captions are padded
    itm_mask = qformer_attention_mask("itm", args.queries, text_mask)  # (B, Q+T, Q+T)
    padding = torch.cat([torch.ones(args.batch, args.queries, dtype=torch.long, device=args.device), text_mask.long()], dim=1)

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; batch {args.batch}, "
          f"{args.queries} queries, {args.image_tokens}x{args.image_dim} image tokens, {args.text_len} text tokens, "
          f"hidden {args.hidden}, {args.layers} layers, {args.heads} heads")
    print(f"{'input':<18}{'transformers':<16}{'transformers ms':>16}{'ours ms':>10}{'ours / transformers':>22}")

    with torch.inference_mode():
        for attn_implementation in ("eager", "sdpa"):
            hf_qformer, hf_embeddings, query_tokens, ours = build_models(args, attn_implementation)
            queries = query_tokens.expand(args.batch, -1, -1)
            embeddings = hf_embeddings(input_ids=input_ids, query_embeds=queries)

            cases = {
                "queries only": (
                    lambda: hf_qformer(query_embeds=queries, encoder_hidden_states=image_features),
                    lambda: ours(image_features),
                ),
                "queries + text": (
                    lambda: hf_qformer(query_embeds=embeddings, query_length=args.queries, attention_mask=padding,
                                       encoder_hidden_states=image_features),
                    lambda: ours(image_features, input_ids, itm_mask),
                ),
            }
            for name, (run_hf, run_ours) in cases.items():
                hf_seconds = median_seconds(run_hf, args.device, args.repeats)
                ours_seconds = median_seconds(run_ours, args.device, args.repeats)
                print(f"{name:<18}{attn_implementation:<16}{hf_seconds * 1e3:>16.1f}{ours_seconds * 1e3:>10.1f}"
                      f"{ours_seconds / hf_seconds:>22.2f}")


if __name__ == "__main__":
    main()
