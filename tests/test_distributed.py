"""Training in several processes (``torchrun``, gloo on the CPU): two processes at batch 4 take the same steps
as one process at batch 8, only rank 0 writes and prints, and ``--resume`` works under torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler, TensorDataset

from cxrcae.errors import CxrcaeError
from cxrcae.models.checkpoint import read_weights
from cxrcae.train import PretrainConfig, pretrain
from cxrcae.train.data import make_loader
from cxrcae.train.distributed import ShardSampler, World, current, local_device

# one step an epoch: the first global batch is the same 8 images either way (a ragged last batch is padded
# under torchrun, as DistributedSampler pads, so it would differ from one process's)
SETTINGS = dict(image_size=32, batch_size=8, limit_batches=1, precision="fp32", num_workers=0, device="cpu")
OPTIONS = [
    *("--image-size", "32", "--limit-batches", "1", "--precision", "fp32", "--num-workers", "0"),
    *("--device", "cpu"),
]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "cxrcae", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {
        **{f"best.{k}": v for k, v in read_weights(run / "best").items()},
        **{f"last.{k}": v for k, v in read_weights(run / "last").items()},
    }


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_two_processes_train_as_one_at_twice_the_batch_and_resume(mini_folder, tmp_path):
    one = pretrain(mini_folder, tmp_path / "one", PretrainConfig(epochs=3, **SETTINGS))

    run = tmp_path / "two"
    done = _torchrun("pretrain", str(mini_folder), "--out", str(run), "--epochs", "2", "-b", "4", *OPTIONS)
    assert done.stdout.count("Best epoch") == 1  # rank 0 alone reported
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    used = json.loads((run / "best" / "config.json").read_text())["training"]["used"]
    assert used["processes"] == 2
    with open(run / "history.csv") as f:
        history = [float(row["val_loss"]) for row in csv.DictReader(f)]
    assert history == pytest.approx([r["val_loss"] for r in one.history[:2]], rel=1e-5)

    # extend the finished run by one epoch and continue it under torchrun: the same weights as one
    # process's three epochs
    state_file = run / "last" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["epochs"] = 3
    state_file.write_text(json.dumps(state))
    done = _torchrun("pretrain", "--resume", str(run), "--device", "cpu", "--json")  # one JSON document
    resumed = json.loads(done.stdout)
    assert resumed["resumed"] and resumed["epochs_run"] == 3
    assert [r["val_loss"] for r in resumed["history"]] == pytest.approx(
        [r["val_loss"] for r in one.history], rel=1e-5
    )
    _assert_close(_weights(run), _weights(tmp_path / "one"))


def test_shards_deal_one_order_out_evenly():
    order = list(range(11))
    shards = [list(ShardSampler(order, World(rank, 0, 2))) for rank in (0, 1)]
    assert shards == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 0]]  # padded by repeating the start
    assert [len(ShardSampler(order, World(r, 0, 4))) for r in range(4)] == [3] * 4
    assert list(ShardSampler([7], World(2, 0, 3))) == [7]

    # every process draws the shuffled order of a one-process loader and takes its share of each batch
    data = TensorDataset(torch.arange(16))
    whole = list(RandomSampler(data, generator=torch.Generator().manual_seed(5)))
    for rank in (0, 1):
        loader = make_loader(data, 4, shuffle=True, seed=5, world=World(rank, rank, 2))
        assert list(loader.sampler) == whole[rank::2]


def test_a_plain_run_is_a_world_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert current() == World() and not current().active and current().main
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current() == World(3, 1, 4) and not current().main
    assert local_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(CxrcaeError, match="CUDA GPUs or the CPU"):
        local_device(torch.device("mps"))
