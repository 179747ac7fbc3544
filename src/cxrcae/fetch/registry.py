"""The public chest X-ray sources cxrcae can fetch: one ``Source`` per dataset, where and how to read it.

Each entry pins what it downloads (a GitHub archive at a fixed commit, a Kaggle handle, the paper
authors' own archive, or a publisher's files) so the bytes behind a manifest never change silently.
``sha256`` is None where the publisher gives no sha256: the first download's sha256 and size are then
recorded in the cache index and every later use is verified against them (see ``cxrcae.fetch.cache``); a
publisher's MD5 (NIH's) is checked on that first download.

A source published as several files (NIH ChestX-ray14: twelve image archives and its label files) lists
them as ``parts``. A mirror (``--mirror`` / ``CXRCAE_MIRROR``) serves every file as
``<MIRROR>/<name>/<filename>``; Kaggle sources are mirrored as one zip of the Kaggle download
(``<name>.zip``). Without a mirror the real URLs below are used unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrcae.errors import CxrcaeError

LABELS = ("COVID", "NORMAL", "PNEUMONIA", "UNLABELED")
"""The COVID task's manifest labels, shown for every source; PNEUMONIA means non-COVID pneumonia. Sources for
other tasks add their own (``TB``), listed after these."""

RESEARCH_ONLY = "research only (README)"
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


@dataclass(frozen=True)
class Part:
    """One file of a source: an archive (unpacked) or a plain file such as a label CSV (copied as is)."""

    filename: str
    url: str
    sha256: str | None = None
    md5: str | None = None
    """The publisher's MD5, checked on the first download (later uses check the sha256 recorded then)."""
    size: int | None = None
    approx_size: int | None = None
    optional: bool = False
    """A server without this file (HTTP 404 / 410) is no error: the source is parsed without it."""

    @property
    def is_archive(self) -> bool:
        return self.filename.lower().endswith(_ARCHIVE_SUFFIXES)

    @property
    def unpack_name(self) -> str:
        """Where it lands under the source's extracted folder: ``images_001`` for an archive
        ``images_001.tar.gz``, the file name itself for a plain file."""
        name = self.filename
        for suffix in _ARCHIVE_SUFFIXES if self.is_archive else ():
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name


@dataclass(frozen=True)
class Source:
    """One fetchable dataset: exactly one of ``url`` (one HTTP archive), ``parts`` (several HTTP files) or
    ``kaggle`` (kagglehub handle)."""

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
    parts: tuple[Part, ...] = ()
    """The files of a source published as several; each archive unpacks into its own folder."""

    @property
    def archive_name(self) -> str:
        """File name in the cache and on a mirror."""
        return self.filename or f"{self.name}.zip"

    @property
    def files(self) -> tuple[Part, ...]:
        """What to download over HTTP: ``parts``, or the one archive (for Kaggle: the zip a mirror serves)."""
        if self.parts:
            return self.parts
        one = Part(
            self.archive_name, self.url or "", self.sha256, size=self.size, approx_size=self.approx_size
        )
        return (one,)

    def download_url(self, mirror: str | None = None, part: Part | None = None) -> str | None:
        """``<MIRROR>/<name>/<filename>`` when a mirror is given, else the real URL (None for Kaggle)."""
        filename = part.filename if part else self.archive_name
        if mirror:
            return f"{mirror.rstrip('/')}/{self.name}/{filename}"
        return (part.url if part else self.url) or None


def _github(owner: str, repo: str, commit: str) -> tuple[str, str]:
    return f"https://github.com/{owner}/{repo}/archive/{commit}.zip", f"{repo}-{commit}.zip"


_IEEE_COMMIT = "6a4242344473ccb5ed0d2148d8c7bfb1691e4ed8"
_FIGURE1_COMMIT = "95bb569e55f4110d3b734c0f355340e04e16989a"
_ACTUALMED_COMMIT = "27240dd8dec9454bc97f9f3c0c432ef434de2517"
_PAPER_BUCKET = "https://storage.googleapis.com/cae_covid_classification"

