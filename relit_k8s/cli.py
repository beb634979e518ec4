"""The ``relit-k8s`` command line: parse, call, print. No logic of its own."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .errors import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, ConfigError, RelitError, exit_code_for
from .images import DEFAULT_MAX_PIXELS

app = typer.Typer(
    name="relit-k8s",
    help="Relight images with HDR environment maps at scale: on this machine's GPUs or CPU "
    "(run), or as a Kubernetes Indexed Job (submit).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def handles_errors(fn):
    """Turn the project's errors into a one-line message and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RelitError as e:
            raise _fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None
        except (typer.Exit, typer.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug or an unforeseen failure: show where, exit by kind
            import traceback

            traceback.print_exc(file=sys.stderr)
            raise _fail(f"{type(e).__name__}: {e}", exit_code_for(e)) from None

    return wrapper


# --- shared selection flags (plan, run; submit later) -----------------------------------------
InputOpt = Annotated[str, typer.Option("--input", help="Input images: a folder, file:// or "
                                       "s3://bucket/prefix (searched recursively).",
                                       metavar="URI")]
RefsOpt = Annotated[str, typer.Option("--refs", help="Reference environment maps (HDR .exr/.hdr"
                                      " or LDR), equirectangular.", metavar="URI")]
OutputOpt = Annotated[str, typer.Option("--output", help="Where outputs, the manifest and shard "
                                        "reports go.", metavar="URI")]
NormalsOpt = Annotated[str | None, typer.Option(
    "--normals", metavar="URI", help="Normal maps, matched by path: a/b.jpg -> <normals>/a/b.<ext>"
    " (camera space, n = 2c - 1). Without them, normals are estimated.")]
IterationsOpt = Annotated[int, typer.Option("--iterations", min=1,
                                            help="Relit samples per (image, reference) pair.")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Base seed; every output's seed "
                                      "derives from it, the image, the reference and the "
                                      "iteration.")]
ImgPatternOpt = Annotated[str, typer.Option("--img-pattern", help="Glob on the image file name "
                                            "(or key, if it has a '/').")]
RefPatternOpt = Annotated[str, typer.Option("--ref-pattern", help="Glob on the reference file "
                                            "name (or key, if it has a '/').")]
ImgFormatsOpt = Annotated[list[str] | None, typer.Option(
    "--img-formats", help="Image extensions (repeat, or comma-separated). "
    "[default: jpg jpeg png bmp exr hdr]")]
RefFormatsOpt = Annotated[list[str] | None, typer.Option(
    "--ref-formats", help="Reference extensions (repeat, or comma-separated). "
    "[default: png exr hdr]")]
RelighterOpt = Annotated[str, typer.Option("--relighter", help="Relighter name (see "
                                           "'relit-k8s relighters') or module:attribute.")]
OptionOpt = Annotated[list[str] | None, typer.Option(
    "-O", "--option", metavar="KEY=VALUE", help="A relighter option (repeatable).")]
DdimOpt = Annotated[int | None, typer.Option("--ddim-steps", min=1, help="Seed parity: sets the "
                                             "relighter option ddim_steps.")]
NewDecoderOpt = Annotated[bool, typer.Option("--new-decoder", help="Seed parity: sets the "
                                             "relighter option new_decoder=true.")]
ShardsOpt = Annotated[int | None, typer.Option("--shards", min=1, help="Number of shards "
                                               "[default: 4 per worker].")]
RunIdOpt = Annotated[str | None, typer.Option("--run-id", help="Run id (DNS label, <= 40 chars)"
                                              " [default: derived from the plan, so the same "
                                              "command continues the same run].")]
BatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1, show_default="the relighter's choice: 8, diffusion measures it",
    help="Seeds per relighter call.")]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse images larger "
                                           "than this many pixels (checked before decoding).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; touch nothing.")]

# --- local execution flags (run, resume --local) ----------------------------------------------
GpusOpt = Annotated[str | None, typer.Option("--gpus", metavar="0,1",
                                             help="GPUs to use, one worker each.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", min=1, help="Worker processes "
                                                "[default: one per GPU, or 1 on the CPU].")]
DeviceOpt = Annotated[str | None, typer.Option("--device", metavar="cpu|cuda",
                                               help="[default: cuda if available]")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 if any item failed.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress",
                                           help="Show the progress bar.")]

