"""Checkers of notebook 01: CLIP's contrastive loss, zero-shot classification, Recall@K.

Each checker compares the learner's function with the reference in ``course_utils.vlm.clip``
on several cases. When a result is wrong, the checker also recomputes the typical mistakes of
the topic (one direction only, a side not normalized, the temperature applied the wrong way,
...) and names the one that matches, so the hint points at the actual slip.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from course_utils.checks.base import Case, CaseFailure, checker, describe, expect_close, expect_tensor, fail
from course_utils.vlm import clip as reference

INIT = reference.LOGIT_SCALE_INIT


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _matches(got: Any, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    if not isinstance(got, (torch.Tensor, int, float)):
        return False
    got_tensor = torch.as_tensor(got).detach().to("cpu", torch.float64)
    expected_tensor = expected.detach().to("cpu", torch.float64)
    return got_tensor.shape == expected_tensor.shape and bool(
        torch.allclose(got_tensor, expected_tensor, atol=atol, rtol=rtol)
    )


def _expect_with_diagnosis(
    got: Any,
    expected: torch.Tensor,
    what: str,
    mistakes: dict[str, tuple[torch.Tensor, str]],
    default_hint: str,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Like ``expect_close``, but when ``got`` equals a known wrong variant, use that variant's hint."""
    if _matches(got, expected, atol, rtol):
        return
    hint = default_hint
    for wrong_value, mistake_hint in mistakes.values():
        if _matches(got, wrong_value, atol, rtol):
            hint = mistake_hint
            break
    expect_close(got, expected, what, hint=hint, atol=atol, rtol=rtol)


def _expect_value_error(call: Callable[[], Any], situation: str, hint: str) -> None:
    try:
        result = call()
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as error:  # the learner raised, but not the promised type
        fail(f"{situation}時丟出 ValueError", f"{type(error).__name__}: {error}", hint)
    fail(f"{situation}時丟出 ValueError", f"沒有丟出例外，回傳 {describe(result)}", hint)


# ---------------------------------------------------------------------------------------------
# clip_loss
# ---------------------------------------------------------------------------------------------


