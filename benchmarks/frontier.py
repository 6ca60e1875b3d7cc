"""The compression frontier on the CPU proxy model, from the results JSONs the other benchmarks wrote.

    python -m benchmarks.frontier

Reads ``benchmarks/results/{pruning_accuracy,pruning_accuracy_seed1,deep_compression_proxy,
decomposition_proxy,quantization_accuracy}.json``, writes ``benchmarks/results/frontier_proxy.png``
(accuracy change against compression, one colour per technique, peers hollow) and the markdown table
between the ``frontier`` markers of the README. Each technique compresses something different, so the
table names what its ratio counts: non-zero weights (pruning), parameters (decomposition), bits per
weight (quantization) or bytes of the file (Deep Compression). No figure is typed in here.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
START, END = "<!-- frontier:start -->", "<!-- frontier:end -->"
BITS = {"int8": 8, "w4a8": 4, "fixed_point_w8a8": 8, "binary": 1}


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def rows() -> list[dict]:
    out = []
    for name in ("pruning_accuracy.json", "pruning_accuracy_seed1.json"):
        data = _load(name)
        for r in (data or {}).get("results", []):
            peer = r["method"] == "lightning_model_pruning"
            out.append({"technique": "pruning", "config": f"{r['method']} {r['sparsity']:.0%} (seed {r['seed']})",
                        "peer": peer, "ratio": 1 / (1 - r["sparsity"]), "counts": "non-zero weights",
                        "delta": r["delta_points"], "source": name})
    data = _load("deep_compression_proxy.json")
    for r in (data or {}).get("results", []):
        out.append({"technique": "deep compression", "config": f"{r['sparsity']:.0%} + {data['bits']} bits ({r['centroid_gradient']})",
                    "peer": False, "ratio": r["ratio_vs_fp32_state_dict"], "counts": "file bytes",
                    "delta": r["delta_points"], "source": "deep_compression_proxy.json"})
    data = _load("decomposition_proxy.json")
    for r in (data or {}).get("runs", []):
        out.append({"technique": "decomposition", "config": r["method"], "peer": r["method"].startswith("peer"),
                    "ratio": r["compression"], "counts": "parameters", "delta": r["delta_points"],
                    "source": "decomposition_proxy.json"})
    data = _load("quantization_accuracy.json")
    for r in (data or {}).get("runs", []):
        config = r["config"]
        if config.startswith("peer"):
            ratio, counts = 32 / 8, "bits per weight"
        else:
            bits = next((b for key, b in BITS.items() if key in config), 8)
            ratio, counts = 32 / bits, "bits per weight"
        out.append({"technique": "quantization", "config": config, "peer": config.startswith("peer"), "ratio": ratio,
                    "counts": counts, "delta": r["delta_points"], "source": "quantization_accuracy.json"})
    return out


def table(data: list[dict]) -> str:
    lines = ["| technique | configuration | compression | counted as | accuracy change (points) | from |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in data:
        config = r["config"].replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| {r['technique']} | {config}{' (peer)' if r['peer'] and 'peer' not in r['config'] else ''} "
                     f"| {r['ratio']:.1f}x | {r['counts']} | {r['delta']:+.2f} | `{r['source']}` |")
    return "\n".join(lines)


def plot(data: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"pruning": "tab:blue", "deep compression": "tab:purple", "decomposition": "tab:green", "quantization": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for technique, colour in colours.items():
        for peer in (False, True):
            points = [r for r in data if r["technique"] == technique and r["peer"] == peer]
            if points:
                ax.scatter([r["ratio"] for r in points], [r["delta"] for r in points], s=40,
                           facecolors="none" if peer else colour, edgecolors=colour,
                           label=f"{technique}{' (peer)' if peer else ''}")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}x" if x in (2, 3, 5, 20, 30, 50) else ""))
    finish_ratio_plot(fig, ax, path, "compression (what is counted differs by technique; see the table)",
                      "CPU proxy (quarter-width VGG11-BN, CIFAR-10 subset)")


def finish_ratio_plot(fig, ax, path: Path, xlabel: str, title: str) -> None:
    """Axes of an accuracy-change-against-compression plot (log ratio, 'Nx' ticks, zero line); save it."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy change (points)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    data = rows()
    plot(data, RESULTS / "frontier_proxy.png")
    text = README.read_text()
    block = f"{START}\n{table(data)}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
        README.write_text(text)
    print(table(data))


if __name__ == "__main__":
    main()
