"""Checkers of notebook 05 (LLaVA): projector, image-feature merge, labels, batching for generation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from course_utils.checks.base import Case, CaseFailure, checker, describe, expect_close, expect_shape, expect_tensor, fail
from course_utils.vlm import llava as reference

IGNORE_INDEX = reference.IGNORE_INDEX


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _expect_value_error(call, what: str, hint: str) -> str:
    """Run ``call`` and return the ValueError's message; fail when it returns or raises something else."""
    try:
        result = call()
    except ValueError as error:
        return str(error)
    except NotImplementedError:
        raise
    except Exception as error:  # a different exception type is a wrong answer here, not a crash
        fail(f"{what}時丟出 ValueError", f"{type(error).__name__}: {error}", hint)
    fail(f"{what}時丟出 ValueError", f"沒有丟出例外，回傳了 {describe(result)}", hint)
    return ""


# ---------------------------------------------------------------------------------------------
# Projector
# ---------------------------------------------------------------------------------------------


def _projector_reference_output(candidate_module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Compute what a LLaVA projector with the candidate's own weights should return."""
    hidden = F.linear(x, candidate_module.linear_1.weight, candidate_module.linear_1.bias)
    if kind == "mlp":
        hidden = F.linear(F.gelu(hidden), candidate_module.linear_2.weight, candidate_module.linear_2.bias)
    return hidden


@checker("llava_projector", "LLaVA projector（linear 與兩層 MLP）", points=2.0)
def check_projector(projector_class):
    """Check ``projector_class(vision_dim, text_dim, kind)`` with kinds "linear" and "mlp".

    The class must name its layers ``linear_1`` (and ``linear_2`` for "mlp"), like transformers'
    ``LlavaMultiModalProjector``, so the checker can read the weights.
    """
    generator = torch.Generator().manual_seed(0)
    vision_dim, text_dim = 12, 8

    def build(kind: str):
        module = projector_class(vision_dim, text_dim, kind=kind)
        if not isinstance(module, torch.nn.Module):
            fail("一個 nn.Module", type(module).__name__, "class 要繼承 nn.Module，並呼叫 super().__init__()。")
        names = ["linear_1"] + (["linear_2"] if kind == "mlp" else [])
        for name in names:
            layer = getattr(module, name, None)
            if not isinstance(layer, torch.nn.Linear):
                linear_count = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
                if layer is None and len(names) > linear_count:
                    hint = (f"kind={kind!r} 需要 {len(names)} 層 nn.Linear，你的 module 只有 {linear_count} 層："
                            "LLaVA-1.5 的 MLP 是 linear_1（vision_dim→text_dim）→ GELU → linear_2（text_dim→text_dim）。")
                else:
                    hint = "層數對了，名稱要照 transformers 的 LlavaMultiModalProjector：第一層 linear_1，第二層 linear_2。"
                fail(f"屬性 {name} 是 nn.Linear", describe(layer), hint)
        return module

    def linear_parameter_count():
        module = build("linear")
        count = sum(p.numel() for p in module.parameters())
        expected = vision_dim * text_dim + text_dim
        if count != expected:
            fail(f"kind='linear' 有 {expected} 個參數（{vision_dim}x{text_dim} 權重 + {text_dim} bias）", str(count),
                 "linear 版本只有一層 nn.Linear(vision_dim, text_dim)，有 bias。")

    def mlp_parameter_count():
        module = build("mlp")
        count = sum(p.numel() for p in module.parameters())
        expected = vision_dim * text_dim + text_dim + text_dim * text_dim + text_dim
        if count != expected:
            fail(f"kind='mlp' 有 {expected} 個參數", str(count),
                 "兩層都輸出 text_dim：linear_1 是 vision_dim→text_dim，linear_2 是 text_dim→text_dim，兩層都有 bias。")

    def output_shape():
        for kind in ("linear", "mlp"):
            module = build(kind)
            x = torch.randn(3, 5, vision_dim, generator=generator)
            expect_shape(module(x), (3, 5, text_dim), f"kind={kind!r} 對 (3, 5, {vision_dim}) 的輸出",
                         hint="每個 visual token 各自投影，token 數不變：(B, N, vision_dim) → (B, N, text_dim)。")

    def linear_values():
        module = build("linear")
        x = torch.randn(2, 4, vision_dim, generator=generator)
        expect_close(module(x), _projector_reference_output(module, x, "linear"), "kind='linear' 的輸出",
                     hint="linear 版本就是 linear_1(x)，中間沒有激活函數。")

    def mlp_values_with_gelu():
        module = build("mlp")
        x = torch.randn(2, 4, vision_dim, generator=generator) * 3
        expect_close(module(x), _projector_reference_output(module, x, "mlp"), "kind='mlp' 的輸出",
                     hint="LLaVA-1.5 的順序是 linear_1 → GELU → linear_2；GELU 用精確版（nn.GELU() 的預設），不是 ReLU 或 tanh 近似。")

    def tokens_projected_independently():
        module = build("mlp")
        x = torch.randn(2, 6, vision_dim, generator=generator)
        order = torch.randperm(6, generator=generator)
        expect_close(module(x[:, order]), module(x)[:, order], "打亂 token 順序後的輸出",
                     hint="projector 只看最後一維：不要沿著 token 維度做任何混合或 reshape。")

    def two_dimensional_input():
        module = build("mlp")
        x = torch.randn(7, vision_dim, generator=generator)
        expect_close(module(x), _projector_reference_output(module, x, "mlp"), "二維輸入 (7, vision_dim) 的輸出",
                     hint="nn.Linear 作用在最後一維，任何前置維度都可以；不要寫死 x.shape[1]。")

    def gradients_reach_every_parameter():
        module = build("mlp")
        module(torch.randn(2, 3, vision_dim, generator=generator)).pow(2).sum().backward()
        for name, parameter in module.named_parameters():
            if parameter.grad is None or not torch.isfinite(parameter.grad).all() or parameter.grad.abs().sum() == 0:
                fail(f"參數 {name} 收到非零的有限梯度", describe(parameter.grad),
                     "確認 forward 用到每一層，且沒有 detach() 或 torch.no_grad()。")

    def runs_on_device(device):
        def run():
            module = build("mlp").to(device)
            x = torch.randn(2, 3, vision_dim, generator=generator).to(device)
            got = module(x)
            if got.device.type != device.type:
                fail(f"輸出在 {device.type} 上", str(got.device), "不要在 forward 裡建立固定在 CPU 上的張量。")
            expect_close(got.cpu(), _projector_reference_output(module.cpu(), x.cpu(), "mlp"), f"{device.type} 上的輸出", atol=1e-4)
        return run

    cases = [
        Case("linear 的參數量", linear_parameter_count),
        Case("兩層 MLP 的參數量", mlp_parameter_count),
        Case("輸出形狀 (B, N, text_dim)", output_shape),
        Case("linear 版本的數值", linear_values),
        Case("MLP 版本的數值（linear_1 → GELU → linear_2）", mlp_values_with_gelu),
        Case("每個 token 各自投影", tokens_projected_independently),
        Case("二維輸入", two_dimensional_input),
        Case("梯度流到每個參數", gradients_reach_every_parameter),
    ]
    cases += [Case(f"在 {device.type} 上執行", runs_on_device(device)) for device in _devices() if device.type != "cpu"]
    return cases


# ---------------------------------------------------------------------------------------------
# Merging image features into placeholder positions
# ---------------------------------------------------------------------------------------------


def _diagnose_merge(got: torch.Tensor, input_embeds, input_ids, image_features, image_token_id) -> str:
    """Name the typical mistake behind a wrong merge (reversed order, off by one), or return ""."""
    if not isinstance(got, torch.Tensor) or got.shape != input_embeds.shape:
        return ""
    got = got.detach()
    reversed_merge = reference.merge_image_features(input_embeds, input_ids, image_features.flip(1), image_token_id)
    if torch.allclose(got, reversed_merge):
        return "每張影像的特徵順序反了：第 k 個 image token 位置要放第 k 個特徵（由左到右）。"
    mask = input_ids == image_token_id
    flat = image_features.reshape(-1, image_features.shape[-1])
    for offset in (1, -1):
        shifted = torch.roll(mask, shifts=offset, dims=1)
        if int(shifted.sum()) == flat.shape[0] and torch.allclose(got[shifted], flat):
            side = "右" if offset == 1 else "左"
            return f"影像特徵被寫到往{side}錯開一格的位置：要寫在 input_ids == image_token_id 的位置本身。"
    return ""


def _expect_merge(got, input_embeds, input_ids, image_features, image_token_id, what: str, hint: str) -> None:
    expected = reference.merge_image_features(input_embeds, input_ids, image_features, image_token_id)
    try:
        expect_close(got, expected, what, hint)
    except CaseFailure as failure:
        failure.hint = _diagnose_merge(got, input_embeds, input_ids, image_features, image_token_id) or failure.hint
        raise


@checker("llava_merge", "把影像特徵寫進 image token 的位置", points=2.0)
def check_merge_image_features(merge_image_features):
    """Check ``merge_image_features(input_embeds, input_ids, image_features, image_token_id)``."""
    generator = torch.Generator().manual_seed(1)
    image_id, dim = 9, 4

    def sample(ids, num_images, tokens_per_image):
        input_ids = torch.tensor(ids)
        embeds = torch.randn(*input_ids.shape, dim, generator=generator)
        features = torch.arange(num_images * tokens_per_image * dim, dtype=torch.float32).reshape(num_images, tokens_per_image, dim) + 100
        return embeds, input_ids, features

    def single_sample():
        embeds, ids, features = sample([[1, 9, 9, 9, 5, 6]], 1, 3)
        _expect_merge(merge_image_features(embeds, ids, features, image_id), embeds, ids, features, image_id,
                      "一個樣本、三個 image token 的結果",
                      hint="input_ids == image_token_id 的位置換成影像特徵，其他位置保留原本的 embedding。")

    def features_keep_their_order():
        embeds, ids, features = sample([[1, 2, 9, 9, 9, 9, 3]], 1, 4)
        got = expect_tensor(merge_image_features(embeds, ids, features, image_id), "輸出")
        expect_close(got[0, 2:6], features[0], "位置 2..5 的向量（應該依序是特徵 0..3）",
                     hint="第 k 個 image token 位置放第 k 個特徵：順序不能反過來，也不能錯開一格。")

    def text_positions_unchanged():
        embeds, ids, features = sample([[9, 9, 4, 5, 6, 7]], 1, 2)
        got = expect_tensor(merge_image_features(embeds, ids, features, image_id), "輸出")
        expect_close(got[0, 2:], embeds[0, 2:], "文字位置的 embedding",
                     hint="只改 image token 的位置；文字 token 的 embedding 必須原封不動。")

    def batch_with_different_offsets():
        embeds, ids, features = sample([[1, 9, 9, 3, 3, 0], [1, 2, 3, 9, 9, 0], [9, 9, 4, 4, 4, 4]], 3, 2)
        _expect_merge(merge_image_features(embeds, ids, features, image_id), embeds, ids, features, image_id,
                      "三個樣本（image token 在不同位置）的結果",
                      hint="第 b 張影像的特徵要寫進第 b 列的 image token 位置；用布林遮罩（input_ids == image_token_id）找位置最不容易錯。")

    def two_images_in_one_row():
        embeds, ids, features = sample([[9, 9, 1, 9, 9, 2], [3, 9, 9, 4, 5, 6]], 3, 2)
        _expect_merge(merge_image_features(embeds, ids, features, image_id), embeds, ids, features, image_id,
                      "第一列有兩張影像時的結果",
                      hint="影像依閱讀順序消耗：第 0 列由左到右，接著第 1 列；每張影像填接下來的 N 個位置。")

    def does_not_modify_input():
        embeds, ids, features = sample([[1, 9, 9, 2]], 1, 2)
        before = embeds.clone()
        merge_image_features(embeds, ids, features, image_id)
        if not torch.equal(embeds, before):
            fail("input_embeds 保持不變", "input_embeds 被就地（in-place）修改了", "先 clone() 再寫入，回傳新的張量。")

    def gradients_reach_both_inputs():
        embeds, ids, features = sample([[1, 9, 9, 2]], 1, 2)
        embeds.requires_grad_(True)
        features.requires_grad_(True)
        merge_image_features(embeds, ids, features, image_id).sum().backward()
        if features.grad is None or not torch.equal(features.grad, torch.ones_like(features)):
            fail("每個影像特徵的梯度都是 1", describe(features.grad),
                 "不要 detach() 影像特徵，也不要把它們轉成 Python 數字；projector 要靠這個梯度學習。")
        expected_text_grad = torch.tensor([1.0, 0.0, 0.0, 1.0])[None, :, None].expand(1, 4, dim)
        expect_close(embeds.grad, expected_text_grad, "input_embeds 的梯度（image 位置應為 0）",
                     hint="image 位置的文字 embedding 被覆蓋，梯度是 0；其他位置的梯度是 1。")

    def count_mismatch_raises():
        embeds, ids, features = sample([[1, 9, 9, 9, 2]], 1, 4)
        message = _expect_value_error(lambda: merge_image_features(embeds, ids, features, image_id),
                                      "3 個 image token 位置配上 4 個特徵向量",
                                      "先數 (input_ids == image_token_id).sum()，和特徵向量總數不同就 raise ValueError，不要默默截斷或補齊。")
        if "3" not in message or "4" not in message:
            fail("錯誤訊息寫出兩個數字（3 個位置、4 個特徵）", repr(message), "在訊息裡寫出位置數和特徵數，使用者才知道哪裡對不上。")

    def truncated_prompt_raises():
        embeds, ids, features = sample([[1, 2, 9, 9, 9, 9, 5, 6]], 1, 4)
        truncated_embeds, truncated_ids = embeds[:, :4], ids[:, :4]  # the prompt was cut inside its image tokens
        _expect_value_error(lambda: merge_image_features(truncated_embeds, truncated_ids, features, image_id),
                            "prompt 在 image token 中間被截斷（剩 2 個位置，特徵有 4 個）",
                            "截斷後位置數變少，一定要檢查數量並 raise ValueError，不能只寫入前幾個特徵。")

    def keeps_embedding_dtype():
        embeds, ids, features = sample([[1, 9, 9, 2]], 1, 2)
        got = expect_tensor(merge_image_features(embeds.double(), ids, features, image_id), "輸出")
        if got.dtype != torch.float64:
            fail("輸出 dtype 與 input_embeds 相同（float64）", str(got.dtype), "把影像特徵 .to(input_embeds.dtype) 後再寫入。")

    def runs_on_device(device):
        def run():
            embeds, ids, features = sample([[1, 9, 9, 2], [9, 9, 3, 4]], 2, 2)
            got = merge_image_features(embeds.to(device), ids.to(device), features.to(device), image_id)
            expect_close(expect_tensor(got, "輸出").cpu(), reference.merge_image_features(embeds, ids, features, image_id),
                         f"{device.type} 上的結果", hint="不要在函式裡建立固定在 CPU 上的張量。")
        return run

    cases = [
        Case("一個樣本", single_sample),
        Case("特徵依序放入", features_keep_their_order),
        Case("文字位置不變", text_positions_unchanged),
        Case("批次中 image token 位置不同", batch_with_different_offsets),
        Case("同一列有兩張影像", two_images_in_one_row),
        Case("不修改輸入", does_not_modify_input),
        Case("梯度流到兩個輸入", gradients_reach_both_inputs),
        Case("數量不符時丟出 ValueError", count_mismatch_raises),
        Case("截斷後數量不符也要丟出 ValueError", truncated_prompt_raises),
        Case("保持 embedding 的 dtype", keeps_embedding_dtype),
    ]
    cases += [Case(f"在 {device.type} 上執行", runs_on_device(device)) for device in _devices() if device.type != "cpu"]
    return cases


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def _diagnose_labels(got: torch.Tensor, expected: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_token_id: int, pad_token_id: int | None = None) -> str:
    """Name the typical mistake behind a wrong label tensor, or return "" when none fits."""
    shifted_left = torch.full_like(expected, IGNORE_INDEX)
    shifted_left[:, :-1] = expected[:, 1:]
    if torch.equal(got, shifted_left):
        return ("你的 labels 往左平移了一格。loss 函式（transformers 的 causal LM loss、本課的 causal_lm_loss）"
                "已經會把 logits[t] 對到 labels[t+1]；這裡再平移，就變成平移兩次。labels 要和 input_ids 對齊。")
    answer_kept = expected != IGNORE_INDEX
    leaked = (got != IGNORE_INDEX) & ~answer_kept
    dropped = answer_kept & (got == IGNORE_INDEX)
    if bool(dropped.any()) and not bool(leaked.any()) and torch.equal(got[~dropped], expected[~dropped]):
        dropped_ids = sorted(set(input_ids[dropped].tolist()))
        message = (f"其他位置都對，但有 {int(dropped.sum())} 個回答位置被設成 -100（token id {dropped_ids}）："
                   "回答的每個 token，包括結尾的 <|im_end|>，都要保留 id。")
        if pad_token_id is not None and dropped_ids == [pad_token_id]:
            message += ("被遮掉的正是 pad id；SmolLM2 的 pad token 也是回答結尾的 <|im_end|>，"
                        "所以找 padding 要看 attention_mask，不要用 input_ids == pad_id 判斷。")
        return message
    if not (torch.equal(got[answer_kept], expected[answer_kept]) and bool(leaked.any())):
        return ""
    padding = leaked & ~attention_mask.bool()
    image = leaked & attention_mask.bool() & (input_ids == image_token_id)
    prompt = leaked & ~padding & ~image
    kinds = []
    if bool(prompt.any()):
        kinds.append(f"{int(prompt.sum())} 個 prompt 或聊天模板位置：只有 answer_mask 為 True 的位置保留 token id，"
                     "沒遮掉的話，模型會把力氣花在背使用者的問題和模板上")
    if bool(image.any()):
        kinds.append(f"{int(image.sum())} 個 image token 位置：那裡的 id 只是佔位符，沒有東西可學，"
                     "不論 answer_mask 怎麼寫，input_ids == image_token_id 的位置都要是 -100")
    if bool(padding.any()):
        kinds.append(f"{int(padding.sum())} 個 padding 位置（attention_mask 為 0）：不論 padding 在左邊或右邊，"
                     "都看 attention_mask，不要用 input_ids == pad_id 判斷（SmolLM2 的 pad id 也是回答結尾的 <|im_end|>）")
    return "回答的 labels 正確，但這些位置沒有設成 -100：" + "；".join(kinds) + "。"


@checker("llava_labels", "建立 labels：只在回答上計算 loss", points=2.0)
def check_build_labels(build_labels):
    """Check ``build_labels(input_ids, answer_mask, attention_mask, image_token_id)``."""
    image_id, end_id, pad_id = 9, 2, 2  # like SmolLM2, the pad token is the end-of-turn token

    def as_batch(ids, answer, attention):
        return (torch.tensor(ids), torch.tensor(answer, dtype=torch.bool), torch.tensor(attention))

    def compare(ids, answer, attention, what, hint):
        input_ids, answer_mask, attention_mask = as_batch(ids, answer, attention)
        got = build_labels(input_ids, answer_mask, attention_mask, image_id)
        expected = reference.build_labels(input_ids, answer_mask, attention_mask, image_id)
        got = expect_tensor(got, what)
        if tuple(got.shape) != tuple(expected.shape):
            fail(f"{what} 的形狀為 {tuple(expected.shape)}", f"形狀 {tuple(got.shape)}",
                 "labels 和 input_ids 同形狀：不要在這裡平移（shift），loss 會自己平移一次。")
        if not torch.equal(got.long(), expected):
            fail(f"{what} = {expected.tolist()}", str(got.tolist()),
                 _diagnose_labels(got.long(), expected, input_ids, attention_mask, image_id, pad_id) or hint)

    def prompt_is_masked():
        # <start> user text <end> <start> assistant answer <end>
        compare([[1, 5, 6, 7, end_id, 1, 8, 30, 31, end_id]],
                [[0, 0, 0, 0, 0, 0, 0, 1, 1, 1]],
                [[1] * 10], "單輪對話的 labels",
                "只有回答（answer_mask 為 True）的位置保留 token id；system、使用者問題與聊天模板的位置都是 -100。")

    def no_shift_here():
        input_ids, answer_mask, attention_mask = as_batch([[1, 5, 6, 30, 31, 32]], [[0, 0, 0, 1, 1, 1]], [[1] * 6])
        got = expect_tensor(build_labels(input_ids, answer_mask, attention_mask, image_id), "labels")
        if got.shape == input_ids.shape and torch.equal(got[0, 3:].long(), torch.tensor([30, 31, 32])):
            return
        fail("labels[0, 3:] = [30, 31, 32]（和 input_ids 對齊）", str(got.tolist()),
             "不要自己平移 labels：transformers 的 causal LM loss（和本課的 causal_lm_loss）會把 logits[t] 對到 labels[t+1]，再平移一次就變成預測後兩個 token。")

    def image_positions_masked():
        compare([[1, 9, 9, 9, 5, 30, end_id]], [[0, 1, 1, 1, 0, 1, 1]], [[1] * 7], "answer_mask 誤標到 image token 時的 labels",
                "image token 位置的 id 只是佔位符，沒有東西可學：不論 answer_mask 怎麼寫，input_ids == image_token_id 的位置都要設成 -100。")

    def padding_masked():
        # Right padding with the end-of-turn id, and a collator that padded answer_mask with True.
        compare([[1, 5, 30, end_id, pad_id, pad_id], [1, 5, 6, 7, 31, end_id]],
                [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]],
                [[1, 1, 1, 1, 0, 0], [1] * 6], "有 padding 的批次",
                "attention_mask 為 0 的位置是 padding，一律 -100；回答結尾那個真的 <|im_end|> 要保留（模型才學得會停下來），所以不能用 input_ids == pad_id 判斷。")

    def left_padding_masked():
        compare([[pad_id, pad_id, 1, 5, 30, end_id]], [[1, 1, 0, 0, 1, 1]], [[0, 0, 1, 1, 1, 1]], "左側 padding 的批次",
                "padding 在左邊也一樣：看 attention_mask，不要假設 padding 只在右邊。")

    def multi_turn():
        compare([[1, 5, 9, 9, end_id, 1, 8, 30, end_id, 1, 6, end_id, 1, 8, 31, 32, end_id]],
                [[0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]],
                [[1] * 17], "兩輪對話的 labels", "每一輪助理的回答都要保留，每一輪使用者的問題都要遮掉。")

    def returns_long_and_keeps_input():
        input_ids, answer_mask, attention_mask = as_batch([[1, 5, 30, end_id]], [[0, 0, 1, 1]], [[1] * 4])
        before = input_ids.clone()
        got = expect_tensor(build_labels(input_ids, answer_mask, attention_mask, image_id), "labels")
        if got.dtype != torch.long:
            fail("labels 的 dtype 是 torch.long", str(got.dtype), "cross-entropy 的目標要是整數（long）。")
        if not torch.equal(input_ids, before):
            fail("input_ids 保持不變", "input_ids 被就地（in-place）修改了", "先 clone() 或用 torch.where 建立新的張量。")

    def no_answer_raises():
        input_ids, answer_mask, attention_mask = as_batch([[1, 5, 30, end_id], [1, 5, 6, 7]], [[0, 0, 1, 1], [0, 0, 0, 0]], [[1] * 4, [1] * 4])
        _expect_value_error(lambda: build_labels(input_ids, answer_mask, attention_mask, image_id),
                            "第 1 列沒有任何回答 token（例如回答被截斷）",
                            "檢查每一列至少有一個不是 -100 的 label；全部是 -100 的列會讓 loss 變成 0/0（NaN），要 raise ValueError。")

    def answer_only_in_padding_raises():
        input_ids, answer_mask, attention_mask = as_batch([[1, 5, 30, pad_id]], [[0, 0, 0, 1]], [[1, 1, 1, 0]])
        _expect_value_error(lambda: build_labels(input_ids, answer_mask, attention_mask, image_id),
                            "回答只落在 padding 上（實際上沒有回答）",
                            "先套用所有遮罩（answer、padding、image），再檢查每一列是否還有 label。")

    def loss_equals_answer_only_loss():
        generator = torch.Generator().manual_seed(2)
        input_ids, answer_mask, attention_mask = as_batch([[1, 9, 9, 5, 6, 30, 31, end_id, pad_id]], [[0, 0, 0, 0, 0, 1, 1, 1, 1]], [[1] * 8 + [0]])
        logits = torch.randn(1, 9, 40, generator=generator)
        got = reference.causal_lm_loss(logits, build_labels(input_ids, answer_mask, attention_mask, image_id))
        expected = F.cross_entropy(logits[0, 4:7], torch.tensor([30, 31, end_id]))
        expect_close(got, expected, "用你的 labels 算出的 causal LM loss",
                     hint="loss 應該只來自三個回答 token（30、31、<|im_end|>），且每個由前一個位置的 logits 預測。")

    return [
        Case("遮掉 prompt", prompt_is_masked),
        Case("不在這裡平移", no_shift_here),
        Case("遮掉 image token", image_positions_masked),
        Case("遮掉右側 padding、保留回答結尾", padding_masked),
        Case("遮掉左側 padding", left_padding_masked),
        Case("多輪對話", multi_turn),
        Case("dtype 與不修改輸入", returns_long_and_keeps_input),
        Case("沒有回答 token 時丟出 ValueError", no_answer_raises),
        Case("回答只在 padding 上時丟出 ValueError", answer_only_in_padding_raises),
        Case("loss 只來自回答 token", loss_equals_answer_only_loss),
    ]


