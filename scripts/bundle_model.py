"""Copy a finished ``scripts/train_bundled_model.sh`` run into the package: the weights people get offline.

    python scripts/bundle_model.py RUN_DIR DATA_DIR

Writes ``src/cxrcae/weights/default/`` (the classifier), ``src/cxrcae/weights/encoder/`` (its CAE-pretrained
encoder, before fine-tuning), ``src/cxrcae/samples/`` (redistributable test-split X-rays with attribution).
Weights are stored as float16 (half the wheel size); the script re-evaluates the float16 classifier on the
test split and refuses to bundle when accuracy or macro AUC moves by more than 0.001 against float32.
The classifier folder also gets ``test_split.csv`` (paths relative to DATA_DIR, label, source, sha256) so a
test can re-score the shipped model on exactly the images its card reports.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

from cxrcae.eval.evaluation import evaluate
from cxrcae.hub.card import build_card
from cxrcae.hub.resolve import load_checkpoint
from cxrcae.hub.transfer import encoder_only_config
from cxrcae.models import CAEEncoder
from cxrcae.models.checkpoint import read_config, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "cxrcae"
RECIPE = (
    "bash scripts/train_bundled_model.sh ../shared/data/cxr runs/bundled\n"
    "python scripts/bundle_model.py runs/bundled ../shared/data/cxr   # into src/cxrcae/weights, samples"
)
SAMPLES_PER_CLASS = 2
LICENSES = """## Training data and licenses

Trained on the 8,559 re-encoded frontal chest X-rays of the project's shared data (longest side 256 px):

| source | reference | license |
|---|---|---|
| radiography-db | COVID-19 Radiography Database (Chowdhury et al.; Rahman et al.; Kaggle) | research use |
| kermany | Kermany, Zhang, Goldbaum 2018, doi:10.17632/rscbjbr9sj.2 (pediatric, ages 1-5) | CC BY 4.0 |
| ieee8023 | Cohen et al. 2020, arXiv:2006.11988 | per image: CC BY (some NC/ND), Apache 2.0 |
| figure1 | Figure1-COVID-chestxray-dataset (agchung) | research purposes only |
| actualmed | Actualmed-COVID-chestxray-dataset (agchung) | research purposes only |

