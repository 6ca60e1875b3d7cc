"""The README's full-scale section, from ``benchmarks/results/fullscale_gpu.json`` (``python -m benchmarks fullscale``
on one GPU): the table, the targets met or not, and the VGG19 frontier plot. A smoke run's JSON (CPU, tiny
scale) is never rendered as results."""

from __future__ import annotations

from pathlib import Path

from .common import RESULTS, read_result

SOURCE = RESULTS / "fullscale_gpu.json"
PLOT = RESULTS / "fullscale_frontier_gpu.png"
NOT_MEASURED = ("Not measured yet: this table needs one GPU for about nine minutes "
                "(`python -m benchmarks fullscale`, which writes `benchmarks/results/fullscale_gpu.json`; "
                "`python -m benchmarks report fullscale` renders it here). No GPU run of it exists in this repository.")
# (row, step-time bound against the dense baseline in the same run): the speed targets
STEP_BOUNDS = {"vgg19/prune_98": ("pruning with DNS", 1.1), "vgg19/prune_95": ("pruning", 1.05),
               "vgg19/qat_int8": ("QAT", 1.3), "vgg19/weight_sharing": ("centroid fine-tuning", 1.1),
               "vgg19/tucker_15": ("the 15x Tucker model", 1.0)}
PEERS = {"vgg19/prune_98": "vgg19/prune_98 ModelPruning", "vgg19/tucker": "vgg19/tucker TensorLy energy",
         "vgg19/qat_int8": "vgg19/qat_int8 torch.ao"}


def measured(data: dict | None) -> bool:
    return bool(data and not data.get("smoke") and any("accuracy" in r for r in data.get("rows", [])))


def section(draw=None) -> str:
    """The section's text; ``draw``: the report's frontier plot (``draw(data, path, title=...)``), or None
    for no PNG."""
    data = read_result(SOURCE)
    if not measured(data):
        return NOT_MEASURED
    if draw is not None:
        plot(data, PLOT, draw)
    return "\n\n".join([header(data), table(data), targets(data)])


def header(data: dict) -> str:
    plan = data["plan"]
    share = data.get("bf16_share_of_spec")
    lines = [f"Device: {data['device']}; batch {plan['batch_size']}, {plan['precision']}, compile={plan['compile']!r}, "
             f"baseline {plan['baseline_epochs']} epochs, recipes {plan['recipe_epochs']} epochs at most; the whole data set."]
    if data.get("ours_epoch_seconds") and data.get("plain_loop_epoch_seconds"):
        lines.append(f"Training speed: ours {data['ours_epoch_seconds']:.2f} s/epoch"
                     f" ({data.get('images_per_second', 0):,.0f} images/s"
                     + (f", {share:.1%} of the chip's bf16 rate" if share else "") + "), a plain PyTorch loop "
                     f"{data['plain_loop_epoch_seconds']:.2f} s/epoch: "
                     f"{data['ours_epoch_seconds'] / data['plain_loop_epoch_seconds']:.2f}x.")
    if data.get("skipped"):
        lines.append("Not run (time): " + ", ".join(s["name"] for s in data["skipped"]) + ".")
    failed = [r["name"] for r in data["rows"] if "error" in r]
    if failed:
        lines.append("Failed (error in the JSON): " + ", ".join(failed) + ".")
    return "\n".join(lines)


