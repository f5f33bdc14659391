"""Checkers of notebook 02: scaled dot-product attention, padding masks, multi-head
cross-attention, and the fixed version of a buggy cross-attention module.

Mask convention everywhere: bool, True = may attend. When a learner's result disagrees with
the reference, the checkers compare it with the typical mistakes and name the one it matches in
the hint. The mistakes are: no 1/sqrt(d) scaling, softmax over the wrong axis, inverted mask,
keys reused as values, heads split or merged in the wrong order, and no softmax.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import nn

from course_utils.checks.base import Case, checker, describe, expect_close, expect_shape, expect_tensor, fail
from course_utils.vlm.attention import MultiHeadCrossAttention, causal_mask, scaled_dot_product_attention

# ---------------------------------------------------------------------------------------------
# Typical mistakes, written out so that a mismatch can be named
# ---------------------------------------------------------------------------------------------

HINT_NO_SCALE = "看起來少了縮放：分數要乘上 1/sqrt(d)，d 是每個 query/key 向量的維度（多頭時是每個 head 的維度）。"
HINT_SCALE_D = "縮放用的是 1/d，應該是 1/sqrt(d)。"
HINT_SCALE_D_MODEL = "多頭時每個 head 的縮放是 1/sqrt(d_head)（d_head = d_model / n_heads），不是 1/sqrt(d_model)。"
HINT_SOFTMAX_AXIS = "softmax 的軸不對：每個 query 要在「所有 key」上做 softmax，也就是分數矩陣 (..., Lq, Lk) 的最後一軸 dim=-1。"
HINT_NO_SOFTMAX = "看起來沒有做 softmax：分數要先經過 softmax 變成加總為 1 的權重，再拿去加權 V。"
HINT_INVERTED_MASK = "mask 的意思反了：本課程的慣例是 True = 可以看（和 F.scaled_dot_product_attention 相同），要遮掉的是 False 的位置。"
HINT_IGNORED_MASK = "mask 好像沒有作用：把 mask 為 False 的分數換成很小的值（例如 torch.finfo(dtype).min），再做 softmax。"
HINT_KEYS_AS_VALUES = "看起來把 K 的投影也拿來當 V：V 要用自己的 v_proj(context)。"
HINT_SPLIT_HEADS = "切 head 的順序不對：先 view 成 (B, L, H, d_head)（切的是特徵軸），再 transpose(1, 2) 成 (B, H, L, d_head)；直接 view 成 (B, H, L, d_head) 會把不同 token 的特徵混在一起。"
HINT_MERGE_HEADS = "合併 head 的順序不對：先 transpose(1, 2) 回 (B, L, H, d_head)，再 reshape 成 (B, L, d_model)。"


def _functional_attention(q, k, v, mask, variant: str = "reference"):
    """Attention over (..., L, d) tensors, or one of its typical wrong versions."""
    d = q.size(-1)
    scale = {"no_scale": 1.0, "scale_d": 1.0 / d}.get(variant, 1.0 / math.sqrt(d))
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None and variant != "ignored_mask":
        allowed = ~mask if variant.startswith("inverted_mask") else mask
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    if variant == "no_softmax":
        weights = scores
    else:
        weights = torch.softmax(scores, dim=-2 if variant == "softmax_queries" else -1)
    output = weights @ v
    if mask is not None and variant not in ("ignored_mask", "inverted_mask_no_zeroing"):
        allowed = ~mask if variant == "inverted_mask" else mask
        output = output * allowed.any(dim=-1, keepdim=True)
    return output


SDPA_VARIANTS = (
    ("no_scale", HINT_NO_SCALE),
    ("scale_d", HINT_SCALE_D),
    ("softmax_queries", HINT_SOFTMAX_AXIS),
    ("no_softmax", HINT_NO_SOFTMAX),
    ("inverted_mask", HINT_INVERTED_MASK),
    ("inverted_mask_no_zeroing", HINT_INVERTED_MASK),
    ("ignored_mask", HINT_IGNORED_MASK),
)


def _matches(got: Any, expected: torch.Tensor) -> bool:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    got64, expected64 = got.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64)
    return bool(torch.isfinite(got64).all()) and torch.allclose(got64, expected64, atol=1e-5, rtol=1e-4)


def _diagnose(got: Any, variants: list[tuple[torch.Tensor, str]], default: str) -> str:
    """Return the hint of the first wrong variant that ``got`` matches, else ``default``."""
    for expected, hint in variants:
        if _matches(got, expected):
            return hint
    return default


def _expect_close_or_diagnose(got, expected, what, variants, default_hint):
    expect_tensor(got, what)
    if not _matches(got, expected):
        expect_close(got, expected, what, hint=_diagnose(got, variants, default_hint))


def _devices() -> list[torch.device]:
    return [torch.device("cuda")] if torch.cuda.is_available() else []


# ---------------------------------------------------------------------------------------------
# Exercise: scaled dot-product attention
# ---------------------------------------------------------------------------------------------


@checker("attention_sdpa", "縮放點積注意力（scaled dot-product attention）", points=2.0)
def check_scaled_dot_product_attention(attention: Callable[..., torch.Tensor]):
    """Check ``attention(q, k, v, attention_mask=None)`` -> (..., Lq, dv); mask True = may attend."""
    generator = torch.Generator().manual_seed(2)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    def compare(q, k, v, mask, what):
        got = attention(q, k, v, mask) if mask is not None else attention(q, k, v)
        expected = scaled_dot_product_attention(q, k, v, mask)
        variants = [(_functional_attention(q, k, v, mask, name), hint) for name, hint in SDPA_VARIANTS]
        expect_shape(got, tuple(expected.shape), what,
                     hint="輸出形狀是 (..., Lq, dv)：每個 query 一列，寬度和 V 相同。")
        _expect_close_or_diagnose(got, expected, what, variants,
                                  "公式是 softmax(Q Kᵀ / sqrt(d)) V；逐步印出分數、權重和輸出的形狀檢查看看。")
        return got

    def tiny_example():
        q = torch.tensor([[1.0, 0.0]])
        k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        compare(q, k, v, None, "1 個 query、3 個 key 的小例子")

    def different_lengths():
        compare(randn(2, 5, 16), randn(2, 7, 16), randn(2, 7, 3), None, "Lq=5、Lk=7、d=16、dv=3 的輸出")

    def large_features():
        # With d = 64 the missing 1/sqrt(d) changes the softmax a lot.
        compare(randn(1, 4, 64), randn(1, 6, 64), randn(1, 6, 8), None, "d=64 的輸出")

    def multi_head_shape():
        compare(randn(2, 3, 4, 8), randn(2, 3, 6, 8), randn(2, 3, 6, 8), None, "四維輸入 (B, H, L, d) 的輸出")

    def key_padding_mask():
        mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]]).unsqueeze(1)  # (2, 1, 6)
        compare(randn(2, 4, 8), randn(2, 6, 8), randn(2, 6, 5), mask, "padding mask (B, 1, Lk) 下的輸出")

    def causal():
        compare(randn(2, 5, 8), randn(2, 5, 8), randn(2, 5, 8), causal_mask(5), "causal mask (L, L) 下的輸出")

    def fully_masked_row_forward():
        mask = torch.ones(2, 3, 4, dtype=torch.bool)
        mask[0, 1] = False  # query 1 of sample 0 may attend to nothing
        q, k, v = randn(2, 3, 8), randn(2, 4, 8), randn(2, 4, 8)
        got = attention(q, k, v, mask)
        expect_tensor(got, "輸出")
        if not torch.isfinite(got).all():
            fail("完全被遮住的那一列輸出 0，整個輸出沒有 NaN", f"含有 NaN 或 inf：{describe(got[0, 1])}",
                 "用 -inf 遮住整列時 softmax 會算出 0/0 = NaN。改用有限的極小值（torch.finfo(dtype).min），"
                 "再把「沒有任何可看的 key」的列乘上 0。")
        expect_close(got[0, 1], torch.zeros(8), "完全被遮住的 query 的輸出",
                     hint="沒有可看的 key 時輸出應該是 0（而不是所有 V 的平均）：用 mask.any(dim=-1, keepdim=True) 把那些列乘上 0。")
        compare(q, k, v, mask, "其餘各列的輸出")

    def gradients():
        mask = torch.ones(2, 3, 5, dtype=torch.bool)
        mask[1, 2] = False
        mask[0, :, 3:] = False
        base = [randn(2, 3, 8), randn(2, 5, 8), randn(2, 5, 4)]
        mine = [t.clone().requires_grad_() for t in base]
        ref = [t.clone().requires_grad_() for t in base]
        upstream = randn(2, 3, 4)
        got = attention(*mine, mask)
        expect_tensor(got, "輸出")
        (got * upstream).sum().backward()
        (scaled_dot_product_attention(*ref, mask) * upstream).sum().backward()
        for name, a, b in zip(("q", "k", "v"), mine, ref):
            if a.grad is None:
                fail(f"{name} 有梯度", "梯度是 None", "不要用 .detach()、.data 或 torch.no_grad()，梯度才流得回去。")
            if not torch.isfinite(a.grad).all():
                fail(f"{name} 的梯度沒有 NaN", describe(a.grad),
                     "完全被遮住的列在反向傳播時也會產生 NaN；用有限的極小值取代 -inf。")
            expect_close(a.grad, b.grad, f"{name} 的梯度", hint="前向對了但梯度不對時，檢查是否有就地（in-place）修改輸入。")

    def keeps_dtype_and_inputs():
        q, k, v = randn(2, 3, 8, dtype=torch.float64), randn(2, 4, 8, dtype=torch.float64), randn(2, 4, 8, dtype=torch.float64)
        before = [t.clone() for t in (q, k, v)]
        got = compare(q, k, v, None, "float64 輸入的輸出")
        if got.dtype != torch.float64:
            fail("輸出 dtype 為 float64（和輸入相同）", str(got.dtype), "不要把張量轉成 float32；用輸入的 dtype。")
        for name, tensor, original in zip(("q", "k", "v"), (q, k, v), before):
            if not torch.equal(tensor, original):
                fail(f"{name} 保持不變", f"{name} 被就地修改了", "避免 q *= ... 或 masked_fill_ 作用在輸入上。")

    def on_cuda():
        for device in _devices():
            q, k, v = (t.to(device) for t in (randn(2, 4, 8), randn(2, 6, 8), randn(2, 6, 8)))
            mask = torch.ones(2, 1, 6, dtype=torch.bool, device=device)
            mask[1, :, 4:] = False
            got = attention(q, k, v, mask)
            expect_tensor(got, "CUDA 上的輸出")
            if got.device.type != "cuda":
                fail("輸出留在 CUDA 上", str(got.device), "新建的張量要加 device=q.device。")
            expect_close(got.cpu(), scaled_dot_product_attention(q, k, v, mask).cpu(), "CUDA 上的輸出")

    cases = [
        Case("1 個 query 的小例子", tiny_example),
        Case("Lq ≠ Lk，dv ≠ d", different_lengths),
        Case("較大的特徵維度 d=64（縮放）", large_features),
        Case("多頭形狀 (B, H, L, d)", multi_head_shape),
        Case("padding mask 會廣播", key_padding_mask),
        Case("causal mask", causal),
        Case("完全被遮住的 query：輸出 0，沒有 NaN", fully_masked_row_forward),
        Case("反向傳播：梯度正確、沒有 NaN", gradients),
        Case("保持 dtype，不修改輸入", keeps_dtype_and_inputs),
    ]
    if _devices():
        cases.append(Case("在 CUDA 上執行", on_cuda))
    return cases


# ---------------------------------------------------------------------------------------------
# Exercise: padding mask
# ---------------------------------------------------------------------------------------------


@checker("attention_padding_mask", "padding mask：哪些 key 是真的 token", points=1.0)
def check_padding_mask(padding_mask: Callable[[torch.Tensor, int], torch.Tensor]):
    """Check ``padding_mask(lengths, max_len)`` -> bool (batch, 1, max_len), True = real token."""

    def reference(lengths, max_len):
        return (torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]).unsqueeze(1)

    def compare(lengths, max_len, what):
        got = padding_mask(lengths, max_len)
        expected = reference(lengths, max_len)
        expect_tensor(got, what)
        if got.shape != expected.shape:
            hint = "形狀要是 (B, 1, max_len)：中間的 1 是 query 軸，才能廣播到 (B, Lq, Lk)。"
            if got.shape == expected.shape[:1] + expected.shape[2:]:
                hint = "少了中間的 query 軸：用 .unsqueeze(1) 把 (B, L) 變成 (B, 1, L)，才能廣播到 (B, Lq, Lk)。"
            fail(f"{what} 的形狀為 {tuple(expected.shape)}", f"形狀 {tuple(got.shape)}", hint)
        if got.dtype != torch.bool:
            fail(f"{what} 的 dtype 為 torch.bool", str(got.dtype),
                 "mask 要是布林值（True = 可以看）；0/1 的整數或 float mask 會被當成相加的分數。")
        if torch.equal(got, ~expected):
            fail(f"{what} = {expected.int().tolist()}", str(got.int().tolist()), HINT_INVERTED_MASK)
        if not torch.equal(got, expected):
            hint = "位置 j 是真的 token 當且僅當 j < length。"
            shifted = reference(lengths + 1, max_len)
            shorter = reference((lengths - 1).clamp_min(0), max_len)
            if torch.equal(got, shifted) or torch.equal(got, shorter):
                hint = "差了一格：位置從 0 開始數，條件是 j < length（不是 <=）。"
            fail(f"{what} = {expected.int().tolist()}", str(got.int().tolist()), hint)

    def simple():
        compare(torch.tensor([3, 1, 4]), 4, "lengths=[3, 1, 4]、max_len=4 的 mask")

    def longer_max_len():
        compare(torch.tensor([2, 5]), 7, "max_len 比最長的序列還長時的 mask")

    def zero_length():
        compare(torch.tensor([0, 2]), 3, "長度 0 的序列（整列都是 padding）")

    def broadcasts_in_attention():
        lengths = torch.tensor([5, 2])
        mask = padding_mask(lengths, 5)
        expect_tensor(mask, "mask")
        generator = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 3, 4, generator=generator), torch.randn(2, 5, 4, generator=generator),
                   torch.randn(2, 5, 4, generator=generator))
        try:
            got = scaled_dot_product_attention(q, k, v, mask)
        except (TypeError, ValueError) as error:
            fail("mask 可以直接傳給注意力函式", str(error), "回傳 (B, 1, L) 的布林張量。")
        expect_close(got, scaled_dot_product_attention(q, k, v, reference(lengths, 5)), "用這個 mask 算出的注意力輸出")

    def on_cuda():
        for device in _devices():
            lengths = torch.tensor([1, 3], device=device)
            got = padding_mask(lengths, 3)
            expect_tensor(got, "CUDA 上的 mask")
            if got.device.type != "cuda":
                fail("mask 和 lengths 在同一個 device", str(got.device), "torch.arange(..., device=lengths.device)。")
            compare(lengths, 3, "CUDA 上的 mask")

    cases = [
        Case("簡單的長度", simple),
        Case("max_len 大於最長長度", longer_max_len),
        Case("長度為 0", zero_length),
        Case("可以直接用在注意力裡", broadcasts_in_attention),
    ]
    if _devices():
        cases.append(Case("在 CUDA 上執行", on_cuda))
    return cases


# ---------------------------------------------------------------------------------------------
# Exercise: multi-head cross-attention
# ---------------------------------------------------------------------------------------------


def _copy_linear(source: nn.Linear, target: nn.Linear) -> None:
    with torch.no_grad():
        target.weight.copy_(source.weight)
        if target.bias is not None:
            if source.bias is None:
                target.bias.zero_()
            else:
                target.bias.copy_(source.bias)


def _reference_from(candidate: nn.Module, d_model: int, n_heads: int, d_context: int) -> MultiHeadCrossAttention:
    reference = MultiHeadCrossAttention(d_model, n_heads, d_context)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _copy_linear(getattr(candidate, name), getattr(reference, name))
    return reference.to(candidate.q_proj.weight.device)


def _mhca_variant(reference: MultiHeadCrossAttention, x, context, mask, variant: str) -> torch.Tensor:
    """Compute the reference module's output with one typical mistake."""
    batch, query_len, d_model = x.shape
    heads, d_head = reference.n_heads, reference.d_head
    q = reference.q_proj(x)
    k = reference.k_proj(context)
    v = reference.k_proj(context) if variant == "keys_as_values" else reference.v_proj(context)

    def split(t):
        if variant == "split_wrong":
            return t.reshape(batch, heads, t.size(1), d_head)
        return t.view(batch, t.size(1), heads, d_head).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    head_mask = mask
    if mask is not None and mask.dim() == 3:
        head_mask = mask.unsqueeze(1)  # (B, 1, Lq, Lk): one mask for every head
    attention_variant = {"scale_d_model": "reference"}.get(variant, variant)
    if variant == "scale_d_model":
        q = q * math.sqrt(d_head) / math.sqrt(d_model)
    attended = _functional_attention(q, k, v, head_mask, attention_variant)
    if variant == "merge_wrong":
        merged = attended.reshape(batch, query_len, d_model)
    else:
        merged = attended.transpose(1, 2).reshape(batch, query_len, d_model)
    output = reference.out_proj(merged)
    if head_mask is not None and variant not in ("ignored_mask", "inverted_mask_no_zeroing"):
        allowed = ~head_mask if variant == "inverted_mask" else head_mask
        output = output * allowed.any(dim=-1).any(dim=1).unsqueeze(-1)
    return output


