"""Checker of notebook 00's warm-up exercise: L2-normalizing each row of a matrix."""

from __future__ import annotations

import torch

from course_utils.checks.base import Case, checker, describe, expect_close, fail


def _reference(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@checker("warmup_l2_normalize", "把每一列向量正規化成單位長度", points=1.0)
def check_l2_normalize(l2_normalize):
    """Check ``l2_normalize(x)`` that scales each row of ``x`` (..., d) to unit L2 norm."""
    generator = torch.Generator().manual_seed(0)

    def simple_rows():
        x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
        expect_close(l2_normalize(x), _reference(x), "l2_normalize([[3, 4], [0, 2]])",
                     hint="每一列除以它自己的 L2 長度 sqrt(sum(x**2))。")

    def normalizes_last_dim():
        x = torch.randn(4, 7, generator=generator) * 5
        got = l2_normalize(x)
        expect_close(got, _reference(x), "(4, 7) 隨機矩陣的結果",
                     hint="要沿著最後一個維度（特徵維度）正規化：dim=-1，並保持維度 keepdim=True。")
        norms = got.norm(dim=-1)
        expect_close(norms, torch.ones(4), "每一列的長度", hint="正規化後每一列的長度應該都是 1。")

    def batched_input():
        x = torch.randn(2, 3, 5, generator=generator)
        expect_close(l2_normalize(x), _reference(x), "三維輸入 (2, 3, 5) 的結果",
                     hint="用 dim=-1，不要寫死 dim=1，這樣任何維度數的輸入都能用。")

    def keeps_input_unchanged():
        x = torch.randn(3, 4, generator=generator)
        before = x.clone()
        l2_normalize(x)
        if not torch.equal(x, before):
            fail("輸入張量保持不變", "輸入被就地（in-place）修改了", "避免 x /= ...；回傳新的張量。")

    def zero_row_is_finite():
        x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        got = l2_normalize(x)
        if not torch.isfinite(torch.as_tensor(got)).all():
            fail("全零的列回傳有限值（例如 0），不是 NaN", str(got), "分母加上下限：norm.clamp_min(1e-12)。")

    def gradient_flows():
        x = torch.randn(3, 4, generator=generator, requires_grad=True)
        got = l2_normalize(x)
        if not isinstance(got, torch.Tensor) or not got.requires_grad:
            fail("輸出保留計算圖（requires_grad=True）", "輸出沒有梯度", "不要用 .detach()、.numpy() 或 torch.no_grad()。")
        got.sum().backward()
        expected_x = x.detach().clone().requires_grad_(True)
        _reference(expected_x).sum().backward()
        expect_close(x.grad, expected_x.grad, "對輸入的梯度", hint="用可微分的 torch 運算（norm、除法）即可。")

    def float64_and_device():
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in devices:
            x = torch.randn(2, 6, generator=generator, dtype=torch.float64).to(device)
            got = l2_normalize(x)
            if not isinstance(got, torch.Tensor) or got.dtype != torch.float64 or got.device.type != device:
                fail(f"float64、{device} 上的輸入得到 float64、{device} 上的輸出", describe(got), "不要建立固定 dtype 或固定 device 的新張量。")
            expect_close(got.cpu(), _reference(x).cpu(), f"float64 輸入（{device}）的結果", atol=1e-10, rtol=1e-10)

    return [
        Case("簡單的 2x2 矩陣", simple_rows),
        Case("沿最後一維正規化", normalizes_last_dim),
        Case("批次（三維）輸入", batched_input),
        Case("不修改輸入", keeps_input_unchanged),
        Case("全零的列不產生 NaN", zero_row_is_finite),
        Case("梯度正確", gradient_flows),
        Case("float64 與 device 不變", float64_and_device),
    ]
