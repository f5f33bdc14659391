"""Checkers of notebook 03: building shared or separate layers, tying key/value projections,
counting parameters with shared tensors once, and the parameter list given to an optimizer.

"Shared" means the same ``nn.Parameter`` object reached from several places. Equal values are
not sharing: a ``copy.deepcopy`` or a ``load_state_dict`` makes independent tensors that drift
apart at the first optimizer step, and the checkers report that in their hints.
"""

from __future__ import annotations

import numbers
from typing import Callable

import torch
from torch import nn

from course_utils.checks.base import Case, checker, describe, expect_close, fail
from course_utils.vlm.sharing import build_cross_attention_layers, tie_key_value

HINT_DEEPCOPY = (
    "這些層的數值相同，卻是不同的物件：copy.deepcopy（或 load_state_dict、.data.copy_）只是複製數值，"
    "訓練一步之後就會分開。共享要讓每個位置都指向「同一個」模組。"
)
HINT_LIST_MULTIPLY = (
    "每一層都是同一個物件：[layer] * depth 或在迴圈外建立一次再重複放入，得到的是 depth 個指向同一個模組的參照。"
    "要獨立的層，就在迴圈裡每次呼叫 make_layer()。"
)
HINT_KEYS_AS_VALUES_SHARED = "共享是「跨層」共用 K 的投影、跨層共用 V 的投影；同一層的 K 與 V 仍要用兩個不同的投影。"


def _small_layer() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))


def _parameter_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def _shares_parameters(first: nn.Module, second: nn.Module) -> bool:
    return bool(_parameter_ids(first) & _parameter_ids(second))


def _same_values(first: nn.Module, second: nn.Module) -> bool:
    pairs = zip(first.parameters(), second.parameters())
    return all(a.shape == b.shape and torch.equal(a, b) for a, b in pairs)


def _blocks(depth: int = 3, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return build_cross_attention_layers(depth, 16, 2, 12, sharing="none")


# ---------------------------------------------------------------------------------------------
# Exercise: a list of shared or separate layers
# ---------------------------------------------------------------------------------------------


@checker("sharing_make_layers", "建立共享或獨立的層", points=2.0)
def check_make_layers(make_layers: Callable[[Callable[[], nn.Module], int, bool], nn.ModuleList]):
    """Check ``make_layers(make_layer, depth, share)``: an ``nn.ModuleList`` of ``depth`` layers built
    with ``make_layer()``, all the same module when ``share`` is true, all separate otherwise."""

    def call(depth: int, share: bool):
        calls = []

        def make_layer():
            layer = _small_layer()
            calls.append(layer)
            return layer

        layers = make_layers(make_layer, depth, share)
        if not isinstance(layers, nn.ModuleList):
            fail("回傳 nn.ModuleList", type(layers).__name__,
                 "用 nn.ModuleList 包起來：普通的 Python list 不會被註冊成子模組，model.parameters() 看不到那些參數。")
        if len(layers) != depth:
            fail(f"{depth} 層", f"{len(layers)} 層", "回傳的長度要等於 depth。")
        if not calls:
            fail("層由 make_layer() 建立", "make_layer 一次都沒有被呼叫", "用傳進來的 make_layer() 建立層。")
        return layers, calls

    def shared_is_one_module():
        layers, _ = call(4, True)
        for index, layer in enumerate(layers):
            if layer is not layers[0]:
                hint = HINT_DEEPCOPY if _same_values(layer, layers[0]) else "share=True 時每一層都要是同一個模組物件。"
                fail(f"第 {index} 層就是第 0 層（同一個物件）", "不同的物件", hint)

    def shared_counts_once():
        layers, _ = call(3, True)
        one_layer = sum(p.numel() for p in layers[0].parameters())
        total = sum(p.numel() for p in layers.parameters())
        if total != one_layer:
            fail(f"參數總數 {one_layer}（共享的層只算一次）", str(total), HINT_DEEPCOPY)

    def shared_stays_tied_after_step():
        layers, _ = call(3, True)
        optimizer = torch.optim.SGD(layers.parameters(), lr=0.1)
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(6))
        for layer in layers:
            x = layer(x)
        x.square().sum().backward()
        optimizer.step()
        for index, layer in enumerate(layers[1:], start=1):
            if not _same_values(layer, layers[0]):
                fail(f"訓練一步後第 {index} 層仍然等於第 0 層", "數值已經分開", HINT_DEEPCOPY)

    def separate_are_independent():
        layers, calls = call(4, False)
        for index in range(1, len(layers)):
            for other in range(index):
                if layers[index] is layers[other] or _shares_parameters(layers[index], layers[other]):
                    fail(f"第 {other} 層與第 {index} 層各自有參數", "兩層共用同一組參數", HINT_LIST_MULTIPLY)

    def separate_counts_all():
        layers, _ = call(3, False)
        one_layer = sum(p.numel() for p in _small_layer().parameters())
        total = sum(p.numel() for p in layers.parameters())
        if total != 3 * one_layer:
            fail(f"參數總數 {3 * one_layer}（3 層各自的參數）", str(total), HINT_LIST_MULTIPLY)

    def separate_train_independently():
        layers, _ = call(2, False)
        before = [p.detach().clone() for p in layers[1].parameters()]
        optimizer = torch.optim.SGD(layers[0].parameters(), lr=0.1)
        layers[0](torch.ones(3, 4)).sum().backward()
        optimizer.step()
        after = list(layers[1].parameters())
        if any(not torch.equal(a, b) for a, b in zip(before, after)):
            fail("只更新第 0 層時第 1 層不變", "第 1 層也變了", HINT_LIST_MULTIPLY)

    def single_layer():
        for share in (True, False):
            call(1, share)

    return [
        Case("share=True：每一層是同一個模組", shared_is_one_module),
        Case("share=True：參數只算一次", shared_counts_once),
        Case("share=True：訓練一步後仍然相同", shared_stays_tied_after_step),
        Case("share=False：各層的參數互不相同", separate_are_independent),
        Case("share=False：參數總數是每層的總和", separate_counts_all),
        Case("share=False：更新一層不影響另一層", separate_train_independently),
        Case("depth=1", single_layer),
    ]


