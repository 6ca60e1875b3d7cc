"""Per-layer training time of dense vs Tucker-factorized VGG19 blocks, at the ranks of a trained plan.

    python -m benchmarks layer-profile PLAN_JSON BATCH STEPS

``PLAN_JSON`` is the output of ``python -m benchmarks decomposition-vgg19 train`` (its runs hold the
ranks chosen from trained weights for 30x and 15x). For each of the 16 convolutions, the block
conv -> BatchNorm -> ReLU is timed (forward + backward, bf16 autocast and channels_last on a GPU,
median of STEPS after 5 warm-ups) dense and factorized at those ranks, and at the ranks rounded up to
multiples of 32; then the whole models. Prints one line per layer; the GPU run's output is
``benchmarks/results/decomposition_vgg19_gpu_layers.txt``. It shows where a factorized network loses
time: on a GPU every block costs about the same whatever its FLOPs, so extra stages cost time.
"""

import json
import time

import torch
from torch import nn

from lightning_compress.methods.decomposition import apply_plan, plan_from_state
from lightning_compress.models import create_model

from .common import machine, parser


def main(argv: list[str] | None = None) -> None:
    ap = parser("layer-profile", __doc__)
    ap.add_argument("plan_json", help="a `decomposition-vgg19 train` results JSON (its 30x and 15x runs)")
    ap.add_argument("batch", type=int)
    ap.add_argument("steps", type=int, help="timed steps per block, after 5 warm-ups")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    with open(args.plan_json) as f:
        plans = {r["target_compression"]: plan_from_state(r["layers"]) for r in json.load(f)["runs"]}
    batch, steps = args.batch, args.steps
    model = create_model("vgg19_bn")
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(i[0].shape[1:])))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()

    def timed(block, shape):
        block = block.to(dev).to(memory_format=torch.channels_last)
        x = torch.randn(batch, *shape, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        ts = []
        for i in range(steps + 5):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            s = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                y = block(x)
            y.float().sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                ts.append(time.perf_counter() - s)
        return sorted(ts)[len(ts) // 2] * 1e3

    def round_plan(plan, m):
        out = []
        for d in plan:
            d = plan_from_state([d.to_dict()])[0]
            if d.method == "tucker":
                g = d.geometry
                d.ranks = (min(-(-d.ranks[0] // m) * m, g["out_features"]), min(-(-d.ranks[1] // m) * m, g["in_features"]))
            out.append(d)
        return out

    rows = {}
    variants = [("30x", plans[30.0]), ("15x", plans[15.0]), ("30x_r32", round_plan(plans[30.0], 32)),
                ("15x_r32", round_plan(plans[15.0], 32))]
    for label, plan in variants:
        m = create_model("vgg19_bn")
        apply_plan(m, plan, from_weights=False)
        d = create_model("vgg19_bn")
        for dec in plan:
            n = dec.name
            idx = int(n.split(".")[1])
            dense_block = nn.Sequential(d.features[idx], d.features[idx + 1], nn.ReLU())
            fact_block = nn.Sequential(m.features[idx], m.features[idx + 1], nn.ReLU())
            rows.setdefault(n, {"shape": shapes[n]})
            rows[n].setdefault("dense_ms", timed(dense_block, shapes[n]))
            rows[n][label] = (dec.ranks, round(timed(fact_block, shapes[n]), 3))
        rows.setdefault("model", {})
        rows["model"].setdefault("dense_ms", timed(create_model("vgg19_bn"), (3, 32, 32)))
        rows["model"][label] = timed(m, (3, 32, 32))
        rows["model"][label + "_params"] = sum(p.numel() for p in m.parameters())
    print("machine", json.dumps(machine()))
    for n, r in rows.items():
        print(n, json.dumps(r))


if __name__ == "__main__":
    main()