# ---------------------------------------------------------------------------------------------
# Batching for generation
# ---------------------------------------------------------------------------------------------


def _tiny_language_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@checker("llava_generation_batch", "批次生成：左側 padding 與 position ids", points=1.0)
def check_batch_for_generation(batch_for_generation):
    """Check ``batch_for_generation(sequences, pad_token_id) -> (input_ids, attention_mask, position_ids)``."""
    pad_id = 0
    sequences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]

    def run(seqs=sequences):
        output = batch_for_generation(seqs, pad_id)
        if not isinstance(output, (tuple, list)) or len(output) != 3:
            fail("回傳 (input_ids, attention_mask, position_ids) 三個張量", describe(output), "用 return input_ids, attention_mask, position_ids。")
        width = max(len(s) for s in seqs)
        for tensor, name in zip(output, ("input_ids", "attention_mask", "position_ids")):
            expect_shape(tensor, (len(seqs), width), name, hint="形狀是 (批次大小, 最長序列長度)。")
        return output

    def shapes():
        run()

    def last_column_is_real():
        input_ids, attention_mask, _ = run()
        for row, seq in enumerate(sequences):
            if attention_mask[row, -1] == 0 or input_ids[row, -1] != seq[-1]:
                fail(f"第 {row} 列最後一個位置是真的 token {seq[-1]}", f"input_ids={input_ids[row].tolist()}, attention_mask={attention_mask[row].tolist()}",
                     "生成時讀的是最後一個位置的 logits；右側 padding 會讓短的序列讀到 pad 位置。padding 要放在左邊。")

    def tokens_and_mask_values():
        input_ids, attention_mask, _ = run()
        for row, seq in enumerate(sequences):
            pads = input_ids.shape[1] - len(seq)
            expected_ids = [pad_id] * pads + seq
            expected_mask = [0] * pads + [1] * len(seq)
            if input_ids[row].tolist() != expected_ids:
                fail(f"第 {row} 列 input_ids = {expected_ids}", str(input_ids[row].tolist()), "左邊補 pad_token_id，序列本身順序不變。")
            if attention_mask[row].tolist() != expected_mask:
                fail(f"第 {row} 列 attention_mask = {expected_mask}", str(attention_mask[row].tolist()), "padding 位置是 0，真的 token 是 1。")

    def position_ids_start_at_first_token():
        _, attention_mask, position_ids = run()
        for row, seq in enumerate(sequences):
            real = attention_mask[row].bool()
            got = position_ids[row][real].tolist()
            if got != list(range(len(seq))):
                fail(f"第 {row} 列真的 token 的 position ids = {list(range(len(seq)))}", str(got),
                     "position 從每一列第一個真的 token 開始算 0；可以用 attention_mask.cumsum(-1) - 1。")

    def equal_lengths_unchanged():
        input_ids, attention_mask, position_ids = run([[1, 2, 3], [4, 5, 6]])
        if input_ids.tolist() != [[1, 2, 3], [4, 5, 6]] or attention_mask.min() != 1 or position_ids.tolist() != [[0, 1, 2], [0, 1, 2]]:
            fail("等長序列不加 padding、position ids 為 0,1,2", f"{input_ids.tolist()} / {attention_mask.tolist()} / {position_ids.tolist()}",
                 "最長的序列不需要 padding。")

    def batched_generation_matches_one_by_one():
        model = _tiny_language_model()
        input_ids, attention_mask, _ = run()
        embed = model.get_input_embeddings()
        if bool((attention_mask[:, -1] == 0).any()):
            fail("每一列的最後一個位置都是真的 token", str(attention_mask.tolist()), "右側 padding 會讓生成讀到 pad 位置；改成左側 padding。")
        batched = reference.greedy_generate(model, embed(input_ids.long()), attention_mask.long(), 6, eos_token_id=47)
        for row, seq in enumerate(sequences):
            single_ids = torch.tensor([seq])
            single = reference.greedy_generate(model, embed(single_ids), torch.ones_like(single_ids), 6, eos_token_id=47)
            width = single.shape[1]
            if batched[row, :width].tolist() != single[0].tolist():
                fail(f"第 {row} 列批次生成的 token = 單獨生成的 {single[0].tolist()}", str(batched[row, :width].tolist()),
                     "批次結果和單獨生成不同：檢查 attention_mask 是否把 padding 遮掉、padding 是否在左邊。")

    return [
        Case("回傳三個 (B, T) 張量", shapes),
        Case("最後一個位置是真的 token（左側 padding）", last_column_is_real),
        Case("input_ids 與 attention_mask 的值", tokens_and_mask_values),
        Case("position ids 從第一個真的 token 起算", position_ids_start_at_first_token),
        Case("等長序列", equal_lengths_unchanged),
        Case("批次生成與逐一生成相同", batched_generation_matches_one_by_one),
    ]
