"""``cxrcae samples``: write the sample X-rays shipped with the package, to try predict on right away."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrcae.cli.app import app
from cxrcae.cli.common import JsonOpt, console, print_json


@app.command("samples")
def samples_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the sample X-rays into.")],
    json_out: JsonOpt = False,
) -> None:
    """Write the bundled sample chest X-rays (redistributable licenses, attribution included) to OUT.

    Then: cxrcae predict OUT
    """
    from cxrcae.bundled import write_samples

    written = write_samples(out)
    if json_out:
        print_json({"out": str(out), "images": [str(p) for p in written]})
        return
    console.print(f"Wrote {len(written)} sample X-rays and ATTRIBUTION.md to {out}", highlight=False)
    console.print(f"Next: cxrcae predict {out}", highlight=False)
