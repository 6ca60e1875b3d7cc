"""The README table and the plots of ``benchmarks/results/recipes_cpu.json`` (``python -m benchmarks.recipes``).

    python -m benchmarks.recipes report

Writes the markdown table between the ``recipes`` markers of the README,
``benchmarks/results/recipes_frontier_cpu.png`` (VGG19: accuracy change against the file's compression
ratio, one colour per technique, peers hollow) and ``benchmarks/results/recipes_layers_cpu.png``
(per layer of the best VGG19 model and of the composed one: parameters kept, density, bits). No figure is typed in here.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SOURCE = RESULTS / "recipes_cpu.json"
README = Path(__file__).parents[1] / "README.md"
START, END = "<!-- recipes:start -->", "<!-- recipes:end -->"
# "Best" VGG19 model for the per-layer plot: the smallest file within this many points of the baseline.
BEST_WITHIN_POINTS = 1.0
# Factorized layers report their stages (features.3.reduce, .core, ...); the plot groups them back.
STAGES = ("reduce", "core", "expand", "vertical", "horizontal", "first", "second")
TECHNIQUES = {"prune": "pruning", "filter": "pruning", "qat": "quantization", "tucker": "decomposition",
              "cp": "decomposition", "sharing": "weight sharing", "deep_compression": "weight sharing",
              "composed": "composed", "baseline": "baseline"}
COLOURS = {"baseline": "black", "pruning": "tab:blue", "quantization": "tab:orange", "decomposition": "tab:green",
           "weight sharing": "tab:purple", "composed": "tab:red"}


def load(path: Path = SOURCE) -> dict:
    return json.loads(path.read_text())


def technique(row: dict) -> str:
    recipe = row["name"].split("/", 1)[1].split(" ")[0]
    return next(label for key, label in TECHNIQUES.items() if key in recipe)


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(data: dict) -> str:
    lines = ["| model | recipe | test acc | change (points) | params | non-zeros | bits/weight | file | file bytes "
             "| vs fp32 state dict | MACs | CPU latency, batch 1 | train time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["runs"]:
        model, recipe = r["name"].split("/", 1)
        if r.get("peer"):
            recipe = f"{recipe.split(' ')[0]}, peer: {r['peer']}" + (f" ({r['peer_note']})" if r.get("peer_note") else "")
        latency = "-"
        if r.get("latency_ms") is not None:
            latency = f"{r['latency_ms']:.2f} ms" + (f" ({r['speedup']:.2f}x)" if r.get("speedup") else "")
        bits = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") is not None else "8 (int8)"
        runtime = "ORT" if r["runtime"] == "onnxruntime" else "torch"
        lines.append(
            f"| {model} | {recipe} | {100 * r['accuracy']:.2f}% ({runtime}) | {r['delta_points']:+.2f} "
            f"| {_count(r.get('params'))} | {_count(r.get('nonzeros'))} | {bits} | {r['file_format']} "
            f"| {_bytes(r['file_bytes'])} | {r['ratio_vs_fp32_state_dict']:.1f}x | {_count(r.get('macs'))} "
            f"| {latency} | {r['train_seconds'] / 60:.1f} min ({r['epochs']} ep) |"
        )
    return "\n".join(lines)


def _row(data: dict, name: str) -> dict | None:
    return next((r for r in data["runs"] if r["name"] == name), None)


def targets(data: dict) -> str:
    """The issue's VGG19 targets (stated for the full-scale GPU runs) against what this scale measured."""
    lines = ["| target (full scale) | measured here (CPU-proxy scale) | met here |", "| --- | --- | --- |"]
    base = _row(data, "vgg19/baseline")

    def add(target: str, row: dict | None, measured: str, met: bool) -> None:
        if row is not None:
            lines.append(f"| {target} | {measured} | {'yes' if met else 'no'} |")

    if base:
        add("VGG19 baseline >= 90.5%", base, f"{100 * base['accuracy']:.2f}% ({base['epochs']} epochs)",
            base["accuracy"] >= 0.905)
    r = _row(data, "vgg19/prune_98")
    if r:
        sparsity = 1 - r["nonzeros"] / r["params"]
        add("pruning 98% within 0.3 points", r, f"{sparsity:.1%} of layer parameters zero (biases included), {r['delta_points']:+.2f} points",
            r["delta_points"] >= -0.3)
    r = _row(data, "vgg19/tucker")
    if r and base:
        ratio = base["params"] / r["params"]
        add("Tucker >= 30x within 1 point", r, f"{ratio:.1f}x fewer parameters, {r['delta_points']:+.2f} points",
            ratio >= 30 and r["delta_points"] >= -1)
        if r.get("speedup"):
            add("Tucker no slower than dense", r, f"{r['speedup']:.2f}x the dense model's speed (CPU, batch 1)",
                r["speedup"] >= 1)
    r = _row(data, "vgg19/qat_int8")
    if r:
        add("QAT int8 within 0.2 points", r, f"{r['delta_points']:+.2f} points (int8 ONNX in ONNX Runtime)",
            r["delta_points"] >= -0.2)
    r = _row(data, "vgg19/deep_compression")
    if r:
        add("Deep Compression file >= 100x within 0.5 points", r,
            f"{r['ratio_vs_fp32_state_dict']:.1f}x, {r['delta_points']:+.2f} points",
            r["ratio_vs_fp32_state_dict"] >= 100 and r["delta_points"] >= -0.5)
    return "\n".join(lines)


