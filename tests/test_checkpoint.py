"""Training state saved and found again: the checkpoint a run resumes from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from vit_core import storage
from vit_core.model import create_model
from vit_core.train.checkpoint import (
    MODEL_DIR,
    STATE_FILE,
    Progress,
    StoredCheckpoint,
    checkpoint_files,
    gather_state,
    latest_stored_checkpoint,
    load_training_state,
    remove_incomplete_checkpoints,
    save_training_state,
)


def tiny():
    return create_model(
        "vit_ti16", img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2, num_classes=3
    )


def trained(seed: int):
    """A model one optimiser step from a seeded init, with its optimiser and schedule."""
    torch.manual_seed(seed)
    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def save(directory: Path, step: int, seed: int = 0) -> Path:
    model, optimizer, scheduler = trained(seed)
    weights, optimizer_state = gather_state(model, optimizer)
    return save_training_state(
        directory, model, weights, optimizer_state, scheduler, Progress(step=step, epoch=1)
    )


def write_run(run: Path) -> None:
    """Three checkpoints: steps 8 and 16 complete, step 24 cut short (no optimiser state)."""
    save(run / "checkpoint_2026-01-01_00-00-01.000001", 8)
    save(run / "checkpoint_2026-01-01_00-00-02.000001", 16, seed=1)
    cut = save(run / "checkpoint_2026-01-01_00-00-03.000001", 24)
    (cut / STATE_FILE).unlink()
    # Files Ray keeps beside the checkpoints are not checkpoints.
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    save(run / "best_model_like", 99)


def test_latest_complete_checkpoint_is_found_and_loads(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    assert sorted(checkpoint_files(str(run))) == [
        f"checkpoint_2026-01-01_00-00-0{i}.000001" for i in (1, 2, 3)
    ]
    found = latest_stored_checkpoint(str(run))
    assert found is not None
    assert (found.step, Path(found.uri).name) == (16, "checkpoint_2026-01-01_00-00-02.000001")

    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    progress = load_training_state(Path(found.uri), model, optimizer, scheduler)
    assert progress.step == 16
    reference, reference_optimizer, _ = trained(seed=1)  # what the step-16 checkpoint holds
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    restored_state = optimizer.state_dict()["state"]
    reference_state = reference_optimizer.state_dict()["state"]
    assert restored_state.keys() == reference_state.keys()
    for index, state in reference_state.items():
        assert torch.equal(restored_state[index]["exp_avg"], state["exp_avg"])


def test_incomplete_checkpoints_older_than_a_complete_one_are_removed(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    early_cut = save(run / "checkpoint_2026-01-01_00-00-01.500000", 12)
    (early_cut / MODEL_DIR / "model.safetensors").unlink()
    # The cut step-24 checkpoint is newer than every complete one: it stays for now.
    assert remove_incomplete_checkpoints(str(run)) == [str(early_cut)]
    assert not early_cut.exists()
    assert (run / "checkpoint_2026-01-01_00-00-03.000001").exists()
    save(run / "checkpoint_2026-01-01_00-00-04.000001", 32)
    assert remove_incomplete_checkpoints(str(run)) == [
        str(run / "checkpoint_2026-01-01_00-00-03.000001")
    ]
    names = sorted(p.name for p in run.iterdir())
    assert names == ["best_model_like", "checkpoint_2026-01-01_00-00-01.000001",
                     "checkpoint_2026-01-01_00-00-02.000001",
                     "checkpoint_2026-01-01_00-00-04.000001",
                     "checkpoint_manager_snapshot.json"]  # fmt: skip


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert latest_stored_checkpoint(str(tmp_path / "missing")) is None
    run = tmp_path / "run"
    save(run / "checkpoint_a", 8)
    shutil.rmtree(run / "checkpoint_a" / MODEL_DIR)
    assert latest_stored_checkpoint(str(run)) is None


@pytest.mark.usefixtures("s3")
def test_latest_checkpoint_on_s3(tmp_path, s3_prefix):
    run = tmp_path / "run"
    write_run(run)
    storage.upload_dir(run, s3_prefix)
    found = latest_stored_checkpoint(s3_prefix)
    assert found == StoredCheckpoint(f"{s3_prefix}/checkpoint_2026-01-01_00-00-02.000001", 16)
    local = storage.materialize(found.uri)
    assert (local / MODEL_DIR / "model.safetensors").exists()


def test_ema_checkpoint_keeps_averaged_weights_as_the_model_and_resumes_the_trained(tmp_path):
    """With Polyak averaging the model folder (validated, registered, served) holds the
    averaged weights; resuming restores the trained weights and the average."""
    model, optimizer, scheduler = trained(seed=0)
    ema = torch.optim.swa_utils.AveragedModel(
        tiny(), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5)
    )
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    ema.update_parameters(model)  # now half way between
    weights, optimizer_state = gather_state(model, optimizer)
    save_training_state(tmp_path, model, weights, optimizer_state, scheduler,
                        Progress(step=3), ema)  # fmt: skip
    saved = create_model(checkpoint=tmp_path / MODEL_DIR)
    for key, value in ema.module.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
    assert not torch.equal(saved.state_dict()["head.bias"], model.state_dict()["head.bias"])

    resumed = tiny()
    resumed_ema = torch.optim.swa_utils.AveragedModel(
        tiny(), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5)
    )
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert load_training_state(tmp_path, resumed, opt, sched, resumed_ema).step == 3
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key, value in ema.state_dict().items():
        assert torch.equal(resumed_ema.state_dict()[key], value), key