# --- cluster flags -----------------------------------------------------------------------------
NamespaceOpt = Annotated[str | None, typer.Option(
    "--namespace", "-n", help="Namespace [default: the submission's, else the context's].")]
ContextOpt = Annotated[str | None, typer.Option("--context", help="kubeconfig context "
                                                "[default: the current one].")]
OutputFindOpt = Annotated[str | None, typer.Option(
    "--output", metavar="URI", help="The run's output, where its submission record is.")]


def _formats(values: list[str] | None) -> tuple[str, ...] | None:
    if not values:
        return None
    return tuple(f for v in values for f in v.replace(",", " ").split())


def _options(pairs: list[str] | None, ddim_steps: int | None, new_decoder: bool) -> dict:
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-O {pair!r}: expected KEY=VALUE")
        options[key.strip().replace("-", "_")] = value
    if ddim_steps is not None:
        options["ddim_steps"] = ddim_steps
    if new_decoder:
        options["new_decoder"] = True
    return options


#: The shared selection flags (plan, run, submit): the names of their PlanSettings inputs.
_SELECTION = ("input", "refs", "output", "normals", "iterations", "seed", "img_pattern",
              "ref_pattern", "img_formats", "ref_formats", "relighter", "option", "ddim_steps",
              "new_decoder", "shards", "run_id", "batch_size", "max_pixels")


def _settings(flags: dict, workers: int = 1):
    """PlanSettings from a command's flags (its ``locals()``): the selection flags only."""
    from pydantic import ValidationError

    from .planner import PlanSettings

    kw = {k: flags[k] for k in _SELECTION}
    img_formats, ref_formats = _formats(kw.pop("img_formats")), _formats(kw.pop("ref_formats"))
    options = _options(kw.pop("option"), kw.pop("ddim_steps"), kw.pop("new_decoder"))
    data = {**kw, "options": options, "workers": workers}
    if img_formats:
        data["img_formats"] = img_formats
    if ref_formats:
        data["ref_formats"] = ref_formats
    try:
        return PlanSettings(**data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(problems) from e


def _make_plan(settings):
    from .planner import list_sources, plan

    images, refs = list_sources(settings)
    return plan(settings, images, refs)


def _print_summary(manifest, title: str) -> None:
    from .planner import estimate_output_bytes, human_bytes, summary

    table = Table(title=title, show_header=False, title_justify="left", box=None)
    table.add_column(style="bold cyan")
    table.add_column()
    rows = summary(manifest)
    size = estimate_output_bytes(manifest)
    rows["estimated size"] = f"~{human_bytes(size)} of outputs" if size else "unknown"
    for key, value in rows.items():
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)


@app.command("plan")
@handles_errors
def plan_cmd(
    input: InputOpt, refs: RefsOpt, output: OutputOpt, normals: NormalsOpt = None,
    iterations: IterationsOpt = 50, seed: SeedOpt = 0, img_pattern: ImgPatternOpt = "*",
    ref_pattern: RefPatternOpt = "*", img_formats: ImgFormatsOpt = None,
    ref_formats: RefFormatsOpt = None, relighter: RelighterOpt = "sh",
    option: OptionOpt = None, ddim_steps: DdimOpt = None, new_decoder: NewDecoderOpt = False,
    shards: ShardsOpt = None, run_id: RunIdOpt = None, batch_size: BatchOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS, dry_run: DryRunOpt = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Workers the default shard "
                                         "count is made for.")] = 1,
):
    """List inputs and references and write the run's manifest (no relighting)."""
    settings = _settings(dict(locals()), workers)
    from .planner import write_manifest

    manifest = _make_plan(settings)
    if dry_run:
        _print_summary(manifest, "Plan (dry run: nothing written)")
        return
    manifest, uri = write_manifest(manifest)
    _print_summary(manifest, "Plan")
    out.print(f"manifest: {uri}")
    out.print(f"run a shard with: relit-k8s worker --manifest {uri} --index 0")


