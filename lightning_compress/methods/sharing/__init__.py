"""Weight sharing (Deep Compression): 1-D k-means codebooks, tied centroid gradients, packed files."""

from .codebook import is_shared, share_weights, sync_to_codebook, tie_gradients
from .kmeans import INITS, kmeans_1d

__all__ = ["INITS", "is_shared", "kmeans_1d", "share_weights", "sync_to_codebook", "tie_gradients"]
