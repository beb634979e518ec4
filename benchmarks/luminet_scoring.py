"""luminet_scoring: what scoring every output (LumiNet's seed selector) costs a luminet worker.

Two measurements, each side by side in one process:

* ``tiny``: whole shards through the worker (``ShardRunner``: decode, relight, encode, score,
  write to a local folder) with a random tiny LumiNet on this device, scoring on and off in
  turn, ``--repeats`` shards each (each setting's relighter loaded once, before its timed
  shards; a shard's outputs are removed before the next): items/s of each and the ratio
  (on / off) per round, with its spread. The tiny model relights cheaply, so its ratio is the
  worst case of scoring's share.
* ``full``: the full-size model's parts (random weights, float32): one denoising step of the
  UNet and ControlNet for one seed, and the whole scoring of one 512 x 512 output (decode of
  its PNG bytes, resize, selector, in float32 as the worker does), each timed ``--repeats``
  times; scoring's share of one output = score / (steps x step + score). The VAE decode and
  the rest of relighting are left out of the denominator, so the share is overstated.

    python benchmarks/luminet_scoring.py --part tiny \
        --out benchmarks/results/luminet_scoring_tiny_cpu.json
    python benchmarks/luminet_scoring.py --part full \
        --out benchmarks/results/luminet_scoring_full_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import provenance
import torch
from common import header, sync
from PIL import Image
from worker_pipeline import make_inputs, plan_run

from relit_k8s.relighters import create
from relit_k8s.relighters.luminet.make import make_luminet, run_options


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def tiny(args, device: torch.device, tmp: Path) -> dict:
    from relit_k8s.worker import ShardRunner

    options = {**run_options(make_luminet(tmp / "luminet", "tiny")), "ddim_steps": args.steps}
    images, refs = make_inputs(tmp / "in", args.pairs, 256, "png")
    rates: dict[str, list[float]] = {"on": [], "off": []}
    runners = {}
    for setting in ("on", "off"):
        opts = {**options, "score": setting == "on"}
        manifest, _ = plan_run(str(images), str(refs), str(tmp / f"out-{setting}"),
                               args.iterations, opts, relighter="luminet")
        r = create("luminet", opts, str(device))
        runners[setting] = ShardRunner(manifest, relighter=r, device=str(device),
                                       report_interval=5.0)
    for round_ in range(args.repeats + 1):  # round 0 warms both up; not counted
        for setting in (("on", "off") if round_ % 2 else ("off", "on")):
            runner = runners[setting]
            for folder in (tmp / f"out-{setting}").iterdir():  # every output made again
                if folder.name != "_relit":
                    shutil.rmtree(folder)
            sync(device)
            start = time.perf_counter()
            report = runner.run(0)
            sync(device)
            seconds = time.perf_counter() - start
            if report.items_done != runner.manifest.items:
                raise SystemExit(f"score {setting}: wrote {report.items_done} of "
                                 f"{runner.manifest.items}")
            if round_:
                rates[setting].append(report.items_done / seconds)
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    return {"items_per_shard": runners["on"].manifest.items,
            "items_per_second_score_on": spread(rates["on"]),
            "items_per_second_score_off": spread(rates["off"]),
            "throughput_ratio_on_over_off": spread(ratios),
            "score_cost_percent_median": round(100 * (1 - statistics.median(ratios)), 2)}


def full(args, device: torch.device) -> dict:
    from relit_k8s.relighters.luminet.config import IntrinsicsConfig, LumiNetConfig
    from relit_k8s.relighters.luminet.intrinsics import IntrinsicsEncoder
    from relit_k8s.relighters.luminet.model import LumiNet
    from relit_k8s.relighters.luminet.selector import Selector

    def randomised(module: torch.nn.Module) -> torch.nn.Module:
        module.to_empty(device=device)
        with torch.no_grad():
            for tensor in module.state_dict().values():  # buffers too: no stray NaNs
                if tensor.is_floating_point():
                    tensor.normal_(0, 0.02)
        return module.eval().requires_grad_(False)

    cfg = LumiNetConfig()
    with torch.device("meta"):
        model = LumiNet(cfg)
        encoder = IntrinsicsEncoder(IntrinsicsConfig())
    model = randomised(model)
    selector = Selector(randomised(encoder), device)
    res, side = cfg.image_size, cfg.prior.hint_spatial
    with torch.inference_mode():
        hint = torch.rand(1, 6, res, res, device=device)
        prepared = model.lighting(hint, torch.randn(1, 77, cfg.unet.context_dim, device=device))
        x = torch.randn(1, cfg.unet.in_channels, side, side, device=device)
        t = torch.full((1,), 500, device=device)
        steps = []
        for _ in range(args.repeats + 1):
            sync(device)
            start = time.perf_counter()
            model.apply_model(x, t, None, None, prepared=prepared)
            sync(device)
            steps.append(time.perf_counter() - start)
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).resize(
        (res, res), Image.Resampling.BICUBIC)  # a PNG of a photo's size and entropy
    buf = io.BytesIO()
    smooth.save(buf, "PNG", compress_level=1)
    data = buf.getvalue()
    code = selector.reference_code(np.asarray(smooth, np.float32) / 255)
    scores = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        selector.score(data, "out.png", code)
        scores.append(time.perf_counter() - start)
    step, score = statistics.median(steps[1:]), statistics.median(scores[1:])
    return {"denoising_step_seconds_batch_1": spread(steps[1:]),
            "score_one_output_seconds": spread(scores[1:]),
            "steps": args.steps,
            "score_cost_percent_of_one_output": round(100 * score / (args.steps * step + score),
                                                      3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps [default: the original's]")
    ap.add_argument("--pairs", type=int, default=4, help="tiny: pairs in the shard")
    ap.add_argument("--iterations", type=int, default=8, help="tiny: seeds per pair")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    args.tiny = args.part == "tiny"
    result = {**header("luminet_scoring", args, device), "part": args.part,
              "model": f"LumiNet {'tiny' if args.tiny else 'full size'} (random)",
              "command": provenance.command("luminet_scoring.py"),
              "repeats": args.repeats, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        result |= tiny(args, device, Path(tmp)) if args.tiny else full(args, device)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
