"""The figures of README.md and benchmarks/README.md, generated from the result files.

A block of figures lies between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``; its
text is what ``BLOCKS[NAME]`` renders from its JSON under ``benchmarks/results/``, with the
command, commit, date and machine that JSON records. No figure of either README lives outside
such a block.

    python benchmarks/figures.py           # rewrite every block from the JSON files
    python benchmarks/figures.py --check   # exit 1, naming each block that differs
                                           # (tests/test_figures.py runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from fleet import stats, verdict  # the fleet's own median, range and verdict over the seeds

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "docs" / "luminet.md",
        ROOT / "docs" / "balancing.md")
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /figures:(?P=name) -->)", re.S)


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def source(name: str, d: dict) -> str:
    """The line that says where a block's figures come from."""
    where = d.get("machine") or d.get("device") or "?"
    commit = d.get("commit") or "?"
    return (f"From [`benchmarks/results/{name}`](benchmarks/results/{name}): "
            f"`{d['command']}`, {d['date']}, commit {commit}, {where}.")


def _range(v: dict | None) -> str:
    if not v:
        return "-"
    if v["min"] == v["max"]:
        return f"{v['median']:.3f}"
    return f"{v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})"


def fleet_scenarios(name: str = "fleet_cpu.json") -> str:
    d = load(name)
    rows = ["| workers | scenario | static, best shards per worker | static: makespan / ideal "
            "| leases: makespan / ideal | leases against the best static |",
            "|---|---|---|---|---|---|"]
    for e in d["summary"]["scenarios"]:
        rows.append(f"| {e['workers']} | {e['scenario']} | "
                    f"{e.get('static_best_shards_per_worker', '-')} | "
                    f"{_range(e.get('static_best'))} | {_range(e.get('leases'))} | "
                    f"{e.get('leases_vs_static_best', '-')} |")
    pods = d["pods"]
    latency = d["latency"] or {}
    return "\n".join([
        *rows, "",
        f"Median (range) over seeds {', '.join(map(str, d['seeds']))}; a row stands for a real "
        f"run of {pods['real_minutes']:g} minutes; pods start in {pods['cold_seconds']:g} s "
        f"cold and {pods['warm_seconds']:g} s warm; store: {d['store']}, with "
        f"{latency.get('p50_ms', 0):g} ms p50 / {latency.get('p99_ms', 0):g} ms p99 added "
        "per request. " + source(name, d)])


def fleet_sweep() -> str:
    d = load("fleet_cpu.json")
    sizes = sorted({int(n) for e in d["summary"]["scenarios"]
                    for n in e["static_by_shards_per_worker"]})
    rows = ["| workers | scenario | " + " | ".join(f"static, {n} per worker" for n in sizes)
            + " | leases |", "|---|---|" + "---|" * (len(sizes) + 1)]
    for e in d["summary"]["scenarios"]:
        by = e["static_by_shards_per_worker"]
        rows.append(f"| {e['workers']} | {e['scenario']} | " + " | ".join(
            _range(by.get(str(n))) for n in sizes) + f" | {_range(e.get('leases'))} |")
    return "\n".join(rows)


def fleet_ablation(name: str = "fleet_cpu.json", cite: bool = False) -> str:
    d = load(name)
    rows = ["| workers | scenario | switched off | makespan / ideal without it | with all | "
            "store requests without / with (median) | verdict |", "|---|---|---|---|---|---|---|"]
    for a in d["summary"]["ablation"]:
        rows.append(f"| {a['workers']} | {a['scenario']} | `{a['disabled']}` | "
                    f"{_range(a['without'])} | {_range(a['with_all'])} | "
                    f"{a['requests_without']['median']:,.0f} / "
                    f"{a['requests_with_all']['median']:,.0f} | {a['verdict']} |")
    if cite:
        rows += ["", f"Median (range) over seeds {', '.join(map(str, d['seeds']))}. "
                 + source(name, d)]
    return "\n".join(rows)


