"""The ``sh`` relighter on large images: time and peak memory at 1, 4, 16 and 64 megapixels.

Each case runs in its own process (so its peak resident memory is its own): one ``relight`` call
of one square image and one seed, with normals estimated from the image (the default). Side by
side, in the same run, the same relighter with the square-window blur it used before (a
``k x k`` average whose side grows with the image, so the time grew with the square of the
area), up to ``--old-up-to`` megapixels (the old one takes minutes beyond 16). The ratio column is
old time / new time; "per MP" shows whether the time is linear in pixels.

    python benchmarks/sh_large_images.py [--sizes 1 4 16 64] [--old-up-to 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import resource
import time
from datetime import UTC, datetime


def _case(megapixels: float, old_blur: bool, queue) -> None:
    import torch
    import torch.nn.functional as F

    from relit_k8s.relighters import create, sh

    if old_blur:  # the square window the relighter used before the separable running sums
        sh.box_blur = lambda x, k: F.avg_pool2d(  # type: ignore[assignment]
            F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1
        )
    side = int(math.sqrt(megapixels * 1e6))
    torch.manual_seed(0)
    image = torch.rand(3, side, side)
    reference = torch.rand(3, 64, 128)
    relighter = create("sh", {}, "cpu")
    start = time.perf_counter()
    out = relighter.relight(image, reference, [0])
    seconds = time.perf_counter() - start
    assert out.shape == (1, 3, side, side)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    queue.put({"seconds": seconds, "peak_gib": peak_gib, "side": side})


def measure(megapixels: float, old_blur: bool) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_case, args=(megapixels, old_blur, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64],
                    help="image sizes in megapixels [default: 1 4 16 64]")
    ap.add_argument("--old-up-to", type=float, default=16,
                    help="measure the old square blur up to this size [default: 16]")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    import torch

    rows = []
    print(f"{'MP':>5} {'side':>6} {'new s':>8} {'s per MP':>9} {'peak GiB':>9} "
          f"{'old s':>8} {'old/new':>8}", flush=True)
    for mpx in args.sizes:
        new = measure(mpx, old_blur=False)
        old = measure(mpx, old_blur=True) if mpx <= args.old_up_to else None
        row = {"megapixels": mpx, "side": new["side"], "seconds": new["seconds"],
               "seconds_per_megapixel": new["seconds"] / mpx, "peak_gib": new["peak_gib"],
               "old_seconds": old and old["seconds"],
               "old_over_new": old and old["seconds"] / new["seconds"]}
        rows.append(row)
        print(f"{mpx:>5g} {row['side']:>6} {row['seconds']:>8.2f} "
              f"{row['seconds_per_megapixel']:>9.3f} {row['peak_gib']:>9.2f} "
              + (f"{old['seconds']:>8.2f} {row['old_over_new']:>7.1f}x" if old else
                 f"{'-':>8} {'-':>8}"), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"benchmark": "sh_large_images",
                       "date": datetime.now(UTC).date().isoformat(),
                       "device": platform.processor() or "cpu", "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