@app.command("run")
@handles_errors
def run_cmd(
    input: InputOpt, refs: RefsOpt, output: OutputOpt, normals: NormalsOpt = None,
    iterations: IterationsOpt = 50, seed: SeedOpt = 0, img_pattern: ImgPatternOpt = "*",
    ref_pattern: RefPatternOpt = "*", img_formats: ImgFormatsOpt = None,
    ref_formats: RefFormatsOpt = None, relighter: RelighterOpt = "sh",
    option: OptionOpt = None, ddim_steps: DdimOpt = None, new_decoder: NewDecoderOpt = False,
    shards: ShardsOpt = None, run_id: RunIdOpt = None, batch_size: BatchOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS, dry_run: DryRunOpt = False,
    gpus: GpusOpt = None, workers: WorkersOpt = None, device: DeviceOpt = None,
    strict: StrictOpt = False, progress: ProgressOpt = True,
):
    """Relight on this machine: one worker process per GPU (or on the CPU). No cluster needed."""
    flags = dict(locals())
    slots = _slots(device, gpus, workers)
    settings = _settings(flags, workers=len(slots))
    manifest = _make_plan(settings)
    if dry_run:
        _print_summary(manifest, "Plan (dry run: nothing written)")
        return
    _run_here(manifest, slots, progress, strict)


def _slots(device: str | None, gpus: str | None, workers: int | None):
    from .local import plan_slots

    gpu_list = None
    if gpus:
        try:
            gpu_list = [int(g) for g in gpus.replace(" ", "").split(",") if g]
        except ValueError:
            raise ConfigError(f"--gpus {gpus!r}: expected GPU numbers such as 0,1") from None
    return plan_slots(device, gpu_list, workers)


def _run_here(manifest, slots, progress: bool, strict: bool, again: str = "run the same "
              "command again") -> None:
    """Write the manifest, run its shards in local worker processes, print the outcome."""
    from . import status as status_mod
    from .local import run_local
    from .planner import write_manifest

    manifest, uri = write_manifest(manifest)
    where = slots[0].device if slots[0].device == "cpu" else "GPU " + ",".join(
        sorted({s.visible_gpu or "0" for s in slots}))
    out.print(f"run [bold]{manifest.run_id}[/]: {manifest.items} outputs "
              f"({len(manifest.images)} images x {len(manifest.references)} references x "
              f"{manifest.iterations}) in {manifest.shards} shards on {len(slots)} worker(s), "
              f"{where}", highlight=False)
    result = _run_with_progress(uri, manifest, slots, run_local, progress)
    status = status_mod.collect(manifest.output, manifest.run_id)
    out.print(f"written {status['items_done']}, skipped {status['items_skipped']} "
              f"(already there), failed {status['items_failed']}, of {status['items_total']}",
              highlight=False)
    out.print(f"outputs: {manifest.output}")
    out.print(f"reports: {manifest.output.rstrip('/')}/{manifest.meta_prefix}/shards/")
    if status["items_failed"]:
        out.print(f"failures are listed in the reports: relit-k8s status {manifest.run_id} "
                  f"--output {manifest.output}")
    for msg in result.messages:
        err.print(f"[red]{msg}[/]", highlight=False)
    if result.interrupted:
        raise _fail(f"interrupted: {again} to continue", result.interrupt_code)
    code = result.exit_code
    if code == EXIT_OK and strict and status["items_failed"]:
        code = EXIT_FAILED
    raise typer.Exit(code)


def _run_with_progress(uri, manifest, slots, run_local, show: bool):
    levels = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "red"}
    if not show:
        return run_local(uri, manifest.shards, slots,
                         on_log=lambda lvl, msg: lvl >= logging.WARNING and err.print(msg))
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("relighting", total=manifest.items, rate="")
        state = {"failed": 0}

        def on_progress(done: int, skipped: int, failed: int) -> None:
            state["failed"] += failed
            bar.advance(task, done + skipped + failed)
            t = bar.tasks[task]
            rate = f"{t.speed:.1f} items/s" if t.speed else ""
            if state["failed"]:
                rate += f" [red]{state['failed']} failed[/]"
            bar.update(task, rate=rate)

        def on_log(level: int, msg: str) -> None:
            if level >= logging.WARNING:
                bar.console.print(f"[{levels.get(level, 'yellow')}]{msg}[/]", highlight=False)

        return run_local(uri, manifest.shards, slots, on_progress=on_progress, on_log=on_log)


