"""Tests of course_utils.vlm.attention and its checkers.

Equivalence: the reference attention equals ``F.scaled_dot_product_attention``, and the
reference cross-attention equals ``nn.MultiheadAttention`` with copied weights and converted
masks. Mutation: each checker rejects the typical mistakes of its exercise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from course_utils.checks import attention as checks
from course_utils.vlm.attention import (
    MultiHeadCrossAttention,
    as_nn_multihead_attention,
    causal_mask,
    key_padding_to_attention_mask,
    padding_mask,
    scaled_dot_product_attention,
    to_nn_multihead_attention_mask,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _qkv(*, batch=2, heads=3, lq=5, lk=7, d=8, dv=4, dtype=torch.float32, grad=False):
    q = torch.randn(batch, heads, lq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(batch, heads, lk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(batch, heads, lk, dv, dtype=dtype, requires_grad=grad)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------


def test_sdpa_matches_torch_without_mask():
    q, k, v = _qkv()
    assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize(
    "mask_shape",
    [(2, 1, 1, 7), (2, 3, 5, 7), (5, 7), (1, 1, 5, 7)],
    ids=["key-padding", "full", "shared-2d", "broadcast-batch"],
)
def test_sdpa_matches_torch_with_mask(mask_shape):
    q, k, v = _qkv()
    mask = torch.rand(mask_shape) > 0.3
    mask[..., 0] = True  # every query keeps at least one key
    assert_close(
        scaled_dot_product_attention(q, k, v, mask),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
    )


def test_sdpa_matches_torch_causal():
    q, k, v = _qkv(lq=6, lk=6)
    assert_close(
        scaled_dot_product_attention(q, k, v, causal_mask(6)),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )


def test_sdpa_gradients_match_torch():
    q, k, v = _qkv(grad=True, dtype=torch.float64)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mask = torch.rand(2, 1, 5, 7) > 0.5
    mask[..., 0] = True
    upstream = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    (scaled_dot_product_attention(q, k, v, mask) * upstream).sum().backward()
    (F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask) * upstream).sum().backward()
    for mine, theirs in ((q, q2), (k, k2), (v, v2)):
        assert_close(mine.grad, theirs.grad)


def test_sdpa_custom_scale_matches_torch():
    q, k, v = _qkv()
    assert_close(
        scaled_dot_product_attention(q, k, v, scale=0.3),
        F.scaled_dot_product_attention(q, k, v, scale=0.3),
    )


def test_sdpa_fully_masked_row_is_zero():
    q, k, v = _qkv(grad=True)
    mask = torch.ones(2, 3, 5, 7, dtype=torch.bool)
    mask[0, 1, 2] = False
    output, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    assert torch.isfinite(output).all()
    assert torch.equal(output[0, 1, 2], torch.zeros(4))
    assert torch.equal(weights[0, 1, 2], torch.zeros(7))
    output.sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
    assert torch.equal(q.grad[0, 1, 2], torch.zeros(8))


def test_naive_minus_inf_masking_gives_nan():
    # The failure the reference avoids: -inf on a whole row makes softmax compute 0 / 0.
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, True], [False, False]])
    naive = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    assert torch.isnan(naive[1]).all()
    _, weights = scaled_dot_product_attention(scores[:, :1], scores[:, :1], scores, mask, return_weights=True)
    assert torch.isfinite(weights).all()


def test_sdpa_weights_rows_sum_to_one():
    q, k, v = _qkv()
    _, weights = scaled_dot_product_attention(q, k, v, return_weights=True)
    assert_close(weights.sum(-1), torch.ones(2, 3, 5))


def test_sdpa_keeps_low_precision_finite():
    q, k, v = _qkv(dtype=torch.bfloat16)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[3] = False
    output = scaled_dot_product_attention(q, k, v, mask)
    assert output.dtype == torch.bfloat16
    assert torch.isfinite(output).all()
    assert_close(output[..., :3, :], F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[..., :3, :], atol=2e-2, rtol=2e-2)


def test_sdpa_rejects_float_mask():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="torch.bool"):
        scaled_dot_product_attention(q, k, v, torch.ones(5, 7))


def test_sdpa_rejects_mask_that_does_not_broadcast():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, torch.ones(7, 5, dtype=torch.bool))


def test_sdpa_rejects_mismatched_features():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="same feature size"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="same number of keys"):
        scaled_dot_product_attention(q, k, v[..., :3, :])


# ---------------------------------------------------------------------------------------------
# Mask helpers
# ---------------------------------------------------------------------------------------------


def test_padding_mask_from_lengths():
    mask = padding_mask(torch.tensor([3, 1, 0]), max_len=4)
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool).unsqueeze(1)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_padding_mask_from_list_defaults_to_longest():
    assert padding_mask([2, 3]).shape == (2, 1, 3)


def test_padding_mask_from_tokenizer_attention_mask():
    attention_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(padding_mask(attention_mask), attention_mask.bool().unsqueeze(1))


def test_padding_mask_errors():
    with pytest.raises(ValueError, match=">= 0"):
        padding_mask(torch.tensor([2, -1]))
    with pytest.raises(ValueError, match="max_len"):
        padding_mask(torch.tensor([5]), max_len=3)
    with pytest.raises(TypeError, match="integers"):
        padding_mask(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="0 and 1"):
        padding_mask(torch.tensor([[1, 2]]))


def test_causal_mask_is_lower_triangular():
    mask = causal_mask(4)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, torch.tril(torch.ones(4, 4)).bool())
    with pytest.raises(ValueError, match="positive int"):
        causal_mask(0)


def test_nn_mask_conversion_round_trip():
    mask = padding_mask(torch.tensor([3, 5]))  # (2, 1, 5)
    converted = to_nn_multihead_attention_mask(mask, num_heads=2, query_len=4)
    assert converted.shape == (4, 4, 5)
    assert torch.equal(converted[1], ~mask[0].expand(4, 5))  # batch 0, head 1
    assert torch.equal(converted[2], ~mask[1].expand(4, 5))  # batch 1, head 0
    key_padding = ~mask.squeeze(1)
    assert torch.equal(key_padding_to_attention_mask(key_padding), mask)


def test_nn_mask_conversion_needs_query_len():
    with pytest.raises(ValueError, match="query_len"):
        to_nn_multihead_attention_mask(torch.ones(2, 1, 5, dtype=torch.bool), num_heads=2)


# ---------------------------------------------------------------------------------------------
# MultiHeadCrossAttention against nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------


def test_mhca_matches_nn_multihead_attention_different_widths():
    module = MultiHeadCrossAttention(32, 4, d_context=48)
    torch_module = as_nn_multihead_attention(module)
    assert torch_module.in_proj_weight is None  # kdim/vdim path with separate weights
    x, context = torch.randn(2, 5, 32), torch.randn(2, 9, 48)
    mask = padding_mask(torch.tensor([9, 4]))  # (2, 1, 9)

    output, weights = module(x, context, mask, return_weights=True)
    expected, expected_weights = torch_module(
        x, context, context, attn_mask=to_nn_multihead_attention_mask(mask, 4, query_len=5), average_attn_weights=False
    )
    assert_close(output, expected)
    assert_close(weights, expected_weights)


def test_mhca_matches_nn_multihead_attention_key_padding_mask():
    module = MultiHeadCrossAttention(24, 3)
    torch_module = as_nn_multihead_attention(module)
    assert torch_module.in_proj_weight is not None  # same width: one stacked projection
    x, context = torch.randn(3, 4, 24), torch.randn(3, 6, 24)
    mask = padding_mask(torch.tensor([6, 2, 5]))
    expected, _ = torch_module(x, context, context, key_padding_mask=~mask.squeeze(1))
    assert_close(module(x, context, mask), expected)


def test_mhca_gradients_match_nn_multihead_attention():
    module = MultiHeadCrossAttention(16, 2, d_context=8).double()
    torch_module = as_nn_multihead_attention(module)
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    context = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.rand(2, 4, 6) > 0.5
    mask[..., 0] = True
    upstream = torch.randn(2, 4, 16, dtype=torch.float64)

    (module(x, context, mask) * upstream).sum().backward()
    expected, _ = torch_module(x, context, context, attn_mask=to_nn_multihead_attention_mask(mask, 2))
    (expected * upstream).sum().backward()
    assert_close(module.q_proj.weight.grad, torch_module.q_proj_weight.grad)
    assert_close(module.k_proj.weight.grad, torch_module.k_proj_weight.grad)
    assert_close(module.v_proj.weight.grad, torch_module.v_proj_weight.grad)
    assert_close(module.out_proj.weight.grad, torch_module.out_proj.weight.grad)


def test_unconverted_mask_breaks_nn_multihead_attention():
    # The pitfall the notebook shows: passing a True = may-attend mask to nn.MultiheadAttention.
    module = MultiHeadCrossAttention(16, 2)
    torch_module = as_nn_multihead_attention(module)
    x, context = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = padding_mask(torch.tensor([5, 3]))
    wrong, _ = torch_module(x, context, context, key_padding_mask=mask.squeeze(1))
    assert torch.isnan(wrong[0]).all()  # sample 0 has no padding, so every key is blocked
    assert not torch.allclose(wrong[1], module(x, context, mask)[1])


def test_mhca_matches_manual_torch_sdpa_path():
    module = MultiHeadCrossAttention(32, 4, d_context=20)
    x, context = torch.randn(2, 3, 32), torch.randn(2, 7, 20)
    mask = padding_mask(torch.tensor([7, 2]))

    def heads(t):
        return t.view(2, -1, 4, 8).transpose(1, 2)

    attended = F.scaled_dot_product_attention(
        heads(module.q_proj(x)), heads(module.k_proj(context)), heads(module.v_proj(context)), attn_mask=mask.unsqueeze(1)
    )
    expected = module.out_proj(attended.transpose(1, 2).reshape(2, 3, 32))
    assert_close(module(x, context, mask), expected)


def test_mhca_fully_masked_row_returns_zeros_without_nan():
    module = MultiHeadCrossAttention(16, 4, d_context=12)
    x = torch.randn(2, 3, 16, requires_grad=True)
    context = torch.randn(2, 5, 12, requires_grad=True)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[1, 0] = False
    output = module(x, context, mask)
    assert torch.equal(output[1, 0], torch.zeros(16))
    output.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(context.grad).all()
    for parameter in module.parameters():
        assert torch.isfinite(parameter.grad).all()


def test_mhca_accepts_per_head_and_2d_masks():
    module = MultiHeadCrossAttention(16, 2)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    shared = causal_mask(4)
    assert_close(module(x, context, shared), module(x, context, shared.expand(2, 4, 4)))
    per_head = shared.expand(2, 2, 4, 4)
    assert_close(module(x, context, per_head), module(x, context, shared))


def test_mhca_weights_shape_and_rows_sum_to_one():
    module = MultiHeadCrossAttention(16, 4, d_context=12)
    _, weights = module(torch.randn(2, 3, 16), torch.randn(2, 5, 12), return_weights=True)
    assert weights.shape == (2, 4, 3, 5)
    assert_close(weights.sum(-1), torch.ones(2, 4, 3))


def test_mhca_constructor_errors():
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadCrossAttention(30, 4)
    with pytest.raises(ValueError, match="positive int"):
        MultiHeadCrossAttention(0, 1)


def test_mhca_forward_errors():
    module = MultiHeadCrossAttention(16, 2, d_context=8)
    with pytest.raises(ValueError, match="d_context"):
        module(torch.randn(2, 3, 16), torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="batch size"):
        module(torch.randn(2, 3, 16), torch.randn(3, 5, 8))
    with pytest.raises(TypeError, match="bool"):
        module(torch.randn(2, 3, 16), torch.randn(2, 5, 8), torch.ones(2, 1, 5))
    with pytest.raises(ValueError, match="broadcast"):
        module(torch.randn(2, 3, 16), torch.randn(2, 5, 8), torch.ones(2, 1, 4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Checker: scaled dot-product attention
# ---------------------------------------------------------------------------------------------


def _sdpa_with(*, scale="sqrt", softmax_dim=-1, invert=False, softmax=True, ignore_mask=False, fill=None, zero_rows=True):
    def attention(q, k, v, attention_mask=None):
        d = q.size(-1)
        factor = {"sqrt": 1 / math.sqrt(d), "none": 1.0, "d": 1 / d}[scale]
        scores = q @ k.transpose(-2, -1) * factor
        mask = attention_mask
        if mask is not None and not ignore_mask:
            allowed = ~mask if invert else mask
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min if fill is None else fill)
        weights = torch.softmax(scores, dim=softmax_dim) if softmax else scores
        output = weights @ v
        if mask is not None and zero_rows and fill is None and not ignore_mask:
            output = output * (~mask if invert else mask).any(-1, keepdim=True)
        return output

    return attention


def _status(check, candidate):
    return check(candidate, raise_on_fail=False, verbose=False).status


def test_sdpa_checker_accepts_reference():
    assert _status(checks.check_scaled_dot_product_attention, scaled_dot_product_attention) == "passed"


def test_sdpa_checker_reports_stub():
    def stub(q, k, v, attention_mask=None):
        raise NotImplementedError

    assert _status(checks.check_scaled_dot_product_attention, stub) == "not_implemented"


@pytest.mark.parametrize(
    "wrong",
    [
        dict(scale="none"),
        dict(scale="d"),
        dict(softmax_dim=-2),
        dict(invert=True),
        dict(softmax=False),
        dict(ignore_mask=True),
        dict(fill=float("-inf")),
        dict(zero_rows=False),
    ],
    ids=["no-scaling", "scale-by-d", "softmax-over-queries", "inverted-mask", "no-softmax", "mask-ignored", "minus-inf-nan", "uniform-empty-rows"],
)
def test_sdpa_checker_rejects_wrong_answers(wrong):
    result = checks.check_scaled_dot_product_attention(_sdpa_with(**wrong), raise_on_fail=False, verbose=False)
    assert result.status == "failed"


def test_sdpa_checker_names_missing_scaling():
    result = checks.check_scaled_dot_product_attention(_sdpa_with(scale="none"), raise_on_fail=False, verbose=False)
    assert "sqrt" in result.hint


def test_sdpa_checker_names_wrong_softmax_axis():
    result = checks.check_scaled_dot_product_attention(_sdpa_with(softmax_dim=-2), raise_on_fail=False, verbose=False)
    assert "dim=-1" in result.hint


def test_sdpa_checker_names_inverted_mask():
    result = checks.check_scaled_dot_product_attention(_sdpa_with(invert=True), raise_on_fail=False, verbose=False)
    assert "True = 可以看" in result.hint


def test_sdpa_checker_rejects_in_place_input_change():
    def in_place(q, k, v, attention_mask=None):
        q.mul_(1.0 / math.sqrt(q.size(-1)))
        return _sdpa_with(scale="none")(q, k, v, attention_mask)

    assert _status(checks.check_scaled_dot_product_attention, in_place) == "failed"


def test_sdpa_checker_reports_crash_as_error():
    def crashes(q, k, v, attention_mask=None):
        return q @ v  # wrong shapes for most cases

    assert _status(checks.check_scaled_dot_product_attention, crashes) in ("error", "failed")


# ---------------------------------------------------------------------------------------------
# Checker: padding mask
# ---------------------------------------------------------------------------------------------


def test_padding_mask_checker_accepts_reference():
    assert _status(checks.check_padding_mask, lambda lengths, max_len: padding_mask(lengths, max_len)) == "passed"


def test_padding_mask_checker_reports_stub():
    def stub(lengths, max_len):
        raise NotImplementedError

    assert _status(checks.check_padding_mask, stub) == "not_implemented"


@pytest.mark.parametrize(
    "wrong",
    [
        lambda lengths, max_len: ~padding_mask(lengths, max_len),
        lambda lengths, max_len: padding_mask(lengths, max_len).squeeze(1),
        lambda lengths, max_len: padding_mask(lengths, max_len).float(),
        lambda lengths, max_len: (torch.arange(max_len)[None] <= lengths[:, None]).unsqueeze(1),
    ],
    ids=["inverted", "no-query-axis", "float", "off-by-one"],
)
def test_padding_mask_checker_rejects_wrong_answers(wrong):
    assert _status(checks.check_padding_mask, wrong) == "failed"


# ---------------------------------------------------------------------------------------------
# Checker: multi-head cross-attention
# ---------------------------------------------------------------------------------------------


def _mhca_class(*, scale="head", softmax_dim=-1, invert=False, softmax=True, kv_shared=False, split="right", merge="right", zero_rows=True):
    class Candidate(nn.Module):
        def __init__(self, d_model, n_heads, d_context=None):
            super().__init__()
            d_context = d_context or d_model
            self.n_heads, self.d_head = n_heads, d_model // n_heads
            self.q_proj = nn.Linear(d_model, d_model)
            self.k_proj = nn.Linear(d_context, d_model)
            self.v_proj = nn.Linear(d_context, d_model)
            self.out_proj = nn.Linear(d_model, d_model)

        def forward(self, x, context, attention_mask=None):
            batch, length, d_model = x.shape

            def heads(t):
                if split == "wrong":
                    return t.reshape(batch, self.n_heads, t.size(1), self.d_head)
                return t.view(batch, t.size(1), self.n_heads, self.d_head).transpose(1, 2)

            q = heads(self.q_proj(x))
            k = heads(self.k_proj(context))
            v = heads(self.k_proj(context) if kv_shared else self.v_proj(context))
            factor = {"head": 1 / math.sqrt(self.d_head), "model": 1 / math.sqrt(d_model), "none": 1.0}[scale]
            scores = q @ k.transpose(-2, -1) * factor
            mask = None if attention_mask is None else attention_mask.unsqueeze(1)
            if mask is not None:
                allowed = ~mask if invert else mask
                scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=softmax_dim) if softmax else scores
            attended = weights @ v
            if merge == "wrong":
                merged = attended.reshape(batch, length, d_model)
            else:
                merged = attended.transpose(1, 2).reshape(batch, length, d_model)
            output = self.out_proj(merged)
            if mask is not None and zero_rows:
                output = output * mask.any(-1).any(1).unsqueeze(-1)
            return output

    return Candidate


def test_mhca_checker_accepts_reference():
    assert _status(checks.check_multi_head_cross_attention, MultiHeadCrossAttention) == "passed"


def test_mhca_checker_accepts_independent_correct_version():
    assert _status(checks.check_multi_head_cross_attention, _mhca_class()) == "passed"


def test_mhca_checker_reports_stub():
    class Stub(nn.Module):
        def __init__(self, d_model, n_heads, d_context=None):
            super().__init__()
            raise NotImplementedError

    assert _status(checks.check_multi_head_cross_attention, Stub) == "not_implemented"


@pytest.mark.parametrize(
    "wrong, hint_word",
    [
        (dict(scale="none"), "sqrt"),
        (dict(scale="model"), "d_head"),
        (dict(softmax_dim=-2), "dim=-1"),
        (dict(invert=True), "True = 可以看"),
        (dict(softmax=False), "softmax"),
        (dict(kv_shared=True), "v_proj"),
        (dict(split="wrong"), "切 head"),
        (dict(merge="wrong"), "合併 head"),
        (dict(zero_rows=False), "bias"),
    ],
    ids=["no-scaling", "scale-by-d-model", "softmax-over-queries", "inverted-mask", "no-softmax", "keys-as-values", "split-heads-wrong", "merge-heads-wrong", "bias-on-empty-rows"],
)
def test_mhca_checker_rejects_wrong_answers(wrong, hint_word):
    result = checks.check_multi_head_cross_attention(_mhca_class(**wrong), raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert hint_word in result.hint


def test_mhca_checker_rejects_single_kv_projection():
    class OneKV(nn.Module):
        def __init__(self, d_model, n_heads, d_context=None):
            super().__init__()
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_context or d_model, d_model)
            self.out_proj = nn.Linear(d_model, d_model)

        def forward(self, x, context, attention_mask=None):
            return x

    result = checks.check_multi_head_cross_attention(OneKV, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "kv_proj" in result.got


# ---------------------------------------------------------------------------------------------
# Checker: the buggy snippet and its fix
# ---------------------------------------------------------------------------------------------


class BuggyCrossAttention(nn.Module):
    """One projection for keys and values, and no softmax (the two faults of notebook 02)."""

    def __init__(self, d_model, d_context):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_context, d_model)

    def forward(self, x, context):
        q, k, v = self.q_proj(x), self.kv_proj(context), self.kv_proj(context)
        return (q @ k.transpose(1, 2) / math.sqrt(q.size(-1))) @ v


class FixedCrossAttention(nn.Module):
    def __init__(self, d_model, d_context):
        super().__init__()
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_context, d_model)
        self.v_proj = nn.Linear(d_context, d_model)

    def forward(self, x, context):
        q, k, v = self.q_proj(x), self.k_proj(context), self.v_proj(context)
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.size(-1)), dim=-1) @ v


class OnlySoftmaxFixed(BuggyCrossAttention):
    def forward(self, x, context):
        q, k, v = self.q_proj(x), self.kv_proj(context), self.kv_proj(context)
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.size(-1)), dim=-1) @ v


class OnlyProjectionFixed(FixedCrossAttention):
    def forward(self, x, context):
        q, k, v = self.q_proj(x), self.k_proj(context), self.v_proj(context)
        return (q @ k.transpose(1, 2) / math.sqrt(q.size(-1))) @ v


class UnusedValueProjection(FixedCrossAttention):
    def forward(self, x, context):
        q, k = self.q_proj(x), self.k_proj(context)
        return torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.size(-1)), dim=-1) @ k


class ExtraOutputProjection(FixedCrossAttention):
    def __init__(self, d_model, d_context):
        super().__init__(d_model, d_context)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, context):
        return self.out_proj(super().forward(x, context))


class SameModuleForKeyAndValue(FixedCrossAttention):
    def __init__(self, d_model, d_context):
        super().__init__(d_model, d_context)
        self.v_proj = self.k_proj


def test_fix_checker_accepts_fixed_version():
    assert _status(checks.check_fixed_cross_attention, FixedCrossAttention) == "passed"


@pytest.mark.parametrize(
    "wrong",
    [BuggyCrossAttention, OnlySoftmaxFixed, OnlyProjectionFixed, UnusedValueProjection, SameModuleForKeyAndValue, ExtraOutputProjection],
    ids=["buggy-original", "only-softmax-fixed", "only-projection-fixed", "v-proj-unused", "v-proj-is-k-proj", "extra-out-proj"],
)
def test_fix_checker_rejects_buggy_versions(wrong):
    assert _status(checks.check_fixed_cross_attention, wrong) == "failed"


def test_fix_checker_names_missing_softmax():
    result = checks.check_fixed_cross_attention(OnlyProjectionFixed, raise_on_fail=False, verbose=False)
    assert "softmax" in result.hint
