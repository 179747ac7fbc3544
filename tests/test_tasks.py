"""Every registered task, the same checks (as timm tests every registered model): it builds from its
config.json alone, one training step moves every parameter, its outputs become probabilities of the right
shape, and a saved checkpoint loads back as that task through the registry."""

from __future__ import annotations

import json

import pytest
import torch

from cxrcae.errors import CheckpointError
from cxrcae.hub.resolve import load, load_checkpoint
from cxrcae.models.checkpoint import save_checkpoint
from cxrcae.tasks import TASKS, build_model, get_task, task_name, task_of


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_task_builds_trains_and_round_trips(name, tmp_path):
    task = get_task(name)
    config, targets = task.example(32)
    task_of(config)  # its own fields validate
    torch.manual_seed(0)
    model = build_model(config)
    objective = task.objective(config)
    images = torch.rand(2, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, outputs = objective(model.train(), images, targets)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{name}: parameters without a gradient: {no_grad[:3]}"
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{name}: one step changed nothing"

    probs = task.probabilities(outputs, config)
    assert probs.shape[0] == 2 and torch.isfinite(torch.from_numpy(probs)).all()

    folder = save_checkpoint(model, tmp_path / name, config)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["task"] == name
    loaded = load(folder)
    assert loaded.task is task
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.net(images), model(images), atol=1e-6)


def test_checkpoints_without_a_task_load_as_the_task_of_their_kind(tmp_path):
    config, _ = get_task("classify").example(32)
    old = {k: v for k, v in config.items() if k != "task"}  # as written before tasks existed
    assert task_name(old) == "classify"
    folder = save_checkpoint(build_model(old), tmp_path / "old", old)
    assert "task" not in json.loads((folder / "config.json").read_text())
    model, _ = load_checkpoint(folder)
    assert load(folder).task.name == "classify" and model is not None
    assert task_name({"kind": "autoencoder"}) == "reconstruct"
    assert task_name({"kind": "encoder"}) is None


def test_the_registry_refuses_what_it_does_not_know(tmp_path):
    with pytest.raises(CheckpointError, match="unknown task 'regress'; known tasks: .*classify"):
        get_task("regress")
    config, _ = get_task("classify").example(32)
    with pytest.raises(CheckpointError, match="task 'classify' needs kind 'classifier'"):
        task_of({**config, "kind": "autoencoder"})
    with pytest.raises(CheckpointError, match="'class_names' must list 2 to 1000 distinct names"):
        task_of({**config, "class_names": ["a", "a"]})
    folder = save_checkpoint(build_model(config), tmp_path / "clf", config)
    with pytest.raises(CheckpointError, match="a 'classify' model, but this needs a 'reconstruct' model"):
        load(folder, task="reconstruct")