def fleet_quick() -> str:
    """The protocol as it is now: the scenarios, then the ablation of what remains."""
    name = "fleet_quick_cpu.json"
    return fleet_scenarios(name) + "\n\n" + fleet_ablation(name)


def fleet_now() -> str:
    """The mixed rows of the protocol now beside the same rows before the removal (every
    mechanism in) and with the claim ahead removed too: makespan and store requests, with a
    verdict against "before" where the seeds' ranges do not overlap."""
    runs = ((16, (("every mechanism (before)", "fleet_16_before_cpu.json"),
                  ("four removed, the claim ahead too", "fleet_16_no_ahead_cpu.json"),
                  ("now: three removed", "fleet_16_cpu.json"))),
            (16, (("every mechanism (before)", "fleet_16_before_seeds5_cpu.json"),
                  ("four removed, the claim ahead too", "fleet_16_no_ahead_seeds5_cpu.json"),
                  ("now: three removed", "fleet_16_seeds5_cpu.json"))),
            (64, (("every mechanism (before)", "fleet_ablation64_cpu.json"),
                  ("four removed, the claim ahead too", "fleet_64_no_ahead_cpu.json"),
                  ("now: three removed", "fleet_64_cpu.json"))))

    def of(d: dict, workers: int) -> tuple[list[float], list[int]]:
        rows = [r for r in d["rows"] if r["balance"] == "leases" and not r.get("disabled")
                and r["workers"] == workers and r["scenario"] == "mixed"]
        return [r["makespan_over_ideal"] for r in rows], [r["requests"] for r in rows]

    rows = ["| workers | lease protocol | seeds | makespan / ideal | store requests | "
            "against before |", "|---|---|---|---|---|---|"]
    sources = []
    for workers, variants in runs:
        base = None
        for label, name in variants:
            d = load(name)
            ratios, requests = (stats(v) for v in of(d, workers))
            against = "-" if base is None else (
                f"{verdict(ratios, base[0], 'faster', 'slower')}; requests "
                f"{verdict(requests, base[1], 'fewer', 'more')}")
            base = base or (ratios, requests)
            rows.append(f"| {workers} | {label} | {', '.join(map(str, d['seeds']))} | "
                        f"{_range(ratios)} | "
                        f"{requests['median']:,.0f} ({requests['min']:,}-{requests['max']:,}) | "
                        f"{against} |")
            sources.append(f"{label}, {workers} workers, seeds {len(d['seeds'])}: "
                           + source(name, d))
    return "\n".join([*rows, "", "Mixed scenario, median (range) over the seeds; 30 s rows at 16 "
                      "workers, 120 s at 64; each 16-worker group measured within one hour, "
                      "the 64-worker 'before' by the ablation's run earlier the same day.",
                      "", *(f"- {s}" for s in sources)])


def fleet_stragglers() -> str:
    """Leases on the straggler scenarios with the takeover gone, beside the rows measured with
    it (fleet_cpu.json) and the best static layout of those."""
    now, before = load("fleet_stragglers_cpu.json"), load("fleet_cpu.json")
    old = {(e["workers"], e["scenario"]): e for e in before["summary"]["scenarios"]}
    rows = ["| workers | scenario | leases, no takeover | leases with the takeover (before) | "
            "best static (before) |", "|---|---|---|---|---|"]
    for e in now["summary"]["scenarios"]:
        was = old.get((e["workers"], e["scenario"])) or {}
        rows.append(f"| {e['workers']} | {e['scenario']} | {_range(e.get('leases'))} | "
                    f"{_range(was.get('leases'))} | {_range(was.get('static_best'))} "
                    f"({was.get('static_best_shards_per_worker', '-')} per worker) |")
    return "\n".join([*rows, "", f"Median (range) over seeds "
                       f"{', '.join(map(str, now['seeds']))}. " + source(
                           "fleet_stragglers_cpu.json", now)])


