"""Tests of course_utils.vlm.clip (CLIP loss, zero-shot, retrieval, tiny models) and its checkers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils.checks import clip as checks
from course_utils.vlm import clip
from course_utils.vlm.text import WordTokenizer

INIT = math.log(1 / 0.07)


def random_pairs(batch=6, dim=10, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, dim, generator=generator, dtype=dtype) * 3
    text = torch.randn(batch, dim, generator=generator, dtype=dtype) * 0.5
    return image, text


def manual_loss(image, text, scale):
    """The CLIP loss written out with explicit loops over rows, as an independent oracle."""
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    batch = image.shape[0]
    total = 0.0
    for i in range(batch):
        row = scale * (image[i] @ text.T)
        column = scale * (text[i] @ image.T)
        total = total - torch.log_softmax(row, dim=0)[i] - torch.log_softmax(column, dim=0)[i]
    return total / (2 * batch)


# ---------------------------------------------------------------------------------------------
# clip_loss
# ---------------------------------------------------------------------------------------------


def tiny_hf_clip():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=12, bos_token_id=62, eos_token_id=63, pad_token_id=0,
        ),
        vision_config=dict(
            image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


def hf_inputs(batch=5):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 62, (batch, 7), generator=generator)
    input_ids[:, -1] = 63  # end-of-text token, where CLIP's text tower pools
    pixel_values = torch.randn(batch, 3, 16, 16, generator=generator)
    return input_ids, pixel_values


def test_clip_loss_matches_transformers():
    model = tiny_hf_clip()
    input_ids, pixel_values = hf_inputs()
    output = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    image_features = model.get_image_features(pixel_values=pixel_values).pooler_output
    text_features = model.get_text_features(input_ids=input_ids).pooler_output

    ours = clip.clip_loss(image_features, text_features, model.logit_scale)

    # transformers stores the default rounded to 2.6592; ln(1/0.07) = 2.65926.
    assert model.logit_scale.item() == pytest.approx(INIT, abs=1e-4)
    torch.testing.assert_close(ours, output.loss)


def test_clip_logits_match_transformers():
    model = tiny_hf_clip()
    input_ids, pixel_values = hf_inputs()
    output = model(input_ids=input_ids, pixel_values=pixel_values)
    image_features = model.get_image_features(pixel_values=pixel_values).pooler_output
    text_features = model.get_text_features(input_ids=input_ids).pooler_output

    logits_per_image, logits_per_text = clip.clip_logits(image_features, text_features, model.logit_scale)

    torch.testing.assert_close(logits_per_image, output.logits_per_image)
    torch.testing.assert_close(logits_per_text, output.logits_per_text)


def test_clip_loss_gradients_match_transformers():
    model = tiny_hf_clip()
    input_ids, pixel_values = hf_inputs()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss.backward()
    expected = model.logit_scale.grad.clone()
    model.zero_grad()

    image_features = model.get_image_features(pixel_values=pixel_values).pooler_output
    text_features = model.get_text_features(input_ids=input_ids).pooler_output
    clip.clip_loss(image_features, text_features, model.logit_scale).backward()

    torch.testing.assert_close(model.logit_scale.grad, expected)


def test_clip_loss_clamps_where_transformers_does_not():
    model = tiny_hf_clip()
    input_ids, pixel_values = hf_inputs()
    image_features = model.get_image_features(pixel_values=pixel_values).pooler_output
    text_features = model.get_text_features(input_ids=input_ids).pooler_output
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    at_clamp = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss

    above_clamp = clip.clip_loss(image_features, text_features, torch.tensor(math.log(1000.0)))

    torch.testing.assert_close(above_clamp, at_clamp)


def test_clip_loss_matches_manual_oracle():
    image, text = random_pairs(dtype=torch.float64)
    for logit_scale in (0.0, 1.0, INIT, math.log(100.0)):
        expected = manual_loss(image, text, math.exp(logit_scale))
        got = clip.clip_loss(image, text, torch.tensor(logit_scale, dtype=torch.float64))
        torch.testing.assert_close(got, expected)


def test_clip_loss_accepts_float_scale():
    image, text = random_pairs()
    torch.testing.assert_close(clip.clip_loss(image, text, INIT), clip.clip_loss(image, text, torch.tensor(INIT)))


def test_logit_scale_init_and_effective_scale():
    parameter = clip.init_logit_scale()
    assert isinstance(parameter, torch.nn.Parameter)
    assert parameter.item() == pytest.approx(INIT)
    assert clip.effective_scale(parameter).item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert clip.effective_scale(10.0).item() == pytest.approx(100.0)


def test_clamp_stops_logit_scale_gradient():
    image, text = random_pairs()
    below = torch.tensor(3.0, requires_grad=True)
    above = torch.tensor(6.0, requires_grad=True)
    clip.clip_loss(image, text, below).backward()
    clip.clip_loss(image, text, above).backward()
    assert below.grad.abs().item() > 0
    assert above.grad.item() == 0.0


def test_clip_loss_is_small_for_matching_pairs():
    image, _ = random_pairs(batch=8, dim=32)
    matching = clip.clip_loss(image, image.clone(), INIT)
    shuffled = clip.clip_loss(image, image.roll(1, dims=0), INIT)
    assert matching.item() < 0.1
    assert shuffled.item() > 5.0


def test_clip_loss_of_identical_rows_is_log_batch():
    features = torch.ones(4, 3)
    assert clip.clip_loss(features, features, INIT).item() == pytest.approx(math.log(4))


def test_clip_loss_rejects_mismatched_shapes():
    image, text = random_pairs()
    with pytest.raises(ValueError, match="same shape"):
        clip.clip_loss(image, text[:4], INIT)
    with pytest.raises(ValueError, match="same shape"):
        clip.clip_loss(image, text[:, :5], INIT)


def test_clip_loss_rejects_batch_of_one():
    image, text = random_pairs(batch=1)
    with pytest.raises(ValueError, match="at least 2"):
        clip.clip_loss(image, text, INIT)


def test_clip_loss_rejects_bad_inputs():
    image, text = random_pairs()
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        clip.clip_loss(image.unsqueeze(0), text.unsqueeze(0), INIT)
    with pytest.raises(TypeError):
        clip.clip_loss(image.tolist(), text, INIT)
    with pytest.raises(ValueError, match="one number"):
        clip.clip_loss(image, text, torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Gathering across devices, simulated in one process
# ---------------------------------------------------------------------------------------------


def test_gathered_loss_mean_equals_full_batch_loss():
    image, text = random_pairs(batch=12, dim=8, dtype=torch.float64)
    per_rank = clip.gathered_clip_loss(image.chunk(3), text.chunk(3), INIT)
    assert per_rank.shape == (3,)
    torch.testing.assert_close(per_rank.mean(), clip.clip_loss(image, text, INIT))


def test_gathered_loss_gradient_equals_full_batch_gradient():
    image, text = random_pairs(batch=8, dim=6, dtype=torch.float64)
    image_a, text_a = image.clone().requires_grad_(), text.clone().requires_grad_()
    image_b, text_b = image.clone().requires_grad_(), text.clone().requires_grad_()
    clip.gathered_clip_loss(image_a.chunk(4), text_a.chunk(4), INIT).mean().backward()
    clip.clip_loss(image_b, text_b, INIT).backward()
    torch.testing.assert_close(image_a.grad, image_b.grad)
    torch.testing.assert_close(text_a.grad, text_b.grad)


def test_rank_loss_uses_targets_offset_by_rank():
    image, text = random_pairs(batch=8, dim=6, dtype=torch.float64)
    local_batch, rank = 4, 1
    local_image, local_text = image[4:], text[4:]
    scale = math.exp(INIT)
    image_n, text_n = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    targets = torch.arange(local_batch) + rank * local_batch  # 4, 5, 6, 7
    expected = (
        F.cross_entropy(scale * F.normalize(local_image, dim=-1) @ text_n.T, targets)
        + F.cross_entropy(scale * F.normalize(local_text, dim=-1) @ image_n.T, targets)
    ) / 2

    got = clip.rank_clip_loss(local_image, local_text, image, text, rank, INIT)

    torch.testing.assert_close(got, expected)


def test_rank_loss_without_offset_is_wrong():
    # Rank 1 with rank-0 targets would point every row at another device's pair.
    image, text = random_pairs(batch=8, dim=6, dtype=torch.float64)
    correct = clip.rank_clip_loss(image[4:], text[4:], image, text, 1, INIT)
    unshifted = clip.rank_clip_loss(image[4:], text[4:], image, text, 0, INIT)
    assert not torch.allclose(correct, unshifted)


def test_gathering_adds_negatives():
    # A local batch of 1 has no negative; gathered over 4 devices it has 3.
    image, text = random_pairs(batch=4, dim=6)
    per_rank = clip.gathered_clip_loss(image.chunk(4), text.chunk(4), INIT)
    assert torch.all(per_rank > 0)
    with pytest.raises(ValueError, match="at least 2"):
        clip.clip_loss(image[:1], text[:1], INIT)


def test_gathered_loss_rejects_bad_chunks():
    image, text = random_pairs(batch=8, dim=6)
    with pytest.raises(ValueError, match="one image chunk and one text chunk"):
        clip.gathered_clip_loss(image.chunk(2), text.chunk(4), INIT)
    with pytest.raises(ValueError, match="same shape"):
        clip.gathered_clip_loss([image[:3], image[3:]], [text[:3], text[3:]], INIT)
    with pytest.raises(ValueError, match="rank must be"):
        clip.rank_clip_loss(image[:4], text[:4], image, text, 2, INIT)
    with pytest.raises(ValueError, match="whole number"):
        clip.rank_clip_loss(image[:3], text[:3], image, text, 0, INIT)


# ---------------------------------------------------------------------------------------------
# Zero-shot classification and Recall@K
# ---------------------------------------------------------------------------------------------


def test_class_embeddings_average_then_renormalize():
    table = {
        "a red circle": torch.tensor([2.0, 0.0]),
        "a red square": torch.tensor([0.0, 0.5]),
        "a blue circle": torch.tensor([-1.0, 0.0]),
        "a blue square": torch.tensor([0.0, -3.0]),
    }
    encode = lambda texts: torch.stack([table[t] for t in texts])  # noqa: E731

    embeddings = clip.build_class_embeddings(["a {} circle", "a {} square"], ["red", "blue"], encode)

    half = 1 / math.sqrt(2)
    torch.testing.assert_close(embeddings, torch.tensor([[half, half], [-half, -half]]))


def test_class_embeddings_reject_bad_templates():
    encode = lambda texts: torch.randn(len(texts), 4)  # noqa: E731
    with pytest.raises(ValueError, match="containing"):
        clip.build_class_embeddings(["a photo"], ["red"], encode)
    with pytest.raises(ValueError, match="unique"):
        clip.build_class_embeddings(["a {}"], ["red", "red"], encode)
    with pytest.raises(ValueError, match="encode_fn must return"):
        clip.build_class_embeddings(["a {}"], ["red", "blue"], lambda texts: torch.randn(3, 4))


def test_zero_shot_logits_are_cosine():
    image, text = random_pairs(batch=4, dim=5)
    logits = clip.zero_shot_logits(image, text)
    torch.testing.assert_close(logits, F.cosine_similarity(image.unsqueeze(1), text.unsqueeze(0), dim=-1))


def test_recall_at_k_both_directions_by_hand():
    similarity = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.2, 0.6], [0.3, 0.95, 0.5]])
    # Rows (images): image 0 ranks text 0 first; image 1 ranks text 1 last; image 2 ranks text 2 second.
    assert clip.recall_at_k(similarity, 1, "image_to_text") == pytest.approx(1 / 3)
    assert clip.recall_at_k(similarity, 2, "image_to_text") == pytest.approx(2 / 3)
    # Columns (texts): text 0 ranks image 0 first; text 1 ranks image 1 third; text 2 ranks image 2 second.
    assert clip.recall_at_k(similarity, 1, "text_to_image") == pytest.approx(1 / 3)
    assert clip.recall_at_k(similarity, 2, "text_to_image") == pytest.approx(2 / 3)
    assert clip.recall_at_k(similarity, 3, "text_to_image") == pytest.approx(1.0)


def test_recall_at_k_directions_differ():
    similarity = torch.tensor([[1.0, 0.2, 0.9], [0.8, 0.1, 0.0], [0.0, 0.3, 0.5]])
    # Rows: images 0 and 2 rank their own text first, image 1 ranks text 0 first.
    assert clip.recall_at_k(similarity, 1, "image_to_text") == pytest.approx(2 / 3)
    # Columns: only text 0 ranks its own image first (text 1 prefers image 2, text 2 prefers image 0).
    assert clip.recall_at_k(similarity, 1, "text_to_image") == pytest.approx(1 / 3)


def test_recall_with_positives_mask():
    # Image 1 matches texts 1 and 2 (two captions of one picture).
    similarity = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.3, 0.6]])
    positives = torch.tensor([[True, False, False], [False, True, True]])
    assert clip.recall_at_k(similarity, 1, "image_to_text", positives) == pytest.approx(0.0)
    assert clip.recall_at_k(similarity, 2, "image_to_text", positives) == pytest.approx(0.5)
    assert clip.recall_at_k(similarity, 3, "image_to_text", positives) == pytest.approx(1.0)
    assert clip.recall_at_k(similarity, 1, "text_to_image", positives) == pytest.approx(1 / 3)


def test_recall_rejects_bad_arguments():
    similarity = torch.randn(4, 4)
    with pytest.raises(ValueError, match="direction"):
        clip.recall_at_k(similarity, 1, "both")
    with pytest.raises(ValueError, match="k must be"):
        clip.recall_at_k(similarity, 5)
    with pytest.raises(ValueError, match="square"):
        clip.recall_at_k(torch.randn(3, 4), 1)


def test_retrieval_recalls_and_chance():
    similarity = torch.eye(6) + 0.01 * torch.randn(6, 6)
    table = clip.retrieval_recalls(similarity, ks=(1, 5, 10))
    assert table["image_to_text"] == {1: 1.0, 5: 1.0}
    assert table["text_to_image"] == {1: 1.0, 5: 1.0}
    assert clip.chance_recall(100, 5) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------
# Models and tokenizer
# ---------------------------------------------------------------------------------------------


def test_word_tokenizer_round_trip():
    tokenizer = WordTokenizer.from_texts(["a red circle", "an orange square!"], max_length=5)
    input_ids, attention_mask = tokenizer(["a red circle", "a purple square on the left"])
    assert input_ids.shape == (2, 5)
    assert attention_mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert tokenizer.decode(input_ids[0]) == "a red circle"
    assert tokenizer.decode(input_ids[1]) == "a [UNK] square [UNK]"
    rebuilt = WordTokenizer.from_config(tokenizer.to_config())
    assert torch.equal(rebuilt(["a red circle"])[0], tokenizer(["a red circle"])[0])


def test_word_tokenizer_rejects_bad_vocab():
    with pytest.raises(ValueError, match="must start with"):
        WordTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="no words"):
        WordTokenizer.from_texts(["!!"])


@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_tiny_clip_shapes_and_loss(stem):
    config = clip.TinyCLIPConfig(vocab_size=20, max_length=8, image_size=32, patch_size=8, vision_stem=stem,
                                 vision_dim=32, vision_depth=1, vision_heads=2, text_dim=24, text_depth=1, text_heads=2, embed_dim=16)
    model = clip.TinyCLIP(config)
    images = torch.randn(3, 3, 32, 32)
    input_ids = torch.randint(3, 20, (3, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)

    image_features, text_features = model(images, input_ids, attention_mask)
    loss = model.loss(images, input_ids, attention_mask)
    loss.backward()

    assert image_features.shape == (3, 16)
    assert text_features.shape == (3, 16)
    assert model.vision.forward_tokens(images).shape == (3, 17, 32)
    assert model.logit_scale.item() == pytest.approx(INIT)
    assert model.logit_scale.grad is not None
    rebuilt = clip.TinyCLIP.from_config(model.config_dict())
    rebuilt.load_state_dict(model.state_dict())


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    encoder = clip.TinyTextEncoder(vocab_size=10, max_length=6, dim=16, depth=1, heads=2).eval()
    short = torch.tensor([[2, 5, 6]])
    padded = torch.tensor([[2, 5, 6, 0, 0, 0]])
    mask_short = torch.ones(1, 3, dtype=torch.bool)
    mask_padded = torch.tensor([[True, True, True, False, False, False]])
    torch.testing.assert_close(encoder(short, mask_short), encoder(padded, mask_padded), atol=1e-5, rtol=1e-5)


def test_vit_mean_pooling():
    vit = clip.TinyViT(image_size=32, patch_size=8, dim=16, depth=1, heads=2, pool="mean").eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(images), vit.forward_tokens(images)[:, 1:].mean(dim=1))


def test_models_reject_bad_inputs():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        clip.TinyViT(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="pool must be"):
        clip.TinyViT(image_size=32, patch_size=8, pool="max")
    with pytest.raises(ValueError, match="stem must be"):
        clip.TinyViT(image_size=32, patch_size=8, stem="resnet")
    with pytest.raises(ValueError, match="power-of-two"):
        clip.TinyViT(image_size=36, patch_size=6, stem="conv")
    vit = clip.TinyViT(image_size=32, patch_size=8, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="images must be"):
        vit(torch.randn(2, 3, 64, 64))
    encoder = clip.TinyTextEncoder(vocab_size=10, max_length=4, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="exceed max_length"):
        encoder(torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one real token"):
        encoder(torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))


def test_clip_heads_shapes():
    heads = clip.CLIPHeads(clip.CLIPHeadsConfig(image_dim=12, text_dim=8, embed_dim=6, hidden_dim=10))
    image_features, text_features = heads(torch.randn(4, 12), torch.randn(4, 8))
    assert image_features.shape == (4, 6)
    assert text_features.shape == (4, 6)
    heads.loss(torch.randn(4, 12), torch.randn(4, 8)).backward()
    assert heads.logit_scale.grad is not None
    assert clip.CLIPHeads.from_config(heads.config_dict()).config == heads.config


def test_clip_heads_can_keep_text_space():
    heads = clip.CLIPHeads(clip.CLIPHeadsConfig(image_dim=12, text_dim=8, embed_dim=8, project_text=False))
    text = torch.randn(4, 8)
    _, text_features = heads(torch.randn(4, 12), text)
    assert torch.equal(text_features, text)
    with pytest.raises(ValueError, match="must equal text_dim"):
        clip.CLIPHeads(clip.CLIPHeadsConfig(image_dim=12, text_dim=8, embed_dim=6, project_text=False))


def test_images_to_tensor_range():
    from PIL import Image

    images = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 0))]
    batch = clip.images_to_tensor(images)
    assert batch.shape == (2, 3, 4, 4)
    assert batch[0, 0].eq(1.0).all()
    assert batch[1].eq(-1.0).all()
    with pytest.raises(ValueError, match="same size"):
        clip.images_to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 5))])


# ---------------------------------------------------------------------------------------------
# Checkers: the reference passes, a stub is "not implemented", typical mistakes are rejected
# ---------------------------------------------------------------------------------------------


def run_check(check, *candidates):
    return check(*candidates, raise_on_fail=False, verbose=False)


def stub(*args, **kwargs):
    raise NotImplementedError


def make_loss(normalize_image=True, normalize_text=True, scale_fn=None, both=True, targets_fn=None, reduce="mean"):
    """Build a CLIP loss with one deliberate mistake switched on."""

    def loss_fn(image, text, logit_scale):
        if image.shape != text.shape:
            raise ValueError("shapes differ")
        if image.shape[0] < 2:
            raise ValueError("batch < 2")
        if normalize_image:
            image = F.normalize(image, dim=-1)
        if normalize_text:
            text = F.normalize(text, dim=-1)
        scale = scale_fn(logit_scale) if scale_fn else logit_scale.exp().clamp(max=100)
        logits = scale * image @ text.T
        targets = targets_fn(image.shape[0], image.device) if targets_fn else torch.arange(image.shape[0], device=image.device)
        image_to_text = F.cross_entropy(logits, targets)
        if not both:
            return image_to_text
        total = image_to_text + F.cross_entropy(logits.T, targets)
        return total / 2 if reduce == "mean" else total

    return loss_fn


def test_clip_loss_checker_accepts_reference():
    result = run_check(checks.check_clip_loss, clip.clip_loss)
    assert result.status == "passed", result.report()
    assert result.passed_cases == result.total_cases


def test_clip_loss_checker_accepts_correct_variant():
    assert run_check(checks.check_clip_loss, make_loss()).status == "passed"


def test_clip_loss_checker_stub_not_implemented():
    assert run_check(checks.check_clip_loss, stub).status == "not_implemented"


CLIP_LOSS_MISTAKES = {
    "one_direction": make_loss(both=False),
    "sum_of_directions": make_loss(reduce="sum"),
    "image_not_normalized": make_loss(normalize_image=False),
    "text_not_normalized": make_loss(normalize_text=False),
    "neither_normalized": make_loss(normalize_image=False, normalize_text=False),
    "targets_reversed": make_loss(targets_fn=lambda b, d: torch.arange(b, device=d).flip(0)),
    "targets_shifted": make_loss(targets_fn=lambda b, d: (torch.arange(b, device=d) + 1) % b),
    "targets_zero": make_loss(targets_fn=lambda b, d: torch.zeros(b, dtype=torch.long, device=d)),
    "divided_by_scale": make_loss(scale_fn=lambda s: 1 / s.exp().clamp(max=100)),
    "divided_by_log_scale": make_loss(scale_fn=lambda s: 1 / s),
    "not_exponentiated": make_loss(scale_fn=lambda s: s),
    "no_scale": make_loss(scale_fn=lambda s: 1.0),
    "not_clamped": make_loss(scale_fn=lambda s: s.exp()),
    "clamped_log_at_100": make_loss(scale_fn=lambda s: s.clamp(max=100).exp()),
    "clamped_too_low": make_loss(scale_fn=lambda s: s.exp().clamp(max=20)),
    "detached_scale": make_loss(scale_fn=lambda s: min(math.exp(s.item()), 100.0)),
}


@pytest.mark.parametrize("mistake", sorted(CLIP_LOSS_MISTAKES))
def test_clip_loss_checker_rejects_mistake(mistake):
    result = run_check(checks.check_clip_loss, CLIP_LOSS_MISTAKES[mistake])
    assert result.status == "failed", f"{mistake} was not rejected"


def test_clip_loss_checker_names_the_mistake():
    assert "一個方向" in run_check(checks.check_clip_loss, CLIP_LOSS_MISTAKES["one_direction"]).hint
    assert "clamp" in run_check(checks.check_clip_loss, CLIP_LOSS_MISTAKES["not_clamped"]).hint
    assert "exp()" in run_check(checks.check_clip_loss, CLIP_LOSS_MISTAKES["not_exponentiated"]).hint
    assert "文字特徵" in run_check(checks.check_clip_loss, CLIP_LOSS_MISTAKES["text_not_normalized"]).hint
    assert "torch.arange(B)" in run_check(checks.check_clip_loss, CLIP_LOSS_MISTAKES["targets_zero"]).hint
    assert "梯度" in run_check(checks.check_clip_loss, CLIP_LOSS_MISTAKES["detached_scale"]).case


def test_clip_loss_checker_requires_value_errors():
    def loss_without_validation(image, text, logit_scale):
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        logits = logit_scale.exp().clamp(max=100) * image @ text.T
        targets = torch.arange(image.shape[0])
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets[: logits.shape[1]])) / 2

    result = run_check(checks.check_clip_loss, loss_without_validation)
    assert result.status in ("failed", "error")
    assert "ValueError" in result.case


def test_clip_loss_checker_reports_crash_as_error():
    def crashes(image, text, logit_scale):
        return image @ text.T[:-1]  # matmul of mismatched shapes

    assert run_check(checks.check_clip_loss, crashes).status == "error"


def make_class_embeddings(normalize_prompts=True, renormalize=True, first_only=False):
    def build(templates, class_names, encode_fn):
        rows = []
        for name in class_names:
            embeddings = encode_fn([template.format(name) for template in templates])
            if normalize_prompts:
                embeddings = F.normalize(embeddings, dim=-1)
            row = embeddings[0] if first_only else embeddings.mean(dim=0)
            rows.append(F.normalize(row, dim=-1) if renormalize else row)
        return torch.stack(rows)

    return build


def test_zero_shot_checker_accepts_reference():
    result = run_check(checks.check_zero_shot, clip.build_class_embeddings, clip.zero_shot_logits)
    assert result.status == "passed", result.report()


def test_zero_shot_checker_accepts_per_class_loop():
    assert run_check(checks.check_zero_shot, make_class_embeddings(), clip.zero_shot_logits).status == "passed"


def test_zero_shot_checker_stub_not_implemented():
    assert run_check(checks.check_zero_shot, stub, stub).status == "not_implemented"
    assert run_check(checks.check_zero_shot, clip.build_class_embeddings, stub).status == "not_implemented"


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(make_class_embeddings(renormalize=False), id="no_renormalization"),
        pytest.param(make_class_embeddings(normalize_prompts=False), id="no_prompt_normalization"),
        pytest.param(make_class_embeddings(normalize_prompts=False, renormalize=False), id="no_normalization"),
        pytest.param(make_class_embeddings(first_only=True), id="first_template_only"),
        pytest.param(lambda t, c, encode: clip.build_class_embeddings(t[::-1][:1] + t, c, encode), id="extra_template"),
        pytest.param(lambda t, c, encode: clip.build_class_embeddings(t, sorted(c), encode), id="wrong_class_order"),
    ],
)
def test_zero_shot_checker_rejects_class_embedding_mistakes(build):
    result = run_check(checks.check_zero_shot, build, clip.zero_shot_logits)
    assert result.status == "failed"


def test_zero_shot_checker_names_missing_renormalization():
    result = run_check(checks.check_zero_shot, make_class_embeddings(renormalize=False), clip.zero_shot_logits)
    assert "再做一次 L2 正規化" in result.hint


@pytest.mark.parametrize(
    "logits",
    [
        pytest.param(lambda images, classes: images @ F.normalize(classes, dim=-1).T, id="images_not_normalized"),
        pytest.param(lambda images, classes: F.normalize(images, dim=-1) @ classes.T, id="classes_not_normalized"),
        pytest.param(lambda images, classes: clip.zero_shot_logits(images, classes).T, id="transposed"),
        pytest.param(lambda images, classes: clip.zero_shot_logits(images, classes).softmax(-1), id="softmax"),
    ],
)
def test_zero_shot_checker_rejects_logit_mistakes(logits):
    result = run_check(checks.check_zero_shot, clip.build_class_embeddings, logits)
    assert result.status == "failed"


def recall_on_axis(axis_for_image_to_text):
    """Recall@K where image->text ranks along ``axis_for_image_to_text`` (1 is right, 0 is wrong)."""

    def recall(similarity, k, direction="image_to_text"):
        if direction not in ("image_to_text", "text_to_image"):
            raise ValueError(direction)
        axis = axis_for_image_to_text if direction == "image_to_text" else 1 - axis_for_image_to_text
        top = similarity.topk(k, dim=axis).indices  # (k, N) on axis 0, (N, k) on axis 1
        if axis == 0:
            top = top.T
        hits = (top == torch.arange(similarity.shape[0]).unsqueeze(1)).any(dim=1)
        return hits.float().mean().item()

    return recall


def recall_by_rank(similarity, k, direction="image_to_text"):
    """A correct Recall@K written differently: the rank of the positive is below k."""
    if direction not in ("image_to_text", "text_to_image"):
        raise ValueError(direction)
    scores = similarity if direction == "image_to_text" else similarity.T
    positive = scores.diagonal().unsqueeze(1)
    rank = (scores > positive).sum(dim=1)
    return torch.mean((rank < k).float())


def test_recall_checker_accepts_reference_and_variants():
    for candidate in (clip.recall_at_k, recall_on_axis(1), recall_by_rank):
        result = run_check(checks.check_recall_at_k, candidate)
        assert result.status == "passed", result.report()


def test_recall_checker_stub_not_implemented():
    assert run_check(checks.check_recall_at_k, stub).status == "not_implemented"


def test_recall_checker_rejects_wrong_axis():
    result = run_check(checks.check_recall_at_k, recall_on_axis(0))
    assert result.status == "failed"
    assert "方向錯了" in result.hint


@pytest.mark.parametrize(
    "candidate",
    [
        pytest.param(lambda s, k, d="image_to_text": clip.recall_at_k(s, k, d) * s.shape[0], id="count_not_fraction"),
        pytest.param(lambda s, k, d="image_to_text": clip.recall_at_k(s, max(k - 1, 1), d), id="top_k_minus_one"),
        pytest.param(lambda s, k, d="image_to_text": clip.recall_at_k(s, k, "image_to_text"), id="ignores_direction"),
        pytest.param(lambda s, k, d="image_to_text": clip.recall_at_k(-s, k, d) if d in clip.DIRECTIONS else clip.recall_at_k(s, k, d), id="lowest_scores"),
        pytest.param(lambda s, k, d="image_to_text": 1.0 if d in clip.DIRECTIONS else clip.recall_at_k(s, k, d), id="constant"),
    ],
)
def test_recall_checker_rejects_mistakes(candidate):
    assert run_check(checks.check_recall_at_k, candidate).status == "failed"


def test_recall_checker_small_example_differs_by_direction():
    # The checker's wrong-axis case only bites when the two directions disagree on its matrices.
    similarity = torch.tensor(
        [[0.9, 0.8, 0.1, 0.0], [0.7, 0.2, 0.6, 0.1], [0.3, 0.95, 0.5, 0.4], [0.2, 0.1, 0.85, 0.3]]
    )
    image_to_text = [clip.recall_at_k(similarity, k, "image_to_text") for k in (1, 2)]
    text_to_image = [clip.recall_at_k(similarity, k, "text_to_image") for k in (1, 2)]
    assert image_to_text != text_to_image
