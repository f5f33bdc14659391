"""How much of ShapesWorld's question answering do notebook 05's frozen vision tokens allow?

Notebook 05 feeds SmolLM2 the frozen EfficientNet-Lite0 tokens of each scene, average-pooled from
7x7 to ``grid x grid``. This script measures what those tokens support at all, with no language
model in the way. A small transformer classifier reads an answer slot, the projected image
tokens with learned position embeddings, and the question words. It trains from scratch on the
training scenes and question-answer pairs of notebook 05's ``cpu`` profile and picks one answer
out of all answers. Its held-out accuracy per question type, next to the majority-answer
baseline, shows which question types the pooled tokens make learnable in a short run.

Usage::

    python benchmarks/probe_llava_features.py [--grids 2 4 7] [--steps 1500] [--json FILE]

The 7x7 tokens are cached under ``data/cache/features``; the first run encodes the scenes.
It prints one markdown row per grid.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_utils import seed_everything  # noqa: E402
from course_utils.apps import accuracy_by_type  # noqa: E402
from course_utils.data import make_shapes_world  # noqa: E402
from course_utils.pretrained import cached_features, load_image_encoder  # noqa: E402
from course_utils.vlm.llava import pool_image_tokens  # noqa: E402

MAX_QUESTION_WORDS = 12


def question_answers(scenes) -> list[tuple[int, str, str, str]]:
    """Return (scene row, question, answer, question type) for every question of every scene."""
    rows = []
    for row, (questions, answers, kinds) in enumerate(zip(scenes["questions"], scenes["answers"], scenes["question_types"])):
        rows += [(row, question, answer, kind) for question, answer, kind in zip(questions, answers, kinds)]
    return rows


def question_words(question: str) -> list[str]:
    return question.replace("?", "").split()


class AnswerProbe(nn.Module):
    """Transformer encoder that reads image tokens and question words and classifies the answer."""

    def __init__(self, num_image_tokens: int, vision_dim: int, vocab_size: int, num_answers: int,
                 width: int = 128, depth: int = 3, heads: int = 4):
        super().__init__()
        self.image_in = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, width))
        self.word_embedding = nn.Embedding(vocab_size, width, padding_idx=0)
        self.answer_slot = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1 + num_image_tokens + MAX_QUESTION_WORDS, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_answers)

    def forward(self, image_tokens: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
        batch = word_ids.shape[0]
        x = torch.cat([self.answer_slot.expand(batch, -1, -1), self.image_in(image_tokens), self.word_embedding(word_ids)], dim=1)
        padding = torch.cat([torch.zeros(batch, 1 + image_tokens.shape[1], dtype=torch.bool), word_ids == 0], dim=1)
        return self.head(self.encoder(x + self.position, src_key_padding_mask=padding)[:, 0])


def encode_scenes(scenes) -> dict[str, torch.Tensor]:
    encoder = load_image_encoder("cpu")
    images = scenes["image"]
    chunks = [encoder.encode(images[start:start + 100]).tokens.half() for start in range(0, len(images), 100)]
    return {"tokens": torch.cat(chunks)}


def probe_grid(grid, train_tokens, test_tokens, train_qa, test_qa, vocab, answers, steps, batch_size, seed):
    seed_everything(seed)
    answer_index = {answer: i for i, answer in enumerate(answers)}

    def tensors(rows):
        words = torch.zeros(len(rows), MAX_QUESTION_WORDS, dtype=torch.long)
        for i, (_, question, _, _) in enumerate(rows):
            ids = [vocab[w] for w in question_words(question)]
            words[i, : len(ids)] = torch.tensor(ids)
        scenes = torch.tensor([row for row, _, _, _ in rows])
        targets = torch.tensor([answer_index[answer] for _, _, answer, _ in rows])
        return words, scenes, targets

    train_tokens = pool_image_tokens(train_tokens, grid)
    test_tokens = pool_image_tokens(test_tokens, grid)
    words, scenes, targets = tensors(train_qa)
    test_words, test_scenes, _ = tensors(test_qa)
    model = AnswerProbe(grid * grid, train_tokens.shape[-1], len(vocab) + 1, len(answers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(words), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(train_tokens[scenes[batch]], words[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = [answers[i] for i in model(test_tokens[test_scenes], test_words).argmax(-1).tolist()]
    table = accuracy_by_type(predicted, [answer for _, _, answer, _ in test_qa], [kind for _, _, _, kind in test_qa])
    by_type, overall = {}, None
    for row in table.to_dict("records"):  # column names are the notebook-facing Chinese ones
        if row["題型"] == "全部":
            overall = row["準確率"]
        else:
            by_type[row["題型"]] = {"accuracy": row["準確率"], "majority": row["猜最常見答案"], "questions": row["題數"]}
    return {"grid": grid, "accuracy": overall, "by_type": by_type, "train_s": time.time() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[2, 4, 7], help="pooled grid sizes to probe (1 to 7)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per grid")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-scenes", type=int, default=1200, help="notebook 05's cpu profile uses 1200")
    parser.add_argument("--test-scenes", type=int, default=150, help="notebook 05's cpu profile uses 150")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if any(not 1 <= grid <= 7 for grid in args.grids):
        parser.error(f"--grids must lie in 1..7 (EfficientNet-Lite0 gives a 7x7 grid), got {args.grids}")

    train = make_shapes_world(args.train_scenes, split="train", seed=0)
    test = make_shapes_world(args.test_scenes, split="test", seed=0)
    train_tokens = cached_features(f"llava-probe-shapes-train-seed0-n{args.train_scenes}-effnet-g7", lambda: encode_scenes(train))["tokens"].float()
    test_tokens = cached_features(f"llava-probe-shapes-test-seed0-n{args.test_scenes}-effnet-g7", lambda: encode_scenes(test))["tokens"].float()
    train_qa, test_qa = question_answers(train), question_answers(test)
    vocab = {w: i + 1 for i, w in enumerate(sorted({w for _, q, _, _ in train_qa + test_qa for w in question_words(q)}))}
    answers = sorted({answer for _, _, answer, _ in train_qa + test_qa})

    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | {platform.platform()}")
    print(f"{len(train_qa)} training and {len(test_qa)} held-out questions; {args.steps} steps of {args.batch_size}")
    kinds = sorted({kind for _, _, _, kind in test_qa})
    print("| grid | tokens | all | " + " | ".join(kinds) + " | train (s) |")
    print("|---:|---:|---:|" + "---:|" * len(kinds) + "---:|")
    results = []
    for grid in args.grids:
        result = probe_grid(grid, train_tokens, test_tokens, train_qa, test_qa, vocab, answers, args.steps, args.batch_size, args.seed)
        results.append(result)
        cells = " | ".join(f"{result['by_type'][k]['accuracy']:.3f} ({result['by_type'][k]['majority']:.2f})" for k in kinds)
        print(f"| {grid} | {grid * grid} | {result['accuracy']:.3f} | {cells} | {result['train_s']:.0f} |", flush=True)
    print("Each type cell: probe accuracy (majority-answer baseline).")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "machine": platform.platform(), "steps": args.steps,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
