"""What a task is: the one place that knows how a model's outputs are trained, scored and read.

The engine, evaluate, predict, export and the Hub never ask "is this a classifier?": they take the task named
by the checkpoint's config.json (``task``; older checkpoints have only ``kind`` and are read as the task whose
``kind`` it is) and call it. A task declares:

- ``kind``: the model family written into config.json (``classifier``, ``autoencoder``, ...), which the
  checkpoint loader uses to know what tensors to expect;
- ``build(config)``: the network (encoder + head or decoder) rebuilt from config.json alone;
- ``validate_config(config, where)``: refuse, in one line naming the field, what this task needs and lacks;
- ``objective(config, **options)``: the training loss and its validation metrics (an ``Objective``);
- ``probabilities(outputs, config)``: how raw outputs become what users read (class probabilities,
  per-label probabilities, masks), calibration included;
- ``metric_names``: the validation metrics it reports each epoch (the training table shows them);
- ``card_summary(config)``: the sentence the model card says about what the model predicts, and
  ``pipeline_tag``, the card's Hub pipeline tag;
- for evaluation (``cxrcae evaluate``): ``targets`` (what the records say the answer is, as an array
  aligned with the outputs), ``score`` (metrics.json's body, with patient-bootstrap CIs), ``metric_rows``
  (the table a user reads) and ``evaluation_files`` (plots or overlays beside metrics.json);
- for prediction (``cxrcae predict``): ``prediction_columns`` / ``prediction_row`` (the CSV row of one
  image) and ``prediction_files`` (files written per image, e.g. masks and overlays);
- ``options``: the switches only some tasks have (classify: ``top_k``, ``threshold``, ``explain``,
  ``onnx``, ``calibrate``, ``bins``, ``serve``); a command given one its model's task lacks refuses it in
  one line (``require_option``), so no command ever asks which task it runs;
- for fine-tuning on labelled data (``cxrcae finetune --task NAME``): ``target_fields`` (what the training
  records say the outputs are, e.g. ``class_names``, checked against validation), ``dataset`` (items whose
  ``"label"`` is this task's target: a class index, a 0/1 vector, masks), ``weighting`` (``--balance``) and
  ``training_notes``. ``uses_label_column`` says whether a record needs the manifest's ``label`` column.

Hooks added for what classify always did and other tasks may do too (each has a default that composes the
ones above, so a task that implements only those still evaluates and predicts): ``evaluation_records``
(which records carry an answer), ``score_outputs`` (metrics from raw outputs), ``evaluation_row`` (a row of
evaluate's predictions.csv), ``summary`` (the headline figures), ``prediction_blank`` /
``prediction_cells`` / ``prediction_display`` / ``flag_uncertain`` (a row without an answer, its CSV cells,
its terminal cells, an answer flagged out of distribution).

A new task is one module with a ``Task`` subclass, one line in ``cxrcae.tasks.TASKS``, and its tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from cxrcae.data.records import Record
from cxrcae.errors import CheckpointError, CxrcaeError, DataError
from cxrcae.io.decoded import DecodedCache


class EpochOutputs(Protocol):
    """What ``validate`` hands an objective after an epoch: the mean loss and what it observed."""

    loss: float
    images: int


class Objective:
    """A task's training loss and validation metrics, with the state a resumed run needs.

    ``__call__(model, images, targets)`` returns (fp32 loss, outputs). During validation the engine calls
    ``observe(outputs, targets)`` for every batch, then ``epoch_metrics(stats)`` once; metrics are named
    ``val_*`` and land in history.csv, the best checkpoint's config.json and the progress line.
    """

    name = "loss"
    monitor_metrics: Sequence[str] = ()
    """The ``val_*`` metrics shown in the progress line (the first one) and the training table."""

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
        raise NotImplementedError

    def start_validation(self) -> None:
        """Called before a validation pass: forget what the previous one observed."""

    def observe(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One validation batch's outputs and targets (no gradients)."""

    def epoch_metrics(self, stats: EpochOutputs) -> dict[str, Any]:
        return {}

    def epoch_fields(self) -> dict[str, Any]:
        """config.json fields chosen on this epoch's validation (e.g. per-label thresholds); the best
        epoch's are saved with its weights. Called after ``epoch_metrics``."""
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class TargetSource:
    """Where a task's training targets come from in a manifest (what ``finetune`` was told): the ``label``
    column (classify), another column of separated names (``labels`` + ``label_sep``), 0/1 columns
    (``label_columns``) or one mask-path column per structure (``masks``)."""

    labels: str | None = None
    label_sep: str | None = None
    label_columns: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Weighting:
    """What ``--balance`` asks of a training set: a loss weight per class, sampling weights per image."""

    loss_weight: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None


Transform = Callable[[torch.Tensor], torch.Tensor]


