"""Scaled dot-product attention, multi-head cross-attention and the masks they take.

Mask convention, used everywhere in the course: a boolean mask where ``True`` means "this
query may attend to this key", the same meaning as ``torch.nn.functional.scaled_dot_product_attention``.
``torch.nn.MultiheadAttention`` uses the opposite meaning (``True`` = blocked);
:func:`to_nn_multihead_attention_mask` and :func:`key_padding_to_attention_mask` convert
between the two.

A query row whose mask allows no key at all gets an output of zeros (and zero gradients), not
NaN. The naive ``masked_fill(-inf)`` + softmax computes ``exp(-inf) / sum(exp(-inf)) = 0 / 0``
for such a row. Here masked scores are set to the minimum finite value of the dtype instead,
and the output of rows without any allowed key is multiplied by zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MultiHeadCrossAttention",
    "as_nn_multihead_attention",
    "causal_mask",
    "key_padding_to_attention_mask",
    "padding_mask",
    "scaled_dot_product_attention",
    "to_nn_multihead_attention_mask",
]


def _check_bool_mask(attention_mask: torch.Tensor, scores_shape: tuple[int, ...], name: str = "attention_mask") -> None:
    """Raise unless ``attention_mask`` is a bool tensor that broadcasts to ``scores_shape``."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor (True = may attend), got {type(attention_mask).__name__}.")
    if attention_mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must have dtype torch.bool (True = may attend), got {attention_mask.dtype}; "
            "convert a 0/1 mask with mask.bool(), or an additive float mask with mask == 0."
        )
    try:
        broadcast = torch.broadcast_shapes(tuple(attention_mask.shape), scores_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(scores_shape):
        raise ValueError(
            f"{name} of shape {tuple(attention_mask.shape)} does not broadcast to the attention scores "
            f"of shape {scores_shape} (..., query_len, key_len); a padding mask over the keys has "
            "shape (batch, 1, key_len), a full mask (batch, query_len, key_len)."
        )


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Compute ``softmax(q k^T / sqrt(d)) v`` over the allowed keys, with plain tensor operations.

    Shapes: ``q`` (..., Lq, d), ``k`` (..., Lk, d), ``v`` (..., Lk, dv); the leading dimensions
    broadcast, e.g. (batch, heads). ``attention_mask`` is a bool tensor that broadcasts to
    (..., Lq, Lk), where True = the query may attend to the key. ``scale`` defaults to
    ``1 / sqrt(d)``. ``dropout_p`` drops attention weights (pass 0.0 at evaluation time).

    Returns the output (..., Lq, dv), or ``(output, weights)`` with weights (..., Lq, Lk) when
    ``return_weights`` is true. A query with no allowed key gets a zero output row, zero weights
    and zero gradients, never NaN.

    Raises ``ValueError`` for mismatched sizes or a mask that does not broadcast, and
    ``TypeError`` for a mask that is not bool.
    """
    if q.dim() < 2 or k.dim() < 2 or v.dim() < 2:
        raise ValueError(
            f"q, k and v need at least 2 dimensions (..., length, features), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if q.size(-1) != k.size(-1):
        raise ValueError(f"q and k must have the same feature size, got q {tuple(q.shape)} and k {tuple(k.shape)}.")
    if k.size(-2) != v.size(-2):
        raise ValueError(f"k and v must have the same number of keys, got k {tuple(k.shape)} and v {tuple(v.shape)}.")
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))

    # Scaling q (Lq x d numbers) is cheaper than scaling the scores (Lq x Lk numbers).
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (..., Lq, Lk)

    if attention_mask is not None:
        _check_bool_mask(attention_mask, tuple(scores.shape))
        # Blocked keys get the minimum finite value, not -inf, so a fully masked row gives a finite
        # uniform softmax (zeroed below) instead of NaN. A bias at the mask's own, often smaller,
        # shape plus one broadcast add is several times faster on CPU than a broadcast
        # masked_fill_. In place is safe because matmul's backward needs its inputs, not its output.
        blocked_bias = attention_mask.logical_not().to(scores.dtype).mul_(torch.finfo(scores.dtype).min)
        scores.add_(blocked_bias)

    weights = torch.softmax(scores, dim=-1)  # (..., Lq, Lk), each row sums to 1
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    output = torch.matmul(weights, v)  # (..., Lq, dv)

    if attention_mask is not None:
        has_key = attention_mask.any(dim=-1, keepdim=True)  # (..., Lq or 1, 1)
        output = output * has_key
        if return_weights:
            weights = weights * has_key

    if return_weights:
        return output, weights
    return output


def padding_mask(lengths_or_attention_mask: torch.Tensor | Sequence[int], max_len: int | None = None) -> torch.Tensor:
    """Build a key padding mask of shape (batch, 1, max_len), True = real token (may attend).

    Accepts either ``lengths`` (a 1-d integer tensor or a list of ints: the number of real
    tokens of each sequence, padding at the end) or a 2-d ``attention_mask`` (batch, length) as
    tokenizers return it (bool, or 0/1 integers with 1 = real token). The middle axis of size 1
    broadcasts over the queries, so the result can go straight into
    :func:`scaled_dot_product_attention` or :class:`MultiHeadCrossAttention`.

    ``max_len`` (only with lengths) defaults to the largest length. Raises ``ValueError`` for
    negative lengths, lengths above ``max_len``, or an attention mask with values other than 0/1,
    and ``TypeError`` for float lengths.
    """
    if not isinstance(lengths_or_attention_mask, torch.Tensor):
        lengths_or_attention_mask = torch.as_tensor(lengths_or_attention_mask)
    values = lengths_or_attention_mask

    if values.dim() == 2:
        if max_len is not None:
            raise ValueError("max_len only applies to lengths; a 2-d attention_mask already has its length.")
        if values.dtype != torch.bool:
            if values.is_floating_point() or not bool(((values == 0) | (values == 1)).all()):
                raise ValueError(
                    "a 2-d attention_mask must be bool or contain only 0 and 1 (1 = real token), "
                    f"got dtype {values.dtype} with values {values.unique()[:6].tolist()}."
                )
        return values.bool().unsqueeze(1)  # (B, 1, L)

    if values.dim() != 1:
        raise ValueError(
            f"expected lengths (batch,) or an attention_mask (batch, length), got shape {tuple(values.shape)}."
        )
    if values.is_floating_point() or values.dtype == torch.bool:
        raise TypeError(f"lengths must be integers, got dtype {values.dtype}.")
    if values.numel() == 0:
        raise ValueError("lengths is empty; pass one length per sequence.")
    if bool((values < 0).any()):
        raise ValueError(f"lengths must be >= 0, got {values.tolist()}.")
    longest = int(values.max())
    if max_len is None:
        max_len = longest
    if longest > max_len:
        raise ValueError(f"a length of {longest} does not fit in max_len={max_len}; raise max_len.")

    positions = torch.arange(max_len, device=values.device)  # (L,)
    return (positions.unsqueeze(0) < values.unsqueeze(1)).unsqueeze(1)  # (B, 1, L)


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Return the (length, length) causal mask: True where key position <= query position.

    Query ``i`` may attend to itself and to earlier positions. Combine it with a padding mask
    by ``&``: ``causal_mask(L) & padding_mask(lengths)`` broadcasts to (batch, L, L).
    Raises ``ValueError`` when ``length`` is not a positive int.
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}.")
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def to_nn_multihead_attention_mask(attention_mask: torch.Tensor, num_heads: int, query_len: int | None = None) -> torch.Tensor:
    """Convert a course mask (True = may attend) into ``nn.MultiheadAttention``'s ``attn_mask``.

    ``nn.MultiheadAttention`` reads a bool ``attn_mask`` the other way round (True = may NOT
    attend) and wants shape (Lq, Lk) or (batch * num_heads, Lq, Lk) with batch-major order.
    A 2-d mask (Lq, Lk) is returned inverted. A 3-d mask (batch, Lq or 1, Lk) is inverted,
    expanded to ``query_len`` queries and repeated for each head. Pass ``query_len`` when the
    mask's query axis is 1. Raises ``ValueError`` for other shapes and ``TypeError``
    for non-bool masks.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        raise TypeError("attention_mask must be a bool tensor (True = may attend).")
    if attention_mask.dim() == 2:
        return ~attention_mask
    if attention_mask.dim() != 3:
        raise ValueError(
            f"expected a (Lq, Lk) or (batch, Lq, Lk) mask, got shape {tuple(attention_mask.shape)}."
        )
    batch, mask_queries, key_len = attention_mask.shape
    if query_len is None:
        if mask_queries == 1:
            raise ValueError("the mask has a query axis of size 1; pass query_len so it can be expanded.")
        query_len = mask_queries
    if mask_queries not in (1, query_len):
        raise ValueError(f"mask query axis has size {mask_queries}, which does not fit query_len={query_len}.")

    expanded = attention_mask.expand(batch, query_len, key_len)  # (B, Lq, Lk)
    per_head = expanded.repeat_interleave(num_heads, dim=0)  # (B * H, Lq, Lk), batch-major
    return ~per_head


def key_padding_to_attention_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Convert ``nn.MultiheadAttention``'s ``key_padding_mask`` (batch, Lk), True = padding,
    into a course mask (batch, 1, Lk), True = may attend."""
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor (True = padding, as nn.MultiheadAttention reads it).")
    if key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must have shape (batch, key_len), got {tuple(key_padding_mask.shape)}.")
    return (~key_padding_mask).unsqueeze(1)  # (B, 1, Lk)


class MultiHeadCrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x``, keys and values from ``context``.

    ``x`` (batch, Lq, d_model) are for example text tokens, and ``context`` (batch, Lk,
    d_context) for example image patch features. The context width may differ from
    ``d_model`` and defaults to it. Four separate projections: ``q_proj`` (d_model -> d_model), ``k_proj`` and
    ``v_proj`` (d_context -> d_model), ``out_proj`` (d_model -> d_model). Each of the
    ``n_heads`` heads attends with ``d_model / n_heads`` features and its own
    ``1 / sqrt(d_head)`` scale.

    ``attention_mask`` is bool, True = may attend, with shape (batch, Lq, Lk) or anything that
    broadcasts to it: (batch, 1, Lk) for key padding, (Lq, Lk) for one mask shared by the
    batch, or (batch, n_heads, Lq, Lk) per head. A query row with no allowed key returns
    zeros (no NaN, forward or backward), so a residual connection leaves that token unchanged.
    """

    def __init__(self, d_model: int, n_heads: int, d_context: int | None = None, *, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        d_context = d_model if d_context is None else d_context
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("d_context", d_context)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if d_model % n_heads != 0:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}; each head needs "
                "d_model / n_heads features, so pick n_heads among the divisors of d_model."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_context = d_context
        self.d_head = d_model // n_heads
        self.dropout = dropout

        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_context, d_model, bias=bias)
        self.v_proj = nn.Linear(d_context, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, d_context={self.d_context}, dropout={self.dropout}"

    def _split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tensor.shape
        # Split the feature axis (not the length axis) into heads, then move heads forward.
        return tensor.view(batch, length, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, L, Dh)

    def _head_mask(self, attention_mask: torch.Tensor, batch: int, query_len: int, key_len: int) -> torch.Tensor:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a bool torch.Tensor (True = may attend), got {type(attention_mask).__name__}.")
        if attention_mask.dim() == 2:
            attention_mask = attention_mask.reshape(1, 1, *attention_mask.shape)  # (1, 1, Lq, Lk)
        elif attention_mask.dim() == 3:
            attention_mask = attention_mask.unsqueeze(1)  # (B, 1, Lq or 1, Lk): same mask for every head
        elif attention_mask.dim() != 4:
            raise ValueError(
                f"attention_mask must have shape (batch, query_len, key_len), (batch, 1, key_len), "
                f"(query_len, key_len) or (batch, n_heads, query_len, key_len); got {tuple(attention_mask.shape)}."
            )
        _check_bool_mask(attention_mask, (batch, self.n_heads, query_len, key_len))
        return attention_mask

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return the attended output (batch, Lq, d_model), and with ``return_weights`` also the
        attention weights (batch, n_heads, Lq, Lk), e.g. for plotting.

        Raises ``ValueError`` for inputs of the wrong rank or width, mismatched batch sizes or a
        mask that does not broadcast, and ``TypeError`` for a non-bool mask.
        """
        if x.dim() != 3 or x.size(-1) != self.d_model:
            raise ValueError(f"x must have shape (batch, query_len, {self.d_model}), got {tuple(x.shape)}.")
        if context.dim() != 3 or context.size(-1) != self.d_context:
            raise ValueError(
                f"context must have shape (batch, key_len, {self.d_context}), got {tuple(context.shape)}; "
                "pass d_context= when the context width differs from d_model."
            )
        if context.size(0) != x.size(0):
            raise ValueError(f"x and context must have the same batch size, got {x.size(0)} and {context.size(0)}.")
        batch, query_len, _ = x.shape
        key_len = context.size(1)

        q = self._split_heads(self.q_proj(x))  # (B, H, Lq, Dh)
        k = self._split_heads(self.k_proj(context))  # (B, H, Lk, Dh)
        v = self._split_heads(self.v_proj(context))  # (B, H, Lk, Dh)

        head_mask = None
        if attention_mask is not None:
            head_mask = self._head_mask(attention_mask, batch, query_len, key_len)

        attended, weights = scaled_dot_product_attention(
            q, k, v, head_mask, dropout_p=self.dropout if self.training else 0.0, return_weights=True
        )  # (B, H, Lq, Dh), (B, H, Lq, Lk)

        merged = attended.transpose(1, 2).reshape(batch, query_len, self.d_model)  # (B, Lq, D)
        output = self.out_proj(merged)

        if head_mask is not None:
            # out_proj would turn a zero row into its bias; keep "no allowed key -> zeros".
            # A row counts as empty only when no head may attend to any key.
            has_key = head_mask.any(dim=-1).any(dim=1)  # (B or 1, Lq or 1)
            output = output * has_key.unsqueeze(-1)

        if return_weights:
            return output, weights
        return output


def as_nn_multihead_attention(module: MultiHeadCrossAttention) -> nn.MultiheadAttention:
    """Build an ``nn.MultiheadAttention`` (``batch_first=True``) holding copies of ``module``'s weights.

    With a context width different from ``d_model``, PyTorch keeps separate
    ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` (``kdim``/``vdim``); otherwise one
    stacked ``in_proj_weight``. Pass masks through :func:`to_nn_multihead_attention_mask`.
    Raises ``TypeError`` for other modules and ``ValueError`` for modules without biases.
    """
    if not isinstance(module, MultiHeadCrossAttention):
        raise TypeError(f"expected a MultiHeadCrossAttention, got {type(module).__name__}.")
    if module.q_proj.bias is None:
        raise ValueError("nn.MultiheadAttention copies need biases; build the module with bias=True.")
    reference = module.q_proj.weight
    torch_module = nn.MultiheadAttention(
        module.d_model,
        module.n_heads,
        dropout=module.dropout,
        kdim=module.d_context,
        vdim=module.d_context,
        batch_first=True,
        device=reference.device,
        dtype=reference.dtype,
    )
    with torch.no_grad():
        if torch_module.in_proj_weight is not None:
            torch_module.in_proj_weight.copy_(torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight]))
        else:
            torch_module.q_proj_weight.copy_(module.q_proj.weight)
            torch_module.k_proj_weight.copy_(module.k_proj.weight)
            torch_module.v_proj_weight.copy_(module.v_proj.weight)
        torch_module.in_proj_bias.copy_(torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias]))
        torch_module.out_proj.weight.copy_(module.out_proj.weight)
        torch_module.out_proj.bias.copy_(module.out_proj.bias)
    return torch_module
