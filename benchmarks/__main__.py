"""The benchmarks, one entry point: ``python -m benchmarks NAME [ARGS...]``; ``NAME --help`` for each.

Results go to ``benchmarks/results/*.json`` (each with the machine it ran on, under ``"machine"``);
``report`` renders the README's generated tables from them.
"""

from __future__ import annotations

import importlib
import sys

# name: (module, one line). The proxy benchmarks start from the checkpoint that ``proxy`` trains.
BENCHMARKS = {
    "proxy": ("proxy", "train the CPU proxy baseline (quarter-width VGG11-BN) the proxy benchmarks start from"),
    "pruning": ("pruning", "overhead | accuracy | filter-latency: IterativePruning vs Lightning ModelPruning"),
    "quantization": ("quantization", "step-time | accuracy | onnx-latency: QAT vs torch.ao and ORT quantize_static"),
    "decomposition": ("decomposition", "our Tucker rank allocation vs TensorLy energy ranks on the proxy; flattened-vs-cp, TT vs Tucker on digits"),
    "decomposition-vgg19": ("decomposition_vgg19", "train | speed: Tucker VGG19 accuracy, step time (GPU), CPU latency"),
    "layer-profile": ("layer_profile", "per-layer training time of dense vs factorized VGG19 blocks"),
    "deep-compression": ("deep_compression", "prune -> share -> packed file on the proxy"),
    "packed-vgg19": ("packed_vgg19", "k-means, packed-file save / load times and size on VGG19"),
    "sharing": ("sharing", "pq-vs-kmeans: product quantization vs scalar k-means at equal packed-file bytes (digits)"),
    "data-pipeline": ("data_pipeline", "CIFAR10DataModule throughput vs plain indexing and per-image transforms"),
    "executorch-latency": ("executorch_latency", "ExecuTorch int8 (XNNPACK) vs ONNX Runtime int8 / fp32, batch 1 (edge extra)"),
    "fullscale": ("fullscale", "one GPU: the full-scale VGG19 table (baseline, every recipe, the peers) in one command; --smoke on the CPU"),
    "recipes": ("recipes", "run | latency: every recipe of recipes/ at CPU-proxy scale, beside its peers"),
    "report": ("report", "write the README's generated tables (frontier, recipes) and their plots"),
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: python -m benchmarks NAME [ARGS...]   (python -m benchmarks NAME --help)", "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # imported only when chosen: each pulls in torch, Lightning and its own dependencies
    importlib.import_module(f"{__package__ or 'benchmarks'}.{BENCHMARKS[name][0]}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
