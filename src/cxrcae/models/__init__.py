"""The paper's models: the convolutional autoencoder, its encoder, classification heads, the U-Net on the
encoder, checkpoints."""

from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.models.classifier import CXRClassifier
from cxrcae.models.factory import ARCHITECTURE, count_parameters
from cxrcae.models.heads import HEADS, build_head
from cxrcae.models.unet import CXRSegmenter, UNetDecoder

__all__ = [
    "ARCHITECTURE",
    "CAEDecoder",
    "CAEEncoder",
    "CXRClassifier",
    "CXRSegmenter",
    "ConvAutoencoder",
    "HEADS",
    "UNetDecoder",
    "build_head",
    "count_parameters",
]
