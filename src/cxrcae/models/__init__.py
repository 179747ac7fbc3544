"""The paper's models: the convolutional autoencoder, its encoder, classification heads, checkpoints."""

from cxrcae.models.cae import CAEDecoder, CAEEncoder, ConvAutoencoder
from cxrcae.models.classifier import CXRClassifier
from cxrcae.models.factory import ARCHITECTURE, count_parameters
from cxrcae.models.heads import HEADS, build_head

__all__ = [
    "ARCHITECTURE",
    "CAEDecoder",
    "CAEEncoder",
    "CXRClassifier",
    "ConvAutoencoder",
    "HEADS",
    "build_head",
    "count_parameters",
]
