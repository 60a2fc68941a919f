"""Choices made on validation, and how a paired comparison is read: the rules the report and the promotion
gate share, so that a model is never chosen, and a difference never read, two different ways.

    best_member([(uri, val_macro_f1, val_nll), ...])       # -> (uri or None, refusals)
    reading(test, p_adjusted, alpha, margin)               # -> "better" / "worse" / "not distinguishable ..."
    margin_words(lower, upper, margin)                     # -> "equivalent within +-0.05", "non-inferior ...", ...

The best member is the one with the highest validation macro-F1 recorded when it was registered; a tie is broken
by the lower validation NLL, then by the earlier registration. The split being reported never takes part. A member
without a validation score cannot be the best member (one refusal line per such member).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mllm.evaluation.metrics import PairedTest

NOT_DISTINGUISHABLE = "not distinguishable at this size"


def _version_number(uri: str) -> int:
    tail = uri.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def best_member(members: Sequence[tuple[str, float | None, float | None]]) -> tuple[str | None, list[str]]:
    """(the best member's URI, or None; refusal lines) from (URI, validation macro-F1, validation NLL) triples."""
    refused = [f"{uri} has no validation macro-F1, so it cannot be the best member (its test score is never used "
               "instead)" for uri, f1, _ in members if f1 is None]
    scored = [(uri, f1, nll) for uri, f1, nll in members if f1 is not None]
    if not scored:
        return None, refused
    top = max(scored, key=lambda m: (m[1], -(m[2] if m[2] is not None else float("inf")), -_version_number(m[0])))
    return top[0], refused


@dataclass(frozen=True)
class Reading:
    """What a paired comparison of A against B allows one to say."""

    word: str  # "better", "worse", "not distinguishable at this size"
    sentence: str  # the word with its figures
    non_inferior: bool  # the one-sided lower bound exceeds -margin


def difference_word(point: float, p_adjusted: float, alpha: float) -> str:
    """The test of a difference, in the one vocabulary report, gate and study share."""
    if p_adjusted < alpha:
        return "better" if point > 0 else "worse"
    return NOT_DISTINGUISHABLE


def margin_words(lower: float, upper: float | None, margin: float) -> str:
    """What an interval of A - B says against +-margin: with only a one-sided lower bound (the report, the gate),
    non-inferiority shown or not; with a two-sided (1 - 2 alpha) interval (the study), equivalence (both one-sided
    tests inside the margin), non-inferiority, or a difference larger than the margin. Equivalence is never read
    from a test that merely failed to find a difference."""
    if upper is None:
        return (f"non-inferior within {margin:g}" if lower > -margin
                else f"non-inferiority within {margin:g} not shown")
    if lower > margin:
        return f"better by more than {margin:g}"
    if upper < -margin:
        return f"worse by more than {margin:g}"
    if -margin < lower and upper < margin:
        return f"equivalent within +-{margin:g}"
    if lower > -margin:
        return f"non-inferior within {margin:g}"
    if upper < margin:
        return f"non-inferiority within {margin:g} not shown (possibly worse by up to {-lower:.3f}), not better by " \
               f"{margin:g}"
    return f"inconclusive: the interval reaches past both -{margin:g} and +{margin:g}"


def reading(test: PairedTest, p_adjusted: float, alpha: float, margin: float, confidence: float) -> Reading:
    """Superiority (two-sided, family-wise adjusted p) and non-inferiority (one-sided (1 - alpha) lower bound of
    A - B above -margin) readings. Not distinguishable is never written as equivalent."""
    d, (lo, hi) = test.macro_f1_diff, test.macro_f1_diff_ci
    figures = f"Δ macro-F1 {d:+.4f}, {confidence:.0%} CI {lo:+.3f} to {hi:+.3f}, adjusted p={p_adjusted:.4g}"
    word = difference_word(d, p_adjusted, alpha)
    bound = test.lower_bound(alpha)
    ni = f"{margin_words(bound, None, margin)} (one-sided {1 - alpha:.0%} lower bound {bound:+.3f})"
    return Reading(word, f"**{word}** ({figures}); {ni}", bound > -margin)
