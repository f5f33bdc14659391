"""Checkers of notebook 04 (BLIP-2's Q-Former): the three attention masks, the max-over-queries
similarity and hard-negative sampling."""

from __future__ import annotations

import math
from typing import Callable

import torch

from course_utils.checks.base import Case, checker, describe, expect_close, expect_shape, expect_tensor, fail
from course_utils.env import seed_everything
from course_utils.vlm.qformer import itc_similarity, qformer_attention_mask

TASK_NAMES = {"itc": "ITC（對比）", "itm": "ITM（匹配）", "itg": "ITG（生成）"}


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _lengths_to_mask(lengths: list[int], text_len: int, left: bool = False) -> torch.Tensor:
    """Return a (B, T) bool mask with ``lengths[b]`` real tokens, padded on the right (or the left)."""
    mask = torch.arange(text_len)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    return mask.flip(1) if left else mask


# ---------------------------------------------------------------------------------------------
# qformer_attention_mask
# ---------------------------------------------------------------------------------------------


def _format_mask(mask: torch.Tensor, num_queries: int) -> str:
    """Draw one (L, L) mask as rows of 1/0 with a bar between the query and text columns."""
    rows = []
    for row in mask.int().tolist():
        cells = [str(v) for v in row]
        rows.append(" ".join(cells[:num_queries]) + " | " + " ".join(cells[num_queries:]))
    return "\n      " + "\n      ".join(rows)


def _block_hint(task: str, block: str, got: torch.Tensor, expected: torch.Tensor,
                padded_key: torch.Tensor, causal_violation: torch.Tensor) -> str:
    """Name the likely mistake behind a mismatch inside one block of the mask."""
    if (got & padded_key).any():
        return "padding 位置（text_attention_mask 為 False/0）不能被任何位置看到：那些欄（key）要全部是 False。"
    if task == "itc" and block in ("query→文字", "文字→query"):
        return "ITC 裡 queries 和文字彼此完全看不到：query→文字、文字→query 兩塊都要是 False，這樣影像表示和文字表示才是各自獨立算出來的。"
    if task == "itg" and block == "query→文字":
        return "ITG 裡 queries 只能看 queries，不能看文字；否則 query 會偷看到要生成的答案。"
    if task == "itg" and block == "文字→文字" and causal_violation.any():
        return "ITG 裡每個文字 token 只能看到自己和前面的文字（下三角，包含對角線），不能看後面的 token。"
    if task == "itg" and block == "文字→query":
        return "ITG 裡每個文字 token 都能看到全部 queries（圖像資訊從這裡流進文字）。"
    if task == "itm":
        return "ITM 裡所有位置互相都看得到（只排除 padding 的 key）。"
    if (expected & ~got).any():
        return f"{block} 這一塊有該是 True 的位置變成 False：再對照 {TASK_NAMES[task]} 的規則。"
    return f"{block} 這一塊有該是 False 的位置變成 True：再對照 {TASK_NAMES[task]} 的規則。"