# ---------------------------------------------------------------------------------------------
# Exercise: partial sharing, key and value projections tied across layers
# ---------------------------------------------------------------------------------------------


@checker("sharing_tie_kv", "部分共享：所有層共用第 0 層的 K/V 投影", points=2.0)
def check_tie_key_value(tie: Callable[[nn.ModuleList], object]):
    """Check ``tie(layers)``: afterwards every ``layers[i].attn.k_proj`` and ``.v_proj`` is layer
    0's module, while ``q_proj``, ``out_proj`` and the rest stay per layer (changed in place)."""

    def tied(depth: int = 3, seed: int = 0) -> tuple[nn.ModuleList, nn.ModuleList]:
        layers = _blocks(depth, seed)
        untouched = _blocks(depth, seed)
        result = tie(layers)
        if result is not None and result is not layers:
            if not isinstance(result, nn.ModuleList):
                fail("就地修改 layers（或回傳同一個 ModuleList）", type(result).__name__, "直接改 layers[i].attn 的屬性就好。")
            layers = result
        return layers, untouched

    def kv_are_layer0_modules():
        layers, _ = tied()
        first = layers[0].attn
        for index, layer in enumerate(layers):
            for name in ("k_proj", "v_proj"):
                mine, wanted = getattr(layer.attn, name), getattr(first, name)
                if mine.weight is not wanted.weight:
                    hint = HINT_DEEPCOPY if torch.equal(mine.weight, wanted.weight) else (
                        f"把第 0 層的 {name} 模組本身指定給每一層：layer.attn.{name} = layers[0].attn.{name}。")
                    fail(f"第 {index} 層的 {name} 就是第 0 層的 {name}", "不同的參數", hint)
                if mine.bias is not wanted.bias:
                    fail(f"第 {index} 層的 {name}.bias 也是第 0 層的", "只共享了 weight，bias 仍是各層自己的",
                         f"直接指定整個模組（layer.attn.{name} = layers[0].attn.{name}），weight 和 bias 就會一起共享。")

    def query_and_output_stay_separate():
        layers, _ = tied()
        for index in range(1, len(layers)):
            for name in ("q_proj", "out_proj"):
                if getattr(layers[index].attn, name).weight is getattr(layers[0].attn, name).weight:
                    fail(f"第 {index} 層保有自己的 {name}", f"{name} 也被共享了",
                         "只共享 K 與 V 的投影；Q 和輸出投影、LayerNorm、MLP 都要留在各層。")
            if _shares_parameters(layers[index].mlp, layers[0].mlp):
                fail(f"第 {index} 層保有自己的 MLP", "MLP 也被共享了", "只共享 attn.k_proj 與 attn.v_proj。")

    def keys_not_tied_to_values():
        layers, _ = tied()
        if layers[0].attn.k_proj.weight is layers[0].attn.v_proj.weight:
            fail("k_proj 與 v_proj 仍是兩個不同的投影", "k_proj 和 v_proj 是同一個", HINT_KEYS_AS_VALUES_SHARED)

    def parameter_count():
        layers, untouched = tied(depth=4)
        per_kv = sum(p.numel() for m in (untouched[0].attn.k_proj, untouched[0].attn.v_proj) for p in m.parameters())
        expected = sum(p.numel() for p in untouched.parameters()) - 3 * per_kv
        got = sum(p.numel() for p in layers.parameters())
        if got != expected:
            fail(f"參數數量 {expected}（少了 3 組 K/V 投影）", str(got), "4 層共用 1 組 K/V，所以省下 3 組。")

    def uses_layer0_weights():
        layers, untouched = tied(seed=1)
        tie_key_value(untouched)
        generator = torch.Generator().manual_seed(7)
        x, context = torch.randn(2, 3, 16, generator=generator), torch.randn(2, 5, 12, generator=generator)
        got, expected = x, x
        with torch.no_grad():
            for layer, reference in zip(layers, untouched):
                got, expected = layer(got, context), reference(expected, context)
        expect_close(got, expected, "整疊層的輸出", hint="共享的 K/V 要用第 0 層原本的權重，不要換成新建的層。")

    def stays_tied_after_step():
        layers, _ = tied()
        parameters = list(layers.parameters())
        before = layers[0].attn.k_proj.weight.detach().clone()
        optimizer = torch.optim.SGD(parameters, lr=0.5)
        generator = torch.Generator().manual_seed(8)
        x, context = torch.randn(2, 3, 16, generator=generator), torch.randn(2, 5, 12, generator=generator)
        for layer in layers:
            x = layer(x, context)
        x.square().sum().backward()
        optimizer.step()
        if torch.equal(before, layers[0].attn.k_proj.weight):
            fail("訓練一步會更新共享的 k_proj", "k_proj 沒有變", "確認共享的參數仍然 requires_grad=True。")
        for index, layer in enumerate(layers):
            if not torch.equal(layer.attn.k_proj.weight, layers[0].attn.k_proj.weight):
                fail(f"訓練一步後第 {index} 層的 k_proj 仍等於第 0 層", "已經分開", HINT_DEEPCOPY)

    return [
        Case("每一層的 k_proj/v_proj 就是第 0 層的", kv_are_layer0_modules),
        Case("q_proj、out_proj、MLP 仍各自獨立", query_and_output_stay_separate),
        Case("K 沒有和 V 綁在一起", keys_not_tied_to_values),
        Case("參數數量少了 (depth-1) 組 K/V", parameter_count),
        Case("共享的是第 0 層原本的權重", uses_layer0_weights),
        Case("訓練一步後仍然共享", stays_tied_after_step),
    ]