MHCA_VARIANTS = (
    ("no_scale", HINT_NO_SCALE),
    ("scale_d_model", HINT_SCALE_D_MODEL),
    ("softmax_queries", HINT_SOFTMAX_AXIS),
    ("no_softmax", HINT_NO_SOFTMAX),
    ("inverted_mask", HINT_INVERTED_MASK),
    ("inverted_mask_no_zeroing", HINT_INVERTED_MASK),
    ("ignored_mask", HINT_IGNORED_MASK),
    ("keys_as_values", HINT_KEYS_AS_VALUES),
    ("split_wrong", HINT_SPLIT_HEADS),
    ("merge_wrong", HINT_MERGE_HEADS),
)


def _expect_projections(module: nn.Module, d_model: int, d_context: int) -> None:
    if hasattr(module, "kv_proj") and not (hasattr(module, "k_proj") and hasattr(module, "v_proj")):
        fail("分開的 k_proj 與 v_proj", "只有一個 kv_proj", "K 與 V 共用同一個投影時 V 就等於 K；" + HINT_KEYS_AS_VALUES)
    expected_shapes = {
        "q_proj": (d_model, d_model),
        "k_proj": (d_context, d_model),
        "v_proj": (d_context, d_model),
        "out_proj": (d_model, d_model),
    }
    for name, (in_features, out_features) in expected_shapes.items():
        layer = getattr(module, name, None)
        if not isinstance(layer, nn.Linear):
            fail(f"屬性 self.{name} 是 nn.Linear", f"{type(layer).__name__}",
                 "在 __init__ 裡建立 self.q_proj、self.k_proj、self.v_proj、self.out_proj 四個 nn.Linear。")
        if (layer.in_features, layer.out_features) != (in_features, out_features):
            fail(f"self.{name} 是 nn.Linear({in_features}, {out_features})",
                 f"nn.Linear({layer.in_features}, {layer.out_features})",
                 "K 與 V 的輸入寬度是 d_context（影像特徵），輸出寬度都是 d_model。")
    if module.k_proj is module.v_proj or module.k_proj.weight is module.v_proj.weight:
        fail("k_proj 與 v_proj 是不同的層", "兩者是同一個物件", HINT_KEYS_AS_VALUES)


