"""Time weight sharing and the packed artifact on VGG19-BN (randomly initialised: sizes and times
depend on shapes and value distributions, not on training).

Measured, each the best of ``--repeats``: WeightSharing's k-means (5 bits) over all 20M weights of
the dense VGG19; then, on a copy pruned to 95% by magnitude per layer and shared with 5 bits by the
same k-means, ``save_compressed`` and ``load_compressed``; Huffman encode and decode of 20M symbols
drawn from a geometric distribution (p = 0.25, clipped to 256 symbols); with the file size and its
ratio to ``torch.save`` of the fp32 state dict. Written to ``benchmarks/results/packed_vgg19.json``.

    python -m benchmarks packed-vgg19
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_compress.methods.pruning.masks import is_prunable
from lightning_compress.methods.pruning.pruner import Pruner
from lightning_compress.methods.sharing.codebook import remove_codebook_buffers, share_weights
from lightning_compress.methods.sharing.huffman import huffman_decode, huffman_encode
from lightning_compress.methods.sharing.packed import load_compressed, save_compressed
from lightning_compress.models import create_model

from .common import machine, parser, write_result


@torch.no_grad()
def prune(model: nn.Module, sparsity: float = 0.95) -> None:
    """Per-layer magnitude pruning through IterativePruning's own Pruner, folded into the weights."""
    pruner = Pruner(model, [name for name, m in model.named_modules() if is_prunable(m)])
    pruner.attach()
    pruner.update(sparsity, first=True)
    pruner.finalize()


def share(model: nn.Module, bits: int = 5) -> float:
    """WeightSharing's k-means on every Conv / Linear weight; returns its seconds."""
    layers = [m for m in model.modules() if is_prunable(m)]
    start = time.perf_counter()
    for layer in layers:
        share_weights(layer, bits)
    seconds = time.perf_counter() - start
    for layer in layers:
        remove_codebook_buffers(layer)
    return seconds


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit patterns of a floating tensor (so -0.0 differs from +0.0); other tensors as they are."""
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv: list[str] | None = None) -> None:
    ap = parser("packed-vgg19", __doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--symbols", type=int, default=20_000_000)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    dense = create_model("vgg19_bn").eval()
    kmeans_s = min(share(create_model("vgg19_bn")) for _ in range(args.repeats))
    model = create_model("vgg19_bn").eval()
    model.load_state_dict(dense.state_dict())
    prune(model)
    share(model)
    reference = {key: value.clone() for key, value in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch_save_bytes = buffer.getbuffer().nbytes

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vgg19_bn.lcpk"
        save_s, summary = best_of(args.repeats, lambda: save_compressed(model, path))
        load_s, state = best_of(args.repeats, lambda: load_compressed(path))
        file_bytes = path.stat().st_size
    exact = all(torch.equal(_bits(state[key]), _bits(value)) for key, value in reference.items())

    rng = np.random.default_rng(0)
    symbols = (rng.geometric(0.25, args.symbols) - 1).clip(max=255).astype(np.uint16)
    encode_s, stream = best_of(args.repeats, lambda: huffman_encode(symbols))
    decode_s, decoded = best_of(args.repeats, lambda: huffman_decode(stream))

    result = {
        "machine": machine(),
        "model": "vgg19_bn",
        "sparsity": 0.95,
        "bits": 5,
        "params": sum(p.numel() for p in model.parameters()),
        "kmeans_all_weights_s": round(kmeans_s, 3),
        "save_compressed_s": round(save_s, 3),
        "load_compressed_s": round(load_s, 3),
        "round_trip_bit_exact": exact,
        "file_bytes": file_bytes,
        "torch_save_bytes": torch_save_bytes,
        "ratio_vs_torch_save": round(torch_save_bytes / file_bytes, 2),
        "stages_bytes": summary.stages(),
        "weight_nonzeros": sum(layer.nonzeros for layer in summary.layers),
        "file_bits_per_nonzero": round(8 * file_bytes / sum(layer.nonzeros for layer in summary.layers), 2),
        "manifest_bytes": summary.manifest_bytes,
        "huffman_symbols": args.symbols,
        "huffman_bits_per_symbol": round(stream.bits_per_symbol, 4),
        "huffman_encode_s": round(encode_s, 3),
        "huffman_decode_s": round(decode_s, 3),
        "huffman_round_trip_exact": bool(np.array_equal(decoded, symbols)),
    }
    print(json.dumps(result, indent=2))
    write_result("packed_vgg19.json", result)


if __name__ == "__main__":
    main()
