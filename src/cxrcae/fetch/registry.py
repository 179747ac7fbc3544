"""The public chest X-ray sources cxrcae can fetch: one ``Source`` per dataset, where and how to read it.

Each entry pins what it downloads (a GitHub archive at a fixed commit, a Kaggle handle, or the paper
authors' own archive) so the bytes behind a manifest never change silently. ``sha256`` is None where the
publisher gives no checksum: the first download's sha256 and size are then recorded in the cache index and
every later use is verified against them (see ``cxrcae.fetch.cache``).

A mirror (``--mirror`` / ``CXRCAE_MIRROR``) serves every source as ``<MIRROR>/<name>/<filename>``; Kaggle
sources are mirrored as one zip of the Kaggle download (``<name>.zip``). Without a mirror the real URLs
below are used unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrcae.errors import CxrcaeError

LABELS = ("COVID", "NORMAL", "PNEUMONIA", "UNLABELED")
"""Manifest labels produced by every parser; PNEUMONIA means non-COVID pneumonia."""

RESEARCH_ONLY = "research only (README)"


@dataclass(frozen=True)
class Source:
    """One fetchable dataset: exactly one of ``url`` (HTTP archive) or ``kaggle`` (kagglehub handle)."""

    name: str
    title: str
    description: str
    homepage: str
    license: str
    parser: str
    url: str | None = None
    kaggle: str | None = None
    filename: str = ""
    sha256: str | None = None
    size: int | None = None
    """Exact archive size in bytes when the publisher states it (then verified); None otherwise."""
    approx_size: int | None = None
    """Publisher's rounded size, for the listing and the disk-space check only."""
    images: int | None = None
    """Image files in the download, where the publisher states it (before CT/lateral filtering)."""
    classes: tuple[str, ...] = ()
    reference: str = ""

    @property
    def archive_name(self) -> str:
        """File name in the cache and on a mirror."""
        return self.filename or f"{self.name}.zip"

    def download_url(self, mirror: str | None = None) -> str | None:
        """``<MIRROR>/<name>/<filename>`` when a mirror is given, else the real URL (None for Kaggle)."""
        if mirror:
            return f"{mirror.rstrip('/')}/{self.name}/{self.archive_name}"
        return self.url


def _github(owner: str, repo: str, commit: str) -> tuple[str, str]:
    return f"https://github.com/{owner}/{repo}/archive/{commit}.zip", f"{repo}-{commit}.zip"


_IEEE_COMMIT = "6a4242344473ccb5ed0d2148d8c7bfb1691e4ed8"
_FIGURE1_COMMIT = "95bb569e55f4110d3b734c0f355340e04e16989a"
_ACTUALMED_COMMIT = "27240dd8dec9454bc97f9f3c0c432ef434de2517"
_PAPER_BUCKET = "https://storage.googleapis.com/cae_covid_classification"

