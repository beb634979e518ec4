"""worker_pipeline: does the worker keep the GPU busy? End-to-end against relighter-only.

Side by side in one process, on one device, with one loaded ``diffusion`` relighter:

* relighter only: ``relight`` on tensors decoded beforehand, already on the device, and the
  result copied back to the host (measured before and after the end-to-end runs; the faster of
  the two is the bar);
* end to end: a real shard (``ShardRunner.run``): read and decode the inputs, relight, encode
  the outputs (in the inputs' format, JPEG here) and write them, to a local folder and to a
  local S3 endpoint (moto's server in its own process on 127.0.0.1, when moto is installed);

and prints the samples/s of each and the ratio end-to-end / relighter-only (the target is 0.9
or more). With ``--cold-start`` it also starts ``relit-k8s worker`` as a new process on a
one-pair plan and times worker start -> first output file: with ``compile=true`` and the
inductor cache already on disk (``TORCHINDUCTOR_CACHE_DIR``), that is a pod on a warm node.

Inputs: the bundled example photos, scaled to 1024 pixels wide (JPEG), relit under one of the
bundled HDR maps; outputs keep the inputs' size, as in production.

    python benchmarks/worker_pipeline.py --tiny                       # CPU smoke test (CI)
    python benchmarks/worker_pipeline.py --model /tmp/sd21 --compile --cold-start \\
        --out benchmarks/results/worker_pipeline_h200.json           # on a GPU
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import device_for, header, parser, sync
from PIL import Image

from relit_k8s.relighters.diffusion import AUTO_BATCH_CAP

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def make_inputs(folder: Path, pairs: int, width: int, fmt: str = "jpg") -> tuple[Path, Path]:
    """``pairs`` photos ``width`` wide (JPEG or PNG) and one HDR reference: ``pairs`` pairs."""
    images, refs = folder / "images", folder / "refs"
    images.mkdir(parents=True)
    refs.mkdir()
    photos = sorted(p for p in (EXAMPLES / "images").iterdir() if p.suffix in (".png", ".jpg"))
    for i in range(pairs):
        im = Image.open(photos[i % len(photos)]).convert("RGB")
        if i // len(photos) % 2:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.resize((width, round(width * im.height / im.width)), Image.Resampling.BICUBIC)
        im.save(images / f"photo{i:03d}.{fmt}", **({"quality": 95} if fmt == "jpg" else {}))
    shutil.copy(EXAMPLES / "refs" / "sky_sun.hdr", refs / "sky_sun.hdr")
    return images, refs


def plan_run(images: str, refs: str, output: str, iterations: int, options: dict,
             relighter: str = "diffusion"):
    from relit_k8s.planner import PlanSettings, list_sources, plan, write_manifest

    s = PlanSettings(input=images, refs=refs, output=output, iterations=iterations, shards=1,
                     relighter=relighter, options=options)
    return write_manifest(plan(s, *list_sources(s)[:2]))


def decoded_pairs(r, manifest, device) -> list:
    """(image, reference, seeds) of each pair of the shard, decoded by the worker's own code
    and already on the device."""
    from relit_k8s.inputs import InputLoader
    from relit_k8s.manifest import pair_seeds

    loader = InputLoader(manifest, r.reference_resolution)
    ref_key = manifest.references[0]
    ref = loader.reference(ref_key).to(device)
    return [(loader.image(key).to(device), ref,
             pair_seeds(manifest.base_seed, key, ref_key, manifest.iterations))
            for key in manifest.images]


def relighter_only(r, pairs: list, device) -> float:
    """Samples/s of ``relight`` alone, on pairs decoded beforehand (:func:`decoded_pairs`)."""
    sync(device)
    start = time.perf_counter()
    n = 0
    for image, ref, seeds in pairs:
        for i in range(0, len(seeds), r.batch_size):
            batch = seeds[i:i + r.batch_size]
            r.relight(image, ref, batch).float().cpu()  # the worker also brings results back
            n += len(batch)
    sync(device)
    return n / (time.perf_counter() - start)


def end_to_end(r, manifest, device) -> tuple[float, dict]:
    """Samples/s of a whole shard through ShardRunner (decode, relight, encode, write), and its
    timings with ``cpu_cores``: the process's CPU seconds (every thread) per second of the run,
    what one such worker needs of a pod's CPU request."""
    from relit_k8s.worker import ShardRunner

    runner = ShardRunner(manifest, relighter=r, device=str(device), report_interval=5.0)
    start, cpu = time.perf_counter(), time.process_time()
    report = runner.run(0)
    seconds = time.perf_counter() - start
    cores = (time.process_time() - cpu) / seconds
    if report.items_done != manifest.items:
        raise SystemExit(f"end to end wrote {report.items_done} of {manifest.items}: "
                         f"{report.failures[:3]}")
    return report.items_done / seconds, {**report.timings, "cpu_cores": round(cores, 2)}


