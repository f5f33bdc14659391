"""Sweep the CLIP heads of notebook 01 on OpenMoji: held-out Recall@5 per setting and seed.

The heads align frozen EfficientNet-Lite0 image features and MiniLM sentence features of the
full OpenMoji split. These are the features notebook 01 caches in the ``cpu`` profile, and this
script computes them when the cache is empty. Each setting trains from scratch for every seed and reports
image-to-text and text-to-image Recall@5 on the held-out emoji, the figure notebook 01 asserts.

Usage::

    python benchmarks/sweep_openmoji_heads.py [--seeds 0 1 2] [--only SETTING ...] [--json FILE]

It prints one markdown row per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course_utils import seed_everything  # noqa: E402
from course_utils.data import load_openmoji  # noqa: E402
from course_utils.pretrained import cached_features, load_image_encoder, load_text_encoder  # noqa: E402
from course_utils.train import batch_indices, fit  # noqa: E402
from course_utils.vlm import clip  # noqa: E402

# name -> overrides of the defaults below; the first line is notebook 01's earlier cpu setting.
SETTINGS = {
    "hidden 512, dropout 0.1": {},
    "hidden 512, dropout 0.3": {"dropout": 0.3},
    "hidden 512, dropout 0.5": {"dropout": 0.5},
    "hidden 512, dropout 0.5, 800 steps": {"dropout": 0.5, "steps": 800},
    "hidden 1024, dropout 0.3": {"hidden": 1024, "dropout": 0.3},
    "hidden 2048, dropout 0.3": {"hidden": 2048, "dropout": 0.3},
    "linear, dropout 0.3": {"hidden": None, "dropout": 0.3},
    "linear, dropout 0.5, 800 steps": {"hidden": None, "dropout": 0.5, "steps": 800},
    "hidden 512, standardized image features": {"standardize": True},
    "hidden 512, text not projected": {"project_text": False},
}
DEFAULTS = {"steps": 400, "hidden": 512, "dim": 256, "dropout": 0.1, "weight_decay": 0.05, "lr": 1e-3, "batch": 256,
            "standardize": False, "project_text": True}


def openmoji_features() -> dict[str, dict[str, torch.Tensor]]:
    encoders = {}

    def encode(dataset):
        if not encoders:
            encoders["image"], encoders["text"] = load_image_encoder("cpu"), load_text_encoder("cpu")
        with torch.no_grad():
            image = encoders["image"].encode(list(dataset["image"])).pooled  # (N, 1280)
            text = encoders["text"].encode(list(dataset["caption"])).sentence  # (N, 384)
        return {"image": image.float().cpu(), "text": text.float().cpu()}

    features = {}
    for split in ("train", "test"):
        dataset = load_openmoji(split)
        # The key notebook 01 uses, so either one fills the cache for the other.
        key = f"openmoji-{split}-{len(dataset)}-64px-effnetlite0-pooled-minilm-sentence"
        features[split] = cached_features(key, lambda dataset=dataset: encode(dataset))
    return features


def recall_at_5(features, positives, seed: int, **overrides) -> tuple[float, float]:
    """Train one set of heads and return (image-to-text, text-to-image) Recall@5 on the held-out split."""
    settings = {**DEFAULTS, **overrides}
    train_image, train_text = features["train"]["image"].float(), features["train"]["text"].float()
    test_image, test_text = features["test"]["image"].float(), features["test"]["text"].float()
    if settings["standardize"]:
        mean, std = train_image.mean(0), train_image.std(0).clamp_min(1e-6)
        train_image, test_image = (train_image - mean) / std, (test_image - mean) / std
    config = clip.CLIPHeadsConfig(
        image_dim=train_image.shape[1], text_dim=train_text.shape[1],
        embed_dim=settings["dim"] if settings["project_text"] else train_text.shape[1],
        hidden_dim=settings["hidden"], dropout=settings["dropout"], project_text=settings["project_text"],
    )
    seed_everything(seed)
    heads = clip.CLIPHeads(config)
    next_batch = batch_indices(len(train_image), min(settings["batch"], len(train_image)), seed=seed)
    seed_everything(seed)
    heads.train()
    fit(lambda rows: heads.loss(train_image[rows], train_text[rows]), next_batch, heads.parameters(), settings["steps"],
        lr=settings["lr"], weight_decay=settings["weight_decay"], progress=False)
    heads.eval()
    with torch.no_grad():
        image, text = heads(test_image, test_text)
    recalls = clip.retrieval_recalls(clip.cosine_similarity_matrix(image, text), ks=(5,), positives=positives)
    return recalls["image_to_text"][5], recalls["text_to_image"][5]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per setting (default: 0 1 2)")
    parser.add_argument("--only", nargs="+", metavar="SETTING", choices=list(SETTINGS),
                        help="run only these settings, by their names in SETTINGS (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    features = openmoji_features()
    captions = load_openmoji("test")["caption"]
    positives = torch.tensor([[a == b for b in captions] for a in captions])  # equal names count as hits

    rows = []
    print("| setting | image-to-text R@5 per seed | text-to-image R@5 per seed |")
    print("|---|---|---|")
    for name, overrides in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        results = [recall_at_5(features, positives, seed, **overrides) for seed in args.seeds]
        rows.append({"setting": name, "overrides": overrides, "seeds": args.seeds,
                     "image_to_text_r5": [r[0] for r in results], "text_to_image_r5": [r[1] for r in results]})
        print(f"| {name} | {', '.join(f'{r[0]:.3f}' for r in results)} | {', '.join(f'{r[1]:.3f}' for r in results)} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
