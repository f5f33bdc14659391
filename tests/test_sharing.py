"""Tests of course_utils.vlm.sharing and the checkers of notebook 03.

Covered: the structure of each sharing mode, parameter counts with shared tensors counted once,
the gradient of a shared weight as the sum over its uses, and checkpoints that keep sharing.
Mutation tests: the checkers reject copies where sharing was requested, sharing where separate
layers were requested, and optimizer lists with a shared parameter more than once.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from course_utils.checks import sharing as checks
from course_utils.vlm.attention import MultiHeadCrossAttention
from course_utils.vlm.sharing import (
    SHARING_MODES,
    ConvPatchEncoder,
    CrossAttentionBlock,
    CrossAttentionStack,
    CrossAttentionVQA,
    build_cross_attention_layers,
    collect_vqa_examples,
    count_parameter_uses,
    count_parameters,
    measure_training_memory,
    object_patch_mask,
    shared_parameter_names,
    tie_key_value,
    unique_parameters,
)

D_MODEL, HEADS, D_CONTEXT = 16, 2, 12


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _attention_parameters(d_model=D_MODEL, d_context=D_CONTEXT):
    return sum(p.numel() for p in MultiHeadCrossAttention(d_model, HEADS, d_context).parameters())


def _block_parameters():
    return sum(p.numel() for p in CrossAttentionBlock(D_MODEL, HEADS, D_CONTEXT).parameters())


def _kv_parameters():
    attn = MultiHeadCrossAttention(D_MODEL, HEADS, D_CONTEXT)
    return sum(p.numel() for m in (attn.k_proj, attn.v_proj) for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# Structure of each sharing mode
# ---------------------------------------------------------------------------------------------


def test_unshared_layers_have_separate_attention():
    layers = build_cross_attention_layers(4, D_MODEL, HEADS, D_CONTEXT, sharing="none")
    attentions = {id(layer.attn) for layer in layers}
    assert len(attentions) == 4
    assert count_parameters(layers) == 4 * _block_parameters()
    assert shared_parameter_names(layers) == {}


def test_all_shared_layers_reuse_one_attention():
    layers = build_cross_attention_layers(4, D_MODEL, HEADS, D_CONTEXT, sharing="all")
    assert all(layer.attn is layers[0].attn for layer in layers)
    assert len({id(layer) for layer in layers}) == 4  # norms and MLPs stay per layer
    assert count_parameters(layers) == 4 * _block_parameters() - 3 * _attention_parameters()


def test_kv_shared_layers_share_only_keys_and_values():
    layers = build_cross_attention_layers(4, D_MODEL, HEADS, D_CONTEXT, sharing="kv")
    for layer in layers[1:]:
        assert layer.attn.k_proj is layers[0].attn.k_proj
        assert layer.attn.v_proj is layers[0].attn.v_proj
        assert layer.attn.q_proj is not layers[0].attn.q_proj
        assert layer.attn.out_proj is not layers[0].attn.out_proj
    assert layers[0].attn.k_proj is not layers[0].attn.v_proj
    assert count_parameters(layers) == 4 * _block_parameters() - 3 * _kv_parameters()


def test_every_k_shares_multiples_of_k():
    layers = build_cross_attention_layers(5, D_MODEL, HEADS, D_CONTEXT, sharing="every_k", every=2)
    shared = layers[0].attn
    assert [layer.attn is shared for layer in layers] == [True, False, True, False, True]
    assert layers[1].attn is not layers[3].attn
    assert count_parameters(layers) == 5 * _block_parameters() - 2 * _attention_parameters()


def test_parameter_uses_equal_the_unshared_count():
    for mode in SHARING_MODES:
        torch.manual_seed(0)
        layers = build_cross_attention_layers(3, D_MODEL, HEADS, D_CONTEXT, sharing=mode)
        assert count_parameter_uses(layers) == 3 * _block_parameters(), mode


def test_shared_parameter_names_lists_every_place():
    layers = build_cross_attention_layers(3, D_MODEL, HEADS, D_CONTEXT, sharing="kv")
    names = shared_parameter_names(layers)
    assert names["0.attn.k_proj.weight"] == ["0.attn.k_proj.weight", "1.attn.k_proj.weight", "2.attn.k_proj.weight"]
    assert "0.attn.q_proj.weight" not in names


def test_build_layers_errors():
    with pytest.raises(ValueError, match="unknown sharing mode"):
        build_cross_attention_layers(2, D_MODEL, HEADS, sharing="some")
    with pytest.raises(ValueError, match="depth"):
        build_cross_attention_layers(0, D_MODEL, HEADS)
    with pytest.raises(ValueError, match="every"):
        build_cross_attention_layers(2, D_MODEL, HEADS, sharing="every_k", every=0)


def test_block_rejects_shared_attention_of_other_size():
    with pytest.raises(ValueError, match="shared attention"):
        CrossAttentionBlock(D_MODEL, HEADS, D_CONTEXT, attn=MultiHeadCrossAttention(8, 2, D_CONTEXT))


def test_tie_key_value_rejects_different_shapes():
    layers = [MultiHeadCrossAttention(D_MODEL, HEADS, D_CONTEXT), MultiHeadCrossAttention(D_MODEL, HEADS, 8)]
    with pytest.raises(ValueError, match="only equal shapes"):
        tie_key_value(layers)
    with pytest.raises(TypeError):
        tie_key_value([nn.Linear(2, 2)])


# ---------------------------------------------------------------------------------------------
# Gradients, optimizers and checkpoints
# ---------------------------------------------------------------------------------------------


def test_shared_gradient_is_sum_of_per_use_gradients():
    stack = CrossAttentionStack(3, D_MODEL, HEADS, D_CONTEXT, sharing="all").double()
    untied = copy.deepcopy(stack)
    for index, layer in enumerate(untied.layers):
        layer.attn = copy.deepcopy(stack.layers[0].attn)  # equal values, separate tensors
    assert count_parameters(untied) > count_parameters(stack)

    x = torch.randn(2, 4, D_MODEL, dtype=torch.float64)
    context = torch.randn(2, 5, D_CONTEXT, dtype=torch.float64)
    assert_close(stack(x, context), untied(x, context))

    stack(x, context).square().sum().backward()
    untied(x, context).square().sum().backward()
    summed = sum(layer.attn.q_proj.weight.grad for layer in untied.layers)
    assert_close(stack.layers[0].attn.q_proj.weight.grad, summed)


def test_unique_parameters_keeps_first_appearance_order():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    params = unique_parameters([first, second, first], second.weight)
    assert [id(p) for p in params] == [id(first.weight), id(first.bias), id(second.weight), id(second.bias)]


def test_unique_parameters_keeps_equal_valued_tensors():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.zero_()
            layer.bias.zero_()
    assert len(unique_parameters([first, second])) == 4


def test_unique_parameters_rejects_other_types():
    with pytest.raises(TypeError, match="modules, parameters"):
        unique_parameters([3])


def test_duplicate_parameter_in_sgd_steps_twice():
    # Why the optimizer list must be deduplicated: a listed-twice weight moves twice as far.
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    with pytest.warns(UserWarning, match="duplicate"):
        optimizer = torch.optim.SGD([layer.weight, layer.weight], lr=0.1)
    layer(torch.ones(1, 1)).sum().backward()
    optimizer.step()
    assert_close(layer.weight.detach(), torch.tensor([[0.8]]))


def test_state_dict_round_trip_keeps_sharing():
    model = CrossAttentionStack(3, D_MODEL, HEADS, D_CONTEXT, sharing="kv")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    restored = CrossAttentionStack(3, D_MODEL, HEADS, D_CONTEXT, sharing="kv")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.layers[2].attn.k_proj is restored.layers[0].attn.k_proj
    x, context = torch.randn(1, 2, D_MODEL), torch.randn(1, 3, D_CONTEXT)
    assert_close(restored(x, context), model(x, context))


# ---------------------------------------------------------------------------------------------
# Stack, VQA model and memory measurement
# ---------------------------------------------------------------------------------------------


def test_stack_forward_shapes_and_weights():
    stack = CrossAttentionStack(2, D_MODEL, HEADS, D_CONTEXT, sharing="every_k")
    mask = torch.ones(2, 1, 5, dtype=torch.bool)
    mask[1, :, 3:] = False
    output, weights = stack(torch.randn(2, 4, D_MODEL), torch.randn(2, 5, D_CONTEXT), mask, return_weights=True)
    assert output.shape == (2, 4, D_MODEL)
    assert [w.shape for w in weights] == [(2, HEADS, 4, 5)] * 2
    assert torch.equal(weights[0][1, :, :, 3:], torch.zeros(HEADS, 4, 2))


def test_patch_encoder_grid():
    encoder = ConvPatchEncoder(24, image_size=32, patch_size=4)
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 64, 24)
    with pytest.raises(ValueError, match="power of two"):
        ConvPatchEncoder(24, image_size=30, patch_size=3)
    with pytest.raises(ValueError, match="images must have shape"):
        encoder(torch.rand(2, 3, 16, 16))


def test_vqa_model_forward():
    model = CrossAttentionVQA(20, 6, image_size=32, patch_size=4, d_model=16, d_context=12, n_heads=2, depth=2, sharing="all")
    ids = torch.randint(3, 20, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    logits, weights = model(torch.rand(3, 3, 32, 32), ids, mask, return_weights=True)
    assert logits.shape == (3, 6)
    assert len(weights) == 2
    assert weights[0].shape == (3, 2, 5, 64)
    assert model.config["sharing"] == "all"
    rebuilt = CrossAttentionVQA(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert_close(rebuilt(torch.ones(1, 3, 32, 32), ids[:1], mask[:1]), model(torch.ones(1, 3, 32, 32), ids[:1], mask[:1]))


def test_vqa_model_rejects_long_questions():
    model = CrossAttentionVQA(20, 6, image_size=32, patch_size=4, d_model=16, d_context=12, n_heads=2, max_question_len=4)
    with pytest.raises(ValueError, match="max_question_len"):
        model(torch.rand(1, 3, 32, 32), torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))


def test_collect_vqa_examples_keeps_requested_types():
    from course_utils.data import make_shapes_world

    scenes = make_shapes_world(6, "test", image_size=32, min_objects=2, max_objects=3)
    examples = collect_vqa_examples(scenes, ["color", "count"])
    assert examples.images.shape == (6, 3, 32, 32)
    assert examples.images.dtype == torch.uint8
    assert set(examples.question_types) == {"color", "count"}
    assert len(examples) == len(examples.answers) == len(examples.image_index)
    expected = sum(t in ("color", "count") for types in scenes["question_types"] for t in types)
    assert len(examples) == expected
    first = int(examples.image_index[0])
    assert examples.questions[0] in scenes[first]["questions"]
    with pytest.raises(ValueError, match="question_types is empty"):
        collect_vqa_examples(scenes, [])


def test_object_patch_mask_covers_object():
    mask = object_patch_mask({"x": 0.3, "y": 0.7, "size": "small"}, grid_size=8).view(8, 8)
    assert mask.dtype == torch.bool
    assert mask[5, 2]  # the patch that contains the centre (row from y, column from x)
    assert not mask[0, 7]
    assert 1 < int(mask.sum()) < 16


def test_training_memory_estimate_on_cpu():
    x, context = torch.randn(4, 6, D_MODEL), torch.randn(4, 10, D_CONTEXT)
    results = {}
    for mode in ("none", "all"):
        torch.manual_seed(0)
        stack = CrossAttentionStack(4, D_MODEL, HEADS, D_CONTEXT, sharing=mode)
        results[mode] = measure_training_memory(stack, lambda: stack(x, context).square().mean())
        assert all(p.grad is None for p in stack.parameters())
    assert results["none"]["method"].startswith("estimate")
    # Same depth and inputs: the activations saved for backward are the same, the parameters are not.
    assert results["none"]["activations"] == results["all"]["activations"] > 0
    assert results["all"]["parameters"] < results["none"]["parameters"]
    assert results["all"]["bytes"] < results["none"]["bytes"]
    parameter_bytes = 4 * count_parameters(stack)
    assert results["all"]["bytes"] == 4 * parameter_bytes + results["all"]["activations"]


# ---------------------------------------------------------------------------------------------
# Checkers
# ---------------------------------------------------------------------------------------------


def _status(check, candidate):
    return check(candidate, raise_on_fail=False, verbose=False).status


def _make_layers_reference(make_layer, depth, share):
    if share:
        layer = make_layer()
        return nn.ModuleList([layer] * depth)
    return nn.ModuleList([make_layer() for _ in range(depth)])


def test_make_layers_checker_accepts_reference():
    assert _status(checks.check_make_layers, _make_layers_reference) == "passed"


def test_make_layers_checker_accepts_deepcopies_for_separate_layers():
    def separate_by_deepcopy(make_layer, depth, share):
        layer = make_layer()
        if share:
            return nn.ModuleList([layer for _ in range(depth)])
        return nn.ModuleList([layer] + [copy.deepcopy(layer) for _ in range(depth - 1)])

    assert _status(checks.check_make_layers, separate_by_deepcopy) == "passed"


def test_make_layers_checker_reports_stub():
    def stub(make_layer, depth, share):
        raise NotImplementedError

    assert _status(checks.check_make_layers, stub) == "not_implemented"


def test_make_layers_checker_rejects_deepcopy_when_sharing():
    def deepcopies(make_layer, depth, share):
        layer = make_layer()
        return nn.ModuleList([copy.deepcopy(layer) for _ in range(depth)])

    result = checks.check_make_layers(deepcopies, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "deepcopy" in result.hint


def test_make_layers_checker_rejects_sharing_when_separate_asked():
    def always_shared(make_layer, depth, share):
        return nn.ModuleList([make_layer()] * depth)

    result = checks.check_make_layers(always_shared, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "[layer] * depth" in result.hint


def test_make_layers_checker_rejects_plain_list():
    def plain_list(make_layer, depth, share):
        return list(_make_layers_reference(make_layer, depth, share))

    result = checks.check_make_layers(plain_list, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "ModuleList" in result.hint


def test_make_layers_checker_rejects_shared_submodules():
    def shared_first_linear(make_layer, depth, share):
        layers = [make_layer() for _ in range(depth)]
        for layer in layers[1:]:
            layer[0] = layers[0][0]
        return nn.ModuleList(layers if not share else [layers[0]] * depth)

    assert _status(checks.check_make_layers, shared_first_linear) == "failed"


def _tie_reference(layers):
    tie_key_value(layers)


def test_tie_kv_checker_accepts_reference():
    assert _status(checks.check_tie_key_value, _tie_reference) == "passed"


def test_tie_kv_checker_reports_stub():
    def stub(layers):
        raise NotImplementedError

    assert _status(checks.check_tie_key_value, stub) == "not_implemented"


@pytest.mark.parametrize(
    "wrong",
    [
        lambda layers: [setattr(l.attn, "k_proj", copy.deepcopy(layers[0].attn.k_proj)) or setattr(l.attn, "v_proj", copy.deepcopy(layers[0].attn.v_proj)) for l in layers[1:]],
        lambda layers: [l.attn.load_state_dict(layers[0].attn.state_dict()) for l in layers[1:]],
        lambda layers: [setattr(l, "attn", layers[0].attn) for l in layers[1:]],
        lambda layers: [setattr(l.attn, "v_proj", l.attn.k_proj) for l in layers] and _tie_reference(layers),
        lambda layers: [setattr(l.attn, "k_proj", layers[-1].attn.k_proj) or setattr(l.attn, "v_proj", layers[-1].attn.v_proj) for l in layers],
        lambda layers: None,
        lambda layers: [setattr(l.attn.k_proj, "weight", layers[0].attn.k_proj.weight) or setattr(l.attn.v_proj, "weight", layers[0].attn.v_proj.weight) for l in layers[1:]],
    ],
    ids=["deepcopy", "load-state-dict", "whole-attention-shared", "k-tied-to-v", "last-layer-weights", "does-nothing", "weights-only"],
)
def test_tie_kv_checker_rejects_wrong_answers(wrong):
    assert _status(checks.check_tie_key_value, wrong) == "failed"


def test_tie_kv_checker_names_deepcopy():
    def deepcopy_kv(layers):
        for layer in layers[1:]:
            layer.attn.k_proj = copy.deepcopy(layers[0].attn.k_proj)
            layer.attn.v_proj = copy.deepcopy(layers[0].attn.v_proj)

    result = checks.check_tie_key_value(deepcopy_kv, raise_on_fail=False, verbose=False)
    assert "deepcopy" in result.hint


def test_count_checker_accepts_reference():
    assert _status(checks.check_count_parameters, count_parameters) == "passed"


def test_count_checker_reports_stub():
    def stub(module):
        raise NotImplementedError

    assert _status(checks.check_count_parameters, stub) == "not_implemented"


@pytest.mark.parametrize(
    "wrong",
    [
        lambda module: sum(p.numel() for _, p in module.named_parameters(remove_duplicate=False)),
        lambda module: sum(v.numel() for v in module.state_dict().values()),
        lambda module: sum(p.numel() for p in module.parameters() if p.requires_grad),
        lambda module: torch.tensor(sum(p.numel() for p in module.parameters())),
        lambda module: sum(p.numel() for child in module.children() for p in child.parameters()) or sum(p.numel() for p in module.parameters()),
    ],
    ids=["once-per-use", "state-dict", "trainable-only", "tensor-result", "sum-over-children"],
)
def test_count_checker_rejects_wrong_answers(wrong):
    assert _status(checks.check_count_parameters, wrong) == "failed"


def test_optimizer_params_checker_accepts_reference():
    assert _status(checks.check_unique_parameters, lambda layers: unique_parameters(layers)) == "passed"


def test_optimizer_params_checker_reports_stub():
    def stub(layers):
        raise NotImplementedError

    assert _status(checks.check_unique_parameters, stub) == "not_implemented"


def _dedupe_by_value(layers):
    result = []
    for layer in layers:
        for parameter in layer.parameters():
            if not any(parameter.shape == kept.shape and torch.equal(parameter, kept) for kept in result):
                result.append(parameter)
    return result


@pytest.mark.parametrize(
    "wrong",
    [
        lambda layers: [p for layer in layers for p in layer.parameters()],
        lambda layers: set(p for layer in layers for p in layer.parameters()),
        _dedupe_by_value,
        lambda layers: (p for p in unique_parameters(layers)),
        lambda layers: list(reversed(unique_parameters(layers))),
    ],
    ids=["duplicates", "set", "dedupe-by-value", "generator", "reversed-order"],
)
def test_optimizer_params_checker_rejects_wrong_answers(wrong):
    assert _status(checks.check_unique_parameters, wrong) == "failed"