def frontier_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .frontier import finish_ratio_plot

    rows = [r for r in data["runs"] if r["name"].startswith("vgg19/")]
    fig, ax = plt.subplots(figsize=(8, 5))
    seen, placed = set(), []
    for r in rows:
        kind = technique(r)
        colour = COLOURS[kind]
        label = f"{kind}{' (peer)' if r.get('peer') else ''}"
        ax.scatter(r["ratio_vs_fp32_state_dict"], r["delta_points"], s=50, edgecolors=colour,
                   facecolors="none" if r.get("peer") else colour, label=None if label in seen else label)
        seen.add(label)
        name = r["name"].split("/", 1)[1]
        point = (r["ratio_vs_fp32_state_dict"], r["delta_points"])
        # labels of points that nearly coincide (the QAT rows) go one under the other
        stacked = sum(abs(x / point[0] - 1) < 0.15 and abs(y - point[1]) < 1.5 for x, y in placed)
        placed.append(point)
        ax.annotate(name, point, fontsize=7,
                    xytext=(4, 3 - 9 * stacked), textcoords="offset points")
    finish_ratio_plot(fig, ax, path, "file on disk vs the baseline's fp32 state dict",
                      "VGG19-BN recipes at CPU-proxy scale (quarter width, 10k CIFAR-10 images)")
    plt.close(fig)


def best_vgg19(data: dict) -> dict:
    """The smallest VGG19 file (ours, not a peer) within ``BEST_WITHIN_POINTS`` of the baseline; failing
    that, the one with the least accuracy lost per doubling of the ratio."""
    import math

    rows = [r for r in data["runs"] if r["name"].startswith("vgg19/") and not r.get("peer")
            and not r["name"].endswith("/baseline") and r.get("layers")]
    close = [r for r in rows if r["delta_points"] >= -BEST_WITHIN_POINTS]
    if close:
        return max(close, key=lambda r: r["ratio_vs_fp32_state_dict"])
    return max(rows, key=lambda r: r["delta_points"] / max(math.log2(r["ratio_vs_fp32_state_dict"]), 1e-9))


def _grouped(layers: list[dict], names: set[str]) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for layer in layers:
        name = layer["name"]
        if name not in names and name.rsplit(".", 1)[-1] in STAGES:
            name = name.rsplit(".", 1)[0]
        g = groups.setdefault(name, {"params": 0, "nonzeros": 0, "bit_sum": 0.0, "stages": []})
        g["params"] += layer["params"]
        g["nonzeros"] += layer["nonzeros"]
        g["bit_sum"] += layer["bits"] * layer["params"]
        g["stages"].append(layer)
    return groups


def _ranks(group: dict) -> str:
    """Tucker / CP / SVD ranks read off the stage shapes: the channels between the stages."""
    stages = group["stages"]
    if len(stages) == 1:
        return ""
    return "r=" + ",".join(str(s["shape"][0]) for s in stages[:-1])


def layers_plot(data: dict, path: Path) -> list[dict]:
    """Per layer, for the best VGG19 model (:func:`best_vgg19`) and the composed one (the recipe that
    sets ranks, sparsity and bits at once): parameters kept against the dense layer (Tucker / CP ranks
    written over the bar), fraction of weights non-zero, bits per weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in data["runs"] if r["name"] == "vgg19/baseline")
    chosen = [best_vgg19(data)]
    composed = next((r for r in data["runs"] if r["name"] == "vgg19/composed" and r.get("layers")), None)
    if composed is not None and composed is not chosen[0]:
        chosen.append(composed)
    base_params = {layer["name"]: layer["params"] for layer in base["layers"]}
    fig, axes = plt.subplots(3, len(chosen), figsize=(7 * len(chosen), 7.5), sharex="col", squeeze=False)
    for column, row in enumerate(chosen):
        groups = _grouped(row["layers"], set(base_params))
        names = [n for n in base_params if n in groups]
        x = list(range(len(names)))
        kept = [groups[n]["params"] / base_params[n] for n in names]
        top, middle, bottom = axes[:, column]
        top.bar(x, kept, color="tab:green")
        top.set_yscale("log")
        for i, n in enumerate(names):
            if _ranks(groups[n]):
                top.annotate(_ranks(groups[n]), (i, kept[i]), fontsize=6, ha="center", xytext=(0, 2),
                             textcoords="offset points")
        middle.bar(x, [groups[n]["nonzeros"] / groups[n]["params"] for n in names], color="tab:blue")
        middle.set_ylim(0, 1.05)
        bottom.bar(x, [groups[n]["bit_sum"] / groups[n]["params"] for n in names], color="tab:orange")
        bottom.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        top.set_title(f"{row['name']}: {row['ratio_vs_fp32_state_dict']:.1f}x smaller file, "
                      f"{row['delta_points']:+.2f} points", fontsize=9)
        if column == 0:
            top.set_ylabel("params kept\n(vs the dense layer)")
            middle.set_ylabel("non-zero fraction")
            bottom.set_ylabel("bits per weight")
    fig.suptitle("VGG19-BN per layer (CPU-proxy scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return chosen


def update_readme(text: str, data: dict) -> str:
    block = f"{START}\n{table(data)}\n\n{targets(data)}\n{END}"
    if START not in text or END not in text:
        raise ValueError(f"the README has no {START} ... {END} markers")
    return text[: text.index(START)] + block + text[text.index(END) + len(END):]


def main() -> None:
    data = load()
    frontier_plot(data, RESULTS / "recipes_frontier_cpu.png")
    shown = layers_plot(data, RESULTS / "recipes_layers_cpu.png")
    README.write_text(update_readme(README.read_text(), data))
    print(table(data))
    print("per-layer plot:", ", ".join(r["name"] for r in shown))


if __name__ == "__main__":
    main()