Because part of the data is research-use-only or non-commercial, these weights are for **research use only**.
"""


def _fp16_copy(model):
    return copy.deepcopy(model).half()


def _recipe_section(clf_cfg: dict, cae_cfg: dict, seconds: str) -> str:
    t, p = clf_cfg["training"], cae_cfg["training"]
    lines = [
        "## Training recipe (rebuild it)",
        "",
        f"```bash\n{RECIPE}\n```",
        "",
        f"- Image size {clf_cfg['image_size']} px (chosen for a 2-core CPU budget of ~100 minutes; the paper "
        "used 224 px): the CAE is pretrained on every train/val image, unlabelled ones included, never the "
        "test split, letterboxed ('pad').",
        f"- CAE: Adam {p['lr']:g}, batch {p['batch_size']}, {p['epochs_run']} epochs (best epoch "
        f"{p['best_epoch']}, validation MSE {p['best_val_loss']:.5f}).",
        f"- Classifier: gradual unfreezing, stages {', '.join(t['stages'])}: head over the frozen encoder "
        f"(Adam {t['lr']:g}), then every layer (Adam {t['lr_unfrozen']:g}); batch {t['batch_size']}, up to "
        f"{t['epochs']} epochs per stage, early stopping patience {t['patience']} on validation loss, best "
        f"weights kept ({t['epochs_run']} epochs run, best epoch {t['best_epoch']}).",
        f"- Against the source shortcut: `--balance {t['balance']}` (each class weighted equally, and inside "
        "a class each source by the square root of its size) and light augmentation (rotation 5 deg, "
        "shift 5%, "
        "scale 5%, brightness/contrast 10%).",
        f"- Patient-grouped, seeded split (seed {t['seed']}) by `cxrcae split`; 73 / 13.5 / 13.5.",
        f"- Wall time of the whole recipe on a 2-core CPU: {seconds} s. Weights stored as float16 "
        "(evaluation checked unchanged against float32).",
        "",
    ]
    return "\n".join(lines)


def _per_source_table(metrics: dict) -> str:
    rows = [
        "| source | n | accuracy (95% CI) | recall COVID | recall NORMAL | recall PNEUMONIA | macro AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, m in metrics.get("per_source", {}).items():
        ci = (m.get("ci") or {}).get("accuracy")
        acc = f"{m['accuracy']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        rec = [m["per_class"].get(c, {}).get("recall") for c in ("COVID", "NORMAL", "PNEUMONIA")]
        auc = m.get("macro", {}).get("auc")
        cells = [f"{r:.3f}" if r is not None else "n/a" for r in rec]
        rows.append(
            f"| {source} | {m['n']} | {acc} | {' | '.join(cells)} | {auc:.3f} |"
            if auc is not None
            else f"| {source} | {m['n']} | {acc} | {' | '.join(cells)} | n/a |"
        )
    return "## Test results by source\n\n" + "\n".join(rows) + "\n"


def _limitations_extra() -> str:
    return (
        "## Known shortcut\n\n"
        "The public sets behind this model draw each class from different sources: radiography-db PNEUMONIA "
        "and Kermany are pediatric, so 'pneumonia' correlates with 'child'; COVID images come mostly from "
        "adult "
        "collections. Balanced sampling and augmentation reduce but do not remove this. The per-source table "
        "above shows how unevenly it works; expect lower accuracy on images from other hospitals.\n"
    )


def _test_split(splits: Path, data_root: Path, out: Path) -> None:
    with open(splits, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test" and r["label"] != "UNLABELED"]
    with open(out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "source", "patient_id", "sha256"])
        for r in rows:
            path = Path(r["path"])
            full = path if path.is_absolute() else splits.parent / path
            rel = full.resolve().relative_to(data_root.resolve())
            w.writerow(
                [
                    rel.as_posix(),
                    r["label"],
                    r["source"],
                    r["patient_id"],
                    hashlib.sha256(full.read_bytes()).hexdigest(),
                ]
            )


def _samples(splits: Path, data_root: Path) -> None:
    with open(data_root / "manifest.csv", newline="") as f:
        free = {r["path"]: r for r in csv.DictReader(f) if r["redistributable"] == "yes"}
    with open(splits, newline="") as f:
        test = [r for r in csv.DictReader(f) if r["split"] == "test"]
    picked: dict[str, list[dict]] = {}
    for r in test:
        rel = (splits.parent / r["path"]).resolve().relative_to(data_root.resolve()).as_posix()
        row = free.get(rel)
        if (
            row
            and row["label"] != "UNLABELED"
            and len(picked.setdefault(row["label"], [])) < SAMPLES_PER_CLASS
        ):
            picked[row["label"]].append(row)
    out = PACKAGE / "samples"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lines = [
        "# Sample chest X-rays: attribution",
        "",
        "Test-split images (never seen in training) of the bundled model, re-encoded to 256 px, whose",
        "licenses allow redistribution with attribution. File names start with the true label.",
        "",
        "| file | label | dataset | authors / reference | license |",
        "|---|---|---|---|---|",
    ]
    manifest = []
    for label in sorted(picked):
        for row in picked[label]:
            name = f"{label.lower()}_{row['source']}_{Path(row['path']).name}"
            shutil.copyfile(data_root / row["path"], out / name)
            ref = (
                "Kermany, Zhang, Goldbaum 2018, doi:10.17632/rscbjbr9sj.2"
                if row["source"] == "kermany"
                else "Cohen et al. 2020, COVID-19 Image Data Collection, arXiv:2006.11988"
            )
            lic = row["license"] or ("CC BY 4.0" if row["source"] == "kermany" else "")
            lines.append(f"| {name} | {label} | {row['original_dataset']} | {ref} | {lic} |")
            manifest.append({"path": name, "label": label, "source": row["source"], "license": lic})
    (out / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n")
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "source", "license"], lineterminator="\n")
        w.writeheader()
        w.writerows(manifest)


def main(run: Path, data_root: Path) -> None:
    clf_dir, cae_dir = run / "clf" / "best", run / "cae" / "best"
    splits = run / "splits.csv"
    seconds = (
        (run / "seconds.txt").read_text().split(":")[-1].strip() if (run / "seconds.txt").exists() else "?"
    )
    metrics32 = json.loads((run / "eval-test" / "metrics.json").read_text())

    clf, clf_cfg = load_checkpoint(clf_dir)
    cae, cae_cfg = load_checkpoint(cae_dir)
    base = {
        k: v
        for k, v in clf_cfg.items()
        if k not in ("weights_sha256", "versions", "num_parameters", "format_version", "architecture")
    }
    base["weights_dtype"] = "float16"
    base["license"] = "other"  # research use only: see "Training data and licenses" on the card
    base["bundled"] = {"recipe": RECIPE, "seconds": seconds, "cae_training": cae_cfg.get("training")}

    dest = PACKAGE / "weights" / "default"
    shutil.rmtree(dest, ignore_errors=True)
    save_checkpoint(_fp16_copy(clf), dest, base)
    _test_split(splits, data_root, dest / "test_split.csv")
    evaluate(
        dest, splits, split="test", precision="fp32", n_bootstrap=1000, seed=0, out_dir=run / "eval-test-fp16"
    )
    m16 = json.loads((run / "eval-test-fp16" / "metrics.json").read_text())
    for key in ("accuracy",):
        if abs(m16[key] - metrics32[key]) > 0.001:
            sys.exit(f"float16 storage changed {key}: {metrics32[key]} -> {m16[key]}")
    if abs(m16["macro"]["auc"] - metrics32["macro"]["auc"]) > 0.001:
        sys.exit(f"float16 storage changed macro AUC: {metrics32['macro']['auc']} -> {m16['macro']['auc']}")
    m16 = {k: v for k, v in m16.items() if k not in ("model", "data")}
    (dest / "metrics.json").write_text(json.dumps(m16, indent=2) + "\n")
    cfg = read_config(dest)
    card = build_card(cfg, m16)
    card += "\n" + _per_source_table(m16) + "\n" + _recipe_section(cfg, cae_cfg, seconds) + "\n" + LICENSES
    card += "\n" + _limitations_extra()
    (dest / "README.md").write_text(card)

    enc_dest = PACKAGE / "weights" / "encoder"
    shutil.rmtree(enc_dest, ignore_errors=True)
    encoder = CAEEncoder()
    encoder.load_state_dict(cae.encoder.state_dict())
    enc_cfg = encoder_only_config(
        {
            k: v
            for k, v in cae_cfg.items()
            if k not in ("versions", "num_parameters", "format_version", "architecture")
        }
    )
    enc_cfg["weights_dtype"] = "float16"
    enc_cfg["license"] = base["license"]
    enc_cfg["bundled"] = {"recipe": RECIPE, "seconds": seconds}
    enc_cfg.pop("weights_sha256", None)
    save_checkpoint(_fp16_copy(encoder), enc_dest, enc_cfg)
    enc_card = (
        build_card(read_config(enc_dest)) + "\n" + _recipe_section(cfg, cae_cfg, seconds) + "\n" + LICENSES
    )
    (enc_dest / "README.md").write_text(enc_card)

    _samples(splits, data_root)
    for path in (*dest.iterdir(), *enc_dest.iterdir()):
        path.chmod(0o644)  # atomic writes create 0600 files; installed package data must be world-readable
    print(
        json.dumps(
            {
                "accuracy": m16["accuracy"],
                "macro_auc": m16["macro"]["auc"],
                "accuracy_ci": m16["ci"]["accuracy"],
                "macro_auc_ci": m16["ci"]["macro"]["auc"],
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