class Task:
    """Base class of the registered tasks (``cxrcae.tasks.TASKS``); see the module docstring."""

    name: str = ""
    kind: str = ""
    description: str = ""
    labelled: bool = True
    """Whether training needs labels (reconstruction does not); only labelled tasks predict and evaluate."""
    metric_names: tuple[str, ...] = ()
    pipeline_tag: str = "image-feature-extraction"
    """The Hugging Face Hub pipeline tag of its model cards (``cxrcae.hub.card``)."""
    options: frozenset[str] = frozenset()
    """Task-specific switches (see the module docstring). Those that are values (``top_k``,
    ``threshold`` for ``prediction_row``; ``bins`` for ``score``) reach the hooks as keyword arguments,
    and only when set."""

    def require_option(self, option: str, flag: str) -> None:
        """Refuse, in one line, a switch (``flag`` as the user wrote it) that this task does not have."""
        if option not in self.options:
            raise CxrcaeError(f"{flag} is not available for a {self.name!r} model ({self.description})")

    def build(self, config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def example(self, image_size: int = 32) -> tuple[dict[str, Any], torch.Tensor]:
        """A small valid config.json body and a batch of two targets for it: what the registry's tests
        build, train one step and round-trip for every task (timm's tests do the same per model)."""
        raise NotImplementedError

    def validate_config(self, config: dict[str, Any], where: str | Path) -> None:
        """Task-specific fields of config.json (the common ones are checked by ``models.checkpoint``)."""

    def objective(self, config: dict[str, Any], **options: Any) -> Objective:
        raise NotImplementedError

    def probabilities(self, outputs: torch.Tensor | np.ndarray, config: dict[str, Any]) -> np.ndarray:
        """What users read from raw model outputs; the base task returns them as they are."""
        return _numpy(outputs)

    def card_summary(self, config: dict[str, Any]) -> str:
        return self.description

    output_key: str | None = None
    """The config.json field naming the outputs (``class_names``, ``label_names``, ``structures``)."""

    def output_names(self, config: dict[str, Any]) -> list[str]:
        """The names of the model's outputs, in order (none for a task without named outputs)."""
        names = config.get(self.output_key) if self.output_key else None
        return [str(n) for n in names] if isinstance(names, list) else []

    # ------------------------------------------------------------------------------ evaluation

    def targets(self, records: Sequence[Record], config: dict[str, Any]) -> np.ndarray:
        """The answers for ``records`` as an array whose first axis is the record, aligned with
        ``probabilities`` of the same images (class indices, 0/1 matrices, masks at the model's size).
        A record without a usable answer raises a one-line ``DataError`` naming its file or column."""
        raise DataError(f"task {self.name!r} has no labelled evaluation")

    def evaluation_records(
        self, records: Sequence[Record], config: dict[str, Any], where: str | Path
    ) -> tuple[list[Record], list[str]]:
        """The records that can be scored (others dropped, each drop said in a note), and notes about them;
        a record set this model cannot be scored on at all is a one-line ``DataError``. By default all."""
        return list(records), []

    def score(
        self,
        probabilities: np.ndarray,
        targets: np.ndarray,
        groups: Sequence[str],
        config: dict[str, Any],
        *,
        n_boot: int = 1000,
        seed: int = 0,
    ) -> dict[str, Any]:
        """metrics.json's body for these images: point estimates with 95% CIs from a bootstrap over
        ``groups`` (patient ids, so one patient's images are resampled together)."""
        raise DataError(f"task {self.name!r} has no labelled evaluation")

    def score_outputs(
        self,
        outputs: np.ndarray,
        targets: np.ndarray,
        groups: Sequence[str],
        config: dict[str, Any],
        *,
        n_boot: int = 1000,
        seed: int = 0,
        **options: Any,
    ) -> dict[str, Any]:
        """metrics.json's body from the raw outputs: ``score`` of their ``probabilities`` by default (a task
        that can say more from raw outputs, such as classify's ECE before calibration, adds it)."""
        probabilities = self.probabilities(outputs, config)
        return self.score(probabilities, targets, groups, config, n_boot=n_boot, seed=seed, **options)

    def metric_rows(self, metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
        """(headers, rows) of the table ``evaluate`` prints; readable at 80 columns."""
        return ["metric", "value"], [[k, str(v)] for k, v in metrics.items() if not isinstance(v, dict)]

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        """The headline figures (name, text) that ``evaluate`` prints under its table and the HTML report
        lists; none by default (the ``metric_rows`` table says it all)."""
        return []

    def evaluation_row(
        self,
        row: dict[str, Any],
        record: Record,
        probabilities: np.ndarray | None,
        config: dict[str, Any],
    ) -> dict[str, Any]:
        """One row of evaluate's predictions.csv: ``row`` holds path, patient_id, source, set, the subgroup
        columns, status and reason; ``probabilities`` is None for an image that could not be read. By
        default the ``prediction_row`` cells go between status and reason."""
        values = (
            self.prediction_blank(config)
            if probabilities is None
            else self.prediction_row(probabilities, config)
        )
        head = {k: v for k, v in row.items() if k != "reason"}
        return {**head, **self.prediction_cells(values, config), "reason": row.get("reason", "")}

    def evaluation_files(
        self,
        out_dir: Path,
        paths: Sequence[str],
        probabilities: np.ndarray,
        targets: np.ndarray,
        metrics: dict[str, Any],
        config: dict[str, Any],
    ) -> dict[str, Path]:
        """Extra files beside metrics.json (plots, best/worst overlays), written atomically; name -> path."""
        return {}

    # ------------------------------------------------------------------------------ prediction

    def prediction_columns(self, config: dict[str, Any]) -> list[str]:
        """The CSV columns ``prediction_row`` fills, after ``file`` and ``status``."""
        return []

    def prediction_row(self, probabilities: np.ndarray, config: dict[str, Any]) -> dict[str, Any]:
        """One image's CSV columns from its ``probabilities`` (this task's output for that image). A task
        may return values as JSON holds them (lists, dicts: what ``--output x.json`` and ``cxrcae.predict``
        give) and turn them into CSV cells in ``prediction_cells``. Options the task declares (``top_k``,
        ``threshold``) arrive as keyword arguments when the user set them."""
        return {}

    def prediction_blank(self, config: dict[str, Any]) -> dict[str, Any]:
        """The ``prediction_row`` of an image without an answer (unreadable, refused): every column empty."""
        return {c: None for c in self.prediction_columns(config)}

    def prediction_cells(self, values: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        """The CSV cells (``prediction_columns``) of one row's values: by default the values themselves,
        lists and dicts as JSON text."""
        return {c: _cell(values.get(c)) for c in self.prediction_columns(config)}

    def prediction_display(
        self, values: dict[str, Any], config: dict[str, Any], **options: Any
    ) -> dict[str, Any]:
        """The terminal table's cells (column -> text or number) of an answered image, after its file
        name: by default its CSV cells. A ``note`` column, if any, is where predict says why an image was
        flagged."""
        return self.prediction_cells(values, config)

    def flag_uncertain(self, values: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        """The values of an answer whose input the screen flagged out of distribution (``cxrcae.ood.screen``):
        unchanged by default (the row says ``out_of_distribution``); classify's label becomes "uncertain"."""
        return values

    def prediction_files(
        self,
        out_dir: Path,
        name: str,
        image: np.ndarray,
        probabilities: np.ndarray,
        config: dict[str, Any],
    ) -> dict[str, str]:
        """Files written for one image into ``out_dir`` (``name`` is unique per input, no extension),
        e.g. a mask PNG per structure and an overlay; column name -> path, added to its CSV row."""
        return {}

    # ------------------------------------------------------------------------------ fine-tuning on labels

    uses_label_column: bool = False
    balance_modes: tuple[str, ...] = ("none",)

    def target_fields(
        self, train: Sequence[Record], val: Sequence[Record], source: TargetSource, where: str
    ) -> dict[str, Any]:
        """The config.json fields that name this task's outputs, from the training records (a one-line
        ``DataError`` when they cannot be trained on, e.g. a validation class absent from training)."""
        raise DataError(f"task {self.name!r} does not train on labelled data")

    def dataset(
        self,
        records: Sequence[Record],
        config: dict[str, Any],
        transform: Transform | None = None,
        decoded: DecodedCache | None = None,
    ):
        """A dataset of ``{"image", "label", "path", "patient_id"}`` items, ``"label"`` this task's target."""
        raise DataError(f"task {self.name!r} does not train on labelled data")

    def weighting(self, dataset: Any, records: Sequence[Record], balance: str) -> Weighting:
        if balance not in self.balance_modes:
            raise DataError(
                f"--balance {balance} is not available for task {self.name!r} "
                f"(choose {', '.join(self.balance_modes)})"
            )
        return Weighting()

    def training_notes(self, train: Sequence[Record], balance: str) -> list[str]:
        """Advice about the training data worth printing after the run (e.g. imbalanced classes)."""
        return []

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, allow_nan=False, default=str)
    return value


def _numpy(outputs: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach().float().cpu().numpy()
    return np.asarray(outputs)


def check_class_names(
    config: dict[str, Any], where: str | Path, key: str, least: int, most: int
) -> list[str]:
    """``config[key]`` as a list of ``least``..``most`` distinct non-empty names, or a one-line error."""
    names = config.get(key)
    ok = isinstance(names, list) and least <= len(names) <= most
    ok = ok and all(isinstance(n, str) and 0 < len(n) <= 200 for n in names)
    if not ok or len(set(names)) != len(names):
        shown = repr(names)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise CheckpointError(
            f"{where}: field {key!r} must list {least} to {most} distinct names, got {shown}"
        )
    return list(names)