def cold_start(images: Path, refs: Path, output: Path, iterations: int, options: dict,
               device: torch.device) -> dict:
    """A new ``relit-k8s worker`` process on a one-pair plan: seconds to its first output."""
    one = images.parent / "one-image"
    one.mkdir()
    first_image = sorted(images.iterdir())[0]
    shutil.copy(first_image, one / first_image.name)
    manifest, uri = plan_run(str(one), str(refs), str(output), iterations, options)
    start = time.perf_counter()
    log = output.parent / "cold-start.log"
    proc = subprocess.Popen([sys.executable, "-m", "relit_k8s", "worker", "--manifest", uri,
                             "--index", "0", "--device", str(device), "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    first = None
    while proc.poll() is None:
        if first is None and any(p.is_file() and "_relit" not in p.parts  # an output
                                 and not p.name.startswith(".") for p in output.rglob("*")):
            first = time.perf_counter() - start
        time.sleep(0.05)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cold-start worker exited {proc.returncode}: {log.read_text()}")
    phases = None
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"event": "start"' in line:
            phases = json.loads(line).get("model_load_phases")
    from relit_k8s.run import Run

    report = Run.of(manifest).read_report(0)
    return {"first_output_seconds": round(first if first is not None else total, 2),
            "worker_seconds": round(total, 2), "samples": manifest.items,
            "report_timings": report.timings, "model_load_phases": phases}


def in_process(args, options: dict, images: Path, refs: Path, tmp: Path, device,
               result: dict) -> int:
    """Relighter-only and end-to-end runs with one loaded relighter; returns the iterations."""
    from relit_k8s.relighters import create

    started = time.perf_counter()
    r = create(args.relighter, options, device)
    result["batch_size"] = r.batch_size
    iterations = args.iterations or r.batch_size
    result["iterations"] = iterations
    warm_image = torch.rand(3, 64, 96).to(device)
    warm_ref = torch.rand(3, 32, 64).to(device)
    r.relight(warm_image, warm_ref, list(range(min(iterations, r.batch_size))))  # compile
    sync(device)
    result["relighter_ready_seconds"] = round(time.perf_counter() - started, 2)

    local, _ = plan_run(str(images), str(refs), str(tmp / "out-local"), iterations, options,
                        args.relighter)
    pairs = decoded_pairs(r, local, device)
    only = relighter_only(r, pairs, device)
    rate, timings = end_to_end(r, local, device)
    result["local_samples_per_s"] = round(rate, 4)
    result["local_timings"] = timings
    print(f"relighter only {only:.3f} samples/s; end to end, local disk {rate:.3f} "
          f"samples/s: {rate / only:.3f}, using {timings['cpu_cores']} CPU cores", flush=True)

    if not args.no_s3:
        s3 = s3_run(r, images, refs, iterations, options, device, args.relighter)
        if s3:
            rate_s3, timings_s3 = s3
            result["s3_samples_per_s"] = round(rate_s3, 4)
            result["s3_timings"] = timings_s3
            print(f"end to end, local S3 endpoint {rate_s3:.3f} samples/s: "
                  f"{rate_s3 / only:.3f}", flush=True)
        else:
            result["s3_samples_per_s"] = None
            print("moto is not installed: the S3 run was skipped", flush=True)
    again = relighter_only(r, pairs, device)  # before and after: the faster is the bar
    result["relighter_only_samples_per_s_runs"] = [round(only, 4), round(again, 4)]
    best = max(only, again)
    result["relighter_only_samples_per_s"] = round(best, 4)
    for where in ("local", "s3"):
        if result.get(f"{where}_samples_per_s"):
            result[f"{where}_ratio"] = round(result[f"{where}_samples_per_s"] / best, 3)
    print(f"relighter only, again: {again:.3f} samples/s; ratios against the faster: "
          f"local {result['local_ratio']}, S3 {result.get('s3_ratio')}", flush=True)

    del r
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return iterations


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--iterations", type=int, help="seeds per pair [default: the relighter's "
                    "batch size, so each pair is one batch]")
    ap.add_argument("--width", type=int, default=1024, help="input width, pixels")
    ap.add_argument("--compile", action="store_true", help="relighter option compile=true")
    ap.add_argument("--aot", action="store_true",
                    help="relighter option compile=aot: the in-process runs compile the "
                    "packages into the cache folder (a cold node), --cold-start's new worker "
                    "loads them (a warm node)")
    ap.add_argument("--cold-start", action="store_true",
                    help="also time a new worker process to its first output")
    ap.add_argument("--only-cold-start", action="store_true",
                    help="only the new worker process (implies --cold-start)")
    ap.add_argument("--no-s3", action="store_true", help="skip the local S3 endpoint")
    ap.add_argument("--relighter", choices=("diffusion", "sh"), default="diffusion",
                    help="sh: the built-in relighter (thousands of images/s on a GPU: its end "
                    "to end rate is all pipeline)")
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg",
                    help="the inputs' format, so the outputs' too")
    args = ap.parse_args()
    if args.relighter == "sh" and (args.compile or args.aot or args.cold_start
                                   or args.only_cold_start):
        ap.error("--compile and --cold-start measure the diffusion relighter")
    device = device_for(args)
    res = 32 if args.tiny else 512
    if args.tiny:
        args.steps, args.pairs, args.width = 3, 2, 256
    result = {**header("worker_pipeline", args, device), "relighter": args.relighter,
              "resolution": res, "pairs": args.pairs,
              "input": f"{args.format.upper()} {args.width} px wide",
              "compile": "aot" if args.aot else args.compile}
    if args.relighter == "sh":
        result["model"] = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        options = dict(o.split("=", 1) for o in args.option)
        if args.relighter == "diffusion":
            model = args.model
            if model is None:
                from relit_k8s.modelkit import make_model

                model = str(make_model(tmp / "model", "tiny" if args.tiny else "sd21",
                                       device=str(device)))
            options |= {"model": model, "ddim_steps": args.steps, "resolution": res,
                        "compile": "aot" if args.aot else args.compile,
                        "cache_dir": str(tmp / "cache")}
        images, refs = make_inputs(tmp / "data", args.pairs, args.width, args.format)
        iterations = args.iterations or AUTO_BATCH_CAP  # the usual automatic batch size
        if not args.only_cold_start:
            iterations = in_process(args, options, images, refs, tmp, device, result)
        if args.cold_start or args.only_cold_start:
            result["cold_start"] = cold_start(images, refs, tmp / "out-cold", iterations,
                                              options, device)
            print(f"new worker process: first output after "
                  f"{result['cold_start']['first_output_seconds']} s", flush=True)
    result["command"] = " ".join(["python", "benchmarks/worker_pipeline.py", *sys.argv[1:]])
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def s3_run(r, images: Path, refs: Path, iterations: int, options: dict, device,
           relighter: str = "diffusion"):
    """End to end against moto's S3 server on 127.0.0.1, in its own process as MinIO would be
    (None when moto is not installed)."""
    import importlib.util
    import socket

    if importlib.util.find_spec("moto") is None:
        return None
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_REGION": "us-east-1"})
    try:
        client = boto3.client("s3")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.2)
        for folder, prefix in ((images, "in"), (refs, "refs")):
            for path in folder.iterdir():
                client.upload_file(str(path), "bench", f"{prefix}/{path.name}")
        manifest, _ = plan_run("s3://bench/in", "s3://bench/refs", "s3://bench/out",
                               iterations, options, relighter)
        return end_to_end(r, manifest, device)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