def fleet_64_probe() -> str:
    """One 64-worker row with and without the takeover of live stragglers."""
    d = load("fleet_64_probe_cpu.json")
    rows = ["| lease mechanisms | code | finished | makespan / ideal | takeovers of live "
            "holders (most of one shard) | of silent holders |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        ended = (f"{r['makespan_over_ideal']:.3f}" if r["finished"]
                 else f"none: not finished after {r['stopped_after_s']} s (ideal 120 s)")
        rows.append(f"| {r['mechanisms']} | {r['code']} | {'yes' if r['finished'] else 'no'} "
                    f"| {ended} | {r['takeovers_of_live_holders']} "
                    f"({r['most_taken_shard_times']}) | {r['takeovers_of_silent_holders']} |")
    return "\n".join([*rows, "", f"{d['what']}. From [`benchmarks/results/"
                       "fleet_64_probe_cpu.json`](benchmarks/results/fleet_64_probe_cpu.json): "
                       f"`{d['command']}`, {d['date']}, {d['machine']}."])


def fleet_stores() -> str:
    """The same rows on SeaweedFS (fleet_cpu.json) and on moto's server (fleet_moto_cpu.json)."""
    rows = ["| store | scenario | static, 4 per worker | leases | store latency p50 / p90 "
            "(leases rows) |", "|---|---|---|---|---|"]
    commands = []
    for name, label in (("fleet_cpu.json", "SeaweedFS"), ("fleet_moto_cpu.json", "moto")):
        d = load(name)
        commands.append(f"`{d['command']}` (commit {d['commit']})")
        for e in d["summary"]["scenarios"]:
            if e["scenario"] != "mixed" or e["workers"] != 16:
                continue
            lat = [r["latency_ms"]["all"] for r in d["rows"]
                   if r["balance"] == "leases" and not r.get("disabled")
                   and r["scenario"] == "mixed"]
            p50 = statistics.median(x["p50"] for x in lat)
            p90 = statistics.median(x["p90"] for x in lat)
            rows.append(f"| {label} | {e['scenario']} | "
                        f"{_range(e['static_by_shards_per_worker'].get('4'))} | "
                        f"{_range(e.get('leases'))} | {p50:.0f} / {p90:.0f} ms |")
    return "\n".join([*rows, "", "16 workers; " + " and ".join(commands) + "; each store in a "
                      "process of its own on the same 2 cores as the simulated workers, the "
                      "same latency added in the client."])


def relighter_h200() -> str:
    d = load("relighter_throughput_h200.json")
    rows = ["| `diffusion`, bf16 | samples/s | batch | model FLOP utilisation | load | first "
            "batch from creating the relighter |", "|---|---|---|---|---|---|"]
    for name, label in (("relit", "eager"), ("compiled", "`compile=true`")):
        rows.append(f"| {label} | {d[f'{name}_samples_per_s']:.2f} | {d[f'{name}_batch']} | "
                    f"{d[f'{name}_model_flop_utilisation']:.1%} | "
                    f"{d[f'{name}_load_seconds']:.1f} s | "
                    f"{d[f'{name}_first_sample_seconds']:.1f} s |")
    return "\n".join([*rows, "", f"bf16 matmul peak measured in the run: "
                      f"{d['bf16_matmul_peak_tflops']:.0f} TFLOP/s. {source_b(d)} "
                      f"Since: {d['changed_since']}"])


def source_b(d: dict) -> str:
    where = f"one {d['device']}" if d.get("device") else d["machine"]
    torch = f" (torch {d['torch']})" if d.get("torch") else ""
    return (f"`{d['command']}` on {where}{torch}, {d['date']}, commit {d['commit']} "
            f"({d['commit_recorded']}).")


