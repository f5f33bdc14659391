"""How many stage-2 steps does notebook 05's LLaVA recipe need? Held-out accuracy along one long run.

The script repeats notebook 05's ``cpu`` recipe outside the notebook. It uses the same
ShapesWorld and OpenMoji subsets and the same cached EfficientNet-Lite0 tokens pooled to 4x4.
Stage 1 trains the projector alone on emoji names and scene captions in turn. Stage 2 trains the
projector and LoRA adapters on ``q_proj`` and ``v_proj`` with six-turn question-answer chats.
SmolLM2 runs with eager attention and, on a CPU with bf16 instructions, under bf16 autocast.
Only the number of stage-2 steps changes (``--steps``), and the learning-rate schedule stretches
over them.

After the steps listed in ``--eval-at`` (by default every 140 steps, the notebook's
``stage2_steps``) and at the end, it answers the notebook's held-out questions (single turn,
greedy, first word against the answer). Each evaluation prints one markdown row: steps done,
stage-2 seconds so far, overall accuracy and accuracy per question type.

Two differences from the notebook remain. A row in the middle of a longer run comes from a
higher learning rate than a run of that length ends with. The notebook also builds a second
model for its "unfreeze the language model" demonstration, which draws from torch's random
generator before stage 2, so the LoRA adapters start from other random values here. A run with
``--steps 140`` can therefore land a few hundredths away from the notebook's accuracy.

Usage::

    python benchmarks/llava_learning_curve.py [--steps 560] [--eval-at 140 280 420] [--json FILE]
    python benchmarks/llava_learning_curve.py --steps 140 --eval-at     # the notebook's length only

Takes about 2.5 s per stage-2 step on a two-core CPU with bf16 instructions, plus a minute
for stage 1. The features are cached under ``data/cache/features`` (notebook 05 writes the same
files; the first run without them encodes the images).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_utils.apps import accuracy_by_type, first_word, language_model_autocast, shapes_conversation  # noqa: E402
from course_utils.data import load_openmoji, make_shapes_world  # noqa: E402
from course_utils.env import cpu_bf16_enabled, seed_everything  # noqa: E402
from course_utils.pretrained import cached_features, load_image_encoder, load_language_model  # noqa: E402
from course_utils.train import fit  # noqa: E402
from course_utils.vlm import llava  # noqa: E402

# Notebook 05's cpu profile, apart from the number of stage-2 steps.
RECIPE = dict(grid=4, shapes_train=1200, shapes_test=150, emoji_train=640, batch_size=16, turns=6, stage1_steps=60,
              stage1_lr=3e-3, stage2_steps=140, lr=3e-3, lora_rank=8, eval_questions=400)
EMOJI_PROMPT = "<image>\nWhat is this emoji?"
SCENE_PROMPT = "<image>\nDescribe the image."


def load_tokens(key: str, dataset, grid: int) -> torch.Tensor:
    encoder = {}

    def encode():
        if "model" not in encoder:
            encoder["model"] = load_image_encoder("cpu")
        return {"tokens": llava.pool_image_tokens(encoder["model"].encode(dataset["image"]).tokens, grid).half()}

    return cached_features(key, encode)["tokens"].float()


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; ``eval_at`` defaults to every notebook-length step count below ``steps``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=560,
                        help="stage-2 steps (default 560; notebook 05 cpu: 140). Each step took about 2.5 s on a "
                             "two-core CPU with bf16 instructions, so the default run takes about 25 minutes there")
    parser.add_argument("--eval-at", type=int, nargs="*", default=None,
                        help="also evaluate after these many stage-2 steps, each below --steps "
                             "(default: every 140 steps below --steps; give no value for none)")
    parser.add_argument("--seed", type=int, default=0, help="notebook 05 runs with the course seed 0")
    parser.add_argument("--json", type=Path,
                        help="also write the machine, the recipe and one row per evaluation (steps, stage-2 seconds, "
                             "accuracy overall and per question type) to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.eval_at is None:
        args.eval_at = list(range(RECIPE["stage2_steps"], args.steps, RECIPE["stage2_steps"]))
    bad = [step for step in args.eval_at if not 0 < step < args.steps]
    if bad:
        parser.error(f"--eval-at steps must lie between 1 and --steps - 1 = {args.steps - 1}, got {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    recipe = RECIPE
    grid, tokens_per_image = recipe["grid"], recipe["grid"] ** 2
    shapes_train = make_shapes_world(recipe["shapes_train"], split="train", seed=0)
    shapes_test = make_shapes_world(recipe["shapes_test"], split="test", seed=0)
    emoji_train = load_openmoji("train").shuffle(seed=0).select(range(recipe["emoji_train"]))
    train_tokens = load_tokens(f"llava-shapes-train-seed0-n{recipe['shapes_train']}-effnet-g{grid}", shapes_train, grid)
    test_tokens = load_tokens(f"llava-shapes-test-seed0-n{recipe['shapes_test']}-effnet-g{grid}", shapes_test, grid)
    emoji_tokens = load_tokens(f"llava-openmoji-train-shuffle0-n{recipe['emoji_train']}-effnet-g{grid}", emoji_train, grid)

    language_model, tokenizer = load_language_model("cpu", attn_implementation="eager")
    image_token_id = llava.image_placeholder_id(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    print(f"{platform.platform()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
          f"CPU bf16 autocast {'on' if cpu_bf16_enabled() else 'off'}")

    def to_batch(samples, image_tokens):
        batch = llava.pad_batch(samples, tokenizer.pad_token_id)
        batch["labels"] = llava.build_labels(batch["input_ids"], batch["answer_mask"], batch["attention_mask"], image_token_id)
        return batch["input_ids"], batch["attention_mask"], image_tokens, batch["labels"]

    def loss(batch):
        with language_model_autocast("cpu"):
            return model(*batch)

    seed_everything(args.seed)
    model = llava.MiniLlava(language_model, vision_dim=train_tokens.shape[-1], image_token_id=image_token_id)
    model.standardize.fit(torch.cat([emoji_tokens, train_tokens]).flatten(0, 1))
    stage1_rng = random.Random(args.seed)
    emoji_captions, scene_captions = emoji_train["caption"], shapes_train["captions"]

    def caption_batch(step):
        samples, features = [], []
        for position in range(recipe["batch_size"]):
            if position % 2 == 0:
                row = stage1_rng.randrange(len(emoji_train))
                prompt, caption, feature = EMOJI_PROMPT, emoji_captions[row], emoji_tokens[row]
            else:
                row = stage1_rng.randrange(len(shapes_train))
                prompt, caption, feature = SCENE_PROMPT, stage1_rng.choice(scene_captions[row]), train_tokens[row]
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]
            samples.append(llava.build_chat_prompt(tokenizer, messages, image_token_id, tokens_per_image))
            features.append(feature)
        return to_batch(samples, torch.stack(features))

    model.train()
    start = time.time()
    fit(loss, caption_batch, model.projector.parameters(), recipe["stage1_steps"], lr=recipe["stage1_lr"], desc="stage 1", progress=False)
    print(f"stage 1: {recipe['stage1_steps']} steps in {time.time() - start:.0f} s")

    records = [(row, question, answer, kind) for row, scene in enumerate(shapes_test)
               for question, answer, kind in zip(scene["questions"], scene["answers"], scene["question_types"])]
    random.Random(0).shuffle(records)  # the notebook's held-out questions, in the notebook's order
    records = records[: recipe["eval_questions"]]
    prompts = [llava.build_chat_prompt(tokenizer, [{"role": "user", "content": "<image>\n" + question}], image_token_id,
                                       tokens_per_image, add_generation_prompt=True).input_ids for _, question, _, _ in records]
    record_tokens = test_tokens[[row for row, _, _, _ in records]]

    clock = {"seconds": 0.0, "since": None}  # stage-2 training time, without the evaluations
    rows = []
    kinds = sorted({kind for _, _, _, kind in records})
    print("| stage-2 steps | stage-2 time (s) | accuracy | " + " | ".join(kinds) + " |")
    print("|---:|---:|---:|" + "---:|" * len(kinds))

    def evaluate(steps_done: int) -> None:
        clock["seconds"] += time.time() - clock["since"]
        model.eval()
        words = []
        for first in range(0, len(prompts), 64):
            input_ids, attention_mask, _ = llava.batch_for_generation(prompts[first:first + 64], tokenizer.pad_token_id)
            with language_model_autocast("cpu"):
                output = model.generate(input_ids, attention_mask, record_tokens[first:first + 64], 3, end_id)
            words += [first_word(tokenizer.decode(ids, skip_special_tokens=True)) for ids in output]
        table = accuracy_by_type(words, [a for _, _, a, _ in records], [k for _, _, _, k in records]).set_index("題型")
        row = {"steps": steps_done, "stage2_seconds": round(clock["seconds"], 1), "accuracy": float(table.loc["全部", "準確率"]),
               "by_type": {kind: float(table.loc[kind, "準確率"]) for kind in kinds}}
        rows.append(row)
        cells = " | ".join(f"{row['by_type'][kind]:.3f}" for kind in kinds)
        print(f"| {steps_done} | {row['stage2_seconds']:.0f} | {row['accuracy']:.4f} | {cells} |", flush=True)
        model.train()
        clock["since"] = time.time()

    model.add_lora(rank=recipe["lora_rank"], alpha=2 * recipe["lora_rank"])
    stage2_rng = random.Random(args.seed + 1)
    questions, answers = shapes_train["questions"], shapes_train["answers"]
    evaluate_at = set(args.eval_at)

    def conversation_batch(step):
        if step in evaluate_at:  # fit requests the batch of step k after k updates
            evaluate(step)
        scene_rows = [stage2_rng.randrange(len(shapes_train)) for _ in range(recipe["batch_size"])]
        # Only the text columns are read: indexing a scene row would also decode its image.
        samples = [llava.build_chat_prompt(tokenizer, shapes_conversation({"questions": questions[row], "answers": answers[row]},
                                                                          stage2_rng, recipe["turns"]),
                                           image_token_id, tokens_per_image) for row in scene_rows]
        return to_batch(samples, train_tokens[scene_rows])

    trainable = [p for p in model.parameters() if p.requires_grad]
    clock["since"] = time.time()
    fit(loss, conversation_batch, trainable, args.steps, lr=recipe["lr"], desc="stage 2", progress=False)
    evaluate(args.steps)
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__,
                                         "threads": torch.get_num_threads(), "cpu_bf16_autocast": cpu_bf16_enabled(),
                                         "recipe": recipe, "steps": args.steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
