"""Every generated table of the README and the plots beside them, from the results JSONs; no figure
is typed in here.

    python -m benchmarks report                   # every section
    python -m benchmarks report recipes           # one section (frontier, recipes)
    python -m benchmarks report --no-plots        # the README only

Each section is rewritten between its ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers:

* ``frontier``: the CPU proxy runs of ``pruning_accuracy*.json``, ``deep_compression_proxy.json``,
  ``decomposition_proxy.json`` and ``quantization_accuracy.json`` in one table, and
  ``benchmarks/results/frontier_proxy.png`` (accuracy change against compression, one colour per
  technique, peers hollow). Each technique compresses something different, so the table names what
  its ratio counts: non-zero weights (pruning), parameters (decomposition), bits per weight
  (quantization) or bytes of the file (Deep Compression).
* ``recipes``: the table of ``recipes_cpu.json`` (``python -m benchmarks recipes``) and the issue's
  targets against it; ``benchmarks/results/recipes_frontier_cpu.png`` (VGG19: accuracy change against
  the file's compression ratio) and ``benchmarks/results/recipes_layers_cpu.png`` (per layer of the
  best VGG19 model and of the composed one: parameters kept, density, bits).
* ``fullscale``: the full-scale GPU table of ``fullscale_gpu.json`` (``python -m benchmarks.fullscale``) and
  its targets, with ``benchmarks/results/fullscale_frontier_gpu.png`` (:mod:`benchmarks.common_report_fullscale`).
"""

from __future__ import annotations

import math
from pathlib import Path

from .common import README, RESULTS, parser, read_result

RECIPES_SOURCE = RESULTS / "recipes_cpu.json"
SECTIONS = ("frontier", "recipes", "fullscale")  # the README markers this module owns
BITS = {"int8": 8, "w4a8": 4, "fixed_point_w8a8": 8, "binary": 1}
# "Best" VGG19 model for the per-layer plot: the smallest file within this many points of the baseline.
BEST_WITHIN_POINTS = 1.0
# Factorized layers report their stages (features.3.reduce, .core, ...); the plot groups them back.
STAGES = ("reduce", "core", "expand", "vertical", "horizontal", "first", "second")
TECHNIQUES = {"prune": "pruning", "filter": "pruning", "qat": "quantization", "tucker": "decomposition",
              "cp": "decomposition", "tt": "decomposition", "flattened": "decomposition", "slimming": "pruning",
              "sharing": "weight sharing", "deep_compression": "weight sharing",
              "composed": "composed", "baseline": "baseline"}
COLOURS = {"baseline": "black", "pruning": "tab:blue", "quantization": "tab:orange", "decomposition": "tab:green",
           "weight sharing": "tab:purple", "composed": "tab:red"}


# ------------------------------------------------------------------------------------- the writer


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def update_readme(text: str, bodies: dict[str, str]) -> str:
    """``text`` with each section's body between its markers (one newline either side of the body)."""
    for name, body in bodies.items():
        start, end = markers(name)
        if start not in text or end not in text:
            raise ValueError(f"the README has no {start} ... {end} markers")
        text = text[: text.index(start)] + f"{start}\n{body}\n{end}" + text[text.index(end) + len(end):]
    return text


def sections(names: list[str], plots: bool) -> dict[str, str]:
    """The body of each named section; with ``plots``, its PNGs are written too."""
    out = {}
    if "frontier" in names:
        rows = frontier_rows()
        out["frontier"] = frontier_table(rows)
        if plots:
            frontier_plot(rows, RESULTS / "frontier_proxy.png")
    if "recipes" in names:
        data = read_result(RECIPES_SOURCE)
        if data is None:
            print(f"{RECIPES_SOURCE.name} not written yet (python -m benchmarks recipes run): recipes skipped")
        else:
            out["recipes"] = f"{recipes_table(data)}\n\n{targets_table(data)}"
            if plots:
                recipes_plot(data, RESULTS / "recipes_frontier_cpu.png")
                shown = recipes_layers_plot(data, RESULTS / "recipes_layers_cpu.png")
                print("per-layer plot:", ", ".join(r["name"] for r in shown))
    if "fullscale" in names:
        from .common_report_fullscale import section

        out["fullscale"] = section(recipes_plot if plots else None)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = parser("report", __doc__)
    ap.add_argument("sections", nargs="*", metavar="SECTION", help=f"{' / '.join(SECTIONS)} (default: all)")
    ap.add_argument("--no-plots", action="store_true", help="write the README tables only, not the PNGs")
    args = ap.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:  # checked here: argparse rejects an empty list against `choices` on Python 3.11
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
    bodies = sections(args.sections or list(SECTIONS), plots=not args.no_plots)
    README.write_text(update_readme(README.read_text(), bodies))
    for body in bodies.values():
        print(body, end="\n\n")


# ----------------------------------------------------------------------------------- the frontier