@app.command("worker")
@handles_errors
def worker_cmd(
    manifest: Annotated[str | None, typer.Option("--manifest", envvar="RELIT_MANIFEST",
                                                 metavar="URI",
                                                 help="Manifest URI [env: RELIT_MANIFEST].")]
    = None,
    index: Annotated[int | None, typer.Option("--index", min=0, help="Shard index "
                                              "[env: JOB_COMPLETION_INDEX].")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="cpu|cuda|cuda:N",
                                               help="[default: cuda if available]")] = None,
    log_format: Annotated[str | None, typer.Option(
        "--log-format", metavar="text|json", help="text, or one JSON object per line "
        "[env: RELIT_LOG_FORMAT; default text; the Job sets json].")] = None,
):
    """Run one shard (the pod entrypoint). Exit 0 done, 75 retry, 78 config error, 143 stopped."""
    from . import logs
    from .worker import main

    logs.setup(logs.log_format(log_format))
    raise typer.Exit(main(manifest, index, device))


@app.command("status")
@handles_errors
def status_cmd(
    run: Annotated[str | None, typer.Argument(help="Run id [default: the newest run].")] = None,
    output: OutputOpt = ...,
    fmt: Annotated[str, typer.Option("-o", "--format", metavar="table|json")] = "table",
    namespace: NamespaceOpt = None, context: ContextOpt = None,
    cluster: Annotated[bool, typer.Option("--cluster/--no-cluster", help="Also read the Job "
                                          "of a submitted run.")] = True,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until the run ends "
                                        "(Ctrl+C to leave).")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.5, help="Seconds between "
                                            "refreshes with --watch.")] = 5.0,
    stall_after: Annotated[float, typer.Option("--stall-after", min=1, help="Flag running "
                                               "shards silent this many seconds.")] = 120.0,
):
    """Show a run's progress, speed and failures (shard reports), and its Job if submitted."""
    from .status import collect, load_run

    if fmt not in ("table", "json"):
        raise ConfigError(f"-o {fmt!r}: use table or json")

    def snapshot() -> dict:
        status = collect(output, run, stall_after)
        status["job"] = _job_state(load_run(output, status["run_id"]), namespace, context) \
            if cluster else None
        return status

    status = snapshot()
    if fmt == "json":
        out.print_json(json.dumps(status))
        return
    if not watch:
        out.print(_status_view(status))
        return
    from rich.live import Live

    try:
        with Live(_status_view(status), console=out, auto_refresh=False) as live:
            while status["state"] in ("running", "pending"):
                time.sleep(interval)
                status = snapshot()
                live.update(_status_view(status), refresh=True)
    except KeyboardInterrupt:
        pass


def _job_state(manifest, namespace, context) -> dict | None:
    """The Job's summary for a submitted run; None for local runs; an error note if unreachable."""
    from .kube.runs import cluster_for, job_summary, read_submission

    record = read_submission(manifest)
    if record is None and not namespace:
        return None
    try:
        summary = job_summary(cluster_for(record, context, namespace).get_job(manifest.run_id))
    except RelitError as e:
        return {"error": str(e)}
    return summary or {"state": "gone", "name": manifest.run_id,
                       "note": "the Job no longer exists (deleted or expired by its TTL)"}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _status_view(status: dict):
    from rich.console import Group
    from rich.text import Text

    parts: list = []
    rate, eta = status.get("items_per_second"), status.get("eta_seconds")
    finished = status["items_done"] + status["items_skipped"] + status["items_failed"]
    speed = f", {rate:.2f} items/s" if rate else ""
    speed += f", eta {_age(eta)}" if eta else ""
    parts.append(Text.from_markup(
        f"run [bold]{status['run_id']}[/] ({status['relighter']}), {status['state']}: "
        f"{finished}/{status['items_total']} items ({status['items_done']} written, "
        f"{status['items_skipped']} skipped, {status['items_failed']} failed){speed}"))
    job = status.get("job")
    if job and "error" in job:
        parts.append(Text(f"Job state unavailable: {job['error']}", style="yellow"))
    elif job:
        parts.append(Text(
            f"job {job['name']}: {job['state']}; active {job.get('active', 0)}, "
            f"succeeded {job.get('succeeded', 0)}, failed {job.get('failed', 0)}; "
            f"completed indexes {job.get('completed_indexes') or '-'}; "
            f"failed indexes {job.get('failed_indexes') or '-'}"))
        for c in job.get("conditions", []):
            parts.append(Text(f"  {c['type']}: {c.get('reason') or ''} {c.get('message') or ''}"))
    if status.get("stalled_shards"):
        parts.append(Text(f"stalled (no heartbeat): shards {status['stalled_shards']}",
                          style="bold red"))
    table = Table("shard", "state", "done", "skipped", "failed", "total", "items/s",
                  "heartbeat", "attempt", "host / device")
    colour = {"done": "green", "failed": "red", "running": "yellow", "pending": "dim"}
    for sh in status["shards"]:
        state = f"[{colour[sh['state']]}]{sh['state']}[/]"
        if sh.get("stalled"):
            state += " [bold red]stalled[/]"
        table.add_row(
            str(sh["index"]), state, str(sh["items_done"]), str(sh["items_skipped"]),
            str(sh["items_failed"]), str(sh["items_total"]),
            f"{sh['items_per_second']:.2f}" if sh.get("items_per_second") else "",
            _age(sh.get("heartbeat_age_seconds")), str(sh.get("attempt", "")),
            " / ".join(x for x in (sh.get("host"), sh.get("device")) if x))
    parts.append(table)
    timings = status.get("timings") or {}
    if timings:
        parts.append(Text("time spent (s, summed over shards and threads): " + ", ".join(
            f"{k} {v:.1f}" for k, v in timings.items())))
    reasons = status.get("failure_reasons") or []
    if reasons:
        ft = Table("count", "kind", "reason", "e.g.", title="failures by reason",
                   title_justify="left")
        for g in reasons:
            ft.add_row(str(g["count"]), g["kind"], g["reason"], ", ".join(g["examples"]))
        parts.append(ft)
    return Group(*parts)


