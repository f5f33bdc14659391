"""Tests of the Q-Former (course_utils.vlm.qformer) and its checkers (course_utils.checks.qformer)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from course_utils.checks import qformer as checks
from course_utils.vlm.qformer import (
    CaptionTokenizer,
    QFormer,
    QFormerConfig,
    QFormerForPretraining,
    itc_similarity,
    load_from_hf_qformer,
    qformer_attention_mask,
    qformer_config_from_hf,
    sample_hard_negatives,
)

blip_2 = pytest.importorskip("transformers.models.blip_2.modeling_blip_2")

NUM_QUERIES = 5
IMAGE_DIM = 24


def tiny_config(**overrides) -> QFormerConfig:
    sizes = dict(num_queries=4, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
                 image_dim=IMAGE_DIM, vocab_size=40, max_text_length=16)
    sizes.update(overrides)
    return QFormerConfig(**sizes)


def make_hf_pair(attn_implementation: str, use_text_input: bool = True, seed: int = 0):
    """Build a random transformers Q-Former plus text embeddings, and ours with the same weights."""
    from transformers import Blip2QFormerConfig

    torch.manual_seed(seed)
    hf_config = Blip2QFormerConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        encoder_hidden_size=IMAGE_DIM, cross_attention_frequency=2, max_position_embeddings=16,
        use_qformer_text_input=use_text_input, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    hf_config._attn_implementation = attn_implementation
    hf_qformer = blip_2.Blip2QFormerModel(hf_config).eval()
    hf_embeddings = blip_2.Blip2TextEmbeddings(hf_config).eval()
    with torch.no_grad():
        # Random initialization leaves LayerNorms at 1 and 0 and biases at 0; perturb every
        # parameter so that a swapped or skipped one shows up in the outputs.
        for parameter in list(hf_qformer.parameters()) + list(hf_embeddings.parameters()):
            parameter.add_(0.1 * torch.randn_like(parameter))
    query_tokens = torch.randn(1, NUM_QUERIES, 32)
    ours = QFormer(qformer_config_from_hf(hf_config, num_queries=NUM_QUERIES)).eval()
    missing = load_from_hf_qformer(ours, hf_qformer, query_tokens, hf_embeddings)
    return hf_qformer, hf_embeddings, query_tokens, ours, missing


def hf_mask(mask: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """Turn our boolean (B, L, L) mask into the 4-D mask transformers passes through unchanged."""
    if attn_implementation == "sdpa":
        return mask[:, None]
    return torch.zeros(mask.shape[0], 1, *mask.shape[1:]).masked_fill(~mask[:, None], torch.finfo(torch.float32).min)


def example_inputs(batch: int = 3, image_tokens: int = 7, text_len: int = 6, vocab: int = 50, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    image_features = torch.randn(batch, image_tokens, IMAGE_DIM, generator=generator)
    input_ids = torch.randint(1, vocab, (batch, text_len), generator=generator)
    text_mask = torch.ones(batch, text_len, dtype=torch.bool)
    text_mask[1, 4:] = False
    text_mask[2, 2:] = False
    return image_features, input_ids, text_mask


# --- equivalence with transformers -----------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_hf_equivalence_queries_only(attn_implementation):
    hf_qformer, _, query_tokens, ours, missing = make_hf_pair(attn_implementation)
    image_features, _, _ = example_inputs()
    assert missing == []

    with torch.no_grad():
        expected = hf_qformer(query_embeds=query_tokens.expand(3, -1, -1), encoder_hidden_states=image_features).last_hidden_state
        got = ours(image_features)
    assert got.shape == (3, NUM_QUERIES, 32)
    assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("task", ["itc", "itm", "itg"])
def test_hf_equivalence_queries_and_text(attn_implementation, task):
    hf_qformer, hf_embeddings, query_tokens, ours, _ = make_hf_pair(attn_implementation)
    image_features, input_ids, text_mask = example_inputs()
    mask = qformer_attention_mask(task, NUM_QUERIES, text_mask)

    with torch.no_grad():
        embeddings = hf_embeddings(input_ids=input_ids, query_embeds=query_tokens.expand(3, -1, -1))
        expected = hf_qformer(query_embeds=embeddings, query_length=NUM_QUERIES, attention_mask=hf_mask(mask, attn_implementation),
                              encoder_hidden_states=image_features).last_hidden_state
        got = ours(image_features, input_ids, mask)
    assert got.shape == (3, NUM_QUERIES + 6, 32)
    assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_hf_equivalence_itm_with_2d_padding_mask():
    # transformers' retrieval model passes a 2-D padding mask for ITM; our itm mask must match it.
    hf_qformer, hf_embeddings, query_tokens, ours, _ = make_hf_pair("sdpa")
    image_features, input_ids, text_mask = example_inputs()
    padding = torch.cat([torch.ones(3, NUM_QUERIES, dtype=torch.long), text_mask.long()], dim=1)

    with torch.no_grad():
        embeddings = hf_embeddings(input_ids=input_ids, query_embeds=query_tokens.expand(3, -1, -1))
        expected = hf_qformer(query_embeds=embeddings, query_length=NUM_QUERIES, attention_mask=padding,
                              encoder_hidden_states=image_features).last_hidden_state
        got = ours(image_features, input_ids, qformer_attention_mask("itm", NUM_QUERIES, text_mask))
    assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_hf_equivalence_text_only():
    hf_qformer, hf_embeddings, _, ours, _ = make_hf_pair("eager")
    _, input_ids, text_mask = example_inputs()

    with torch.no_grad():
        expected = hf_qformer(query_embeds=hf_embeddings(input_ids=input_ids), query_length=0,
                              attention_mask=text_mask.long()).last_hidden_state
        got = ours(None, input_ids, qformer_attention_mask("itc", 0, text_mask))
    assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_hf_copy_reports_text_feed_forward_missing():
    _, _, _, _, missing = make_hf_pair("eager", use_text_input=False)
    assert missing
    assert all("text_feed_forward" in name for name in missing)


def test_hf_copy_rejects_other_sizes():
    hf_qformer, _, _, _, _ = make_hf_pair("eager")
    ours = QFormer(tiny_config(hidden_size=48))
    with pytest.raises(ValueError, match="hidden_size"):
        load_from_hf_qformer(ours, hf_qformer)


# --- masks -------------------------------------------------------------------------------------


def test_itc_mask_blocks_and_padding():
    text_mask = torch.tensor([[True, True, False]])
    got = qformer_attention_mask("itc", 2, text_mask)[0]
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
    ], dtype=torch.bool)
    assert got.dtype == torch.bool
    assert torch.equal(got, expected)


def test_itm_mask_only_hides_padding():
    text_mask = torch.tensor([[True, True, False]])
    got = qformer_attention_mask("itm", 2, text_mask)[0]
    expected = torch.tensor([[1, 1, 1, 1, 0]] * 5, dtype=torch.bool)
    assert torch.equal(got, expected)


def test_itg_mask_causal_text_and_query_only_queries():
    text_mask = torch.tensor([[True, True, True, False]])
    got = qformer_attention_mask("itg", 2, text_mask)[0]
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
    ], dtype=torch.bool)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("task", ["itc", "itm", "itg"])
def test_mask_padding_per_sample(task):
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    got = qformer_attention_mask(task, 3, text_mask)
    assert got.shape == (2, 7, 7)
    assert not got[1, :, 5:].any()
    assert torch.equal(got[0], qformer_attention_mask(task, 3, text_mask[:1].bool())[0])
    assert torch.equal(got[1, :5, :5], qformer_attention_mask(task, 3, text_mask[1:, :2].bool())[0])


@pytest.mark.parametrize("task", ["itc", "itm", "itg"])
def test_mask_without_text_is_all_queries(task):
    got = qformer_attention_mask(task, 3, torch.ones(2, 0, dtype=torch.bool))
    assert torch.equal(got, torch.ones(2, 3, 3, dtype=torch.bool))


def test_mask_rejects_bad_input():
    text_mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown task"):
        qformer_attention_mask("vqa", 2, text_mask)
    with pytest.raises(ValueError, match="2-D"):
        qformer_attention_mask("itc", 2, text_mask[0])
    with pytest.raises(ValueError, match="num_queries"):
        qformer_attention_mask("itc", -1, text_mask)
    with pytest.raises(TypeError, match="num_queries"):
        qformer_attention_mask("itc", 2.0, text_mask)
    with pytest.raises(ValueError, match="0 and 1"):
        qformer_attention_mask("itc", 2, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="dtype"):
        qformer_attention_mask("itc", 2, torch.ones(2, 3))


# --- what the masks do inside the Q-Former ---------------------------------------------------


def changed_later_token(input_ids: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    changed = input_ids.clone()
    changed[:, position] = (changed[:, position] + 7) % (vocab - 1) + 1
    assert not torch.equal(changed, input_ids)
    return changed


def test_itg_later_token_does_not_change_queries_or_earlier_text():
    torch.manual_seed(0)
    config = tiny_config()
    model = QFormer(config).eval()
    image_features = torch.randn(2, 7, IMAGE_DIM)
    input_ids = torch.randint(5, config.vocab_size, (2, 6))
    text_mask = torch.ones(2, 6, dtype=torch.bool)
    changed = changed_later_token(input_ids, 4, config.vocab_size)
    queries = config.num_queries

    with torch.no_grad():
        before = model(image_features, input_ids, qformer_attention_mask("itg", queries, text_mask))
        after = model(image_features, changed, qformer_attention_mask("itg", queries, text_mask))
    assert_close(after[:, : queries + 4], before[:, : queries + 4], atol=1e-6, rtol=0)
    # The changed token and the one after it do see the change.
    assert (after[:, queries + 4 :] - before[:, queries + 4 :]).abs().max() > 1e-3


def test_itm_text_change_reaches_queries():
    torch.manual_seed(0)
    config = tiny_config()
    model = QFormer(config).eval()
    image_features = torch.randn(2, 7, IMAGE_DIM)
    input_ids = torch.randint(5, config.vocab_size, (2, 6))
    text_mask = torch.ones(2, 6, dtype=torch.bool)
    changed = changed_later_token(input_ids, 4, config.vocab_size)

    with torch.no_grad():
        before = model(image_features, input_ids, qformer_attention_mask("itm", config.num_queries, text_mask))
        after = model(image_features, changed, qformer_attention_mask("itm", config.num_queries, text_mask))
    assert (after[:, : config.num_queries] - before[:, : config.num_queries]).abs().max() > 1e-3


def test_itc_joint_pass_equals_separate_passes():
    torch.manual_seed(0)
    config = tiny_config()
    model = QFormer(config).eval()
    image_features = torch.randn(3, 7, IMAGE_DIM)
    input_ids = torch.randint(5, config.vocab_size, (3, 5))
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool()

    with torch.no_grad():
        joint = model(image_features, input_ids, qformer_attention_mask("itc", config.num_queries, text_mask))
        queries_only = model(image_features)
        text_only = model(None, input_ids, qformer_attention_mask("itc", 0, text_mask))
    assert_close(joint[:, : config.num_queries], queries_only, atol=1e-5, rtol=1e-4)
    assert_close(joint[:, config.num_queries :][text_mask], text_only[text_mask], atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    config = tiny_config()
    model = QFormer(config).eval()
    image_features = torch.randn(1, 7, IMAGE_DIM)
    input_ids = torch.randint(5, config.vocab_size, (1, 4))
    padded_ids = torch.cat([input_ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]]).bool()
    queries = config.num_queries

    for task in ("itc", "itm", "itg"):
        with torch.no_grad():
            short = model(image_features, input_ids, qformer_attention_mask(task, queries, torch.ones(1, 4, dtype=torch.bool)))
            padded = model(image_features, padded_ids, qformer_attention_mask(task, queries, padded_mask))
        assert_close(padded[:, : queries + 4], short, atol=1e-5, rtol=1e-4)


def test_fully_masked_row_gives_no_nan():
    torch.manual_seed(0)
    config = tiny_config()
    model = QFormer(config)
    input_ids = torch.randint(5, config.vocab_size, (2, 3))
    text_mask = torch.tensor([[True, True, True], [False, False, False]])  # second text: all padding
    mask = qformer_attention_mask("itc", 0, text_mask)
    assert not mask[1].any()

    output = model(None, input_ids, mask)
    output.sum().backward()
    assert torch.isfinite(output).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_same_number_of_outputs_for_any_image_size():
    torch.manual_seed(0)
    model = QFormer(tiny_config()).eval()
    for image_tokens in (1, 49, 196):
        with torch.no_grad():
            output = model(torch.randn(2, image_tokens, IMAGE_DIM))
        assert output.shape == (2, 4, 32)


def test_cross_attention_every_frequency_layers():
    model = QFormer(tiny_config(num_layers=5, cross_attention_frequency=2))
    assert [layer.cross_attention is not None for layer in model.layers] == [True, False, True, False, True]
    model = QFormer(tiny_config(num_layers=3, cross_attention_frequency=1))
    assert all(layer.cross_attention is not None for layer in model.layers)


def test_query_and_text_feed_forward_are_separate():
    model = QFormer(tiny_config())
    layer = model.layers[0]
    assert layer.query_feed_forward.fc1.weight.data_ptr() != layer.text_feed_forward.fc1.weight.data_ptr()


def test_forward_rejects_bad_input():
    model = QFormer(tiny_config())
    with pytest.raises(ValueError, match="image_dim"):
        model(torch.randn(2, 7, IMAGE_DIM + 1))
    with pytest.raises(ValueError, match="max_text_length"):
        model(None, torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        model(torch.randn(2, 7, IMAGE_DIM), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="bool"):
        model(None, torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        model(None, torch.ones(1, 4, dtype=torch.long), torch.ones(1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="pass image_features"):
        model(None)


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        QFormerConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_queries"):
        QFormerConfig(num_queries=0)


# --- contrastive similarity and hard negatives -----------------------------------------------


def test_itc_similarity_is_max_over_queries():
    image_embeds = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    text_embeds = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])  # (3, 2)
    got = itc_similarity(image_embeds, text_embeds)
    assert_close(got, torch.tensor([[1.0, 0.8, 0.0]]))


def test_itc_similarity_rejects_mismatch():
    with pytest.raises(ValueError, match="embedding sizes"):
        itc_similarity(torch.randn(2, 3, 4), torch.randn(2, 5))


def test_hard_negatives_never_positive_and_prefer_similar():
    generator = torch.Generator().manual_seed(0)
    similarity = 10 * torch.eye(4)
    similarity[0, 2] = 5.0
    texts, images = [], []
    for _ in range(200):
        negative_text, negative_image = sample_hard_negatives(similarity, generator=generator)
        texts.append(negative_text)
        images.append(negative_image)
    texts, images = torch.stack(texts), torch.stack(images)
    assert not (texts == torch.arange(4)).any()
    assert not (images == torch.arange(4)).any()
    assert (texts[:, 0] == 2).float().mean() > 0.9
    assert (images[:, 2] == 0).float().mean() > 0.9


def test_hard_negatives_respect_positive_mask():
    positive_mask = torch.eye(3, dtype=torch.bool)
    positive_mask[0, 1] = positive_mask[1, 0] = True
    similarity = 5 * positive_mask.float()
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        negative_text, negative_image = sample_hard_negatives(similarity, positive_mask, generator)
        assert not positive_mask[torch.arange(3), negative_text].any()
        assert not positive_mask[negative_image, torch.arange(3)].any()


def test_hard_negatives_reject_batch_without_negatives():
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="square"):
        sample_hard_negatives(torch.zeros(2, 3))


def test_hard_negatives_leave_input_unchanged():
    similarity = torch.randn(4, 4)
    before = similarity.clone()
    sample_hard_negatives(similarity)
    assert torch.equal(similarity, before)


# --- pre-training heads, tokenizer and generation --------------------------------------------


def test_tokenizer_adds_special_tokens_and_round_trips():
    tokenizer = CaptionTokenizer.from_texts(["a red circle", "a blue square"], max_length=6)
    input_ids, attention_mask = tokenizer(["a red circle", "a blue square on the left"])
    assert input_ids[0, 0] == tokenizer.cls_id
    assert input_ids[0, 4] == tokenizer.sep_id
    assert input_ids.shape == (2, 6)
    assert attention_mask.sum(1).tolist() == [5, 6]
    assert input_ids[1, -1] == tokenizer.sep_id  # truncated, but still ends with [SEP]
    assert tokenizer.decode(input_ids[0]) == "a red circle"
    assert tokenizer.decode([tokenizer.dec_id, 5, tokenizer.sep_id, 6]) == tokenizer.vocab[5]


@pytest.mark.parametrize("image_input_dim", [None, 40])
def test_pretraining_losses_reach_every_parameter(image_input_dim):
    torch.manual_seed(0)
    config = tiny_config()
    model = QFormerForPretraining(config, embed_dim=16, num_image_tokens=7, image_input_dim=image_input_dim)
    assert (model.image_proj is not None) == (image_input_dim is not None)
    image_features = torch.randn(4, 7, image_input_dim or IMAGE_DIM)
    input_ids = torch.randint(5, config.vocab_size, (4, 6))
    input_ids[:, 0] = 2
    text_mask = torch.ones(4, 6, dtype=torch.bool)
    text_mask[3, 3:] = False

    losses = model(image_features, input_ids, text_mask, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"loss", "itc", "itm", "itg", "itm_accuracy"}
    assert all(torch.isfinite(value) for value in losses.values())
    losses["loss"].backward()
    without_gradient = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # The padding row of the word embeddings is the only thing allowed to stay untouched.
    assert without_gradient == []


def test_pretraining_rejects_batch_of_one():
    model = QFormerForPretraining(tiny_config(), embed_dim=16)
    with pytest.raises(ValueError, match="at least 2"):
        model(torch.randn(1, 7, IMAGE_DIM), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))


def test_itc_logits_match_separate_embeddings():
    torch.manual_seed(0)
    config = tiny_config()
    model = QFormerForPretraining(config, embed_dim=16).eval()
    image_features = torch.randn(3, 7, IMAGE_DIM)
    input_ids = torch.randint(5, config.vocab_size, (3, 5))
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]).bool()

    with torch.no_grad():
        joint = model.itc_logits(image_features, input_ids, text_mask)
        separate = itc_similarity(model.image_embeddings(image_features), model.text_embeddings(input_ids, text_mask)) * model.scale()
    assert_close(joint, separate, atol=1e-4, rtol=1e-4)


def test_generate_starts_with_dec_and_pads_after_sep():
    torch.manual_seed(0)
    config = tiny_config()
    model = QFormerForPretraining(config, embed_dim=16).eval()
    with torch.no_grad():
        model.lm_head.bias[model.sep_token_id] = 100.0  # always predict [SEP] first
    ids = model.generate(torch.randn(2, 7, IMAGE_DIM), max_new_tokens=5)
    assert ids.tolist() == [[model.dec_token_id, model.sep_token_id]] * 2


def test_pretraining_rejects_wrong_feature_width():
    model = QFormerForPretraining(tiny_config(), embed_dim=16, image_input_dim=40)
    with pytest.raises(ValueError, match="40"):
        model.image_embeddings(torch.randn(2, 7, IMAGE_DIM))


def test_checkpoint_description_round_trips():
    model = QFormerForPretraining(tiny_config(), embed_dim=16, num_image_tokens=7, image_input_dim=40)
    rebuilt = QFormerForPretraining.from_description(model.describe())
    assert rebuilt.describe() == model.describe()
    rebuilt.load_state_dict(model.state_dict())


# --- checkers: the reference passes, typical mistakes fail, stubs are not implemented ---------


def stub(*args, **kwargs):
    raise NotImplementedError


def run_check(check, candidate):
    return check(candidate, raise_on_fail=False, verbose=False)


def test_mask_checker_accepts_reference():
    assert run_check(checks.check_qformer_attention_mask, qformer_attention_mask).status == "passed"


def test_mask_checker_accepts_blank_padded_rows():
    # Rows of padded text positions are free: letting them see nothing is also accepted.
    def blank_padded_rows(task, num_queries, text_attention_mask):
        mask = qformer_attention_mask(task, num_queries, text_attention_mask)
        row_is_real = torch.cat([torch.ones(mask.shape[0], num_queries, dtype=torch.bool, device=mask.device),
                                 text_attention_mask.bool()], dim=1)
        return mask & row_is_real[:, :, None]

    assert run_check(checks.check_qformer_attention_mask, blank_padded_rows).status == "passed"


def test_mask_checker_stub_not_implemented():
    assert run_check(checks.check_qformer_attention_mask, stub).status == "not_implemented"


def test_mask_checker_rejects_itg_text_seeing_later_text():
    def bidirectional_text(task, num_queries, text_attention_mask):
        if task == "itg":
            return qformer_attention_mask("itm", num_queries, text_attention_mask) & ~_query_sees_text(num_queries, text_attention_mask)
        return qformer_attention_mask(task, num_queries, text_attention_mask)

    result = run_check(checks.check_qformer_attention_mask, bidirectional_text)
    assert result.status == "failed"
    assert "ITG" in result.case
    assert "前面" in result.hint


def _query_sees_text(num_queries, text_attention_mask):
    batch, text_len = text_attention_mask.shape
    total = num_queries + text_len
    blocked = torch.zeros(batch, total, total, dtype=torch.bool, device=text_attention_mask.device)
    blocked[:, :num_queries, num_queries:] = True
    return blocked


def test_mask_checker_rejects_itg_queries_seeing_text():
    def queries_see_text(task, num_queries, text_attention_mask):
        mask = qformer_attention_mask(task, num_queries, text_attention_mask)
        if task == "itg":
            mask[:, :num_queries, num_queries:] = text_attention_mask.bool()[:, None, :]
        return mask

    result = run_check(checks.check_qformer_attention_mask, queries_see_text)
    assert result.status == "failed"
    assert "ITG" in result.case
    assert "query" in result.expected


def test_mask_checker_rejects_itc_leak():
    def leaking_itc(task, num_queries, text_attention_mask):
        if task == "itc":
            return qformer_attention_mask("itm", num_queries, text_attention_mask)
        return qformer_attention_mask(task, num_queries, text_attention_mask)

    result = run_check(checks.check_qformer_attention_mask, leaking_itc)
    assert result.status == "failed"
    assert "ITC" in result.case


def test_mask_checker_rejects_itc_text_seeing_queries():
    # A one-way leak: queries stay apart, but text rows may read the queries.
    def text_sees_queries(task, num_queries, text_attention_mask):
        mask = qformer_attention_mask(task, num_queries, text_attention_mask)
        if task == "itc":
            mask[:, num_queries:, :num_queries] = True
        return mask

    result = run_check(checks.check_qformer_attention_mask, text_sees_queries)
    assert result.status == "failed"
    assert "ITC" in result.case
    assert "文字→query" in result.expected


def test_mask_checker_rejects_itg_text_blind_to_queries():
    def causal_text_only(task, num_queries, text_attention_mask):
        mask = qformer_attention_mask(task, num_queries, text_attention_mask)
        if task == "itg":
            mask[:, num_queries:, :num_queries] = False
        return mask

    result = run_check(checks.check_qformer_attention_mask, causal_text_only)
    assert result.status == "failed"
    assert "ITG" in result.case


def test_mask_checker_rejects_padding_ignored_in_itg_only():
    def itg_ignores_padding(task, num_queries, text_attention_mask):
        if task == "itg":
            text_attention_mask = torch.ones_like(text_attention_mask, dtype=torch.bool)
        return qformer_attention_mask(task, num_queries, text_attention_mask)

    result = run_check(checks.check_qformer_attention_mask, itg_ignores_padding)
    assert result.status == "failed"
    assert "padding" in result.case
    assert "padding" in result.hint


def test_mask_checker_rejects_ignored_padding():
    def ignores_padding(task, num_queries, text_attention_mask):
        return qformer_attention_mask(task, num_queries, torch.ones_like(text_attention_mask, dtype=torch.bool))

    result = run_check(checks.check_qformer_attention_mask, ignores_padding)
    assert result.status == "failed"
    assert "padding" in result.hint


def test_mask_checker_rejects_float_mask():
    def float_mask(task, num_queries, text_attention_mask):
        return qformer_attention_mask(task, num_queries, text_attention_mask).float()

    assert run_check(checks.check_qformer_attention_mask, float_mask).status == "failed"


def test_mask_checker_rejects_itg_without_diagonal():
    def strictly_earlier(task, num_queries, text_attention_mask):
        mask = qformer_attention_mask(task, num_queries, text_attention_mask)
        if task == "itg":
            text_len = text_attention_mask.shape[1]
            diagonal = torch.arange(text_len, device=mask.device) + num_queries
            mask[:, diagonal, diagonal] = False
        return mask

    assert run_check(checks.check_qformer_attention_mask, strictly_earlier).status == "failed"


def test_similarity_checker_accepts_reference():
    assert run_check(checks.check_itc_similarity, itc_similarity).status == "passed"


def test_similarity_checker_stub_not_implemented():
    assert run_check(checks.check_itc_similarity, stub).status == "not_implemented"


def test_similarity_checker_rejects_mean_over_queries():
    def mean_over_queries(image_embeds, text_embeds):
        return torch.einsum("iqe,je->ijq", image_embeds, text_embeds).mean(dim=-1)

    result = run_check(checks.check_itc_similarity, mean_over_queries)
    assert result.status == "failed"
    assert "平均" in result.hint


def test_similarity_checker_rejects_transposed_output():
    def transposed(image_embeds, text_embeds):
        return itc_similarity(image_embeds, text_embeds).t()

    assert run_check(checks.check_itc_similarity, transposed).status == "failed"


def test_similarity_checker_rejects_detached_output():
    def detached(image_embeds, text_embeds):
        return itc_similarity(image_embeds, text_embeds).detach()

    assert run_check(checks.check_itc_similarity, detached).status == "failed"


def test_negatives_checker_accepts_reference():
    assert run_check(checks.check_sample_hard_negatives, sample_hard_negatives).status == "passed"


def test_negatives_checker_stub_not_implemented():
    assert run_check(checks.check_sample_hard_negatives, stub).status == "not_implemented"


def test_negatives_checker_rejects_positive_included():
    def includes_positive(similarity, positive_mask=None):
        text = torch.multinomial(similarity.softmax(dim=1), 1).squeeze(1)
        image = torch.multinomial(similarity.t().softmax(dim=1), 1).squeeze(1)
        return text, image

    result = run_check(checks.check_sample_hard_negatives, includes_positive)
    assert result.status == "failed"
    assert "正樣本" in result.case
    assert "正樣本" in result.got


def test_negatives_checker_rejects_diagonal_only_masking():
    # Masks the diagonal but ignores positive_mask: copies of a repeated caption get drawn.
    def diagonal_only(similarity, positive_mask=None):
        return sample_hard_negatives(similarity, None)

    result = run_check(checks.check_sample_hard_negatives, diagonal_only)
    assert result.status == "failed"
    assert "重複" in result.case


def test_negatives_checker_rejects_argmax():
    def argmax(similarity, positive_mask=None):
        mask = torch.eye(similarity.shape[0], dtype=torch.bool) if positive_mask is None else positive_mask
        masked = similarity.masked_fill(mask, float("-inf"))
        return masked.argmax(dim=1), masked.t().argmax(dim=1)

    result = run_check(checks.check_sample_hard_negatives, argmax)
    assert result.status == "failed"
    assert "argmax" in result.case


def test_negatives_checker_rejects_rows_for_both_directions():
    def rows_twice(similarity, positive_mask=None):
        mask = torch.eye(similarity.shape[0], dtype=torch.bool) if positive_mask is None else positive_mask
        probabilities = similarity.masked_fill(mask, float("-inf")).softmax(dim=1)
        return torch.multinomial(probabilities, 1).squeeze(1), torch.multinomial(probabilities, 1).squeeze(1)

    assert run_check(checks.check_sample_hard_negatives, rows_twice).status == "failed"


def test_negatives_checker_rejects_in_place_masking():
    def in_place(similarity, positive_mask=None):
        mask = torch.eye(similarity.shape[0], dtype=torch.bool) if positive_mask is None else positive_mask
        similarity.masked_fill_(mask, float("-inf"))
        return sample_hard_negatives(similarity.clone().nan_to_num(neginf=-1e4), positive_mask)

    result = run_check(checks.check_sample_hard_negatives, in_place)
    assert result.status == "failed"
    assert "不修改" in result.case


def test_negatives_checker_rejects_proportional_to_similarity():
    def linear_weights(similarity, positive_mask=None):
        mask = torch.eye(similarity.shape[0], dtype=torch.bool) if positive_mask is None else positive_mask
        weights = similarity.clamp_min(1e-3).masked_fill(mask, 0.0)
        return torch.multinomial(weights, 1).squeeze(1), torch.multinomial(weights.t(), 1).squeeze(1)

    assert run_check(checks.check_sample_hard_negatives, linear_weights).status == "failed"