def _count(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def table(data: dict) -> str:
    lines = ["| recipe | peer | test acc | change (points) | file bytes | vs fp32 state dict | MACs | epoch s (vs dense) | train time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        if "accuracy" not in r:
            continue
        runtime = "ORT" if r.get("runtime") == "onnxruntime" else "torch"
        speed = f"{r['epoch_seconds']:.2f}" + (f" ({r['epoch_vs_baseline']:.2f}x)" if r.get("epoch_vs_baseline") else "")
        lines.append(f"| {r['name'].split('/', 1)[1].split(' ')[0]} | {r['peer'] or '-'} | {100 * r['accuracy']:.2f}% ({runtime}) "
                     f"| {r['delta_points']:+.2f} | {r['file_bytes'] / 2**20:.2f} MiB | {r['ratio']:.1f}x | {_count(r.get('macs'))} "
                     f"| {speed} | {r['train_seconds'] / 60:.1f} min ({r['epochs']} ep) |")
    return "\n".join(lines)


def targets(data: dict) -> str:
    rows = {r["name"]: r for r in data["rows"] if "accuracy" in r}
    base = rows.get("vgg19/baseline")
    lines = ["| target (full scale) | measured | met |", "| --- | --- | --- |"]

    def add(target: str, text: str, met: bool) -> None:
        lines.append(f"| {target} | {text} | {'yes' if met else 'no'} |")

    if base:
        add("baseline >= 90.5%", f"{100 * base['accuracy']:.2f}% ({base['epochs']} epochs)", base["accuracy"] >= 0.905)
    for name, target, ratio, points in (("vgg19/prune_98", "prune 98% within 0.3 points", None, -0.3),
                                        ("vgg19/prune_99", "prune 99% within 1 point", None, -1.0),
                                        ("vgg19/tucker", "Tucker >= 30x parameters within 1 point", 30, -1.0),
                                        ("vgg19/tucker_15", "Tucker 15x within 0.3 points", 15, -0.3),
                                        ("vgg19/qat_int8", "QAT int8 within 0.2 points", None, -0.2),
                                        ("vgg19/qat_w4a8", "QAT w4/a8 within 0.5 points", None, -0.5)):
        r = rows.get(name)
        if r is None or base is None:
            continue
        if ratio is not None:
            kept = base["params"] / r["params"]
            add(target, f"{kept:.1f}x fewer parameters, {r['delta_points']:+.2f} points",
                kept >= ratio * 0.97 and r["delta_points"] >= points)
        else:
            extra = f"{1 - r['nonzeros'] / r['params']:.1%} zero, " if name.startswith("vgg19/prune") else ""
            add(target, f"{extra}{r['delta_points']:+.2f} points", r["delta_points"] >= points)
    r = rows.get("vgg19/deep_compression")
    if r:
        add("Deep Compression file >= 100x within 0.5 points", f"{r['ratio']:.1f}x, {r['delta_points']:+.2f} points",
            r["ratio"] >= 100 and r["delta_points"] >= -0.5)
    for ours, peer in PEERS.items():
        if ours in rows and peer in rows:
            a, b = rows[ours], rows[peer]
            add(f"{ours.split('/')[1]} ahead of {b['peer']}", f"{100 * a['accuracy']:.2f}% vs {100 * b['accuracy']:.2f}%",
                a["accuracy"] > b["accuracy"])
    if data.get("ours_epoch_seconds"):
        add("training <= 0.6 s/epoch", f"{data['ours_epoch_seconds']:.2f} s", data["ours_epoch_seconds"] <= 0.6)
        if data.get("plain_loop_epoch_seconds"):
            ratio = data["ours_epoch_seconds"] / data["plain_loop_epoch_seconds"]
            add("<= 1.05x a plain PyTorch loop", f"{ratio:.2f}x", ratio <= 1.05)
    for name, (what, bound) in STEP_BOUNDS.items():
        r = rows.get(name)
        if r and r.get("epoch_vs_baseline"):
            add(f"{what}: epoch time <= {bound}x dense", f"{r['epoch_vs_baseline']:.2f}x", r["epoch_vs_baseline"] <= bound)
    return "\n".join(lines)


def plot(data: dict, path: Path, draw) -> None:
    """The CPU table's frontier plot, drawn by ``draw`` (the report's), over this run's rows."""
    runs = [{**r, "ratio_vs_fp32_state_dict": r["ratio"]} for r in data["rows"] if "accuracy" in r]
    draw({"runs": runs}, path, title=f"VGG19-BN / CIFAR-10 at full scale ({data['device']})")