def pipeline_h200() -> str:
    d = load("worker_pipeline_h200.json")
    cold = d["cold_start"]
    return "\n".join([
        "| compiled `diffusion`, 4 pairs x 32 seeds, 1024-pixel JPEGs | samples/s | end to end "
        "/ relighter only |", "|---|---|---|",
        f"| relighter only | {d['relighter_only_samples_per_s']:.2f} | 1 |",
        f"| end to end, local disk | {d['local_samples_per_s']:.2f} | {d['local_ratio']:.3f} |",
        f"| end to end, S3 (moto's server) | {d['s3_samples_per_s']:.2f} | "
        f"{d['s3_ratio']:.3f} |", "",
        f"A new `relit-k8s worker` process on a warm node (inductor cache on disk) wrote its "
        f"{cold['samples']} outputs {cold['worker_seconds']:.1f} s after its start, "
        f"{cold['report_timings']['model_load']:.1f} s of it loading. {source_b(d)} "
        f"Since: {d['changed_since']}"])


def output_cpu_h200() -> str:
    d = load("output_cpu_h200.json")
    total = d["cpu_seconds_per_output_total"]
    per = d["outputs_per_core_second"]
    size = d["output_bytes"]
    names = {"jpeg": "JPEG (quality 95, 4:4:4)", "png0": "PNG, zlib level 0",
             "png1": "PNG, level 1 (the default)", "png3": "PNG, level 3",
             "png6": "PNG, level 6 (Pillow's default)"}
    rows = ["| output, 1024 x 1024 | CPU per output (decode, encode, write) | outputs per "
            "core-second | bytes |", "|---|---|---|---|"]
    for k, label in names.items():
        rows.append(f"| {label} | {1000 * total[k]:.1f} ms | {per[k]:.1f} | {size[k]:,} |")
    return "\n".join([*rows, "", f"{source_b(d)} Since: {d['changed_since']}"])


def pipeline_sh_h200() -> str:
    rows = ["| `sh` relighter, 64 pairs x 8 seeds | relighter only | end to end | ratio | CPU "
            "cores used |", "|---|---|---|---|---|"]
    for fmt in ("jpg", "png"):
        d = load(f"pipeline_sh_{fmt}_h200.json")
        rows.append(f"| {fmt.upper()} inputs and outputs | "
                    f"{d['relighter_only_samples_per_s']:.1f} samples/s | "
                    f"{d['local_samples_per_s']:.1f} samples/s | {d['local_ratio']:.2f} | "
                    f"{d['local_timings']['cpu_cores']:.1f} |")
    d = load("pipeline_sh_jpg_h200.json")
    return "\n".join([*rows, "", f"{source_b(d)} Since: {d['changed_since']}"])


def weights_load_cpu() -> str:
    rows = ["| model | weight bytes (files / cache) | load from the files | load from the cache "
            "| ratio | whole process, ratio |", "|---|---|---|---|---|---|"]
    lines = []
    for name, label in (("weights_load_sd21_cpu.json", "`diffusion`, SD2.1 sizes"),
                        ("weights_load_luminet_cpu.json", "`luminet`, official sizes")):
        d = load(name)
        rows.append(f"| {label} | {d['model_weight_bytes'] / 1e9:.2f} GB / "
                    f"{d['cache_bytes'] / 1e9:.2f} GB | "
                    f"{d['from_files']['load_seconds']:.1f} s | "
                    f"{d['from_cache']['load_seconds']:.1f} s | {d['load_ratio']:.2f}x | "
                    f"{d['process_ratio']:.2f}x |")
        lines.append(f"`{d['command']}`")
    d = load("weights_load_sd21_cpu.json")
    return "\n".join([*rows, "", f"{' and '.join(lines)}; {d['date']}, commit {d['commit']} "
                      f"({d['commit_recorded']}), {d['machine']}, bf16 on the CPU."])