# --- Kubernetes --------------------------------------------------------------------------------
@app.command("submit")
@handles_errors
def submit_cmd(
    input: InputOpt, refs: RefsOpt, output: OutputOpt,
    image: Annotated[str, typer.Option("--image", help="Container image with relit-k8s "
                                       "(see the Dockerfile).")],
    normals: NormalsOpt = None,
    iterations: IterationsOpt = 50, seed: SeedOpt = 0, img_pattern: ImgPatternOpt = "*",
    ref_pattern: RefPatternOpt = "*", img_formats: ImgFormatsOpt = None,
    ref_formats: RefFormatsOpt = None, relighter: RelighterOpt = "sh",
    option: OptionOpt = None, ddim_steps: DdimOpt = None, new_decoder: NewDecoderOpt = False,
    shards: ShardsOpt = None, run_id: RunIdOpt = None, batch_size: BatchOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS, dry_run: DryRunOpt = False,
    parallelism: Annotated[int, typer.Option("--parallelism", min=1, max=100_000,
                                             help="Pods running at once.")] = 8,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
    s3_secret: Annotated[str, typer.Option("--s3-secret", help="Secret with AWS_ACCESS_KEY_ID "
                                           "and AWS_SECRET_ACCESS_KEY ('' for pod identity)."
                                           )] = "relit-s3",
    s3_endpoint: Annotated[str | None, typer.Option(
        "--s3-endpoint", help="AWS_ENDPOINT_URL for the pods [default: $AWS_ENDPOINT_URL].")]
    = None,
    s3_region: Annotated[str | None, typer.Option(
        "--s3-region", help="AWS_REGION for the pods [default: $AWS_REGION].")] = None,
    gpus_per_pod: Annotated[int, typer.Option("--gpus-per-pod", min=0,
                                              help="nvidia.com/gpu per pod (0: CPU only).")] = 1,
    cpu: Annotated[str, typer.Option("--cpu", help="CPU request per pod.")] = "4",
    cpu_limit: Annotated[str | None, typer.Option("--cpu-limit", help="CPU limit per pod.")]
    = None,
    memory: Annotated[str, typer.Option("--memory", help="Memory request and limit.")] = "16Gi",
    node_selector: Annotated[list[str] | None, typer.Option(
        "--node-selector", metavar="KEY=VALUE", help="Node label to require (repeatable).")]
    = None,
    toleration: Annotated[list[str] | None, typer.Option(
        "--toleration", metavar="KEY[=VALUE][:EFFECT]", help="Toleration (repeatable) "
        "[default with GPUs: nvidia.com/gpu:NoSchedule].")] = None,
    priority_class: Annotated[str | None, typer.Option("--priority-class")] = None,
    service_account: Annotated[str | None, typer.Option("--service-account")] = None,
    queue: Annotated[str | None, typer.Option("--queue", help="Kueue LocalQueue name.")] = None,
    backoff_limit_per_index: Annotated[int, typer.Option("--backoff-limit-per-index", min=0,
                                                         help="Retries of each index.")] = 3,
    max_failed_indexes: Annotated[int | None, typer.Option(
        "--max-failed-indexes", min=0, help="Fail the Job past this many failed indexes "
        "[default: a tenth of the shards].")] = None,
    ttl: Annotated[int | None, typer.Option("--ttl", min=0, help="Seconds the finished Job "
                                            "is kept [default: a week].")] = 7 * 24 * 3600,
    grace_period: Annotated[int, typer.Option("--grace-period", min=1, help="Pod termination "
                                              "grace period, seconds.")] = 120,
    image_pull_policy: Annotated[str, typer.Option("--image-pull-policy")] = "IfNotPresent",
    image_pull_secret: Annotated[str | None, typer.Option("--image-pull-secret")] = None,
    cache_host_path: Annotated[str | None, typer.Option(
        "--cache-host-path", help="Opt-in: a node directory as the shared model cache.")] = None,
    fmt: Annotated[str | None, typer.Option("-o", "--format", metavar="yaml|json",
                                            help="Print the Job as YAML or JSON.")] = None,
):
    """Run on Kubernetes: write the manifest and create one Indexed Job (one pod per shard)."""
    flags = dict(locals())
    settings = _settings(flags, workers=parallelism)
    job_settings = _job_settings(flags)
    manifest = _make_plan(settings)
    _submit(manifest, job_settings, context, dry_run, fmt)