# ---------------------------------------------------------------------------------------------
# Exercise: parameter count with shared tensors counted once
# ---------------------------------------------------------------------------------------------


class _TiedEmbeddings(nn.Module):
    """An embedding and an output layer that share one weight, as many language models do."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight


@checker("sharing_count_parameters", "參數計數：共享的參數只算一次", points=1.0)
def check_count_parameters(count_parameters: Callable[[nn.Module], int]):
    """Check ``count_parameters(module) -> int``: every parameter value, each shared tensor once,
    frozen parameters included, buffers excluded."""

    def expect_count(module: nn.Module, expected: int, what: str, hint: str):
        got = count_parameters(module)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            fail(f"{what}：Python int {expected}", f"tensor {got.item()}", "回傳 Python 的 int（例如用 sum(...) 加總 p.numel()）。")
        if not isinstance(got, numbers.Integral) or isinstance(got, bool):
            fail(f"{what}：int {expected}", describe(got), "回傳整數。")
        if int(got) != expected:
            fail(f"{what}：{expected}", str(int(got)), hint)

    def single_linear():
        expect_count(nn.Linear(3, 4), 16, "nn.Linear(3, 4) 的參數", "權重 3x4 加上 bias 4 個。")

    def separate_layers():
        layers = nn.ModuleList([_small_layer() for _ in range(3)])
        expect_count(layers, 3 * 58, "3 個獨立層的參數", "每一層 58 個參數。")

    def shared_layers():
        layer = _small_layer()
        expect_count(nn.ModuleList([layer] * 4), 58, "同一層重複 4 次的參數",
                     "同一個參數被用了 4 次，但只存一份：用 module.parameters()（它會去除重複），不要逐層加總。")

    def partially_shared():
        torch.manual_seed(0)
        layers = build_cross_attention_layers(3, 16, 2, 12, sharing="kv")
        expected = sum(p.numel() for p in layers.parameters())
        expect_count(layers, expected, "共用 K/V 的 3 層 cross-attention",
                     "K/V 投影被 3 層共用，只算一次：不要對每一層的 parameters() 分別加總。")

    def tied_embeddings():
        expect_count(_TiedEmbeddings(), 40, "embedding 與輸出層共用權重的模型",
                     "embedding.weight 和 head.weight 是同一個張量，只算一次。")

    def buffers_not_counted():
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        expect_count(model, 16 + 8, "含 BatchNorm 的模型",
                     "BatchNorm 的 running_mean、running_var 是 buffer 不是參數：用 parameters()，不要用 state_dict()。")

    def frozen_counted():
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        model[0].requires_grad_(False)
        expect_count(model, 16 + 10, "部分凍結的模型",
                     "凍結的參數（requires_grad=False）也是模型的參數，這裡要算進去。")

    return [
        Case("一個 nn.Linear", single_linear),
        Case("獨立的層", separate_layers),
        Case("同一層重複使用", shared_layers),
        Case("部分共享（K/V）", partially_shared),
        Case("共用權重的 embedding 與輸出層", tied_embeddings),
        Case("buffer 不算參數", buffers_not_counted),
        Case("凍結的參數也算", frozen_counted),
    ]


# ---------------------------------------------------------------------------------------------
# Exercise: the parameter list handed to an optimizer
# ---------------------------------------------------------------------------------------------


@checker("sharing_optimizer_params", "交給 optimizer 的參數清單：每個參數只出現一次", points=1.0)
def check_unique_parameters(collect: Callable[[list[nn.Module]], list[nn.Parameter]]):
    """Check ``collect(layers) -> list``: the parameters of all ``layers`` with each tensor once,
    in order of first appearance, as a list."""

    def run(layers: list[nn.Module]) -> list:
        got = collect(layers)
        if isinstance(got, (set, frozenset)):
            fail("回傳 list", "set",
                 "set 的順序每次執行都可能不同，而 optimizer 的 state_dict 用位置對應參數，存檔後重新載入就可能對錯參數；用 list，並以 id(p) 記錄看過的參數。")
        if not isinstance(got, (list, tuple)):
            fail("回傳 list", type(got).__name__, "用 list(...) 收集，generator 只能走一次。")
        for item in got:
            if not isinstance(item, torch.Tensor):
                fail("清單裡每一項都是參數張量", type(item).__name__, "收集 layer.parameters() 產生的參數。")
        return list(got)

    def expected_for(layers: list[nn.Module]) -> list:
        seen, result = set(), []
        for layer in layers:
            for parameter in layer.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    result.append(parameter)
        return result

    def compare(layers: list[nn.Module], what: str):
        got = run(layers)
        expected = expected_for(layers)
        ids = [id(p) for p in got]
        if len(set(ids)) != len(ids):
            fail(f"{what}：{len(expected)} 個參數，每個一次", f"{len(got)} 個，其中有重複",
                 "共享的參數出現兩次時 optimizer 每步會更新它兩次（SGD 的步長變兩倍，AdamW 的動量也被更新兩次）；用 id(p) 去除重複。")
        if set(ids) != {id(p) for p in expected}:
            missing = len({id(p) for p in expected} - set(ids))
            fail(f"{what}：{len(expected)} 個參數", f"{len(got)} 個（少了 {missing} 個）",
                 "用物件身分 id(p) 判斷重複，不要比較數值：兩個初始值相同的獨立參數都要保留。")
        if ids != [id(p) for p in expected]:
            fail(f"{what}：依第一次出現的順序", "順序不同", "依照 layers 的順序、每層 parameters() 的順序，遇到新的參數才加入。")

    def separate_layers():
        compare([_small_layer() for _ in range(3)], "3 個獨立層")

    def repeated_layer():
        layer = _small_layer()
        compare([layer, layer, layer], "同一層出現 3 次")

    def partially_shared():
        torch.manual_seed(0)
        compare(list(build_cross_attention_layers(3, 16, 2, 12, sharing="kv")), "共用 K/V 的 3 層")

    def equal_values_are_separate():
        first, second = nn.Linear(3, 3), nn.Linear(3, 3)
        with torch.no_grad():
            for layer in (first, second):
                layer.weight.zero_()
                layer.bias.zero_()
        compare([first, second], "兩個數值都是 0 但互相獨立的層")

    def sgd_step_size():
        layer = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            layer.weight.fill_(1.0)
        params = run([layer, layer])
        optimizer = torch.optim.SGD(params, lr=0.1)
        layer(torch.ones(1, 2)).sum().backward()  # gradient = 1 for each weight
        optimizer.step()
        expect_close(layer.weight.detach(), torch.full((1, 2), 0.9), "SGD(lr=0.1) 一步後的權重",
                     hint="權重被更新了兩次：清單裡有重複的參數。")

    return [
        Case("獨立的層", separate_layers),
        Case("同一層重複出現", repeated_layer),
        Case("部分共享（K/V）", partially_shared),
        Case("數值相同的獨立參數都保留", equal_values_are_separate),
        Case("SGD 一步只更新一次", sgd_step_size),
    ]


__all__ = [
    "check_count_parameters",
    "check_make_layers",
    "check_tie_key_value",
    "check_unique_parameters",
]
