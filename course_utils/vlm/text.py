"""A word-level tokenizer, small enough to read in one sitting, for the tiny text encoders.

Text is lowercased and split into runs of letters and digits; punctuation is dropped. Every
sequence starts with ``[CLS]`` so that no text encodes to zero tokens. Words that were not in
the training texts map to ``[UNK]``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Sequence

import torch

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN)
WORD_PATTERN = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lowercase ``text`` and return its words (runs of ``a-z`` and ``0-9``)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}: {text!r}.")
    return WORD_PATTERN.findall(text.lower())


class WordTokenizer:
    """Map texts to padded id tensors with a fixed word vocabulary.

    ``vocab`` lists the words; ids 0, 1 and 2 are always ``[PAD]``, ``[UNK]`` and ``[CLS]``.
    ``max_length`` counts the ``[CLS]`` token, and longer texts are truncated.
    """

    def __init__(self, vocab: Sequence[str], max_length: int = 32):
        vocab = list(vocab)
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with {list(SPECIAL_TOKENS)}, got {vocab[:3]}; build it with WordTokenizer.from_texts.")
        if len(set(vocab)) != len(vocab):
            duplicates = sorted(word for word, count in Counter(vocab).items() if count > 1)
            raise ValueError(f"vocab contains duplicate words {duplicates[:5]}; each word may appear once.")
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (the [CLS] token plus one word), got {max_length!r}.")
        self.vocab = vocab
        self.max_length = max_length
        self.word_to_id = {word: index for index, word in enumerate(vocab)}
        self.pad_id = self.word_to_id[PAD_TOKEN]
        self.unk_id = self.word_to_id[UNK_TOKEN]
        self.cls_id = self.word_to_id[CLS_TOKEN]

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_length: int = 32, min_count: int = 1) -> "WordTokenizer":
        """Build the vocabulary from ``texts``: every word seen at least ``min_count`` times, sorted."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(split_words(text))
        if not counts:
            raise ValueError("texts contain no words; pass the training captions.")
        words = sorted(word for word, count in counts.items() if count >= min_count)
        return cls(list(SPECIAL_TOKENS) + words, max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def to_config(self) -> dict[str, Any]:
        """Return what :meth:`from_config` needs to rebuild this tokenizer (JSON-serialisable)."""
        return {"vocab": list(self.vocab), "max_length": self.max_length}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "WordTokenizer":
        return cls(config["vocab"], max_length=config["max_length"])

    def encode_ids(self, text: str) -> list[int]:
        """Return ``[CLS]`` followed by the word ids of ``text``, truncated to ``max_length``."""
        ids = [self.cls_id] + [self.word_to_id.get(word, self.unk_id) for word in split_words(text)]
        return ids[: self.max_length]

    def __call__(self, texts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of texts.

        Returns ``input_ids`` (B, T) long and ``attention_mask`` (B, T) bool, where T is the
        longest encoded text in the batch and True marks a real token (False = padding).
        """
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("texts is empty; pass at least one text.")
        encoded = [self.encode_ids(text) for text in texts]
        length = max(len(ids) for ids in encoded)

        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros(len(encoded), length, dtype=torch.bool)  # (B, T)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = True
        return input_ids, attention_mask

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Return the words of ``ids`` joined by spaces, without special tokens."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return " ".join(self.vocab[i] for i in ids if self.vocab[i] not in (PAD_TOKEN, CLS_TOKEN))
