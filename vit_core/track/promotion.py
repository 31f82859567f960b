"""Promotion: the registry's `champion` alias moves to the `candidate` only when the
candidate is better on the same evaluation set, by a margin in top-1 and by McNemar's
test on the per-image outcomes; the former champion keeps `previous`, so a rollback is
one call. Every decision, promoted or refused, is recorded on the versions with the
figures it rested on. Nothing is deleted.

McNemar's test (McNemar 1947; Dietterich 1998 recommends it for comparing two
classifiers on one test set): of the images exactly one model gets right, b are the
candidate's and c the champion's; under "equally good" b ~ Binomial(b + c, 1/2). The
exact one-sided p-value P(B >= b) is used (scipy.stats.binomtest), as the candidate must
be better, not merely different.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import pandas as pd
from mlflow.tracking import MlflowClient

CHAMPION, CANDIDATE, PREVIOUS = "champion", "candidate", "previous"


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate_version: str
    champion_version: str | None
    candidate_top1: float
    champion_top1: float | None = None
    margin: float = 0.0
    alpha: float = 0.05
    images: int = 0  # paired images both models were scored on
    candidate_only: int = 0  # b: right by the candidate alone
    champion_only: int = 0  # c: right by the champion alone
    p_value: float | None = None
    decided_at: str = ""

    def as_tags(self, role: str) -> dict[str, str]:
        """The decision as version tags, under promotion.<role>.*"""
        return {f"promotion.{role}": json.dumps(asdict(self), sort_keys=True)}


def mcnemar(candidate_correct: pd.Series, champion_correct: pd.Series) -> tuple[int, int, float]:
    """(b, c, one-sided exact p-value that the candidate is better) for two boolean series
    indexed by the same image keys."""
    from scipy.stats import binomtest

    b = int((candidate_correct & ~champion_correct).sum())
    c = int((~candidate_correct & champion_correct).sum())
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def decide(
    candidate: pd.DataFrame, champion: pd.DataFrame | None, candidate_version: str,
    champion_version: str | None, margin: float, alpha: float,
) -> Decision:  # fmt: skip
    """Compare per-image outcomes (DataFrames with columns key and correct) of the
    candidate and the champion (None: no champion yet, so the candidate is promoted).
    Promote when top-1 improves by at least `margin` (a fraction: 0.005 is half a point)
    AND McNemar's one-sided p-value is below `alpha`. Raises ValueError when the two were
    not scored on the same images."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cand = candidate.set_index("key")["correct"].astype(bool)
    if champion is None:
        return Decision(True, "first model for this name: promoted", candidate_version, None,
                        float(cand.mean()), margin=margin, alpha=alpha, images=len(cand),
                        decided_at=stamp)  # fmt: skip
    champ = champion.set_index("key")["correct"].astype(bool)
    if set(cand.index) != set(champ.index):
        raise ValueError(
            f"candidate and champion were scored on different images ({len(cand)} vs "
            f"{len(champ)}, {len(set(cand.index) ^ set(champ.index))} not shared)"
        )
    champ = champ.loc[cand.index]
    b, c, p = mcnemar(cand, champ)
    gain = float(cand.mean() - champ.mean())
    better = gain >= margin and p < alpha
    if better:
        reason = f"top-1 +{gain:.4f} >= margin {margin} and McNemar p={p:.3g} < {alpha}"
    elif gain < margin:
        reason = f"top-1 gain {gain:+.4f} below margin {margin}"
    else:
        reason = f"top-1 +{gain:.4f} not significant: McNemar p={p:.3g} >= {alpha}"
    return Decision(better, reason, candidate_version, champion_version, float(cand.mean()),
                    float(champ.mean()), margin, alpha, len(cand), b, c, p, stamp)  # fmt: skip


def apply(client: MlflowClient, name: str, decision: Decision) -> None:
    """Record the decision on both versions; on promotion move `champion` to the
    candidate and give the former champion `previous`."""
    for role, version in (("candidate", decision.candidate_version),
                          ("champion", decision.champion_version)):  # fmt: skip
        if version is not None:
            for key, value in decision.as_tags(role).items():
                client.set_model_version_tag(name, version, key, value)
    if not decision.promote:
        return
    if decision.champion_version is not None:
        client.set_registered_model_alias(name, PREVIOUS, decision.champion_version)
    client.set_registered_model_alias(name, CHAMPION, decision.candidate_version)


def current_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, None if unset."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # MLflow raises RESOURCE_DOES_NOT_EXIST for an unset alias
        return None


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Swap `champion` and `previous`: (the restored champion, the version it replaced).
    Raises ValueError when there is nothing to roll back to."""
    previous = current_version(client, name, PREVIOUS)
    champion = current_version(client, name, CHAMPION)
    if previous is None or champion is None:
        raise ValueError(f"model {name}: no 'previous' version to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_alias(name, PREVIOUS, champion)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, previous, "promotion.rollback",
                                 f"champion again at {stamp}, replacing version {champion}")
    client.set_model_version_tag(name, champion, "promotion.rolled_back",
                                 f"replaced by version {previous} at {stamp}")  # fmt: skip
    return previous, champion
