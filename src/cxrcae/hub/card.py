"""Model cards (README.md) written from a checkpoint's config.json and, when evaluated, its metrics.json.

Every number on the card is read from those files; a section whose facts are unknown is left out rather
than filled with a placeholder. What the card says the model does (its summary sentence, the Hub pipeline
tag, how to use it, what it is for) is its task's (``cxrcae.tasks``; a bare encoder has none). The front
matter is huggingface_hub's own ``ModelCardData`` (library, tags, pipeline tag, metrics, and the overall /
macro test metrics as ``EvalResult`` entries in ``model-index``), rendered through ``ModelCard`` so the Hub
parses back exactly what was written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cxrcae.errors import CheckpointError
from cxrcae.models.heads import HEADS
from cxrcae.tasks import Task, task_of

PAPER_TITLE = "Unsupervised Convolutional Filter Learning for COVID-19 Classification"
PAPER_DOI = "10.18280/ria.350509"
CITATION = """@article{mahalingam2021unsupervised,
  title   = {Unsupervised Convolutional Filter Learning for {COVID-19} Classification},
  author  = {Mahalingam, Sakthi Ganesh and Pandraju, Saichandra},
  journal = {Revue d'Intelligence Artificielle},
  volume  = {35},
  number  = {5},
  year    = {2021},
  doi     = {10.18280/ria.350509}
}"""

_DATA_KEYS = ("data", "dataset", "training_data")
_TRAINING_KEYS = ("training", "train", "finetune", "pretrain")
_VALUE_KEYS = ("value", "point", "estimate", "mean")
_CI_PAIRS = (("ci_low", "ci_high"), ("low", "high"), ("lower", "upper"), ("ci_lower", "ci_upper"))
_NOT_METRICS = {"n", "count", "support", "seed", "n_bootstrap", "bootstrap", "resamples", "ci_level", "level"}
_METRIC_CONTEXT = (
    "split",
    "n",
    "n_images",
    "n_patients",
    "resample",
    "resample_unit",
    "bootstrap",
    "n_bootstrap",
    "ci_level",
    "seed",
)


def build_card(
    config: dict[str, Any], metrics: dict[str, Any] | None = None, *, repo_id: str | None = None
) -> str:
    """README.md text for a checkpoint: YAML front matter + body, real numbers only."""
    kind = str(config.get("kind", "encoder"))
    task = _task(config)
    rows = list(metric_rows(metrics)) if metrics else []
    parts = [
        _title(config, kind, task),
        _model_section(config, kind),
        _input_section(config, kind),
        _data_section(config),
        _training_section(config),
        _evaluation_section(metrics, rows) if metrics and rows else "",
        _usage_section(task, repo_id),
        _intended_use(task),
        _limitations(config),
        _provenance(config),
        "## Citation\n\n```bibtex\n" + CITATION + "\n```\n",
    ]
    body = "\n".join(p for p in parts if p)
    data = _card_data(config, kind, task, metrics or {}, rows, repo_id)
    # rendered by huggingface_hub itself, so the front matter is exactly what the Hub parses back
    yaml_block = data.to_yaml(original_order=list(_FRONT_MATTER_ORDER))
    return str(ModelCard("---\n" + yaml_block + "\n---\n\n" + body))


# ----------------------------------------------------------------------------------------------- front matter

FEATURES_TAG = "image-feature-extraction"
"""The Hub pipeline tag of a bare encoder (a task names its own: ``Task.pipeline_tag``)."""
_TAGS = ("cxrcae", "chest-x-ray", "medical-imaging", "autoencoder", "covid-19", "pytorch", "safetensors")
_FRONT_MATTER_ORDER = ("library_name", "license", "tags", "datasets", "pipeline_tag", "metrics")
_HEADLINE_SCOPES = ("", "macro")  # overall and macro-averaged rows; per-class rows stay in the body only


def _task(config: dict[str, Any]) -> Task | None:
    """The checkpoint's task; None for a bare encoder (or a config no task accepts: the card still says
    what it can)."""
    try:
        return task_of(config)
    except CheckpointError:
        return None


def _card_data(
    config: dict[str, Any],
    kind: str,
    task: Task | None,
    metrics: dict[str, Any],
    rows: list[dict[str, Any]],
    repo_id: str | None,
) -> ModelCardData:
    """The Hub metadata: library, license, tags, datasets, pipeline tag, metrics and headline eval results."""
    datasets = _hub_datasets(config)
    pipeline = task.pipeline_tag if task is not None else FEATURES_TAG
    results = _eval_results(config, pipeline, metrics, rows)
    return ModelCardData(
        library_name="cxrcae",
        license=str(config["license"]) if config.get("license") else None,
        tags=list(_TAGS),
        datasets=datasets or None,
        pipeline_tag=pipeline,
        metrics=sorted({r["metric"] for r in rows}) or None,
        model_name=(repo_id.rsplit("/", 1)[-1] if repo_id else f"cxrcae-{kind}") if results else None,
        eval_results=results or None,
    )


def _hub_datasets(config: dict[str, Any]) -> list[str]:
    datasets = config.get("hub_datasets") or (config.get("data") or {}).get("hub_datasets")
    return [str(d) for d in datasets] if isinstance(datasets, list) else []


def _eval_results(
    config: dict[str, Any], task: str, metrics: dict[str, Any], rows: list[dict[str, Any]]
) -> list[EvalResult]:
    """One EvalResult per overall / macro metric with a finite value (the card's headline numbers).

    The dataset is the first Hub dataset id of the config when there is one (else "cxr"), named after the
    evaluated data path of metrics.json; the split is metrics.json's.
    """
    hub = _hub_datasets(config)
    data = next((metrics[k] for k in ("data", "dataset") if isinstance(metrics.get(k), str)), "")
    name = _path_name(data)
    split = metrics.get("split")
    results: list[EvalResult] = []
    seen: set[tuple[str, str]] = set()
    for r in rows:
        scope = r["scope"]
        if scope not in _HEADLINE_SCOPES or not math.isfinite(r["value"]) or (scope, r["metric"]) in seen:
            continue
        seen.add((scope, r["metric"]))
        results.append(
            EvalResult(
                task_type=task,
                dataset_type=hub[0] if hub else "cxr",
                dataset_name=name or (hub[0] if hub else "cxr"),
                dataset_split=str(split) if isinstance(split, str) and split else None,
                metric_type=r["metric"],
                metric_name=f"{scope} {r['metric']}" if scope else r["metric"],
                metric_config=scope or None,
                metric_value=r["value"],
            )
        )
    return results


def _path_name(path: str) -> str:
    """Last component of a local path or URL, with either separator ('' for an empty path)."""
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1]


# ----------------------------------------------------------------------------------------------- body


def _title(config: dict[str, Any], kind: str, task: Task | None) -> str:
    what = {
        "autoencoder": "convolutional autoencoder pretrained on chest X-rays",
        "encoder": "chest X-ray encoder (the pretrained half of a convolutional autoencoder)",
        "classifier": "chest X-ray classifier on a pretrained convolutional-autoencoder encoder",
    }.get(kind)
    if what is None:
        what = f"chest X-ray model ({task.description})" if task is not None else f"{kind} model"
    tail = f" {task.card_summary(config)}" if task is not None and task.labelled else ""
    return (
        f"# cxrcae {kind}\n\nA {what}, made with [cxrcae](https://pypi.org/project/cxrcae/), an "
        f'implementation of "{PAPER_TITLE}" (Mahalingam & Pandraju, 2021, doi:{PAPER_DOI}).{tail}\n'
    )


def _model_section(config: dict[str, Any], kind: str) -> str:
    rows = [("Architecture", f"`{config.get('architecture', 'cxrcae_vgg_cae')}`"), ("Checkpoint kind", kind)]
    parts = {
        "encoder": "encoder: 6 conv 3x3 + ReLU, 5 max-pools (VGG-like), output 512 x S/32 x S/32",
        "autoencoder": "encoder (6 conv, 5 max-pools) + decoder (5 stride-2 transposed conv, linear output)",
        "classifier": "pretrained encoder (6 conv, 5 max-pools) + classification head",
    }
    if kind in parts:
        rows.append(("Layers", parts[kind]))
    head = config.get("head")
    if head:
        rows.append(("Head", f"`{head}`: {HEADS[head][0]}" if head in HEADS else f"`{head}`"))
    if config.get("class_names"):
        rows.append(("Classes (output order)", ", ".join(map(str, config["class_names"]))))
    if config.get("num_parameters"):
        rows.append(("Parameters", f"{int(config['num_parameters']):,}"))
    if config.get("temperature") is not None:
        rows.append(("Calibration temperature", _fmt(config["temperature"])))
    return "## Model\n\n" + _table(("", ""), rows, header=False)


def _input_section(config: dict[str, Any], kind: str) -> str:
    size = config.get("image_size")
    rows = []
    if size:
        rows.append(("Input size", f"{size} x {size}"))
    if config.get("resize_mode"):
        how = {"stretch": "each axis scaled independently", "pad": "aspect kept, black borders"}
        rows.append(
            ("Resize", f"`{config['resize_mode']}` ({how.get(config['resize_mode'], 'custom')}), bicubic")
        )
    rows.append(("Channels", f"{config.get('in_chans', 3)} (grayscale replicated)"))
    if config.get("intensity_range"):
        lo, hi = config["intensity_range"]
        rows.append(("Intensity", f"[{_fmt(lo)}, {_fmt(hi)}], bone bright (MONOCHROME1 DICOMs inverted)"))
    if config.get("mean") is not None and config.get("std") is not None:
        rows.append(("Normalisation", f"mean {_list(config['mean'])}, std {_list(config['std'])}"))
    if size:
        side = int(size) // 32
        rows.append(("Encoder output", f"512 x {side} x {side} features (512 when pooled)"))
    text = "## Input contract\n\n" + _table(("", ""), rows, header=False)
    return text + (
        "\nEvery input goes through `cxrcae.io.load_for_model` with these settings (read back from "
        "`config.json`), so PNG (8/16-bit), JPEG, TIFF and DICOM files are prepared identically.\n"
    )


def _data_section(config: dict[str, Any]) -> str:
    data = next((config[k] for k in _DATA_KEYS if isinstance(config.get(k), dict)), None)
    if not data:
        return ""
    out = ["## Training data\n"]
    sources = data.get("sources")
    if isinstance(sources, dict) and sources:
        out.append(_table(("source", "images"), sorted(sources.items())))
    elif isinstance(sources, list) and sources:
        out.append("Sources: " + ", ".join(map(str, sources)) + "\n")
    counts = data.get("counts") or data.get("counts_per_split") or data.get("splits")
    table = _counts_table(counts) if isinstance(counts, dict) else ""
    if table:
        out.append(table)
    scalars = [(k, _fmt(v)) for k, v in data.items() if _is_scalar(v) and k not in ("sources",)]
    if scalars:
        out.append(_table(("", ""), scalars, header=False))
    return "\n".join(out) if len(out) > 1 else ""


def _counts_table(counts: dict[str, Any]) -> str:
    """split -> {class -> n} as a table (classes as rows), or class -> n as a two-column table."""
    if all(isinstance(v, dict) for v in counts.values()):
        splits = list(counts)
        classes: list[str] = []
        for per in counts.values():
            classes += [c for c in per if c not in classes and isinstance(per[c], int)]
        if not classes:
            return ""
        rows = [
            [c, *(counts[s].get(c, 0) for s in splits), sum(counts[s].get(c, 0) for s in splits)]
            for c in classes
        ]
        rows.append(
            [
                "all",
                *(sum(v for v in counts[s].values() if isinstance(v, int)) for s in splits),
                sum(sum(v for v in counts[s].values() if isinstance(v, int)) for s in splits),
            ]
        )
        return _table(("class", *splits, "total"), rows)
    ints = [(k, v) for k, v in counts.items() if isinstance(v, int)]
    return _table(("class", "images"), ints) if ints else ""


def _training_section(config: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    for key in _TRAINING_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            rows += [(k if key == "training" else f"{key}.{k}", v) for k, v in _flatten(value)]
    if not rows:
        return ""
    return "## Training settings\n\n" + _table(("setting", "value"), [(k, _fmt(v)) for k, v in rows])


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, name + ".")
        elif _is_scalar(v) or (isinstance(v, list) and len(v) <= 8 and all(_is_scalar(x) for x in v)):
            yield name, v


def _evaluation_section(metrics: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    ci = metrics.get("ci") if isinstance(metrics.get("ci"), dict) else {}
    context = [(k, _fmt(metrics[k])) for k in _METRIC_CONTEXT if _is_scalar(metrics.get(k))]
    if ci.get("n_resamples"):
        unit = ci.get("unit", "image")
        context.append(
            (
                "confidence intervals",
                f"{ci['n_resamples']} bootstrap resamples of {unit}s"
                + (f" ({ci['n_units']} {unit}s)" if ci.get("n_units") else ""),
            )
        )
    level = float(ci.get("level", 0.95))
    has_ci = any(r["low"] is not None for r in rows)
    header = ("scope", "metric", "value", *([f"{100 * level:g}% CI"] if has_ci else []))
    table_rows = [
        [r["scope"] or "overall", r["metric"], f"{r['value']:.4f}"]
        + ([f"{r['low']:.4f} - {r['high']:.4f}" if r["low"] is not None else ""] if has_ci else [])
        for r in rows
    ]
    out = "## Evaluation\n\n"
    if context:
        out += _table(("", ""), context, header=False) + "\n"
    out += _table(header, table_rows)
    sources = _source_rows(metrics.get("per_source"))
    if sources:
        out += "\nBy data source (a model that leans on source-specific cues does unevenly here):\n\n"
        out += _table(("source", "images", "accuracy", "CI"), sources)
    return out


def _source_rows(per_source: Any) -> list[list[str]]:
    if not isinstance(per_source, dict):
        return []
    rows = []
    for source, m in per_source.items():
        if isinstance(m, dict) and _is_number(m.get("accuracy")):
            ci = (m.get("ci") or {}).get("accuracy")
            interval = f"{_fmt(ci[0])} - {_fmt(ci[1])}" if _is_pair(ci) else ""
            rows.append([str(source), _fmt(m.get("n", "")), _fmt(m["accuracy"]), interval])
    return rows


def metric_rows(metrics: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every metric of a metrics.json: {scope, metric, value, low, high}, in file order.

    ``cxrcae evaluate``'s layout (point values at top level, intervals under ``ci`` at the same paths) is
    read exactly; other files are walked generically: a metric is a number or a dict with a value
    (``value``/``point``/``estimate``) and optionally ``ci_low``/``ci_high`` (or ``ci: [low, high]``).
    """
    if not isinstance(metrics, dict):
        return
    if isinstance(metrics.get("per_class"), dict) and isinstance(metrics.get("macro"), dict):
        yield from _evaluate_rows(metrics)
        return
    yield from _walk_metrics(metrics.get("metrics", metrics), [])


def _evaluate_rows(m: dict[str, Any]) -> Iterator[dict[str, Any]]:
    ci = m.get("ci") if isinstance(m.get("ci"), dict) else {}

    def row(scope: str, name: str, value: Any, interval: Any) -> dict[str, Any] | None:
        if not _is_number(value):
            return None  # undefined (e.g. AUC of an absent class): left out, never invented
        lo, hi = interval if _is_pair(interval) else (None, None)
        return {"scope": scope, "metric": name, "value": float(value), "low": lo, "high": hi}

    found = [row("", "accuracy", m.get("accuracy"), ci.get("accuracy"))]
    for kind in ("macro", "weighted"):
        for name, value in m[kind].items():
            if name != "accuracy":
                found.append(row(kind, name, value, (ci.get(kind) or {}).get(name)))
    calibration = m.get("calibration") or {}
    found.append(row("", "ece", calibration.get("ece"), ci.get("ece")))
    for cls, values in m["per_class"].items():
        for name, value in values.items():
            if name != "support":
                found.append(
                    row(f"class {cls}", name, value, ((ci.get("per_class") or {}).get(cls) or {}).get(name))
                )
    yield from (r for r in found if r is not None)


def _is_pair(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)


def _walk_metrics(node: dict[str, Any], path: list[str]) -> Iterator[dict[str, Any]]:
    for key, value in node.items():
        if key in _NOT_METRICS or key in _METRIC_CONTEXT:
            continue
        entry = _metric_entry(value)
        if entry is not None:
            yield {"scope": " / ".join(path), "metric": str(key), **entry}
        elif isinstance(value, dict):
            yield from _walk_metrics(value, [*path, str(key)])


def _metric_entry(value: Any) -> dict[str, Any] | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"value": float(value), "low": None, "high": None}
    if not isinstance(value, dict):
        return None
    point = next((value[k] for k in _VALUE_KEYS if _is_number(value.get(k))), None)
    if point is None:
        return None
    low = high = None
    ci = value.get("ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(x) for x in ci):
        low, high = ci
    elif isinstance(ci, dict):
        value = {**value, **ci}
    for lo_key, hi_key in _CI_PAIRS:
        if low is None and _is_number(value.get(lo_key)) and _is_number(value.get(hi_key)):
            low, high = value[lo_key], value[hi_key]
    return {
        "value": float(point),
        "low": None if low is None else float(low),
        "high": None if high is None else float(high),
    }


def _usage_section(task: Task | None, repo_id: str | None) -> str:
    ref = repo_id or "path/to/checkpoint"
    if task is not None and task.labelled:  # a model that answers something about an image predicts
        code = (
            "import cxrcae\n"
            f'model = cxrcae.load_model("{ref}")  # strict; preprocessing from config.json\n'
            f'encoder = cxrcae.load_encoder("{ref}", pooled=True)  # or reuse its encoder: (B, 512) features'
        )
        cli = f"cxrcae predict --model {ref} chest_xray.png"
    else:
        code = (
            "import cxrcae\n"
            f'encoder = cxrcae.load_encoder("{ref}", pooled=True)\n'
            'features = encoder(encoder.preprocess(["chest_xray.png"]))  # (1, 512); unpooled: (1, 512, h, w)'
        )
        cli = f"cxrcae embed images/ --model {ref} --output features.npy"
    timm_line = (
        '\nWith timm (after `import cxrcae`): `timm.create_model("cxrcae_vgg_cae", pretrained=True, '
        f'pretrained_cfg_overlay=dict(hf_hub_id="{ref}"))` gives the same encoder.\n'
        if repo_id
        else ""
    )
    return (
        f"## How to use\n\n```bash\npip install cxrcae\n```\n\n```python\n{code}\n```\n\n"
        f"```bash\n{cli}\n```\n{timm_line}"
    )


def _intended_use(task: Task | None) -> str:
    purpose = (
        f"{task.description} on frontal chest radiographs in research settings, and comparison with the paper"
        if task is not None and task.labelled
        else "feature extraction and transfer learning for chest X-ray research tasks"
    )
    return f"## Intended use\n\nResearch use only: {purpose}.\n"


def _limitations(config: dict[str, Any]) -> str:
    lines = [
        "- **Not a medical device.** Not validated for clinical use; do not use it to diagnose, triage or "
        "treat patients.",
        "- **Source bias.** Public COVID-19 X-ray collections draw each class from different hospitals, "
        "devices and age groups (e.g. pneumonia from a paediatric set), so a model can learn the source "
        "instead of the disease. Expect lower performance on data from a new site.",
        "- Trained on frontal (PA/AP) radiographs; lateral views, CT and other modalities are out of scope.",
        "- Intensity-based preprocessing: burnt-in text, markers and borders are part of the input.",
    ]
    if not config.get("license"):
        lines.append(
            "- No license was recorded for these weights; the training images carry their own terms "
            "(several are non-commercial)."
        )
    return "## Limitations\n\n" + "\n".join(lines) + "\n"


def _provenance(config: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    if config.get("weights_sha256"):
        rows.append(("weights sha256", f"`{config['weights_sha256']}`"))
    src = config.get("extracted_from")
    if isinstance(src, dict) and src.get("kind"):
        rows.append(
            ("extracted from", f"{src['kind']} checkpoint (weights sha256 `{src.get('weights_sha256')}`)")
        )
    imported = config.get("source")
    if isinstance(imported, dict):
        rows += [(f"source {k}", _fmt(v)) for k, v in _flatten(imported)]
    encoder = config.get("encoder")
    if isinstance(encoder, dict):
        rows += [(f"encoder {k}", _fmt(v)) for k, v in _flatten(encoder)]
    versions = config.get("versions")
    if isinstance(versions, dict):
        rows.append(("software", ", ".join(f"{k} {v}" for k, v in versions.items())))
    if not rows:
        return ""
    return "## Provenance\n\n" + _table(("", ""), rows, header=False)


# ----------------------------------------------------------------------------------------------- helpers


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool)) and v != ""


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) >= 1e-4 or v == 0 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, list):
        return _list(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _list(values: Any) -> str:
    return "[" + ", ".join(_fmt(x) for x in values) + "]"


def _table(columns: tuple[Any, ...], rows: Any, *, header: bool = True) -> str:
    """A markdown table; without a header the first column is bold (a key/value list)."""
    lines = ["| " + " | ".join(map(str, columns)) + " |" if header else "|" + " |" * len(columns)]
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        cells = [c if isinstance(c, str) else _fmt(c) for c in row]
        if not header and cells:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