def _job_settings(f: dict):
    import os

    from pydantic import ValidationError

    from .kube.job import JobSettings, parse_toleration

    selectors = {}
    for pair in f["node_selector"] or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--node-selector {pair!r}: expected KEY=VALUE")
        selectors[key] = value
    try:
        return JobSettings(
            image=f["image"], namespace=f["namespace"], parallelism=f["parallelism"],
            gpus_per_pod=f["gpus_per_pod"], cpu=f["cpu"], cpu_limit=f["cpu_limit"],
            memory=f["memory"], s3_secret=f["s3_secret"] or None,
            s3_endpoint=f["s3_endpoint"] or os.environ.get("AWS_ENDPOINT_URL") or None,
            s3_region=f["s3_region"] or os.environ.get("AWS_REGION") or None,
            backoff_limit_per_index=f["backoff_limit_per_index"],
            max_failed_indexes=f["max_failed_indexes"], ttl_seconds_after_finished=f["ttl"],
            termination_grace_seconds=f["grace_period"], node_selector=selectors,
            tolerations=tuple(parse_toleration(t) for t in f["toleration"])
            if f["toleration"] else None,
            priority_class=f["priority_class"], service_account=f["service_account"],
            queue=f["queue"], image_pull_policy=f["image_pull_policy"],
            image_pull_secret=f["image_pull_secret"], cache_host_path=f["cache_host_path"],
        )
    except ValidationError as e:
        problems = "; ".join(f"--{'-'.join(map(str, x['loc'])).replace('_', '-')}: {x['msg']}"
                             for x in e.errors())
        raise ConfigError(problems) from e


def _submit(manifest, job_settings, context: str | None, dry_run: bool, fmt: str | None,
            title: str = "Submit") -> None:
    from .kube.job import build_job
    from .kube.runs import manifest_uri_of, submit

    if fmt not in (None, "yaml", "json"):
        raise ConfigError(f"-o {fmt!r}: use yaml or json")
    local = [u for u in (manifest.input, manifest.refs, manifest.output, manifest.normals)
             if u and not u.startswith("s3://")]
    if local:
        raise ConfigError(f"pods cannot read local paths ({', '.join(local)}): put the data in "
                          "S3 or MinIO and pass s3:// URIs (relit-k8s run works on local paths)")
    if dry_run:
        job = build_job(manifest, manifest_uri_of(manifest), job_settings)
        if fmt:
            _print_objects([job], fmt)
            return
        _print_summary(manifest, f"{title} (dry run: nothing written or created)")
        _print_job_summary(job)
        return
    created, record = submit(manifest, job_settings, context)
    if fmt:
        _print_objects([created], fmt)
        return
    ns = record.namespace
    out.print(f"run [bold]{record.run_id}[/]: Job {record.job} created in namespace {ns} "
              f"({manifest.shards} indexes, {created['spec']['parallelism']} at a time)",
              highlight=False)
    out.print(f"manifest: {record.manifest}")
    out.print("follow it with:")
    out.print(f"  relit-k8s status {record.run_id} --output {manifest.output}")
    out.print(f"  relit-k8s logs {record.run_id} --output {manifest.output} --follow")
    out.print(f"  kubectl -n {ns} get job {record.job}")
    out.print(f"  kubectl -n {ns} get pods -l relit-k8s/run-id={record.run_id}")
    out.print(f"  kubectl -n {ns} logs -l relit-k8s/run-id={record.run_id} --prefix")