def frontier_rows() -> list[dict]:
    """One row per proxy run of every technique, from the results JSONs present."""
    out = []
    for name in ("pruning_accuracy.json", "pruning_accuracy_seed1.json"):
        data = read_result(name)
        for r in (data or {}).get("results", []):
            peer = r["method"] == "lightning_model_pruning"
            out.append({"technique": "pruning", "config": f"{r['method']} {r['sparsity']:.0%} (seed {r['seed']})",
                        "peer": peer, "ratio": 1 / (1 - r["sparsity"]), "counts": "non-zero weights",
                        "delta": r["delta_points"], "source": name})
    data = read_result("deep_compression_proxy.json")
    for r in (data or {}).get("results", []):
        out.append({"technique": "deep compression", "config": f"{r['sparsity']:.0%} + {data['bits']} bits ({r['centroid_gradient']})",
                    "peer": False, "ratio": r["ratio_vs_fp32_state_dict"], "counts": "file bytes",
                    "delta": r["delta_points"], "source": "deep_compression_proxy.json"})
    data = read_result("decomposition_proxy.json")
    for r in (data or {}).get("runs", []):
        out.append({"technique": "decomposition", "config": r["method"], "peer": r["method"].startswith("peer"),
                    "ratio": r["compression"], "counts": "parameters", "delta": r["delta_points"],
                    "source": "decomposition_proxy.json"})
    data = read_result("quantization_accuracy.json")
    for r in (data or {}).get("runs", []):
        config, peer = r["config"], r["config"].startswith("peer")
        bits = 8 if peer else next((b for key, b in BITS.items() if key in config), 8)  # the peer is int8 PTQ
        out.append({"technique": "quantization", "config": config, "peer": peer, "ratio": 32 / bits,
                    "counts": "bits per weight", "delta": r["delta_points"], "source": "quantization_accuracy.json"})
    return out


def frontier_table(data: list[dict]) -> str:
    lines = ["| technique | configuration | compression | counted as | accuracy change (points) | from |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in data:
        config = r["config"].replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| {r['technique']} | {config}{' (peer)' if r['peer'] and 'peer' not in r['config'] else ''} "
                     f"| {r['ratio']:.1f}x | {r['counts']} | {r['delta']:+.2f} | `{r['source']}` |")
    return "\n".join(lines)


def frontier_plot(data: list[dict], path: Path) -> None:
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
    plt.close(fig)


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


# ------------------------------------------------------------------------------------ the recipes


def _technique(row: dict) -> str:
    recipe = row["name"].split("/", 1)[1].split(" ")[0]
    return next(label for key, label in TECHNIQUES.items() if key in recipe)


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def recipes_table(data: dict) -> str:
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
            latency += " (earlier run)" if r.get("latency_run") else ""
        bits = f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") is not None else "8 (int8)"
        runtime = "ORT" if r["runtime"] == "onnxruntime" else "torch"
        if r.get("accuracy_int8_exact") is not None and r["accuracy_int8_exact"] != r["accuracy"]:
            runtime += f"; {100 * r['accuracy_int8_exact']:.2f}% exact int8"  # this CPU's kernels saturate
        lines.append(
            f"| {model} | {recipe} | {100 * r['accuracy']:.2f}% ({runtime}) | {r['delta_points']:+.2f} "
            f"| {_count(r.get('params'))} | {_count(r.get('nonzeros'))} | {bits} | {r['file_format']} "
            f"| {_bytes(r['file_bytes'])} | {r['ratio_vs_fp32_state_dict']:.1f}x | {_count(r.get('macs'))} "
            f"| {latency} | {r['train_seconds'] / 60:.1f} min ({r['epochs']} ep) |"
        )
    return "\n".join(lines)


def _row(data: dict, name: str) -> dict | None:
    return next((r for r in data["runs"] if r["name"] == name), None)


def targets_table(data: dict) -> str:
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
        measured = f"{r['delta_points']:+.2f} points (int8 ONNX in ONNX Runtime)"
        if r.get("accuracy_int8_exact") is not None and base:
            exact = 100 * (r["accuracy_int8_exact"] - base["accuracy"])
            measured += f"; {exact:+.2f} with its exact int8 arithmetic (no 16-bit saturation)"
        add("QAT int8 within 0.2 points", r, measured, r["delta_points"] >= -0.2)
    r = _row(data, "vgg19/deep_compression")
    if r:
        add("Deep Compression file >= 100x within 0.5 points", r,
            f"{r['ratio_vs_fp32_state_dict']:.1f}x, {r['delta_points']:+.2f} points",
            r["ratio_vs_fp32_state_dict"] >= 100 and r["delta_points"] >= -0.5)
    return "\n".join(lines)


def recipes_plot(data: dict, path: Path, title: str = "VGG19-BN recipes at CPU-proxy scale (quarter width, 10k CIFAR-10 images)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["runs"] if r["name"].startswith("vgg19/")]
    fig, ax = plt.subplots(figsize=(8, 5))
    seen, placed = set(), []
    for r in rows:
        kind = _technique(r)
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
    finish_ratio_plot(fig, ax, path, "file on disk vs the baseline's fp32 state dict", title)
    plt.close(fig)


def best_vgg19(data: dict) -> dict:
    """The smallest VGG19 file (ours, not a peer) within ``BEST_WITHIN_POINTS`` of the baseline; failing
    that, the one with the least accuracy lost per doubling of the ratio."""
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


def recipes_layers_plot(data: dict, path: Path) -> list[dict]:
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


if __name__ == "__main__":
    main()
