"""Image I/O: the single pixel contract every model input goes through.

``load_xray`` decodes any supported file to float32 HxW in [0, 1] with bone bright; ``resize_xray`` makes it
square; ``load_for_model`` chains both and replicates to 3 channels; ``pixel_hash`` fingerprints decoded
pixels and ``hash_files`` runs it (or another hasher) over many files on threads; ``find_images`` expands
command-line inputs into image files.
"""

from cxrcae.io.decode import load_xray
from cxrcae.io.hashing import FileHashes, hash_files, pixel_hash
from cxrcae.io.limits import DEFAULT_MAX_PIXELS, ENV_MAX_PIXELS
from cxrcae.io.resize import RESIZE_MODES, load_for_model, resize_xray
from cxrcae.io.scan import IMAGE_EXTENSIONS, find_images, has_dicom_magic

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENV_MAX_PIXELS",
    "FileHashes",
    "IMAGE_EXTENSIONS",
    "RESIZE_MODES",
    "find_images",
    "has_dicom_magic",
    "hash_files",
    "load_for_model",
    "load_xray",
    "pixel_hash",
    "resize_xray",
]
