"""Promotion decisions: McNemar's test on paired outcomes, the margin, the aliases on a
real MLflow registry, rollback."""

from __future__ import annotations

import uuid

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from vit_core.track import promotion


def outcomes(correct: list[bool]) -> pd.DataFrame:
    return pd.DataFrame({"key": [f"img{i}" for i in range(len(correct))], "correct": correct})


def test_mcnemar_counts_discordant_pairs_and_is_one_sided():
    cand = pd.Series([True, True, True, False, True])
    champ = pd.Series([False, False, True, True, True])
    b, c, p = promotion.mcnemar(cand, champ)
    assert (b, c) == (2, 1)
    assert p == pytest.approx(0.5)  # P(B >= 2 | n=3, 1/2) = 4/8
    _, _, p_worse = promotion.mcnemar(champ, cand)
    assert p_worse == pytest.approx(0.875)  # the other way round is not "better"


def test_decide_promotes_only_a_significantly_better_candidate():
    # 200 images: champion right on 150; candidate fixes 30 of its errors, breaks 5.
    champ = [i < 150 for i in range(200)]
    cand = list(champ)
    for i in range(150, 180):
        cand[i] = True
    for i in range(5):
        cand[i] = False
    better = promotion.decide(outcomes(cand), outcomes(champ), "2", "1", margin=0.01, alpha=0.05)
    assert better.promote and (better.candidate_only, better.champion_only) == (30, 5)
    assert better.p_value < 1e-4 and better.candidate_top1 == pytest.approx(175 / 200)
    # Better by 2 images only: above a zero margin but not significant.
    slight = list(champ)
    slight[150] = slight[151] = True
    refused = promotion.decide(outcomes(slight), outcomes(champ), "3", "1", 0.0, 0.05)
    assert not refused.promote and "not significant" in refused.reason
    # Significant but below the margin.
    small = promotion.decide(outcomes(cand), outcomes(champ), "2", "1", margin=0.2, alpha=0.05)
    assert not small.promote and "below margin" in small.reason
    # No champion yet: promoted.
    first = promotion.decide(outcomes(cand), None, "1", None, 0.01, 0.05)
    assert first.promote and first.champion_version is None


def test_decide_refuses_unpaired_evaluations():
    with pytest.raises(ValueError, match="different images"):
        promotion.decide(outcomes([True] * 3), outcomes([True] * 4), "2", "1", 0.0, 0.05)


def test_aliases_move_on_promotion_and_roll_back(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    name = f"promo-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    # Aliases and tags need versions only; each points at a run's (tiny) artifact.
    experiment = client.create_experiment(name)
    for _ in range(3):
        run = client.create_run(experiment)
        client.log_text(run.info.run_id, "weights", "model/placeholder.txt")
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    champ = [i < 150 for i in range(200)]
    better = [True] * 190 + [False] * 10

    promotion.apply(client, name, promotion.decide(outcomes(champ), None, "1", None, 0.01, 0.05))
    assert promotion.current_version(client, name, "champion") == "1"
    promotion.apply(client, name, promotion.decide(outcomes(better), outcomes(champ), "2", "1",
                                                   0.01, 0.05))  # fmt: skip
    assert promotion.current_version(client, name, "champion") == "2"
    assert promotion.current_version(client, name, "previous") == "1"
    refused = promotion.decide(outcomes(champ), outcomes(better), "3", "2", 0.01, 0.05)
    promotion.apply(client, name, refused)
    assert promotion.current_version(client, name, "champion") == "2"
    recorded = client.get_model_version(name, "3").tags["promotion.candidate"]
    assert '"promote": false' in recorded and "below margin" in recorded

    assert promotion.rollback(client, name) == ("1", "2")
    assert promotion.current_version(client, name, "champion") == "1"
    assert promotion.current_version(client, name, "previous") == "2"
    assert len(client.search_model_versions(f"name='{name}'")) == 3  # nothing deleted
