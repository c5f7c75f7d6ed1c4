"""The held-out estimate ``optgptq convert`` and ``optgptq quantize`` print, and their warning.

Both commands draw ``--check-samples`` windows of calibration text that the fitting never sees
(:func:`optgptq.compress.calib.load_calibration_split`: the tail of a text source, or extra
samples of the ``generated`` source) and compute the perplexity of the model on them before
and after compressing it, as disjoint windows (:func:`optgptq.compress.eval.perplexity`). It
costs two forward passes over the check windows. The estimate is cheap, not exact: it is
measured on the calibration source's kind of text, so it tracks, but does not replace, a
perplexity on held-out text of the domain the model will serve (``optgptq eval``).

When perplexity rises by more than ``--warn-above`` (relative, default ``WARN_ABOVE``) a
warning is printed: at the 10% default, 4-bit GPTQ with the default flags passes on SmolLM2
and a GQA conversion that damages the model (3 -> 1 K/V heads without recovery) does not.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch import nn

from optgptq.compress.eval import perplexity

CHECK_SAMPLES = 8
WARN_ABOVE = 0.10


def add_check_args(group: argparse._ArgumentGroup) -> None:
    """``--check-samples`` and ``--warn-above``, with their defaults (defined here only)."""
    group.add_argument("--check-samples", type=int, default=CHECK_SAMPLES,
                       help="held-out calibration windows for the before/after perplexity "
                       "estimate (never fitted on); 0: no estimate")
    group.add_argument("--warn-above", type=float, default=WARN_ABOVE,
                       help="warn when that estimate rises by more than this fraction")


def check_perplexity(model: nn.Module, check: torch.Tensor) -> float | None:
    """Perplexity of ``model`` on the check windows ``[n, seq_len]`` (``None`` if none)."""
    if check.numel() == 0:
        return None
    return perplexity(model, check.reshape(-1), check.shape[1], check.shape[1])[0]


@dataclass
class Estimate:
    """Check-window perplexity before and after a compression step."""

    before: float
    after: float
    tokens: int

    @property
    def rise(self) -> float:
        return self.after / self.before - 1

    def to_dict(self) -> dict:
        return {"check_ppl_before": round(self.before, 4), "check_ppl_after": round(self.after, 4),
                "check_tokens": self.tokens}

    def report(self, warn_above: float, what: str, file=None) -> bool:
        """Print the estimate (and a warning past ``warn_above``); whether it warned."""
        file = file or sys.stderr
        print(f"held-out estimate ({self.tokens} calibration tokens not used for fitting): "
              f"perplexity {self.before:.3f} -> {self.after:.3f} ({self.rise:+.1%})", file=file)
        if self.rise <= warn_above:
            return False
        print(f"optgptq: warning: {what} raised the held-out perplexity estimate by "
              f"{self.rise:.1%}, more than --warn-above {warn_above:.0%}; check the model on "
              f"your own text (optgptq eval) before using it", file=file)
        return True


def estimate(before: float | None, model: nn.Module, check: torch.Tensor, warn_above: float,
             what: str) -> dict:
    """Measure ``model`` on ``check``, report against ``before``; the summary's fields."""
    if before is None:
        return {}
    est = Estimate(before, check_perplexity(model, check), check.numel())
    warned = est.report(warn_above, what)
    return {**est.to_dict(), "check_warning": warned}
