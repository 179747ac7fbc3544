"""``cxrcae import-keras``: the authors' Keras .h5 models as cxrcae checkpoint folders (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import JsonOpt, comma_list, console, err_console, make_table, print_json


@app.command("import-keras")
def import_keras_command(
    file: Annotated[
        Path, typer.Argument(help="Keras .h5 file: cae.h5, covid_classification.h5 or an encoder.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write.")],
    class_names: Annotated[
        str | None,
        typer.Option("--class-names", help="Comma-separated class names in the model's output order."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", min=32, help="Input size (default: from the file; classifiers fix it themselves)."
        ),
    ] = None,
    resize_mode: Annotated[
        str | None,
        typer.Option(
            "--resize-mode",
            help="stretch or pad.",
            show_default="as the authors did: pad for the CAE/encoder, stretch for the classifier",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert a Keras .h5 (the paper's CAE, encoder or CAE+LSTM classifier) into a cxrcae checkpoint.

    Weights are read with h5py and re-laid out for PyTorch (conv HWIO->OIHW, transposed conv, LSTM gates,
    Dense); the result loads strictly like any cxrcae checkpoint and gets a model card.
    """
    from cxrcae.hub.keras import import_keras

    names = list(comma_list(class_names, what="--class-names")) if class_names else None
    result = import_keras(file, out, class_names=names, image_size=image_size, resize_mode=resize_mode)
    cfg = result.config
    summary = {
        "file": str(file),
        "out": str(result.out),
        "kind": result.kind,
        "head": result.head,
        "image_size": cfg["image_size"],
        "class_names": cfg.get("class_names"),
        "num_parameters": cfg["num_parameters"],
        "keras_layers_with_weights": result.layers,
    }
    if json_out:
        print_json(summary)
        return
    rows = [
        [k, v if not isinstance(v, list) else ", ".join(map(str, v))]
        for k, v in summary.items()
        if v is not None
    ]
    console.print(make_table(f"Imported {file.name}", ["", "value"], rows))
    if result.kind == "classifier" and not names:
        err_console.print(
            "[yellow]Warning:[/] class names are not stored in Keras files; saved as class_0.. - pass "
            "--class-names in the model's output order (flow_from_directory sorts folders alphabetically).",
            highlight=False,
        )