def _expect_mask(got, task: str, num_queries: int, text_mask: torch.Tensor, what: str) -> None:
    """Compare a learner's mask with the reference, block by block, on the rows that matter.

    Rows of padded text positions are not compared: their outputs are never used, so either
    convention (follow the task's rule, or see nothing) is accepted there.
    """
    text_is_real = text_mask.bool()
    batch, text_len = text_is_real.shape
    total = num_queries + text_len
    got = expect_shape(got, (batch, total, total), what,
                       hint="形狀是 (batch, Q+T, Q+T)：queries 在前、文字在後，列是「誰在看」、欄是「被看的 key」。")
    if got.dtype != torch.bool:
        fail(f"{what} 的 dtype 是 torch.bool", f"dtype {got.dtype}",
             "遮罩用布林值：True = 可以看（F.scaled_dot_product_attention 的慣例）。比較運算的結果本來就是 bool，別轉成 float。")
    if got.device != text_mask.device:
        fail(f"{what} 在 {text_mask.device} 上", f"在 {got.device} 上", "用 device=text_attention_mask.device 建立新的張量。")

    expected = qformer_attention_mask(task, num_queries, text_is_real)
    got = got.cpu()
    expected = expected.cpu()
    text_is_real = text_is_real.cpu()
    row_matters = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool), text_is_real], dim=1)  # (B, L)
    key_is_padding = ~torch.cat([torch.ones(batch, num_queries, dtype=torch.bool), text_is_real], dim=1)  # (B, L)
    later = torch.ones(total, total, dtype=torch.bool).triu(diagonal=1)  # j > i

    queries = slice(0, num_queries)
    text = slice(num_queries, total)
    blocks = [("query→query", queries, queries), ("query→文字", queries, text),
              ("文字→query", text, queries), ("文字→文字", text, text)]
    for sample in range(batch):
        for block, rows, columns in blocks:
            check_rows = row_matters[sample, rows]
            got_block = got[sample, rows, columns][check_rows]
            expected_block = expected[sample, rows, columns][check_rows]
            if torch.equal(got_block, expected_block):
                continue
            padded_key = key_is_padding[sample, columns][None, :].expand_as(got_block)
            causal_violation = (got[sample] & later & ~expected[sample])[rows, columns][check_rows]
            hint = _block_hint(task, block, got_block, expected_block, padded_key, causal_violation)
            fail(
                f"{what}，第 {sample} 筆的「{block}」區塊（列=看的位置，欄=被看的位置，| 左邊是 queries）：{_format_mask(expected[sample], num_queries)}",
                _format_mask(got[sample], num_queries),
                hint,
            )


@checker("qformer_attention_mask", "Q-Former 三種預訓練任務的注意力遮罩", points=3.0)
def check_qformer_attention_mask(qformer_attention_mask_fn: Callable):
    """Check ``qformer_attention_mask(task, num_queries, text_attention_mask)`` for itc, itm and itg."""

    def case_for(task: str, num_queries: int, lengths: list[int], text_len: int, device=torch.device("cpu"),
                 integer_mask: bool = False, left: bool = False):
        def run():
            text_mask = _lengths_to_mask(lengths, text_len, left).to(device)
            given = text_mask.long() if integer_mask else text_mask
            before = given.clone()
            got = qformer_attention_mask_fn(task, num_queries, given)
            expect_tensor(got, f"{task} 遮罩")
            if not torch.equal(given, before):
                fail("text_attention_mask 保持不變", "輸入的遮罩被就地修改了", "不要對輸入做 in-place 運算（例如 ~= 或 masked_fill_）。")
            what = f'qformer_attention_mask("{task}", {num_queries}, 長度 {lengths} 的文字)'
            _expect_mask(got, task, num_queries, text_mask, what)
        return run

    def rejects_unknown_task():
        text_mask = torch.ones(1, 3, dtype=torch.bool)
        try:
            qformer_attention_mask_fn("captioning", 2, text_mask)
        except ValueError:
            return
        except NotImplementedError:
            raise
        except Exception as error:  # noqa: BLE001 - any other type is the learner's bug to report
            fail('task="captioning" 時丟出 ValueError', f"{type(error).__name__}: {error}",
                 'raise ValueError(f"unknown task {task!r} ...")，並在訊息裡列出 itc、itm、itg。')
        fail('task="captioning" 時丟出 ValueError', "沒有丟出例外",
             "未知的 task 不該默默回傳某個遮罩：檢查 task 是否在 ('itc', 'itm', 'itg') 裡，否則 raise ValueError。")

    cases = [
        Case("ITC：2 個 queries、3 個文字 token、沒有 padding", case_for("itc", 2, [3], 3)),
        Case("ITM：2 個 queries、3 個文字 token、沒有 padding", case_for("itm", 2, [3], 3)),
        Case("ITG：2 個 queries、3 個文字 token、沒有 padding", case_for("itg", 2, [3], 3)),
        Case("ITC：批次中有 padding", case_for("itc", 3, [5, 3, 1], 5)),
        Case("ITM：批次中有 padding", case_for("itm", 3, [5, 3, 1], 5)),
        Case("ITG：批次中有 padding", case_for("itg", 3, [5, 3, 1], 5)),
        Case("ITG：queries 比文字多", case_for("itg", 6, [2, 1], 2)),
        # With right padding the causal rule already hides later padding, so only left padding
        # shows whether an ITG mask really removes padded keys.
        Case("ITG：padding 在左側", case_for("itg", 2, [4, 2], 4, left=True)),
        Case("ITC：padding 在左側", case_for("itc", 2, [4, 2], 4, left=True)),
        Case("0/1 整數遮罩（tokenizer 的輸出格式）", case_for("itg", 2, [4, 2], 4, integer_mask=True)),
        Case("ITC：0/1 整數遮罩", case_for("itc", 2, [3, 2], 3, integer_mask=True)),
    ]
    for device in _devices()[1:]:
        cases.append(Case(f"在 {device} 上（ITG，有 padding）", case_for("itg", 3, [4, 2], 4, device=device)))
    cases.append(Case("未知的 task 丟出 ValueError", rejects_unknown_task))
    return cases


