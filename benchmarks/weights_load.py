"""Weights cache: a new worker's model load from the model files against from the cache.

Each load runs in a new process, as a new worker does: first one that reads the model files and
writes the weights cache (the first worker of a node), then, side by side, one that reads the
files again with ``cache_weights=false`` (their pages are in the OS cache by then, as on a node
that ran a worker before) and one that loads the cache. Printed: each load's phases
(``load_timings``), the seconds to a loaded relighter, and the ratios (of the load phases'
sum, and of the whole process); also the bytes read (the model's weight files against the
cache file). Where a phase's work lands differs (a checkpoint read lazily is cast to bf16 in
``to_device``; the cache is read whole in ``read_weights``), so compare the sums.

Usage: python benchmarks/weights_load.py --model DIR [--relighter diffusion|luminet]
         [--device cuda] [--out results.json]
       python benchmarks/weights_load.py --tiny    (a tiny random model on the CPU: CI's check)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch


def options_for(relighter: str, model: Path, cache_dir: Path, cached: bool) -> dict:
    """bf16 (the weights cache keeps 16-bit weights only), a fixed batch (no probe)."""
    common = {"dtype": "bf16", "batch_size": 8, "cache_dir": str(cache_dir),
              "cache_weights": cached}
    if relighter == "diffusion":
        return {"model": str(model), **common}
    import yaml

    from relit_k8s.relighters.luminet.config import LumiNetConfig

    config = model / "config.yaml"
    size = LumiNetConfig.from_yaml(yaml.safe_load(config.read_text())).image_size
    return {"checkpoint": str(model / "LumiNet.ckpt"), "config": str(config),
            "resolution": size, **common}


def child(relighter: str, options: dict, device: str) -> None:
    """One load in this process: print its phases as JSON."""
    started = time.monotonic()
    from relit_k8s.relighters import create

    r = create(relighter, options, device)
    print(json.dumps({"seconds": round(time.monotonic() - started, 3),
                      "load_seconds": round(sum(r.load_timings.values()), 3),
                      "phases": r.load_timings,
                      "weights_from": r.weights_from}))


def load_in_a_new_process(relighter: str, options: dict, device: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", relighter, json.dumps(options),
                           device], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the load failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def weight_bytes(relighter: str, model: Path) -> int:
    if relighter == "luminet":
        return (model / "LumiNet.ckpt").stat().st_size
    return sum(p.stat().st_size for sub in ("unet", "controlnet", "vae")
               for p in (model / sub).glob("*.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], json.loads(argv[2]), argv[3])
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (diffusion) or the folder of LumiNet.ckpt "
                    "and config.yaml (luminet), as relit-k8s make-model writes them")
    ap.add_argument("--relighter", choices=["diffusion", "luminet"], default="diffusion")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model, made here")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            if not args.tiny:
                ap.error("--model DIR, or --tiny")
            from relit_k8s.modelkit import make_model

            model = Path(make_model(Path(tmp) / "tiny", "tiny"))
            args.relighter = "diffusion"
        cache = Path(tmp) / "cache"
        first = load_in_a_new_process(args.relighter, options_for(args.relighter, model, cache,
                                                                  True), args.device)
        files = load_in_a_new_process(args.relighter, options_for(args.relighter, model, cache,
                                                                  False), args.device)
        cached = load_in_a_new_process(args.relighter, options_for(args.relighter, model, cache,
                                                                   True), args.device)
        if cached["weights_from"] != "cache" or "cache" in (first["weights_from"],
                                                             files["weights_from"]):
            raise SystemExit("the loads did not read what they should: "
                             f"{first['weights_from']}, {files['weights_from']}, "
                             f"{cached['weights_from']} (expected files, files, cache)")
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*.safetensors"))
        result = {
            "benchmark": "weights_load",
            "date": datetime.now(UTC).date().isoformat(),
            "command": "python " + " ".join(["benchmarks/weights_load.py", *argv]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "relighter": args.relighter,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else args.device,
            "model": str(model) if args.model else "tiny (random)",
            "first_worker": first,
            "from_files": files,
            "from_cache": cached,
            "model_weight_bytes": weight_bytes(args.relighter, model),
            "cache_bytes": cache_bytes,
            "load_ratio": round(files["load_seconds"] / max(cached["load_seconds"], 1e-6), 2),
            "process_ratio": round(files["seconds"] / max(cached["seconds"], 1e-6), 2),
        }
    for name in ("first_worker", "from_files", "from_cache"):
        run = result[name]
        print(f"{name:13s} {run['seconds']:7.2f} s in the process ({run['weights_from']}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in run["phases"].items()))
    print(f"weights read: {result['model_weight_bytes'] / 1e9:.2f} GB of model files, "
          f"{cache_bytes / 1e9:.2f} GB of cache")
    print(f"from the files / from the cache: the load phases {result['load_ratio']}x, the "
          f"whole process {result['process_ratio']}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