# NIH ChestX-ray14 on the NIH Clinical Center's Box share: the image archives' static links as in NIH's
# batch_download_zips.py, each with the MD5 NIH publishes (FAQ_CHESTXRAY.pdf, Q07) and its size as Box
# reports it (taken as approximate: for the listing and the disk-space check). The label CSV and the split
# lists have no static link; Box's shared-file download by file id serves them, without a checksum.
_NIH_STATIC = "https://nihcc.box.com/shared/static"
_NIH_SHARED_FILE = (
    "https://nihcc.app.box.com/index.php?rm=box_download_shared_file&vanity_name=ChestXray-NIHCC&file_id=f_"
)
_NIH_IMAGES = (
    ("vfk49d74nhbxq3nqjg0900w5nvkorp5c", "fe8ed0a6961412fddcbb3603c11b3698", 2_008_470_987),
    ("i28rlmbvmfjbl8p2n3ril0pptcmcu9d1", "ab07a2d7cbe6f65ddd97b4ed7bde10bf", 3_952_623_504),
    ("f1t00wrtdk94satdfb9olcolqx20z2jp", "2301d03bde4c246388bad3876965d574", 3_929_234_850),
    ("0aowwzs5lhjrceb3qp67ahp0rd1l1etg", "9f1b7f5aae01b13f4bc8e2c44a4b8ef6", 3_838_903_983),
    ("v5e3goj22zr6h8tzualxfsqlqaygfbsn", "1861f3cd0ef7734df8104f2b0309023b", 3_935_496_531),
    ("asi7ikud9jwnkrnkj99jnpfkjdes7l6l", "456b53a8b351afd92a35bc41444c58c8", 3_986_301_172),
    ("jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", "1075121ea20a137b87f290d6a4a5965e", 4_016_328_426),
    ("tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j", "b61f34cec3aa69f295fbb593cbd9d443", 4_018_347_353),
    ("upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj", "442a3caa61ae9b64e61c561294d1e183", 4_111_327_929),
    ("l6nilvfa9cg3s28tqv1qc1olm3gnz54p", "09ec81c4c31e32858ad8cf965c494b74", 4_181_556_296),
    ("hhq8fkdgvcari67vfhs7ppg2w6ni4jze", "499aefc67207a5a97692424cf5dbeed5", 4_187_084_020),
    ("ioqwiy20ihqwyr8pf4c24eazhh281pbu", "dc9fda1757c2de0032b63347a7d2895c", 2_914_187_733),
)
NIH_LABELS_FILE = "Data_Entry_2017_v2020.csv"
NIH_TRAIN_VAL_FILE = "train_val_list.txt"
NIH_TEST_FILE = "test_list.txt"
_NIH_PARTS = (
    *(
        Part(f"images_{i:03d}.tar.gz", f"{_NIH_STATIC}/{link}.gz", md5=md5, approx_size=size)
        for i, (link, md5, size) in enumerate(_NIH_IMAGES, start=1)
    ),
    Part(NIH_LABELS_FILE, f"{_NIH_SHARED_FILE}219760887468"),
    Part(NIH_TRAIN_VAL_FILE, f"{_NIH_SHARED_FILE}256056636701", optional=True),
    Part(NIH_TEST_FILE, f"{_NIH_SHARED_FILE}256055473534", optional=True),
)
_NLM_COLLECTIONS = "https://openi.nlm.nih.gov/imgs/collections"
_NLM_TB_HOME = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
_NLM_TB_LICENSE = "free, cite Jaeger 2014 (README)"
_NLM_TB_PAPER = "Jaeger et al. 2014, Quant Imaging Med Surg 4(6):475, doi:10.3978/j.issn.2223-4292.2014.11.20"

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
        Source(
            name="nih-cxr14",
            title="NIH ChestX-ray14 (Wang et al. 2017), NIH Clinical Center",
            description="112,120 frontal X-rays of 30,805 patients with 14 findings mined from the reports "
            "(multi-label: 'finding' holds Data_Entry_2017's Finding Labels, joined by '|'); the official "
            "patient-level test split, and one train_val patient in 8 as val. 12 archives, ~45 GB.",
            homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
            license="unrestricted, with attribution (FAQ)",
            parser="nih-cxr14",
            parts=_NIH_PARTS,
            approx_size=sum(size for _, _, size in _NIH_IMAGES),
            images=112_120,
            classes=("NORMAL", "PNEUMONIA", "UNLABELED"),
            reference="Wang et al. 2017, ChestX-ray8, CVPR, arXiv:1705.02315; acknowledge the NIH Clinical "
            "Center and link https://nihcc.app.box.com/v/ChestXray-NIHCC",
        ),
        Source(
            name="montgomery",
            title="Montgomery County chest X-ray set (NLM), tuberculosis",
            description="138 PA X-rays (80 normal, 58 tuberculosis) with each radiologist's reading and "
            "manual lung masks (manifest columns left_lung, right_lung).",
            homepage=_NLM_TB_HOME,
            license=_NLM_TB_LICENSE,
            parser="montgomery",
            url=f"{_NLM_COLLECTIONS}/NLM-MontgomeryCXRSet.zip",
            filename="NLM-MontgomeryCXRSet.zip",
            approx_size=617_000_000,
            images=138,
            classes=("NORMAL", "TB"),
            reference=f"{_NLM_TB_PAPER}; masks: Candemir et al. 2014 and Jaeger et al. 2014, IEEE TMI 33(2)",
        ),
        Source(
            name="shenzhen",
            title="Shenzhen No.3 People's Hospital chest X-ray set (NLM), tuberculosis",
            description="662 PA X-rays (326 normal, 336 tuberculosis) with each radiologist's reading.",
            homepage=_NLM_TB_HOME,
            license=_NLM_TB_LICENSE,
            parser="shenzhen",
            url=f"{_NLM_COLLECTIONS}/ChinaSet_AllFiles.zip",
            filename="ChinaSet_AllFiles.zip",
            approx_size=3_770_000_000,
            images=662,
            classes=("NORMAL", "TB"),
            reference=_NLM_TB_PAPER,
        ),
    ]
}


def get_source(name: str) -> Source:
    """Look a source up by name; an unknown name lists the known ones."""
    try:
        return SOURCES[name]
    except KeyError:
        raise CxrcaeError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}") from None