_ieee_url, _ieee_file = _github("ieee8023", "covid-chestxray-dataset", _IEEE_COMMIT)
_fig_url, _fig_file = _github("agchung", "Figure1-COVID-chestxray-dataset", _FIGURE1_COMMIT)
_act_url, _act_file = _github("agchung", "Actualmed-COVID-chestxray-dataset", _ACTUALMED_COMMIT)

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            name="ieee8023",
            title="COVID-19 image data collection (Cohen et al.)",
            description="Images from publications and case reports: COVID-19 and other pneumonias, with "
            "per-image license and patient id; CT and lateral views excluded by default.",
            homepage="https://github.com/ieee8023/covid-chestxray-dataset",
            license="per image (license column)",
            parser="ieee8023",
            url=_ieee_url,
            filename=_ieee_file,
            classes=("COVID", "NORMAL", "PNEUMONIA", "UNLABELED"),
            reference="[18] Cohen et al. 2020, arXiv:2006.11988",
        ),
        Source(
            name="figure1",
            title="Figure1-COVID-chestxray-dataset",
            description="COVID-19 case images from the Figure 1 platform (55 images at the pinned commit).",
            homepage="https://github.com/agchung/Figure1-COVID-chestxray-dataset",
            license=RESEARCH_ONLY,
            parser="figure1",
            url=_fig_url,
            filename=_fig_file,
            images=55,
            classes=("COVID", "NORMAL", "PNEUMONIA", "UNLABELED"),
            reference="[19]",
        ),
        Source(
            name="actualmed",
            title="Actualmed-COVID-chestxray-dataset",
            description="Actualmed chest X-rays, COVID-19 and no-finding; empty finding = inconclusive "
            "(238 images at the pinned commit).",
            homepage="https://github.com/agchung/Actualmed-COVID-chestxray-dataset",
            license=RESEARCH_ONLY,
            parser="actualmed",
            url=_act_url,
            filename=_act_file,
            images=238,
            classes=("COVID", "NORMAL", "UNLABELED"),
            reference="[20]",
        ),
        Source(
            name="radiography-db",
            title="COVID-19 Radiography Database (Kaggle)",
            description="COVID-19, Normal, Viral Pneumonia and Lung Opacity PNGs (299x299). Lung Opacity "
            "(non-COVID infection, RSNA) is kept as UNLABELED.",
            homepage="https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
            license="see Kaggle page",
            parser="radiography-db",
            kaggle="tawsifurrahman/covid19-radiography-database",
            images=21_165,
            classes=("COVID", "NORMAL", "PNEUMONIA", "UNLABELED"),
            reference="[15]",
        ),
        Source(
            name="covid19-xray-kaggle",
            title="COVID-19 Chest X-ray Image Dataset (Kaggle, alifrahman)",
            description="Small COVID-19 / normal collection; labels read from the folder names.",
            homepage="https://www.kaggle.com/datasets/alifrahman/covid19-chest-xray-image-dataset",
            license="see Kaggle page",
            parser="folders",
            kaggle="alifrahman/covid19-chest-xray-image-dataset",
            classes=("COVID", "NORMAL"),
            reference="[16]",
        ),
        Source(
            name="kermany",
            title="Chest X-Ray Images (Pneumonia), Kermany et al. 2018 (Kaggle)",
            description="Pediatric (ages 1-5) normal and bacterial/viral pneumonia; patient id parsed from "
            "file names. Beware: 'pneumonia' correlates with 'child' when mixed with adult sets.",
            homepage="https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia",
            license="CC BY 4.0",
            parser="kermany",
            kaggle="paultimothymooney/chest-xray-pneumonia",
            images=5_856,
            classes=("NORMAL", "PNEUMONIA"),
            reference="[17] Kermany et al. 2018, doi:10.17632/rscbjbr9sj.2",
        ),
        Source(
            name="paper-pretrain",
            title="The paper's pretraining set (authors' archive pretrain.zip)",
            description="The 18,617 images the paper pretrained its autoencoder on, as the authors released "
            "them.",
            homepage="https://github.com/saichandrapandraju/Convolutional-Auto-Encoding-for-detecting-COVID",
            license="mixed, research only",
            parser="folders",
            url=f"{_PAPER_BUCKET}/pretrain.zip",
            filename="pretrain.zip",
            approx_size=3_100_000_000,
            images=18_617,
            classes=("UNLABELED",),
            reference="paper, Section 3.1",
        ),
        Source(
            name="paper-finetune",
            title="The paper's labelled set (authors' archive covid_normal_pneumonia.zip)",
            description="The 11,109 COVID / normal / pneumonia images the paper fine-tuned and tested on.",
            homepage="https://github.com/saichandrapandraju/Convolutional-Auto-Encoding-for-detecting-COVID",
            license="mixed, research only",
            parser="folders",
            url=f"{_PAPER_BUCKET}/covid_normal_pneumonia.zip",
            filename="covid_normal_pneumonia.zip",
            approx_size=778_000_000,
            images=11_109,
            classes=("COVID", "NORMAL", "PNEUMONIA"),
            reference="paper, Section 3.2",
        ),
    ]
}


def get_source(name: str) -> Source:
    """Look a source up by name; an unknown name lists the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise CxrcaeError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}") from None