def sh_large_images_cpu() -> str:
    d = load("sh_large_images_cpu.json")
    rows = ["| image | seconds | seconds per MP | peak memory | the old blur | old / new |",
            "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        old = f"{r['old_seconds']:.2f} s" if r.get("old_seconds") else "not run"
        ratio = f"{r['old_over_new']:.1f}x" if r.get("old_over_new") else ""
        rows.append(f"| {r['megapixels']} MP ({r['side']} x {r['side']}) | {r['seconds']:.2f} "
                    f"| {r['seconds_per_megapixel']:.2f} | {r['peak_gib']:.2f} GiB | {old} | "
                    f"{ratio} |")
    return "\n".join([*rows, "", f"`{d['command']}`, {d['date']}, commit {d['commit']} "
                      f"({d['commit_recorded']}), {d['device']}, torch {d['torch']}, "
                      f"{d['threads']} threads."])


def plan_scale_cpu() -> str:
    d = load("plan_scale_cpu.json")
    return (f"Planning {d['images']:,} images x {d['references']:,} references x "
            f"{d['iterations']} iterations ({d['items']:,} items, {d['units']:,} units, "
            f"{d['shards']:,} shards) takes {d['plan_seconds']:.2f} s and gives a manifest of "
            f"{d['manifest_bytes']:,} bytes; loading it and laying out one shard takes "
            f"{d['load_and_one_shard_seconds']:.3f} s. `{d['command']}`, {d['date']}, commit "
            f"{d['commit']}, {d['machine']}.")


def step_profile_h200() -> str:
    d = load("step_profile_h200.json")
    p = d["step_profile"]
    rows = ["| operator (own GPU time) | share | ms per step |", "|---|---|---|"]
    for op in p["ops"][:8]:
        rows.append(f"| `{op['op']}` | {op['share']:.1%} | {op['ms_per_step']:.1f} |")
    return "\n".join([
        f"One eager bf16 UNet + ControlNet step at {p['batch']} seeds: {p['ms_per_step']:.1f} ms "
        f"of GPU time, {p['tflop_per_step']:.1f} TFLOP counted.", "", *rows, "",
        f"{source_b(d)} Since: {d['changed_since']}"])


def luminet_fidelity(name: str = "luminet_fidelity_tiny_cpu.json") -> str:
    d = load(name)
    rows = ["| dtype | mean difference from fp32 (8-bit levels; per seed) | largest | values "
            "within one level | equal |", "|---|---|---|---|---|"]
    for dtype in [t for t in ("fp32", "bf16", "fp16") if t in d["against_fp32"]]:
        r = d["against_fp32"][dtype]
        seeds = r["mean_levels_per_seed"]
        rows.append(f"| {dtype} | {r['mean_levels']:.2f} ({min(seeds):.2f}-{max(seeds):.2f}) | "
                    f"{r['max_levels']} | {r['within_one_level']:.1%} | {r['equal']:.1%} |")
    return "\n".join([*rows, "", f"{d['model']}, {d['steps']} DDIM steps, seeds "
                      f"{', '.join(map(str, d['seeds']))}, on the CPU. "
                      + source(name, d)])


def luminet_scoring() -> str:
    t, f = load("luminet_scoring_tiny_cpu.json"), load("luminet_scoring_full_cpu.json")
    ratio = t["throughput_ratio_on_over_off"]
    on, off = t["items_per_second_score_on"], t["items_per_second_score_off"]
    step, score = f["denoising_step_seconds_batch_1"], f["score_one_output_seconds"]
    return "\n".join([
        "| measured | scoring off | scoring on | scoring's cost |", "|---|---|---|---|",
        f"| whole shards, tiny LumiNet, {t['steps']} steps, {t['items_per_shard']} outputs "
        f"each ({ratio['n']} rounds; median, range) | {off['median']:.2f} items/s "
        f"({off['min']:.2f}-{off['max']:.2f}) | {on['median']:.2f} items/s "
        f"({on['min']:.2f}-{on['max']:.2f}) | {t['score_cost_percent_median']:.1f}% of "
        f"throughput (on/off {ratio['min']:.3f}-{ratio['max']:.3f}) |",
        f"| full-size parts: one denoising step (1 seed) vs scoring one 512 x 512 output "
        f"({step['n']} each) | {step['median']:.2f} s a step, x {f['steps']} | "
        f"{score['median']:.3f} s | {f['score_cost_percent_of_one_output']:.2f}% of one "
        "output |", "",
        "Random weights, float32, on the CPU. " + source("luminet_scoring_tiny_cpu.json", t),
        source("luminet_scoring_full_cpu.json", f)])


def status_scale() -> str:
    d = load("status_scale_cpu.json")
    rows = ["| shards (workers) | `status` | requests | without the summaries (every report "
            "read, 32 at a time) | requests | `resume --dry-run --trust-reports` | `gallery` |",
            "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        old = r.get("status_reports_one_by_one")
        rows.append(
            f"| {r['shards']:,} ({r['workers']}) | {r['status']['seconds_median']:.2f} s | "
            f"{r['status']['requests']:,} | "
            + (f"{old['seconds_median']:.1f} s | {old['requests']:,}" if old else "- | -")
            + f" | {r['resume_dry_run_trust_reports']['seconds_median']:.2f} s "
            f"({r['resume_dry_run_trust_reports']['requests']:,} requests) | "
            f"{r['gallery']['seconds_median']:.1f} s ({r['gallery']['requests']:,} requests) |")
    return "\n".join([*rows, "", f"A finished leases run ({d['shards_per_worker']} shards per "
                       f"worker) in SeaweedFS behind a proxy adding {d['delay_ms_per_request']:g}"
                       f" ms to every request; median of {d['repeats']} (`gallery` and the "
                       "one-by-one column: one run). " + source("status_scale_cpu.json", d)])


BLOCKS: dict[str, Callable[[], str]] = {
    "status-scale": status_scale,
    "luminet-fidelity": luminet_fidelity,
    "luminet-fidelity-full": lambda: luminet_fidelity("luminet_fidelity_full_cpu.json"),
    "luminet-scoring": luminet_scoring,
    "fleet-scenarios": fleet_scenarios,
    "fleet-sweep": fleet_sweep,
    "fleet-ablation": fleet_ablation,
    "fleet-64-probe": fleet_64_probe,
    "fleet-stragglers": fleet_stragglers,
    "fleet-ablation-64": lambda: fleet_ablation("fleet_ablation64_cpu.json", cite=True),
    "fleet-stores": fleet_stores,
    "fleet-quick": fleet_quick,
    "fleet-scenarios-now": lambda: fleet_scenarios("fleet_quick_cpu.json"),
    "fleet-now": fleet_now,
    "relighter-h200": relighter_h200,
    "pipeline-h200": pipeline_h200,
    "output-cpu-h200": output_cpu_h200,
    "pipeline-sh-h200": pipeline_sh_h200,
    "weights-load-cpu": weights_load_cpu,
    "sh-large-images-cpu": sh_large_images_cpu,
    "plan-scale-cpu": plan_scale_cpu,
    "step-profile-h200": step_profile_h200,
}


def render(text: str, path: Path) -> tuple[str, list[str]]:
    """``text`` with every block rendered anew, and the names of the blocks that changed (a
    block of an unknown name raises)."""
    changed = []

    def one(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise SystemExit(f"{path}: no renderer for the block {name!r}")
        body = BLOCKS[name]().rstrip("\n") + "\n"
        if path.parent != ROOT:  # a page in a folder links relative to its own folder
            results = os.path.relpath(RESULTS, path.parent)
            body = body.replace("](benchmarks/results/", f"]({results}/")
        if body != m["body"]:
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if a block differs from its JSON")
    args = ap.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new, changed = render(text, path)
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            path.write_text(new)
    if stale:
        print(("differs from its JSON: " if args.check else "rewritten: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