# ---------------------------------------------------------------------------------------------
# itc_similarity
# ---------------------------------------------------------------------------------------------


def _normalized(generator: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


@checker("qformer_itc_similarity", "ITC 相似度：對 queries 取最大值", points=2.0)
def check_itc_similarity(itc_similarity_fn: Callable):
    """Check ``itc_similarity(image_embeds (B_img, Q, E), text_embeds (B_txt, E)) -> (B_img, B_txt)``."""
    generator = torch.Generator().manual_seed(0)

    def hint_for(got: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> str:
        per_query = torch.einsum("iqe,je->ijq", image_embeds, text_embeds)  # (B_img, B_txt, Q)
        if isinstance(got, torch.Tensor) and got.shape == per_query.shape[:2]:
            got64 = got.detach().cpu().double()
            for name, value in (("平均", per_query.mean(-1)), ("總和", per_query.sum(-1)), ("最小值", per_query.min(-1).values)):
                if torch.allclose(got64, value.cpu().double(), atol=1e-5):
                    return f"你對 queries 取了{name}。BLIP-2 取最大值：每對圖文只看最匹配的那一個 query（max over Q）。"
        return "先算每個 query 和每段文字的內積，得到 (B_img, B_txt, Q)，再沿著 Q 取最大值 .max(dim=-1).values。"

    def compare(image_embeds: torch.Tensor, text_embeds: torch.Tensor, what: str):
        got = itc_similarity_fn(image_embeds, text_embeds)
        expected = itc_similarity(image_embeds, text_embeds)
        expect_shape(got, tuple(expected.shape), what, hint="輸出形狀是 (影像數, 文字數)：列是影像，欄是文字。")
        expect_close(got, expected, what, hint=hint_for(got, image_embeds, text_embeds))
        return got

    def hand_made():
        image_embeds = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
                                     [[0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]]])  # (2, 3, 2)
        text_embeds = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (2, 2)
        compare(image_embeds, text_embeds, "手算的 2 張影像（各 3 個 queries）× 2 段文字")

    def non_square():
        image_embeds = _normalized(generator, 3, 4, 8)
        text_embeds = _normalized(generator, 5, 8)
        compare(image_embeds, text_embeds, "3 張影像 × 5 段文字的相似度")

    def random_batch():
        image_embeds = _normalized(generator, 6, 32, 16)
        text_embeds = _normalized(generator, 6, 16)
        compare(image_embeds, text_embeds, "6 張影像（各 32 個 queries）× 6 段文字")

    def single_query():
        image_embeds = _normalized(generator, 4, 1, 8)
        text_embeds = _normalized(generator, 3, 8)
        compare(image_embeds, text_embeds, "只有 1 個 query 時（等於一般內積）")

    def gradient_goes_to_best_query():
        image_embeds = _normalized(generator, 3, 5, 8).requires_grad_(True)
        text_embeds = _normalized(generator, 4, 8).requires_grad_(True)
        got = itc_similarity_fn(image_embeds, text_embeds)
        expect_tensor(got, "相似度")
        if not got.requires_grad:
            fail("輸出可以反向傳播（requires_grad=True）", "輸出沒有梯度",
                 "不要用 .detach()、.item() 或 torch.no_grad()：訓練時梯度要從相似度流回 queries。")
        got.sum().backward()
        reference_image = image_embeds.detach().clone().requires_grad_(True)
        reference_text = text_embeds.detach().clone().requires_grad_(True)
        itc_similarity(reference_image, reference_text).sum().backward()
        expect_close(image_embeds.grad, reference_image.grad, "對 image_embeds 的梯度",
                     hint="取最大值時，梯度只流向每對圖文中最匹配的那個 query；其他 queries 的梯度是 0。")
        expect_close(text_embeds.grad, reference_text.grad, "對 text_embeds 的梯度")

    def float64_kept():
        image_embeds = _normalized(generator, 2, 3, 4, dtype=torch.float64)
        text_embeds = _normalized(generator, 2, 4, dtype=torch.float64)
        got = compare(image_embeds, text_embeds, "float64 輸入")
        if got.dtype != torch.float64:
            fail("輸出的 dtype 和輸入一樣是 float64", f"dtype {got.dtype}", "不要把結果轉成 float32。")

    def on_device(device: torch.device):
        def run():
            image_embeds = _normalized(generator, 3, 4, 8).to(device)
            text_embeds = _normalized(generator, 2, 8).to(device)
            got = compare(image_embeds, text_embeds, f"{device} 上的相似度")
            if got.device.type != device.type:
                fail(f"輸出在 {device} 上", f"在 {got.device} 上", "用張量運算，不要轉回 CPU。")
        return run

    cases = [
        Case("手算的小例子", hand_made),
        Case("影像數和文字數不同", non_square),
        Case("隨機的批次", random_batch),
        Case("只有 1 個 query", single_query),
        Case("梯度只流向最匹配的 query", gradient_goes_to_best_query),
        Case("float64 輸入", float64_kept),
    ]
    for device in _devices()[1:]:
        cases.append(Case(f"在 {device} 上", on_device(device)))
    return cases


