"""Comparative studies: arms (an encoder in a mode, with its recipes) x labelled fractions, on one split,
seed and budget, paired on the same test patients.

``run_study`` runs a ``StudySpec`` into a resumable folder; the presets are ``run_transfer`` (``cxrcae
transfer``: encoders x modes, each paired with the first encoder) and ``cxrcae.ablation.run_ablation``
(``cxrcae ablate``: the CAE recipe against its random-init twins), which shares ``run_points`` and the
files of ``outputs``.
"""

from cxrcae.study.cells import continue_or_restart
from cxrcae.study.outputs import arm_rows, comparison_rows, write_outputs
from cxrcae.study.run import StudyResult, run_points, run_study
from cxrcae.study.spec import MODES, Arm, Recipe, StudySpec, claim, claimed, study_splits
from cxrcae.study.transfer import TransferConfig, run_transfer

__all__ = [
    "MODES",
    "Arm",
    "Recipe",
    "StudyResult",
    "StudySpec",
    "TransferConfig",
    "arm_rows",
    "claim",
    "claimed",
    "comparison_rows",
    "continue_or_restart",
    "run_points",
    "run_study",
    "run_transfer",
    "study_splits",
    "write_outputs",
]
