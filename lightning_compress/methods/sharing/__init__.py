"""Weight sharing: 1-D k-means codebooks (Deep Compression) or product quantization, tied centroid
gradients, packed files."""

from .codebook import is_shared, share_weights, sync_to_codebook, tie_gradients
from .kmeans import INITS, kmeans_1d, kmeans_vectors
from .product import is_product_shared, share_product

__all__ = ["INITS", "is_product_shared", "is_shared", "kmeans_1d", "kmeans_vectors", "share_product", "share_weights",
           "sync_to_codebook", "tie_gradients"]
