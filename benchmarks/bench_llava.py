"""Time the course's LLaVA projector + feature merge against transformers' on the same shapes.

Both sides get the same vision tokens, the same token ids and the same projector weights:

- course: ``LlavaProjector`` then ``merge_image_features`` (boolean-index assignment on a copy).
- transformers: ``LlavaMultiModalProjector`` then ``LlavaModel.get_placeholder_mask`` and
  ``masked_scatter``, the path ``LlavaModel.forward`` takes once image features exist.

The outputs are compared first, so the timing never compares two different computations.
Prints the median time of each side and their ratio (course / transformers).

    python benchmarks/bench_llava.py                   # the course's shapes (7x7 EfficientNet grid, SmolLM2 width)
    python benchmarks/bench_llava.py --tokens 576 --vision-dim 1024 --text-dim 1024 --batch 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaModel

from course_utils.vlm.llava import LlavaProjector, merge_image_features


def median_seconds(functions, repeats: int, warmup: int) -> list[float]:
    """Time each function ``repeats`` times, alternating between them so that load on a shared
    machine affects both sides alike; returns each one's median in seconds."""
    for _ in range(warmup):
        for function in functions:
            function()
    timings: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            timings[index].append(time.perf_counter() - start)
    return [statistics.median(values) for values in timings]


def build_transformers_llava(vision_dim: int, text_dim: int, image_token_id: int, vocab_size: int) -> LlavaModel:
    # Both towers have one small layer: only the projector and get_placeholder_mask are timed.
    vision = CLIPVisionConfig(hidden_size=vision_dim, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                              image_size=16, patch_size=8)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id)
    return LlavaModel(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images per batch (one image per sample)")
    parser.add_argument("--tokens", type=int, default=49, help="visual tokens per image")
    parser.add_argument("--text-tokens", type=int, default=32, help="text tokens per sample besides the image")
    parser.add_argument("--vision-dim", type=int, default=1280, help="width of the vision tokens")
    parser.add_argument("--text-dim", type=int, default=576, help="hidden width of the language model")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per side (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per side before timing")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    vocab_size, image_token_id = 1000, 999
    hf_model = build_transformers_llava(args.vision_dim, args.text_dim, image_token_id, vocab_size).to(device)
    hf_projector = hf_model.multi_modal_projector
    projector = LlavaProjector(args.vision_dim, args.text_dim, kind="mlp").to(device).eval()
    projector.load_state_dict(hf_projector.state_dict())

    length = args.tokens + args.text_tokens
    input_ids = torch.randint(0, image_token_id, (args.batch, length), device=device)
    input_ids[:, 2 : 2 + args.tokens] = image_token_id  # the image follows two prompt tokens
    vision_tokens = torch.randn(args.batch, args.tokens, args.vision_dim, device=device)
    text_embeds = torch.randn(args.batch, length, args.text_dim, device=device)

    def course_path() -> torch.Tensor:
        return merge_image_features(text_embeds, input_ids, projector(vision_tokens), image_token_id)

    def transformers_path() -> torch.Tensor:
        features = hf_projector(vision_tokens).reshape(-1, args.text_dim)
        mask = hf_model.get_placeholder_mask(input_ids, inputs_embeds=text_embeds, image_features=features[None])
        return text_embeds.masked_scatter(mask, features)

    def synchronized(function):
        def run():
            output = function()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return output
        return run

    with torch.no_grad():
        torch.testing.assert_close(course_path(), transformers_path())
        course, reference = median_seconds([synchronized(course_path), synchronized(transformers_path)], args.repeats, args.warmup)

    print(f"shapes: batch={args.batch}, visual tokens={args.tokens}, sequence={length}, "
          f"vision_dim={args.vision_dim}, text_dim={args.text_dim}, device={device}, threads={torch.get_num_threads()}")
    print(f"{'path':<34}{'median ms':>12}")
    print(f"{'course (LlavaProjector + merge)':<34}{course * 1e3:>12.3f}")
    print(f"{'transformers (projector + scatter)':<34}{reference * 1e3:>12.3f}")
    print(f"ratio course / transformers: {course / reference:.2f}")


if __name__ == "__main__":
    main()