def _loss_variants(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> dict[str, tuple[torch.Tensor, str]]:
    """Typical wrong CLIP losses for these inputs, each with the hint that names the slip."""
    targets = torch.arange(image.shape[0])
    image_n, text_n = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    scale = logit_scale.detach().exp().clamp(max=reference.MAX_LOGIT_SCALE)

    def loss(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor | float, both: bool = True, reduce: str = "mean") -> torch.Tensor:
        logits = s * a @ b.T
        i2t, t2i = F.cross_entropy(logits, targets), F.cross_entropy(logits.T, targets)
        if not both:
            return i2t
        return (i2t + t2i) / 2 if reduce == "mean" else i2t + t2i

    with torch.no_grad():
        logits = scale * image_n @ text_n.T
        return {
            "image_to_text_only": (F.cross_entropy(logits, targets), "你只算了 image→text 一個方向；CLIP 的損失是兩個方向（對 logits 和 logits.T 各做一次 cross-entropy）的平均。"),
            "text_to_image_only": (F.cross_entropy(logits.T, targets), "你只算了 text→image 一個方向；CLIP 的損失是兩個方向的平均。"),
            "targets_all_zero": (
                (F.cross_entropy(logits, torch.zeros_like(targets)) + F.cross_entropy(logits.T, torch.zeros_like(targets))) / 2,
                "答案（target）不是 0：第 i 張影像的正確文字是第 i 段，用 torch.arange(B)。",
            ),
            "targets_reversed": (
                (F.cross_entropy(logits, targets.flip(0)) + F.cross_entropy(logits.T, targets.flip(0))) / 2,
                "答案（target）在對角線上：第 i 張影像對第 i 段文字，用 torch.arange(B)，不要反轉或位移。",
            ),
            "sum_of_directions": (loss(image_n, text_n, scale, reduce="sum"), "兩個方向的損失要取平均（除以 2），不是相加。"),
            "no_normalization": (loss(image, text, scale), "影像和文字特徵都要先做 L2 正規化（沿最後一維），相似度才是 cosine。"),
            "image_not_normalized": (loss(image, text_n, scale), "影像特徵沒有做 L2 正規化；兩邊都要正規化。"),
            "text_not_normalized": (loss(image_n, text, scale), "文字特徵沒有做 L2 正規化；兩邊都要正規化。"),
            "scale_not_exponentiated": (loss(image_n, text_n, logit_scale.detach()), "logit_scale 存的是對數，乘上去之前要先取 exp()。"),
            "divided_by_scale": (loss(image_n, text_n, 1 / scale), "溫度的用法反了：logits 要乘以 exp(logit_scale)（也就是除以溫度 τ），不是除以 exp(logit_scale)。"),
            "divided_by_log_scale": (loss(image_n, text_n, 1 / logit_scale.detach()), "logits 要乘以 exp(logit_scale)，不是除以 logit_scale。"),
            "no_scale": (loss(image_n, text_n, 1.0), "忘了乘上 exp(logit_scale)：沒有溫度，cosine 只在 [-1, 1]，softmax 幾乎是均勻分布。"),
            "not_clamped": (loss(image_n, text_n, logit_scale.detach().exp()), "exp(logit_scale) 要 clamp 在 100 以內（例如 .clamp(max=100)）。"),
            "clamped_in_log_space_at_100": (
                loss(image_n, text_n, logit_scale.detach().clamp(max=reference.MAX_LOGIT_SCALE).exp()),
                "上限 100 是給 exp(logit_scale) 的，不是給 logit_scale 本身的（對數空間的上限是 ln 100）。",
            ),
        }


def _features(generator: torch.Generator, batch: int, dim: int, dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random features whose rows have very different lengths, so a missing normalization shows."""
    image = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    text = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    image = image * torch.linspace(0.3, 4.0, batch, dtype=torch.float64).unsqueeze(1)
    text = text * torch.linspace(3.0, 0.5, batch, dtype=torch.float64).unsqueeze(1)
    return image.to(device=device, dtype=dtype), text.to(device=device, dtype=dtype)


@checker("clip_loss", "CLIP 對比損失（InfoNCE）", points=3.0)
def check_clip_loss(clip_loss):
    """Check ``clip_loss(image_features, text_features, logit_scale)`` against the reference."""
    generator = torch.Generator().manual_seed(1234)
    hint = "依序檢查：L2 正規化兩邊、相似度矩陣乘上 exp(logit_scale)（clamp 在 100）、對角線是答案、兩個方向的 cross-entropy 取平均。"

    def compare(image: torch.Tensor, text: torch.Tensor, logit_value: float, what: str, atol: float = 1e-5) -> None:
        logit_scale = torch.tensor(logit_value, dtype=image.dtype, device=image.device)
        got = clip_loss(image, text, logit_scale)
        expected = reference.clip_loss(image, text, logit_scale)
        cpu = (image.cpu().double(), text.cpu().double(), logit_scale.cpu().double())
        _expect_with_diagnosis(got, expected, what, _loss_variants(*cpu), hint, atol=atol)

    def two_pairs():
        image = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        text = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
        compare(image, text, 0.0, "logit_scale=0（溫度 1）時 2 對特徵的損失")

    def random_batch_init_scale():
        image, text = _features(generator, 8, 16)
        compare(image, text, INIT, "8 對隨機特徵、logit_scale=ln(1/0.07) 的損失")

    def targets_on_diagonal():
        # Text i is a noisy copy of image i, so only the diagonal makes the loss small.
        image = torch.randn(6, 10, generator=generator)
        text = image + 0.05 * torch.randn(6, 10, generator=generator)
        compare(image, text, INIT, "配對特徵幾乎相同時的損失（應該很小）")
        got = clip_loss(image, text, torch.tensor(INIT))
        if float(got) > 1.0:
            fail("配對正確時損失很小（< 1）", describe(got), "答案（target）是對角線：第 i 張影像對第 i 段文字，用 torch.arange(B)。")

    def different_scales():
        image, text = _features(generator, 5, 12)
        compare(image, text, 1.0, "logit_scale=1.0 的損失")
        compare(image, text, math.log(50.0), "logit_scale=ln(50)（還沒到上限）的損失")

    def clamped_at_100():
        image, text = _features(generator, 6, 8)
        compare(image, text, math.log(1000.0), "logit_scale=ln(1000)（exp 超過上限 100）的損失")

    def rectangular_features():
        image, text = _features(generator, 3, 40)
        compare(image, text, INIT, "3 對、40 維特徵（B 比 D 小）的損失")

    def gradients_match():
        image, text = _features(generator, 6, 8, dtype=torch.float64)
        image.requires_grad_(True)
        text.requires_grad_(True)
        logit_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        got = expect_tensor(clip_loss(image, text, logit_scale), "回傳的損失")
        if not got.requires_grad:
            fail("損失可以反向傳播（requires_grad=True）", "回傳的張量沒有梯度", "不要用 .item()、.detach() 或 torch.no_grad()；回傳張量本身。")
        got.backward()
        image_ref = image.detach().clone().requires_grad_(True)
        text_ref = text.detach().clone().requires_grad_(True)
        scale_ref = logit_scale.detach().clone().requires_grad_(True)
        reference.clip_loss(image_ref, text_ref, scale_ref).backward()
        if logit_scale.grad is None:
            fail("logit_scale 有梯度（它是要學習的參數）", "logit_scale.grad 是 None", "用張量運算 logit_scale.exp()，不要用 math.exp(logit_scale.item())。")
        expect_close(image.grad, image_ref.grad, "影像特徵的梯度", hint="值對但梯度不對：檢查有沒有用到 .detach() 或就地修改。")
        expect_close(text.grad, text_ref.grad, "文字特徵的梯度")
        expect_close(logit_scale.grad, scale_ref.grad, "logit_scale 的梯度", hint="溫度要經過 exp()，而且在 clamp 上限以下時梯度要能流回 logit_scale。")

    def float64_inputs():
        image, text = _features(generator, 4, 6, dtype=torch.float64)
        compare(image, text, INIT, "float64 特徵的損失", atol=1e-10)

    def inputs_unchanged():
        image, text = _features(generator, 4, 6)
        before = (image.clone(), text.clone())
        clip_loss(image, text, torch.tensor(INIT))
        if not (torch.equal(image, before[0]) and torch.equal(text, before[1])):
            fail("輸入的特徵保持不變", "特徵被就地（in-place）修改了", "用 F.normalize 或 x / x.norm(...) 產生新張量，不要寫 x /= ...。")

    def mismatched_shapes():
        image, text = _features(generator, 4, 6)
        _expect_value_error(
            lambda: clip_loss(image, text[:3], torch.tensor(INIT)),
            "影像 4 筆、文字 3 筆",
            "先比較 image_features.shape 和 text_features.shape，不同就 raise ValueError（說明兩個形狀）。",
        )

    def batch_of_one():
        image, text = _features(generator, 1, 6)
        _expect_value_error(
            lambda: clip_loss(image, text, torch.tensor(INIT)),
            "batch 只有 1 對",
            "只有一對時沒有負樣本，損失永遠是 0；batch < 2 要 raise ValueError。",
        )

    cases = [
        Case("2 對特徵、溫度 1", two_pairs),
        Case("8 對隨機特徵、初始 logit_scale", random_batch_init_scale),
        Case("目標在對角線", targets_on_diagonal),
        Case("不同的 logit_scale", different_scales),
        Case("exp(logit_scale) clamp 在 100", clamped_at_100),
        Case("B 小於特徵維度", rectangular_features),
        Case("梯度（特徵與 logit_scale）", gradients_match),
        Case("float64 輸入", float64_inputs),
        Case("不修改輸入", inputs_unchanged),
        Case("形狀不合時丟 ValueError", mismatched_shapes),
        Case("batch 為 1 時丟 ValueError", batch_of_one),
    ]
    for device in _devices()[1:]:
        def on_device(device=device):
            image, text = _features(generator, 8, 16, device=device)
            compare(image, text, INIT, f"在 {device} 上的損失")
        cases.append(Case(f"在 {device} 上執行", on_device))
    return cases


# ---------------------------------------------------------------------------------------------
# Zero-shot classification with prompt ensembling
# ---------------------------------------------------------------------------------------------


class _FakeTextEncoder:
    """A deterministic stand-in for a text tower: each known string maps to a fixed vector.

    The vectors have very different lengths, so skipping a normalization changes the result.
    It records every text it was asked to encode.
    """

    def __init__(self, texts: list[str], dim: int, seed: int, device: torch.device = torch.device("cpu")):
        generator = torch.Generator().manual_seed(seed)
        self.table = {}
        for index, text in enumerate(texts):
            length = 0.2 + 5.0 * ((index * 7919) % 13) / 12
            self.table[text] = torch.randn(dim, generator=generator) * length
        self.device = device
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            fail("encode_fn 收到一串文字（list[str]）", f"收到單一字串 {texts!r}", "把所有 prompt 放進一個 list 再呼叫 encode_fn。")
        unknown = [text for text in texts if text not in self.table]
        if unknown:
            fail(
                f"encode_fn 只收到由模板產生的文字，例如 {next(iter(self.table))!r}",
                f"收到 {unknown[0]!r}",
                "用 template.format(class_name) 把類別名稱填進模板的 {}。",
            )
        self.seen.extend(texts)
        return torch.stack([self.table[text] for text in texts]).to(self.device)


def _class_embedding_variants(templates, class_names, encoder) -> dict[str, tuple[torch.Tensor, str]]:
    raw = torch.stack([torch.stack([encoder.table[t.format(c)] for t in templates]) for c in class_names]).double()  # (C, T, D)
    return {
        "no_renormalization": (F.normalize(raw, dim=-1).mean(1), "平均後的向量長度小於 1：prompt ensembling 平均完要再做一次 L2 正規化。"),
        "no_prompt_normalization": (F.normalize(raw.mean(1), dim=-1), "每個 prompt 的 embedding 要先各自 L2 正規化再平均，否則長度大的 prompt 會主導結果。"),
        "no_normalization_at_all": (raw.mean(1), "每個 prompt 的 embedding 要先正規化、平均，再正規化一次。"),
        "first_template_only": (F.normalize(raw[:, 0], dim=-1), "只用了第一個模板；要把所有模板的結果平均。"),
    }


@checker("zero_shot", "零樣本分類：prompt ensembling 與 cosine 相似度", points=2.0)
def check_zero_shot(build_class_embeddings, zero_shot_logits):
    """Check ``build_class_embeddings(templates, class_names, encode_fn)`` and ``zero_shot_logits(image_features, class_embeddings)``."""
    generator = torch.Generator().manual_seed(99)
    class_names = ["red", "green", "blue", "yellow", "purple"]
    templates = ["a {} circle", "a small {} square", "a picture of a {} triangle", "a large {} diamond"]
    texts = [t.format(c) for c in class_names for t in templates]

    def embeddings_case(templates_used, names, what, device=torch.device("cpu")):
        encoder = _FakeTextEncoder([t.format(c) for c in names for t in templates_used], dim=12, seed=7, device=device)
        got = expect_tensor(build_class_embeddings(templates_used, names, encoder), "build_class_embeddings 的回傳值")
        reference_encoder = _FakeTextEncoder([t.format(c) for c in names for t in templates_used], dim=12, seed=7, device=device)
        expected = reference.build_class_embeddings(templates_used, names, reference_encoder)
        if tuple(got.shape) != tuple(expected.shape):
            fail(f"形狀 (類別數, 特徵維度) = {tuple(expected.shape)}", f"形狀 {tuple(got.shape)}", "每個類別一列：把同一類的所有模板平均成一個向量。")
        if str(got.device) != str(expected.device):
            fail(f"結果在 {expected.device} 上", f"結果在 {got.device} 上", "不要把結果搬到別的 device。")
        _expect_with_diagnosis(got, expected, what, _class_embedding_variants(templates_used, names, encoder),
                               "每個 prompt 先 L2 正規化，同一類別的模板取平均，再 L2 正規化一次；列的順序跟 class_names 一樣。")
        return encoder

    def single_template():
        embeddings_case(["a photo of a {}"], class_names[:3], "只有一個模板時的類別 embedding")

    def ensemble_of_templates():
        encoder = embeddings_case(templates, class_names, "4 個模板 × 5 個類別的類別 embedding")
        missing = sorted(set(texts) - set(encoder.seen))
        if missing:
            fail("每個模板和每個類別的組合都送進 encode_fn", f"少了 {missing[0]!r} 等 {len(missing)} 個", "兩層迴圈：每個類別 × 每個模板。")

    def unit_length_rows():
        encoder = _FakeTextEncoder(texts, dim=12, seed=3)
        got = expect_tensor(build_class_embeddings(templates, class_names, encoder), "build_class_embeddings 的回傳值")
        norms = got.detach().double().norm(dim=-1)
        expect_close(norms, torch.ones(len(class_names), dtype=torch.float64), "每個類別 embedding 的長度",
                     hint="平均之後要再 L2 正規化一次，長度才會回到 1。")

    def class_order():
        names = list(reversed(class_names))
        embeddings_case(templates[:2], names, "類別順序顛倒時的類別 embedding")

    def logits_are_cosine():
        images = torch.randn(7, 12, generator=generator) * torch.linspace(0.2, 6.0, 7).unsqueeze(1)
        classes = torch.randn(5, 12, generator=generator) * torch.linspace(3.0, 0.5, 5).unsqueeze(1)
        got = zero_shot_logits(images, classes)
        expected = reference.zero_shot_logits(images, classes)
        variants = {
            "images_not_normalized": (images @ F.normalize(classes, dim=-1).T, "影像特徵也要 L2 正規化，分數才是 cosine 相似度。"),
            "classes_not_normalized": (F.normalize(images, dim=-1) @ classes.T, "類別 embedding 也要 L2 正規化（不要假設它已經是單位長度）。"),
            "no_normalization": (images @ classes.T, "兩邊都要 L2 正規化，分數才是 cosine 相似度。"),
            "transposed": (expected.T, "形狀應該是 (影像數, 類別數)：image_features @ class_embeddings.T。"),
        }
        _expect_with_diagnosis(got, expected, "zero_shot_logits 的 (7, 5) 分數", variants,
                               "回傳 cosine 相似度，不要乘上 logit_scale 或做 softmax。")

    def predictions():
        encoder = _FakeTextEncoder(texts, dim=12, seed=5)
        class_embeddings = reference.build_class_embeddings(templates, class_names, encoder)
        # Images close to a known class, so the right answer is unambiguous.
        labels = torch.tensor([3, 0, 4, 1, 2, 2, 0])
        images = (class_embeddings[labels] + 0.1 * torch.randn(7, 12, generator=generator)) * 5
        got = zero_shot_logits(images, class_embeddings)
        predicted = expect_tensor(got, "zero_shot_logits 的回傳值").argmax(dim=-1)
        if not torch.equal(predicted.cpu(), labels):
            fail(f"argmax 的預測為 {labels.tolist()}", f"{predicted.tolist()}", "每一列是一張影像對所有類別的分數，預測取最大值的那一欄。")

    cases = [
        Case("單一模板", single_template),
        Case("多個模板的 ensembling", ensemble_of_templates),
        Case("類別 embedding 是單位向量", unit_length_rows),
        Case("類別順序跟 class_names 一致", class_order),
        Case("zero_shot_logits 是 cosine 相似度", logits_are_cosine),
        Case("預測正確的類別", predictions),
    ]
    for device in _devices()[1:]:
        cases.append(Case(f"在 {device} 上執行", lambda device=device: embeddings_case(templates, class_names, f"在 {device} 上的類別 embedding", device)))
    return cases


# ---------------------------------------------------------------------------------------------
# Recall@K
# ---------------------------------------------------------------------------------------------


def _recall_variants(similarity: torch.Tensor, k: int, direction: str) -> dict[str, tuple[torch.Tensor, str]]:
    other = "text_to_image" if direction == "image_to_text" else "image_to_text"
    num_queries = similarity.shape[0] if direction == "image_to_text" else similarity.shape[1]
    expected = reference.recall_at_k(similarity, k, direction)
    wrong_axis = reference.recall_at_k(similarity, k, other)
    variants = {
        "wrong_axis": (torch.tensor(wrong_axis, dtype=torch.float64), f"方向錯了：{direction} 要讓每個{'影像（列）' if direction == 'image_to_text' else '文字（欄）'}當查詢，沿著另一個軸排序候選。"),
        "count_not_fraction": (torch.tensor(expected * num_queries, dtype=torch.float64), "要回傳比例（命中的查詢數 ÷ 查詢總數），不是命中數。"),
    }
    if k > 1:
        variants["k_minus_one"] = (
            torch.tensor(reference.recall_at_k(similarity, k - 1, direction), dtype=torch.float64),
            "前 k 名包含第 k 名：topk(k)，或排名（從 0 起算）< k。",
        )
    return variants


@checker("recall_at_k", "檢索的 Recall@K（兩個方向）", points=2.0)
def check_recall_at_k(recall_at_k):
    """Check ``recall_at_k(similarity, k, direction)`` with the diagonal as the correct matches."""
    generator = torch.Generator().manual_seed(2024)
    hint = "對每個查詢，取分數最高的 k 個候選，看正確的那一個（對角線）在不在裡面，再對所有查詢取平均。"

    def compare(similarity: torch.Tensor, k: int, direction: str, what: str) -> None:
        got = recall_at_k(similarity, k, direction)
        if isinstance(got, torch.Tensor) and got.numel() != 1:
            fail("一個數字（Python float 或 0 維張量）", describe(got), "對所有查詢的命中結果取平均，回傳一個比例。")
        expected = torch.tensor(reference.recall_at_k(similarity, k, direction), dtype=torch.float64)
        got_value = torch.as_tensor(float(got) if isinstance(got, (int, float)) else got.detach().cpu().double().reshape(()))
        _expect_with_diagnosis(got_value, expected, what, _recall_variants(similarity.cpu(), k, direction), hint, atol=1e-6)

    # Rows are images and columns texts; this matrix is not symmetric, so the two directions differ.
    small = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],
            [0.7, 0.2, 0.6, 0.1],
            [0.3, 0.95, 0.5, 0.4],
            [0.2, 0.1, 0.85, 0.3],
        ]
    )

    def small_image_to_text():
        compare(small, 1, "image_to_text", "4×4 例子的 image→text Recall@1")
        compare(small, 2, "image_to_text", "4×4 例子的 image→text Recall@2")

    def small_text_to_image():
        compare(small, 1, "text_to_image", "4×4 例子的 text→image Recall@1")
        compare(small, 2, "text_to_image", "4×4 例子的 text→image Recall@2")

    def random_both_directions():
        similarity = torch.randn(30, 30, generator=generator) + 1.2 * torch.eye(30)
        similarity[:, 3] += 2.0  # one "hub" text that many images rank first
        for k in (1, 5, 10):
            for direction in ("image_to_text", "text_to_image"):
                compare(similarity, k, direction, f"30×30 隨機相似度的 {direction} Recall@{k}")

    def k_equals_candidates():
        similarity = torch.randn(6, 6, generator=generator)
        compare(similarity, 6, "image_to_text", "k 等於候選數時的 Recall@6（必定是 1.0）")

    def negative_scores():
        similarity = -torch.rand(12, 12, generator=generator) - 1.0
        compare(similarity, 3, "image_to_text", "分數全為負數時的 image→text Recall@3")
        compare(similarity, 3, "text_to_image", "分數全為負數時的 text→image Recall@3")

    def inputs_unchanged():
        similarity = torch.randn(8, 8, generator=generator)
        before = similarity.clone()
        recall_at_k(similarity, 2, "image_to_text")
        recall_at_k(similarity, 2, "text_to_image")
        if not torch.equal(similarity, before):
            fail("相似度矩陣保持不變", "矩陣被就地修改了", "不要對輸入做 in-place 的排序或轉置賦值。")

    def unknown_direction():
        _expect_value_error(
            lambda: recall_at_k(torch.randn(4, 4, generator=generator), 1, "image2text"),
            "direction 不是 'image_to_text' 或 'text_to_image'",
            "檢查 direction，不認得就 raise ValueError，說明可以用的兩個值。",
        )

    cases = [
        Case("4×4 例子：image→text", small_image_to_text),
        Case("4×4 例子：text→image", small_text_to_image),
        Case("隨機相似度、兩個方向、k = 1, 5, 10", random_both_directions),
        Case("k 等於候選數", k_equals_candidates),
        Case("分數全為負數", negative_scores),
        Case("不修改輸入", inputs_unchanged),
        Case("未知的 direction 丟 ValueError", unknown_direction),
    ]
    for device in _devices()[1:]:
        def on_device(device=device):
            similarity = torch.randn(20, 20, generator=generator).to(device)
            compare(similarity, 5, "text_to_image", f"在 {device} 上的 text→image Recall@5")
        cases.append(Case(f"在 {device} 上執行", on_device))
    return cases