@checker("attention_mhca", "多頭 cross-attention（MultiHeadCrossAttention）", points=3.0)
def check_multi_head_cross_attention(module_class: type):
    """Check a class ``module_class(d_model, n_heads, d_context=None)`` with ``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj`` (nn.Linear) and ``forward(x, context, attention_mask=None)``."""
    generator = torch.Generator().manual_seed(4)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def build(d_model, n_heads, d_context=None):
        torch.manual_seed(0)
        module = module_class(d_model, n_heads, d_context) if d_context is not None else module_class(d_model, n_heads)
        if not isinstance(module, nn.Module):
            fail("一個 nn.Module", type(module).__name__, "class 要繼承 nn.Module 並呼叫 super().__init__()。")
        _expect_projections(module, d_model, d_context or d_model)
        return module

    def compare(module, d_model, n_heads, d_context, x, context, mask, what):
        reference = _reference_from(module, d_model, n_heads, d_context)
        got = module(x, context, mask) if mask is not None else module(x, context)
        expect_shape(got, (x.size(0), x.size(1), d_model), what, hint="輸出形狀要和 x 相同：(B, Lq, d_model)。")
        with torch.no_grad():
            expected = reference(x, context, mask)
            variants = [(_mhca_variant(reference, x, context, mask, name), hint) for name, hint in MHCA_VARIANTS]
        _expect_close_or_diagnose(got, expected, what, variants,
                                  "依序檢查：投影 → 切 head → 縮放點積注意力 → 合併 head → out_proj。")

    def projections():
        build(32, 4, 48)

    def one_head():
        module = build(16, 1, 24)
        compare(module, 16, 1, 24, randn(2, 3, 16), randn(2, 5, 24), None, "1 個 head 的輸出")

    def four_heads():
        module = build(32, 4, 48)
        compare(module, 32, 4, 48, randn(2, 3, 32), randn(2, 6, 48), None, "4 個 heads 的輸出")

    def same_width_default():
        module = build(24, 3)
        compare(module, 24, 3, 24, randn(3, 2, 24), randn(3, 4, 24), None, "d_context 省略（= d_model）時的輸出")

    def key_padding():
        module = build(32, 4, 48)
        mask = torch.ones(2, 1, 6, dtype=torch.bool)
        mask[1, :, 2:] = False
        compare(module, 32, 4, 48, randn(2, 3, 32), randn(2, 6, 48), mask, "key padding mask (B, 1, Lk) 下的輸出")

    def full_mask():
        module = build(32, 4, 48)
        mask = torch.rand(2, 3, 6, generator=generator) > 0.4
        mask[..., 0] = True  # every query may attend to at least one key
        compare(module, 32, 4, 48, randn(2, 3, 32), randn(2, 6, 48), mask, "完整 mask (B, Lq, Lk) 下的輸出")

    def fully_masked_row():
        module = build(32, 4, 48)
        mask = torch.ones(2, 3, 6, dtype=torch.bool)
        mask[0, 2] = False
        got = module(randn(2, 3, 32), randn(2, 6, 48), mask)
        expect_tensor(got, "輸出")
        if not torch.isfinite(got).all():
            fail("沒有 NaN", describe(got[0, 2]), "完全被遮住的列不能產生 NaN：注意力裡用有限的極小值取代 -inf。")
        expect_close(got[0, 2], torch.zeros(32), "完全被遮住的 query 的輸出",
                     hint="注意力輸出是 0，但 out_proj 的 bias 會讓它變成非 0；最後把沒有任何可看 key 的列乘上 0。")

    def gradients():
        module = build(32, 4, 48)
        reference = _reference_from(module, 32, 4, 48)
        x, context = randn(2, 3, 32), randn(2, 6, 48)
        mask = torch.ones(2, 1, 6, dtype=torch.bool)
        mask[0, :, 4:] = False
        upstream = randn(2, 3, 32)
        got = module(x, context, mask)
        expect_tensor(got, "輸出")
        (got * upstream).sum().backward()
        (reference(x, context, mask) * upstream).sum().backward()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            grad = getattr(module, name).weight.grad
            if grad is None:
                hint = HINT_KEYS_AS_VALUES if name == "v_proj" else f"forward 裡沒有用到 self.{name}。"
                fail(f"{name}.weight 有梯度", "梯度是 None（這一層沒有被用到）", hint)
            expect_close(grad, getattr(reference, name).weight.grad, f"{name}.weight 的梯度")

    def samples_independent():
        module = build(32, 4, 48)
        x, context = randn(2, 3, 32), randn(2, 6, 48)
        before = module(x, context)
        changed = context.clone()
        changed[1] = randn(6, 48)
        after = module(x, changed)
        expect_tensor(before, "輸出")
        expect_close(after[0], before[0], "改動第 2 筆 context 後，第 1 筆的輸出",
                     hint="batch 裡的樣本不能互相影響：切 head 時不要動到 batch 軸。")

    def on_cuda():
        for device in _devices():
            module = build(32, 4, 48).to(device)
            x, context = randn(2, 3, 32).to(device), randn(2, 6, 48).to(device)
            mask = torch.ones(2, 1, 6, dtype=torch.bool, device=device)
            got = module(x, context, mask)
            expect_tensor(got, "CUDA 上的輸出")
            expected = _reference_from(module, 32, 4, 48)(x, context, mask)
            expect_close(got.cpu(), expected.cpu(), "CUDA 上的輸出")

    cases = [
        Case("四個投影層的形狀", projections),
        Case("1 個 head", one_head),
        Case("4 個 heads（切分與合併 head）", four_heads),
        Case("d_context 預設等於 d_model", same_width_default),
        Case("key padding mask", key_padding),
        Case("完整的 (B, Lq, Lk) mask", full_mask),
        Case("完全被遮住的 query 輸出 0", fully_masked_row),
        Case("反向傳播：四個投影的梯度", gradients),
        Case("batch 內的樣本互不影響", samples_independent),
    ]
    if _devices():
        cases.append(Case("在 CUDA 上執行", on_cuda))
    return cases


