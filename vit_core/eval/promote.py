"""The promotion job: evaluate `candidate` and `champion` of a registered model on the
same evaluation set with Ray Data batch inference, decide (vit_core.track.promotion),
record the decision and move the aliases."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from vit_core.track import promotion
from vit_core.track.registry import RegistryError, check_model_name
from vit_core.track.runs import set_tracking, tracking_uri


def promote(
    name: str, data: str, split: str, margin: float = 0.0, alpha: float = 0.05
) -> promotion.Decision | None:
    """Evaluate and decide; returns the decision (None when the candidate already is the
    champion). Raises RegistryError (no candidate), DatasetError, StorageError."""
    from vit_core import cluster
    from vit_core.eval.batch import evaluate_model

    check_model_name(name)
    client = set_tracking(tracking_uri())
    candidate = promotion.current_version(client, name, promotion.CANDIDATE)
    if candidate is None:
        raise RegistryError(f"model {name}: no version has the alias 'candidate' to promote")
    champion = promotion.current_version(client, name, promotion.CHAMPION)
    if champion == candidate:
        print(f"{name} version {candidate} is both candidate and champion: nothing to decide")
        return None
    cluster.connect()
    cand = evaluate_model(f"models:/{name}/{candidate}", data, split)
    champ = evaluate_model(f"models:/{name}/{champion}", data, split) if champion else None
    decision = promotion.decide(
        cand.outcomes, champ.outcomes if champ else None, candidate, champion, margin, alpha
    )
    promotion.apply(client, name, decision)
    print(summary(name, decision))
    return decision


def summary(name: str, d: promotion.Decision) -> str:
    champ = (
        f"champion v{d.champion_version} top-1 {d.champion_top1:.4f}, "
        f"candidate-only {d.candidate_only} / champion-only {d.champion_only}, "
        f"McNemar p={d.p_value:.3g}; "
        if d.champion_version
        else ""
    )
    verdict = "PROMOTED to champion" if d.promote else "refused"
    return (
        f"{name}: candidate v{d.candidate_version} top-1 {d.candidate_top1:.4f} on {d.images} "
        f"images; {champ}{verdict}: {d.reason}"
    )


def rollback(name: str) -> tuple[str, str]:
    """Make `previous` the champion again; returns (new champion, replaced version)."""
    client: MlflowClient = set_tracking(tracking_uri())
    try:
        restored, replaced = promotion.rollback(client, name)
    except ValueError as err:
        raise RegistryError(str(err)) from None
    print(f"{name}: champion is version {restored} again (was {replaced}, now 'previous')")
    return restored, replaced