def _print_objects(objects: list[dict], fmt: str) -> None:
    if fmt == "json":
        data = objects[0] if len(objects) == 1 else {"apiVersion": "v1", "kind": "List",
                                                     "items": objects}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))


def _print_job_summary(job: dict) -> None:
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    table = Table(title="Job", show_header=False, title_justify="left", box=None)
    table.add_column(style="bold cyan")
    table.add_column()
    rows = {
        "name": job["metadata"]["name"],
        "namespace": job["metadata"].get("namespace", "(the context's)"),
        "image": container["image"],
        "indexes": f"{spec['completions']} ({spec['parallelism']} at a time)",
        "resources": ", ".join(f"{k}={v}" for k, v in container["resources"]["requests"]
                               .items()),
        "retries": f"{spec['backoffLimitPerIndex']} per index; the Job fails past "
                   f"{spec['maxFailedIndexes']} failed indexes or on a configuration error",
        "s3 secret": next((e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
                           if "valueFrom" in e), "(none: pod identity)"),
        "print it": "add -o yaml (pipe to kubectl apply -f - after relit-k8s plan)",
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    out.print(table)


@app.command("logs")
@handles_errors
def logs_cmd(
    run: Annotated[str, typer.Argument(help="Run id (the Job's name).")],
    output: OutputFindOpt = None,
    index: Annotated[int | None, typer.Option("--index", min=0, help="Only this shard.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the pods end.")]
    = False,
    all_attempts: Annotated[bool, typer.Option("--all-attempts", help="Every pod, not only "
                                               "the newest attempt of each index.")] = False,
    tail: Annotated[int | None, typer.Option("--tail", min=0, help="Last lines per pod.")]
    = None,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
):
    """Print the logs of a run's pods: the newest attempt of each index, prefixed by index."""
    import threading

    from .kube.runs import cluster_for, newest_pods, pod_index

    cluster = cluster_for(_record(run, output), context, namespace)
    pods = newest_pods(cluster.list_pods(run, index), all_attempts)
    if not pods:
        raise ConfigError(f"no pods of run {run} in namespace {cluster.namespace}"
                          + (f" for index {index}" if index is not None else ""))
    lock = threading.Lock()
    prefix = len(pods) > 1 or index is None

    def show(pod: dict) -> None:
        name = pod["metadata"]["name"]
        for line in cluster.pod_logs(name, follow=follow, tail=tail):
            with lock:
                sys.stdout.write(f"[{pod_index(pod)}] {line}\n" if prefix else line + "\n")
                sys.stdout.flush()

    if not follow:
        for pod in pods:
            show(pod)
        return
    threads = [threading.Thread(target=show, args=(p,), daemon=True) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _record(run: str, output: str | None):
    if not output:
        return None
    from .kube.runs import read_submission
    from .status import load_run

    return read_submission(load_run(output, run))


@app.command("cancel")
@handles_errors
def cancel_cmd(
    run: Annotated[str, typer.Argument(help="Run id (the Job's name).")],
    output: OutputFindOpt = None,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
):
    """Delete a run's Job and its pods; workers save their reports as they stop."""
    from .kube.runs import cluster_for

    cluster = cluster_for(_record(run, output), context, namespace)
    cluster.delete_job(run)
    out.print(f"Job {run} deleted in namespace {cluster.namespace} (pods stop in the "
              "background); outputs and reports stay. relit-k8s resume continues it.")


@app.command("resume")
@handles_errors
def resume_cmd(
    run: Annotated[str, typer.Argument(help="Run id to finish.")],
    output: OutputOpt = ...,
    local: Annotated[bool, typer.Option("--local", help="Run the rest here, not as a Job.")]
    = False,
    image: Annotated[str | None, typer.Option("--image", help="[default: the run's]")] = None,
    parallelism: Annotated[int | None, typer.Option("--parallelism", min=1, help="[default: "
                                                    "the run's]")] = None,
    shards: ShardsOpt = None, dry_run: DryRunOpt = False,
    trust_reports: Annotated[bool, typer.Option(
        "--trust-reports", help="Skip shards reported done without listing their outputs "
        "(faster on huge runs; misses outputs deleted since).")] = False,
    fmt: Annotated[str | None, typer.Option("-o", "--format", metavar="yaml|json")] = None,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
    gpus: GpusOpt = None, workers: WorkersOpt = None, device: DeviceOpt = None,
    strict: StrictOpt = False, progress: ProgressOpt = True,
):
    """A new run over only the units not yet written (or failed), as a Job or here."""
    from .kube.runs import read_submission
    from .resume import plan_resume
    from .status import load_run

    manifest = load_run(output, run)
    record = read_submission(manifest)
    on_cluster = record is not None and not local
    if on_cluster:
        job_settings = record.settings.model_copy(update={
            k: v for k, v in {"image": image, "parallelism": parallelism,
                              "namespace": namespace}.items() if v is not None})
        slots, width = None, job_settings.parallelism
    else:
        slots = _slots(device, gpus, workers)
        width = len(slots)
    resumed = plan_resume(manifest, width, shards, trust_reports)
    if resumed is None:
        out.print(f"run {run}: every output is written; nothing to resume")
        return
    out.print(f"run {run}: {resumed.items} outputs in {resumed.units} units are missing; "
              f"new run {resumed.run_id}", highlight=False)
    if on_cluster:
        _submit(resumed, job_settings, context or record.context, dry_run, fmt, "Resume")
    elif dry_run:
        _print_summary(resumed, "Resume (dry run: nothing written)")
    else:
        _run_here(resumed, slots, progress, strict, again=f"relit-k8s resume {run} --local")


@app.command("gallery")
@handles_errors
def gallery_cmd(
    run: Annotated[str | None, typer.Argument(help="Run id [default: the newest run].")] = None,
    output: OutputOpt = ...,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Samples per pair.")] = 3,
    max_images: Annotated[int, typer.Option("--max-images", min=1)] = 12,
    max_refs: Annotated[int, typer.Option("--max-refs", min=1)] = 8,
):
    """Write an HTML contact sheet and a PNG grid of a run's results (thumbnails)."""
    from .gallery import build

    result = build(output, run, samples, max_images, max_refs)
    out.print(f"gallery: {result['html']}")
    out.print(f"grid:    {result['png']}")
    out.print(f"{result['images']} images x {result['references']} references, "
              f"{result['thumbnails']} thumbnails, {result['failed_pairs']} failed pairs marked",
              highlight=False)


@app.command("make-model")
@handles_errors
def make_model_cmd(
    path: Annotated[str, typer.Argument(help="Directory to write the model to.")],
    size: Annotated[str, typer.Option("--size", metavar="tiny|sd21",
                                      help="tiny (tests) or sd21 (the seed model's sizes)")]
    = "tiny",
    distinct_uncond: Annotated[bool, typer.Option(
        "--distinct-uncond", help="Give the unconditional branch its own embedding (then "
        "guidance needs two passes per step).")] = False,
    new_decoder: Annotated[bool, typer.Option("--new-decoder",
                                              help="Also write vae_new_decoder/.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where to initialise the weights "
                                        "(cuda is much faster for sd21).")] = "cpu",
):
    """Write a random-weight model directory for the diffusion relighter (tests, benchmarks)."""
    from .modelkit import SIZES, make_model

    if size not in SIZES:
        raise ConfigError(f"--size {size!r}: use one of {', '.join(SIZES)}")
    written = make_model(path, size, distinct_uncond=distinct_uncond, new_decoder=new_decoder,
                         device=device)
    out.print(f"model: {written} (random weights, {size}); use it with "
              f"--relighter diffusion -O model={written}")


@app.command("relighters")
@handles_errors
def relighters_cmd():
    """List the relighters that can be used, and their options."""
    from .relighters import available, describe_options, resolve

    table = Table("name", "from", "options")
    for name, target in sorted(available().items()):
        try:
            opts = describe_options(resolve(name))
        except RelitError as e:
            opts = f"[red]cannot load: {e}[/]"
        table.add_row(name, target, opts)
    out.print(table)


def version_callback(value: bool):
    if value:
        out.print(f"relit-k8s {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback,
                                          is_eager=True, help="Print the version.")] = False,
):
    """relit-k8s: relighting inference at scale."""


def main() -> None:
    try:
        app()
    except ConfigError as e:  # pragma: no cover - handled in commands
        err.print(f"error: {e}")
        sys.exit(EXIT_CONFIG)


__all__ = ["app", "main"]