# ---------------------------------------------------------------------------------------------
# Exercise: fix the buggy cross-attention
# ---------------------------------------------------------------------------------------------


def _single_head_reference(module: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    q = module.q_proj(x)  # (B, Lq, D)
    k = module.k_proj(context)  # (B, Lk, D)
    v = module.v_proj(context)  # (B, Lk, D)
    return scaled_dot_product_attention(q, k, v)


@checker("attention_fix_bugs", "修好有錯的 cross-attention", points=2.0)
def check_fixed_cross_attention(module_class: type):
    """Check ``module_class(d_model, d_context)``: single-head cross-attention with separate
    ``q_proj``, ``k_proj``, ``v_proj`` and ``forward(x, context) = softmax(q kᵀ / sqrt(d)) v``."""
    generator = torch.Generator().manual_seed(5)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    def build(d_model=16, d_context=24):
        torch.manual_seed(0)
        module = module_class(d_model, d_context)
        if hasattr(module, "kv_proj") and not (hasattr(module, "k_proj") and hasattr(module, "v_proj")):
            fail("分開的 k_proj 與 v_proj", "仍然只有一個 kv_proj",
                 "第一個錯誤：K 和 V 用同一個投影，V 就只是 K 的複本，模型無法分開學「用什麼比對」和「取出什麼內容」。")
        for name in ("q_proj", "k_proj", "v_proj"):
            if not isinstance(getattr(module, name, None), nn.Linear):
                fail(f"屬性 self.{name} 是 nn.Linear", type(getattr(module, name, None)).__name__,
                     "建立 self.q_proj、self.k_proj、self.v_proj 三個 nn.Linear。")
        if module.k_proj is module.v_proj or module.k_proj.weight is module.v_proj.weight:
            fail("k_proj 與 v_proj 是兩個獨立的層", "兩者是同一個物件", HINT_KEYS_AS_VALUES)
        if hasattr(module, "out_proj"):
            fail("只有 q_proj、k_proj、v_proj（沒有輸出投影）", "多了 out_proj",
                 "這個練習只修兩個錯誤；輸出投影留給多頭的 MultiHeadCrossAttention。")
        return module

    def identical_keys():
        # Every context token is the same, so any attention weights that sum to 1 return
        # exactly v_proj(token). Without softmax the result is scaled instead.
        module = build()
        token = randn(1, 1, 24)
        context = token.expand(2, 5, 24).clone()
        got = module(randn(2, 3, 16), context)
        expect_shape(got, (2, 3, 16), "輸出", hint="輸出形狀是 (B, Lq, d_model)。")
        with torch.no_grad():
            expected = module.v_proj(token).expand(2, 3, 16)
        expect_close(got, expected, "所有 key 都相同時的輸出（應該等於那個 value）",
                     hint="第二個錯誤：分數沒有經過 softmax，權重加總不是 1，輸出會隨分數大小和 key 的數量縮放。")

    def duplicated_context():
        module = build()
        x, context = randn(2, 3, 16), randn(2, 4, 24)
        once = module(x, context)
        twice = module(x, torch.cat([context, context], dim=1))
        expect_tensor(once, "輸出")
        expect_close(twice, once, "把 context 重複兩次後的輸出（應該不變）",
                     hint="softmax 後的權重是加權平均，重複同樣的 key/value 不會改變結果；沒有 softmax 時輸出會變成兩倍。")

    def uses_value_projection():
        module = build()
        x, context = randn(2, 3, 16), randn(2, 4, 24)
        before = module(x, context)
        with torch.no_grad():
            module.v_proj.weight.add_(1.0)
        after = module(x, context)
        expect_tensor(before, "輸出")
        if torch.allclose(before, after):
            fail("改變 v_proj 的權重會改變輸出", "輸出完全沒變", HINT_KEYS_AS_VALUES)

    def matches_reference():
        module = build()
        x, context = randn(3, 2, 16), randn(3, 7, 24)
        got = module(x, context)
        with torch.no_grad():
            expected = _single_head_reference(module, x, context)
            q, k, v = module.q_proj(x), module.k_proj(context), module.v_proj(context)
            variants = [(_functional_attention(q, k, v, None, name), hint) for name, hint in SDPA_VARIANTS]
            variants.append((_functional_attention(q, k, module.k_proj(context), None), HINT_KEYS_AS_VALUES))
        _expect_close_or_diagnose(got, expected, "輸出", variants, "公式是 softmax(q kᵀ / sqrt(d)) v，softmax 沿著 key 的軸（dim=-1）。")

    def gradients():
        module = build()
        x, context = randn(2, 3, 16), randn(2, 4, 24)
        got = module(x, context)
        expect_tensor(got, "輸出")
        got.square().sum().backward()
        reference = copy.deepcopy(module)
        reference.zero_grad(set_to_none=True)
        _single_head_reference(reference, x, context).square().sum().backward()
        for name in ("q_proj", "k_proj", "v_proj"):
            grad = getattr(module, name).weight.grad
            if grad is None:
                fail(f"{name}.weight 有梯度", "None", f"forward 裡要用到 self.{name}。")
            expect_close(grad, getattr(reference, name).weight.grad, f"{name}.weight 的梯度")

    return [
        Case("K 與 V 用兩個獨立的投影", lambda: build()),
        Case("所有 key 相同時，輸出等於那個 value", identical_keys),
        Case("重複 context 不改變輸出", duplicated_context),
        Case("V 來自 v_proj", uses_value_projection),
        Case("輸出與參考實作一致", matches_reference),
        Case("梯度正確", gradients),
    ]
