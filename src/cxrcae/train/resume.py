"""``--resume OUT``: rebuild an interrupted run from OUT/last and continue it to the same final weights.

Whatever stopped the run (Ctrl-C, SIGKILL, a full disk, a power cut after the last fsync), the resumed run
ends with the weights an uninterrupted run would have reached, bit for bit on the same CPU: it holds the
run's lock, first puts the newest complete resume state in place (``recover_resume_folder``) and removes the
temporaries the dead process left, then continues after the last completed epoch.
"""

from __future__ import annotations

from pathlib import Path

from cxrcae._atomic import sweep_temporaries
from cxrcae.errors import CheckpointError
from cxrcae.progress import ProgressFn, no_progress
from cxrcae.runtime import reproducible
from cxrcae.tasks import get_task
from cxrcae.train.config import FinetuneConfig, PretrainConfig
from cxrcae.train.data import resumed_data
from cxrcae.train.engine import BEST, TrainResult, run_lock
from cxrcae.train.finetuning import run_finetune
from cxrcae.train.pretraining import run_pretrain
from cxrcae.train.state import LAST, load_resume_state, recover_resume_folder


def resume_run(
    out_dir: str | Path,
    progress: ProgressFn = no_progress,
    *,
    task: str | None = None,
    device: str | None = None,
    num_workers: int | None = None,
) -> TrainResult:
    """Continue the run in ``out_dir`` with its saved data and settings.

    Only ``device`` and ``num_workers`` may change (a different machine); everything that affects the
    result comes from the saved state. ``task`` ("pretrain"/"finetune") guards against resuming the wrong
    kind of run.
    """

    out = Path(out_dir).expanduser()
    if not out.is_dir():
        raise CheckpointError(f"{out}: no such run folder")
    with run_lock(out):
        recover_resume_folder(out)
        for folder in (out, out / BEST, out / LAST):
            sweep_temporaries(folder)
        return _resume(out, progress, task, device, num_workers)


def _resume(
    out: Path, progress: ProgressFn, task: str | None, device: str | None, num_workers: int | None
) -> TrainResult:
    state, tensors, weights = load_resume_state(out)
    kind = state.get("kind")
    if task is not None and kind != task:
        raise CheckpointError(f"{out}: holds a {kind} run, not a {task} run")
    cls = PretrainConfig if kind == "pretrain" else FinetuneConfig
    cfg = cls.from_dict(state["config"])
    if device is not None:
        cfg.device = device
    if num_workers is not None:
        cfg.num_workers = num_workers
    cfg.validate()
    labelled = kind == "finetune" and get_task(getattr(cfg, "task", "classify")).uses_label_column
    tdata = resumed_data(state["data"], out, labeled=labelled)
    resume = (state, tensors, weights)
    with reproducible(cfg.seed):  # the saved RNG states are restored on top of this, inside ``fit``
        if kind == "pretrain":
            return run_pretrain(tdata, out, cfg, progress, resume)
        if kind == "finetune":
            return run_finetune(
                tdata, out, cfg, progress, resume, encoder_provenance=state.get("encoder_init")
            )
    raise CheckpointError(f"{out}: unknown run kind {kind!r} in the resume state")
