"""Window attention on CPU: ``scaled_dot_product_attention`` vs plain matmul-softmax-matmul.

With a float mask (Swin's relative position bias) CPU SDPA takes its math path; this measures
both without gradients (the EMA teacher's forward, inference) at the smit preset's window shapes
for a 96^3 crop, batch 2. Interleaved repeats; the ratio is what matters on a noisy machine.

Run: ``python -m benchmarks.bench_cpu_attention [--repeats 5] [--markdown]``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.tables import format_table

logger = logging.getLogger("bench_cpu_attention")

#: (windows, heads, head dim) of stages 1-3 of the smit preset on a 96^3 crop, window 4^3 = 64 tokens.
SHAPES = ((1728, 4, 12), (216, 4, 24), (27, 8, 24))
TOKENS = 64


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Window attention through ``scaled_dot_product_attention`` (q, k, v: (B, W, heads, T, dim), bias: (W, heads, T, T))."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same attention as matmul-softmax-matmul."""
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias, dim=-1) @ v


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    rows = []
    for windows, heads, dim in SHAPES:
        q, k, v = (torch.randn(args.batch, windows, heads, TOKENS, dim) for _ in range(3))
        bias = torch.randn(windows, heads, TOKENS, TOKENS)
        with torch.no_grad():
            torch.testing.assert_close(sdpa(q, k, v, bias), plain(q, k, v, bias), rtol=1e-4, atol=1e-4)
            times: dict[str, list[float]] = {"sdpa": [], "plain": []}
            for _ in range(args.repeats):
                times["sdpa"].append(timed(sdpa, q, k, v, bias))
                times["plain"].append(timed(plain, q, k, v, bias))
        s, p = statistics.median(times["sdpa"]), statistics.median(times["plain"])
        rows.append([f"{windows} x {heads} heads x d{dim}", f"{s * 1000:.1f}", f"{p * 1000:.1f}", f"{p / s:.2f}x"])
    header = ["windows x heads x dim", "SDPA (ms)", "plain (ms)", "plain / SDPA"]
    logger.info("%s", format_table(header, rows, args.markdown, right_align=True))


if __name__ == "__main__":
    main()