# ---------------------------------------------------------------------------------------------
# sample_hard_negatives
# ---------------------------------------------------------------------------------------------


def _draw(sample_fn: Callable, similarity: torch.Tensor, positive_mask: torch.Tensor | None,
          draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the learner's sampler ``draws`` times; return the stacked indices (draws, B) twice."""
    size = similarity.shape[0]
    texts, images = [], []
    for _ in range(draws):
        result = sample_fn(similarity, positive_mask) if positive_mask is not None else sample_fn(similarity)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            fail("回傳兩個張量 (negative_text_for_image, negative_image_for_text)", describe(result),
                 "回傳一個 tuple：每張影像的負樣本文字索引，以及每段文字的負樣本影像索引。")
        for value, name in zip(result, ("negative_text_for_image", "negative_image_for_text")):
            expect_shape(value, (size,), name, hint="每張影像（每段文字）各抽一個負樣本，所以形狀是 (B,)。")
            if value.dtype not in (torch.int64, torch.int32):
                fail(f"{name} 是整數索引（torch.long）", f"dtype {value.dtype}", "torch.multinomial 回傳的就是 long 索引。")
        texts.append(result[0].detach().cpu().long())
        images.append(result[1].detach().cpu().long())
    texts_tensor, images_tensor = torch.stack(texts), torch.stack(images)  # (draws, B)
    for tensor, name in ((texts_tensor, "negative_text_for_image"), (images_tensor, "negative_image_for_text")):
        if tensor.min() < 0 or tensor.max() >= size:
            fail(f"{name} 的值在 0 到 {size - 1} 之間", f"出現 {int(tensor.min())} 到 {int(tensor.max())}",
                 "索引指的是批次中的第幾段文字（第幾張影像）。")
    return texts_tensor, images_tensor


@checker("qformer_hard_negatives", "ITM 的困難負樣本抽樣", points=2.0)
def check_sample_hard_negatives(sample_hard_negatives_fn: Callable):
    """Check ``sample_hard_negatives(similarity (B, B), positive_mask=None) -> (neg_text (B,), neg_image (B,))``."""

    def expect_no_positive(texts: torch.Tensor, images: torch.Tensor, positive_mask: torch.Tensor, what: str):
        rows = torch.arange(texts.shape[1])
        picked_text_positive = positive_mask[rows[None, :], texts]  # (draws, B): image i drew text j
        picked_image_positive = positive_mask.t()[rows[None, :], images]  # (draws, B): text j drew image i
        hint = ("正樣本不能當負樣本：抽樣前把正樣本位置的相似度設成 -inf（masked_fill），"
                "softmax 後它們的機率就是 0。")
        if picked_text_positive.any():
            draw, image = picked_text_positive.nonzero()[0].tolist()
            fail(f"{what}：影像永遠不會抽到匹配自己的文字", f"第 {draw} 次抽樣時，影像 {image} 抽到了文字 {int(texts[draw, image])}（正樣本）", hint)
        if picked_image_positive.any():
            draw, text = picked_image_positive.nonzero()[0].tolist()
            fail(f"{what}：文字永遠不會抽到匹配自己的影像", f"第 {draw} 次抽樣時，文字 {text} 抽到了影像 {int(images[draw, text])}（正樣本）", hint)

    def returns_indices():
        seed_everything(0)
        similarity = torch.randn(5, 5)
        _draw(sample_hard_negatives_fn, similarity, None, draws=3)

    def never_the_positive():
        seed_everything(1)
        similarity = 8.0 * torch.eye(6) + 0.1 * torch.randn(6, 6)
        texts, images = _draw(sample_hard_negatives_fn, similarity, None, draws=100)
        expect_no_positive(texts, images, torch.eye(6, dtype=torch.bool), "對角線的相似度很高時")

    def repeated_captions():
        seed_everything(2)
        positive_mask = torch.eye(5, dtype=torch.bool)
        positive_mask[0, 1] = positive_mask[1, 0] = True  # images 0 and 1 share a caption
        similarity = 6.0 * positive_mask.float() + 0.1 * torch.randn(5, 5)
        texts, images = _draw(sample_hard_negatives_fn, similarity, positive_mask, draws=100)
        expect_no_positive(texts, images, positive_mask, "批次中有重複的說明文字（positive_mask 不只對角線）")

    def follows_similarity_direction():
        seed_everything(3)
        similarity = torch.zeros(3, 3)
        similarity[0, 1] = 6.0  # for image 0, text 1 is the hard negative
        similarity[2, 0] = 6.0  # for text 0, image 2 is the hard negative
        texts, images = _draw(sample_hard_negatives_fn, similarity, None, draws=100)
        text_rate = (texts[:, 0] == 1).float().mean().item()
        image_rate = (images[:, 0] == 2).float().mean().item()
        if text_rate < 0.85:
            fail("影像 0 大多抽到相似度最高的負樣本文字 1（機率約 0.99）", f"比例 {text_rate:.2f}",
                 "影像 i 的負樣本文字依 softmax(similarity[i]) 抽：列 = 影像，相似度越高越容易被抽到。")
        if image_rate < 0.85:
            fail("文字 0 大多抽到相似度最高的負樣本影像 2（機率約 0.99）", f"比例 {image_rate:.2f}",
                 "文字 j 的負樣本影像要看第 j 欄 similarity[:, j]（也就是 similarity.T 的第 j 列），不是第 j 列。")

    def samples_not_argmax():
        seed_everything(4)
        similarity = torch.zeros(3, 3)
        texts, images = _draw(sample_hard_negatives_fn, similarity, None, draws=200)
        for tensor, name in ((texts, "影像 0 的負樣本文字"), (images, "文字 0 的負樣本影像")):
            rate = (tensor[:, 0] == 1).float().mean().item()
            if not 0.3 <= rate <= 0.7:
                fail(f"相似度都一樣時，{name}在 1 和 2 之間各約一半", f"抽到 1 的比例 {rate:.2f}",
                     "要「抽樣」（torch.multinomial），不是每次都取 argmax；BLIP-2 依相似度的 softmax 隨機抽。")

    def proportional_to_softmax():
        seed_everything(5)
        # Row i: the positive at i, then negatives at offsets 1, 2, 3 with similarities 0, ln 2,
        # ln 3, so every row (and every column) has negative probabilities 1/6, 2/6, 3/6.
        size = 4
        offsets = (torch.arange(size)[None, :] - torch.arange(size)[:, None]) % size  # (B, B): j - i
        similarity = torch.tensor([5.0, 0.0, math.log(2.0), math.log(3.0)])[offsets]
        texts, images = _draw(sample_hard_negatives_fn, similarity, None, draws=300)
        expected = torch.tensor([1 / 6, 2 / 6, 3 / 6])
        rows = torch.arange(size)[None, :]
        directions = (((texts - rows) % size, "影像抽到的負樣本文字（依列 similarity[i]）"),
                      ((rows - images) % size, "文字抽到的負樣本影像（依欄 similarity[:, j]）"))
        for picked_offsets, name in directions:
            rates = torch.stack([(picked_offsets == offset).float().mean() for offset in (1, 2, 3)])
            if (rates - expected).abs().max() > 0.055:
                fail(f"{name}：相似度 0、ln 2、ln 3 的負樣本被抽到的比例約為 [0.17, 0.33, 0.50]",
                     f"[{', '.join(f'{r:.2f}' for r in rates.tolist())}]",
                     "機率是 softmax(相似度)，只在負樣本上正規化（正樣本先設成 -inf）；不是相似度直接除以總和。")

    def input_unchanged():
        seed_everything(6)
        similarity = torch.randn(4, 4)
        before = similarity.clone()
        positive_mask = torch.eye(4, dtype=torch.bool)
        mask_before = positive_mask.clone()
        sample_hard_negatives_fn(similarity, positive_mask)
        if not torch.equal(similarity, before):
            fail("similarity 保持不變", "similarity 被就地修改了（例如 fill_diagonal_ 或 masked_fill_）",
                 "同一個相似度矩陣還要拿來算 ITC loss：先 .clone() 或用不帶底線的 masked_fill。")
        if not torch.equal(positive_mask, mask_before):
            fail("positive_mask 保持不變", "positive_mask 被就地修改了", "不要對輸入做 in-place 運算。")

    def rejects_row_without_negative():
        similarity = torch.randn(2, 2)
        positive_mask = torch.ones(2, 2, dtype=torch.bool)
        try:
            sample_hard_negatives_fn(similarity, positive_mask)
        except ValueError:
            return
        except NotImplementedError:
            raise
        except Exception as error:  # noqa: BLE001 - any other type is the learner's bug to report
            fail("沒有任何負樣本可抽時丟出 ValueError", f"{type(error).__name__}: {error}",
                 "先檢查 positive_mask 是否有整列（或整欄）都是 True，是的話 raise ValueError 並說明原因。")
        fail("沒有任何負樣本可抽時丟出 ValueError", "沒有丟出例外",
             "整列都是正樣本時不可能抽到負樣本：raise ValueError，而不是回傳一個正樣本。")

    def on_device(device: torch.device):
        def run():
            seed_everything(7)
            similarity = (8.0 * torch.eye(4) + torch.randn(4, 4)).to(device)
            positive_mask = torch.eye(4, dtype=torch.bool, device=device)
            texts, images = _draw(sample_hard_negatives_fn, similarity, positive_mask, draws=50)
            expect_no_positive(texts, images, positive_mask.cpu(), f"在 {device} 上")
        return run

    cases = [
        Case("回傳兩個 (B,) 的索引張量", returns_indices),
        Case("永遠不抽到正樣本（對角線）", never_the_positive),
        Case("重複說明文字時也不抽到正樣本", repeated_captions),
        Case("相似度越高越常被抽到，兩個方向各看列與欄", follows_similarity_direction),
        Case("是隨機抽樣而不是 argmax", samples_not_argmax),
        Case("抽樣比例等於負樣本上的 softmax", proportional_to_softmax),
        Case("不修改輸入", input_unchanged),
    ]
    for device in _devices()[1:]:
        cases.append(Case(f"在 {device} 上", on_device(device)))
    cases.append(Case("沒有負樣本時丟出 ValueError", rejects_row_without_negative))
    return cases
