"""The ``relit-k8s`` command line: parse, call, print.

Commands turn flags into typed settings, call the library (planner, local runner, kube.runs,
status, resume, gallery) and print through :mod:`relit_k8s.console`. The rules live in the
library, where a Python caller meets them too.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Annotated, Any

import click
import typer

from . import __version__
from .console import out
from .errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ConfigError,
    RelitError,
    exit_code_for,
)
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


def _fail(message: str, code: int) -> typer.Exit:
    from .console import fail

    fail(message)
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
            raise _fail("interrupted", EXIT_INTERRUPTED) from None
        except BrokenPipeError:  # the reader left (`| head`): no traceback, as the docs advise
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_FAILED) from None
        except (typer.Exit, typer.Abort, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug or an unforeseen failure: show where, exit by kind
            import traceback

            traceback.print_exc(file=sys.stderr)
            raise _fail(f"{type(e).__name__}: {e}", exit_code_for(e)) from None

    return wrapper


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also print how many "
                                          "requests it sent to S3 (to stderr).")]


def _say_requests(verbose: bool) -> None:
    """``--verbose``: the S3 requests this command sent (none are counted on local folders)."""
    if verbose:
        from .storage import S3_REQUESTS

        sys.stderr.write(f"requests to S3: {S3_REQUESTS.value}\n")


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
ImgPatternOpt = Annotated[str, typer.Option("--img-pattern", metavar="GLOB",
                                            help="Glob on the image file name "
                                            "(or key, if it has a '/').")]
RefPatternOpt = Annotated[str, typer.Option("--ref-pattern", metavar="GLOB",
                                            help="Glob on the reference file "
                                            "name (or key, if it has a '/').")]
ImgFormatsOpt = Annotated[list[str] | None, typer.Option(
    "--img-formats", metavar="EXT",
    help="Image extensions (repeat, or comma-separated); other files are "
    "reported as left out. [default: all it reads, jpg jpeg png bmp webp tif tiff exr hdr]")]
RefFormatsOpt = Annotated[list[str] | None, typer.Option(
    "--ref-formats", metavar="EXT", help="Reference extensions (repeat, or comma-separated). "
    "[default: png exr hdr]")]
RelighterOpt = Annotated[str, typer.Option("--relighter", metavar="NAME",
                                           help="Relighter name (see "
                                           "'relit-k8s relighters') or module:attribute.")]
OptionOpt = Annotated[list[str] | None, typer.Option(
    "-O", "--option", metavar="KEY=VALUE", help="A relighter option (repeatable).")]
DdimOpt = Annotated[int | None, typer.Option("--ddim-steps", min=1, help="Seed parity: sets the "
                                             "relighter option ddim_steps.")]
NewDecoderOpt = Annotated[bool, typer.Option("--new-decoder", help="Seed parity: sets the "
                                             "relighter option new_decoder=true (luminet: the "
                                             "new_decoder.ckpt beside the checkpoint).")]
ShardsOpt = Annotated[int | None, typer.Option(
    "--shards", min=1, help="Number of shards [default: 32 per worker with leases, 4 with "
    "static balance].")]
RunIdOpt = Annotated[str | None, typer.Option("--run-id", metavar="ID",
                                              help="Run id (DNS label, <= 40 chars)"
                                              " [default: derived from the plan, so the same "
                                              "command continues the same run].")]
BatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1, show_default="the relighter's choice: 8, diffusion measures it",
    help="Seeds per relighter call.")]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse images larger "
                                           "than this many pixels (checked before decoding).")]
BalanceOpt = Annotated[str, typer.Option(
    "--balance", metavar="MODE", help="How shards reach workers: auto, leases or static. "
    "leases: each "
    "worker claims shards from the output store until none is left (no straggler tail; a "
    "lost worker's shard is taken over; local runs and Jobs can share a run). static: shard i "
    "is Job index i. auto: leases where the output store honours conditional writes (probed "
    "once), else static with a warning.")]
KeepTopOpt = Annotated[int | None, typer.Option(
    "--keep-top", min=1, metavar="K", help="Keep only the K best scored outputs of every pair "
    "(a relighter that scores them: luminet); the others are DELETED once all the pair's seeds "
    "are written [default: keep all].")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; touch nothing.")]
MixedOpt = Annotated[bool, typer.Option(
    "--allow-mixed-output", help="Add to an output folder whose outputs were made by another "
    "relighter, other options or another model (refused otherwise: outputs are named by seed "
    "only, so outputs already there are kept, not remade).")]

# --- local execution flags (run, resume --local) ----------------------------------------------
GpusOpt = Annotated[str | None, typer.Option("--gpus", metavar="0,1",
                                             help="GPUs to use, one worker each.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", min=1, help="Worker processes "
                                                "[default: one per GPU, or 1 on the CPU].")]
DeviceOpt = Annotated[str | None, typer.Option("--device", metavar="cpu|cuda",
                                               help="Where the workers relight [default: cuda "
                                               "if available].")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 if any item failed.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="No progress bar.")]

# --- cluster flags -----------------------------------------------------------------------------
NamespaceOpt = Annotated[str | None, typer.Option(
    "--namespace", "-n", metavar="NS",
    help="Namespace [default: the submission's, else the context's].")]
ContextOpt = Annotated[str | None, typer.Option("--context", metavar="CONTEXT",
                                                help="kubeconfig context "
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


def _plan_settings(
    *, input: str, refs: str, output: str, normals: str | None, iterations: int, seed: int,
    img_pattern: str, ref_pattern: str, img_formats: list[str] | None,
    ref_formats: list[str] | None, relighter: str, option: list[str] | None,
    ddim_steps: int | None, new_decoder: bool, shards: int | None, run_id: str | None,
    batch_size: int | None, max_pixels: int, workers: int, balance: str = "auto",
    keep_top: int | None = None,
):
    """PlanSettings from the shared selection flags of plan, run and submit."""
    from pydantic import ValidationError

    from .planner import PlanSettings

    data: dict[str, Any] = dict(
        input=input, refs=refs, output=output, normals=normals, iterations=iterations,
        seed=seed, img_pattern=img_pattern, ref_pattern=ref_pattern, relighter=relighter,
        options=_options(option, ddim_steps, new_decoder), shards=shards, run_id=run_id,
        batch_size=batch_size, max_pixels=max_pixels, workers=workers, balance=balance,
        keep_top=keep_top)
    for name, values in (("img_formats", img_formats), ("ref_formats", ref_formats)):
        if parsed := _formats(values):
            data[name] = parsed
    try:
        return PlanSettings(**data)
    except ValidationError as e:
        raise ConfigError("; ".join(
            f"--{'.'.join(map(str, x['loc'])).replace('_', '-')}: "
            f"{x['msg'].removeprefix('Value error, ')}" for x in e.errors())) from e


def _make_plan(settings, dry_run: bool = False):
    """List the sources and plan; ``--balance auto`` probes the output store (not in a dry
    run, which writes nothing: it assumes leases)."""
    from . import console
    from .planner import choose_balance, list_sources, plan

    sources = list_sources(settings)
    console.left_out(sources.left_out)
    manifest = plan(settings, sources.images, sources.references)  # options checked first
    balance, warning = choose_balance(settings, probe=not dry_run)
    if warning:
        console.warning(f"--balance auto: {warning}")
    if balance == manifest.balance:
        return manifest
    return plan(settings, sources.images, sources.references, balance=balance)


@app.command("plan")
@handles_errors
def plan_cmd(
    input: InputOpt, refs: RefsOpt, output: OutputOpt, normals: NormalsOpt = None,
    iterations: IterationsOpt = 50, seed: SeedOpt = 0, img_pattern: ImgPatternOpt = "*",
    ref_pattern: RefPatternOpt = "*", img_formats: ImgFormatsOpt = None,
    ref_formats: RefFormatsOpt = None, relighter: RelighterOpt = "sh",
    option: OptionOpt = None, ddim_steps: DdimOpt = None, new_decoder: NewDecoderOpt = False,
    shards: ShardsOpt = None, run_id: RunIdOpt = None, batch_size: BatchOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS, balance: BalanceOpt = "auto",
    keep_top: KeepTopOpt = None,
    dry_run: DryRunOpt = False,
    allow_mixed: MixedOpt = False,
    workers: Annotated[int, typer.Option(
        "--parallelism", "--workers", min=1, help="Workers (pods) the default shard count is "
        "made for: the same as submit's --parallelism, so that plan and submit --dry-run with "
        "the same flags make the same run.")] = 8,
):
    """List inputs and references and write the run's manifest (no relighting)."""
    from . import console
    from .planner import write_manifest

    manifest = _make_plan(_plan_settings(
        input=input, refs=refs, output=output, normals=normals, iterations=iterations,
        seed=seed, img_pattern=img_pattern, ref_pattern=ref_pattern, img_formats=img_formats,
        ref_formats=ref_formats, relighter=relighter, option=option, ddim_steps=ddim_steps,
        new_decoder=new_decoder, shards=shards, run_id=run_id, batch_size=batch_size,
        max_pixels=max_pixels, workers=workers, balance=balance, keep_top=keep_top),
        dry_run=dry_run)
    if dry_run:
        _check_maker(manifest, allow_mixed)
        console.plan_summary(manifest, "Plan (dry run: nothing written)")
        return
    manifest, uri = write_manifest(manifest, allow_mixed)
    console.plan_summary(manifest, "Plan")
    console.where("manifest", uri)
    console.command("start a worker on it with (with leases it claims shards until none is "
                    "left):" if manifest.balance == "leases" else "run its first shard with:",
                    ["relit-k8s", "worker", "--manifest", uri, "--index", "0"])


@app.command("run")
@handles_errors
def run_cmd(
    input: InputOpt, refs: RefsOpt, output: OutputOpt, normals: NormalsOpt = None,
    iterations: IterationsOpt = 50, seed: SeedOpt = 0, img_pattern: ImgPatternOpt = "*",
    ref_pattern: RefPatternOpt = "*", img_formats: ImgFormatsOpt = None,
    ref_formats: RefFormatsOpt = None, relighter: RelighterOpt = "sh",
    option: OptionOpt = None, ddim_steps: DdimOpt = None, new_decoder: NewDecoderOpt = False,
    shards: ShardsOpt = None, run_id: RunIdOpt = None, batch_size: BatchOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS, balance: BalanceOpt = "auto",
    keep_top: KeepTopOpt = None,
    dry_run: DryRunOpt = False,
    allow_mixed: MixedOpt = False,
    gpus: GpusOpt = None, workers: WorkersOpt = None, device: DeviceOpt = None,
    strict: StrictOpt = False, no_progress: NoProgressOpt = False,
):
    """Relight on this machine: one worker process per GPU (or on the CPU). No cluster needed."""
    from . import console

    slots = _slots(device, gpus, workers)
    manifest = _make_plan(_plan_settings(
        input=input, refs=refs, output=output, normals=normals, iterations=iterations,
        seed=seed, img_pattern=img_pattern, ref_pattern=ref_pattern, img_formats=img_formats,
        ref_formats=ref_formats, relighter=relighter, option=option, ddim_steps=ddim_steps,
        new_decoder=new_decoder, shards=shards, run_id=run_id, batch_size=batch_size,
        max_pixels=max_pixels, workers=len(slots), balance=balance, keep_top=keep_top),
        dry_run=dry_run)
    if dry_run:
        _check_maker(manifest, allow_mixed)
        console.plan_summary(manifest, "Plan (dry run: nothing written)")
        return
    _run_here(manifest, slots, not no_progress, strict, allow_mixed=allow_mixed)


def _slots(device: str | None, gpus: str | None, workers: int | None):
    from .local import parse_gpus, plan_slots

    return plan_slots(device, parse_gpus(gpus), workers)


def _check_maker(manifest, allow_mixed: bool) -> None:
    """A dry run's check that the output folder's outputs were made the same way."""
    if allow_mixed:
        return
    from .maker import check_maker
    from .storage import open_storage

    check_maker(manifest, open_storage(manifest.output), allow_mixed)


def _finished(run) -> bool:
    """Whether every shard of a ``balance: leases`` run is marked finished (one listing)."""
    if run.manifest.balance != "leases":
        return False
    from .leases import LeaseBook

    return len(LeaseBook(run.output, run.run_id).listing().done) >= run.manifest.shards


def _run_here(manifest, slots, progress: bool, strict: bool, again: str = "run the same "
              "command again", allow_mixed: bool = False) -> None:
    """Write the manifest, run its shards in local worker processes, print the outcome."""
    from . import console
    from .local import preflight, run_local
    from .planner import write_run
    from .status import collect, record_launch

    preflight(manifest)
    run = write_run(manifest, allow_mixed)
    manifest, uri = run.manifest, run.manifest_uri
    if _finished(run):  # balance leases: finished shards are not listed again
        out.print(f"run [bold]{manifest.run_id}[/] is finished: all {manifest.shards} shards "
                  "are done, nothing to relight", highlight=False)
        status = collect(run)
        console.run_outcome(status, run.uri_of(run.paths.shards) + "/")
        console.command("to find and redo outputs deleted since:",
                        ["relit-k8s", "resume", manifest.run_id, "--output", manifest.output,
                         "--local"])
        raise typer.Exit(EXIT_FAILED if strict and status.items_failed else EXIT_OK)
    record_launch(run, len(slots))
    where = slots[0].device if slots[0].device == "cpu" else "GPU " + ",".join(
        sorted({s.visible_gpu or "0" for s in slots}))
    out.print(f"run [bold]{manifest.run_id}[/]: {console.plural(manifest.items, 'output')} "
              f"({console.plural(len(manifest.images), 'image')} x "
              f"{console.plural(len(manifest.references), 'reference')} x "
              f"{manifest.iterations}) in {console.plural(manifest.shards, 'shard')} on "
              f"{len(slots)} worker(s), {where}", highlight=False)
    if progress:
        # leases: the shards an earlier attempt finished are not run again, and their items
        # would never reach the bar
        before = sum(r.items_finished for r in run.read_reports().values()
                     if r.state == "done") if manifest.balance == "leases" else 0
        with console.progress_runner(manifest.items, before) as (on_progress, on_log):
            result = run_local(uri, manifest.shards, slots, on_progress=on_progress,
                               on_log=on_log)
    else:
        result = run_local(uri, manifest.shards, slots, on_log=console.warn_log)
    status = collect(run)
    console.run_outcome(status, run.uri_of(run.paths.shards) + "/")
    console.problems(result.messages)
    if result.interrupted:
        raise _fail(f"interrupted: {again} to continue", result.interrupt_code)
    code = result.exit_code
    if code == EXIT_OK and strict and status.items_failed:
        code = EXIT_FAILED
    raise typer.Exit(code)


@app.command("worker")
@handles_errors
def worker_cmd(
    manifest: Annotated[str | None, typer.Option("--manifest", envvar="RELIT_MANIFEST",
                                                 metavar="URI",
                                                 help="Manifest URI.")]
    = None,
    index: Annotated[int | None, typer.Option(
        "--index", min=0, help="This worker's index, whose shards it claims first (leases), "
        "or the shard it runs (static) [env: JOB_COMPLETION_INDEX].")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="cpu|cuda|cuda:N",
                                               help="Where the worker relights [default: cuda "
                                               "if available].")] = None,
    log_format: Annotated[str | None, typer.Option(
        "--log-format", metavar="text|json", help="text, or one JSON object per line "
        "[env: RELIT_LOG_FORMAT; default text; the Job sets json].")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, envvar="RELIT_POD_WORKERS", help="Worker processes here, each "
        "claiming shards (leases) [default: one per visible GPU, else 1].")] = None,
):
    """The pod entrypoint: claim shards until every shard of the run is finished (leases), or
    run shard --index (static). Exit 0 done, 75 retry, 78 config error, 143 stopped."""
    from . import logs
    from .worker import check_cache_writable, check_expected_gpus, main

    logs.setup(logs.log_format(log_format))
    check_expected_gpus(device)
    check_cache_writable()
    slots = _pod_slots(device, workers)
    if len(slots) > 1:  # a GPU each, or CPU stand-ins: one process per slot, claiming
        from .local import run_pod
        from .worker import job_index

        code = run_pod(_manifest_uri(manifest), job_index(index), slots)
        if code is not None:
            raise typer.Exit(code)
    raise typer.Exit(main(manifest, index, device))


def _manifest_uri(manifest: str | None) -> str:
    if not manifest:
        raise ConfigError("no manifest: pass --manifest URI or set RELIT_MANIFEST")
    return manifest


def _pod_slots(device: str | None, workers: int | None):
    """``worker``'s processes: ``--workers``, else one per visible GPU when the device is
    ``cuda`` (or left out and GPUs are visible); a device such as ``cuda:1`` is one worker."""
    if device is not None and device not in ("cpu", "cuda"):
        return []
    if workers is None and device == "cpu":
        return []
    from .local import cuda_visible, plan_slots

    if workers is None and not cuda_visible():
        return []

    return plan_slots(device, None, workers)


@app.command("status")
@handles_errors
def status_cmd(
    run: Annotated[str | None, typer.Argument(help="Run id [default: the newest run].")] = None,
    output: OutputOpt = ...,  # type: ignore[assignment]  # typer: required
    fmt: Annotated[str, typer.Option("-o", "--format", metavar="table|json",
                                      help="A table, or one JSON object (the documented "
                                      "keys).")] = "table",
    namespace: NamespaceOpt = None, context: ContextOpt = None,
    no_cluster: Annotated[bool, typer.Option("--no-cluster", help="Do not read the Job of "
                                             "a submitted run.")] = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until the run ends: no "
                                        "shard runs or is starting, and its Job (if any) has "
                                        "ended (Ctrl+C to leave).")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.5, help="Seconds between "
                                            "refreshes with --watch.")] = 5.0,
    stall_after: Annotated[float, typer.Option("--stall-after", min=1, help="Flag running "
                                               "shards silent this many seconds.")] = 120.0,
    verbose: VerboseOpt = False,
):
    """Show a run's progress, speed and failures (shard reports), and its Job if submitted."""
    from . import console
    from .run import Run
    from .status import collect

    if fmt not in ("table", "json"):
        raise ConfigError(f"-o {fmt!r}: use table or json")
    the_run = Run.load(output, run)

    def snapshot():
        status = collect(the_run, stall_after=stall_after)
        if not no_cluster:
            from .kube.runs import job_state

            status.job = job_state(the_run, namespace, context)
        return status

    status = snapshot()
    if fmt == "json":
        sys.stdout.write(status.model_dump_json(indent=2) + "\n")
        _say_requests(verbose)
        return
    if not watch:
        out.print(console.status_view(status))
        _say_requests(verbose)
        return
    if not out.is_terminal:  # a pipe or a file: every refresh, one after the other
        while True:
            out.print(console.status_view(status))
            if not status.going:
                return
            time.sleep(interval)
            status = snapshot()
    from rich.live import Live

    try:
        with Live(console.status_view(status), console=out, auto_refresh=False) as live:
            while status.going:
                time.sleep(interval)
                status = snapshot()
                live.update(console.status_view(status), refresh=True)
    except KeyboardInterrupt:
        pass


# --- Kubernetes --------------------------------------------------------------------------------
@app.command("submit")
@handles_errors
def submit_cmd(
    input: InputOpt, refs: RefsOpt, output: OutputOpt,
    image: Annotated[str, typer.Option("--image", metavar="IMAGE",
                                       help="Container image with relit-k8s "
                                       "(see the Dockerfile).")],
    normals: NormalsOpt = None,
    iterations: IterationsOpt = 50, seed: SeedOpt = 0, img_pattern: ImgPatternOpt = "*",
    ref_pattern: RefPatternOpt = "*", img_formats: ImgFormatsOpt = None,
    ref_formats: RefFormatsOpt = None, relighter: RelighterOpt = "sh",
    option: OptionOpt = None, ddim_steps: DdimOpt = None, new_decoder: NewDecoderOpt = False,
    shards: ShardsOpt = None, run_id: RunIdOpt = None, batch_size: BatchOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS, balance: BalanceOpt = "auto",
    keep_top: KeepTopOpt = None,
    dry_run: DryRunOpt = False,
    allow_mixed: MixedOpt = False,
    parallelism: Annotated[int, typer.Option("--parallelism", min=1, max=100_000,
                                             help="Pods running at once.")] = 8,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
    s3_secret: Annotated[str, typer.Option("--s3-secret", metavar="NAME",
                                           help="Secret with AWS_ACCESS_KEY_ID "
                                           "and AWS_SECRET_ACCESS_KEY ('' for pod identity)."
                                           )] = "relit-s3",
    s3_endpoint: Annotated[str | None, typer.Option(
        "--s3-endpoint", metavar="URL",
        help="AWS_ENDPOINT_URL for the pods [default: $AWS_ENDPOINT_URL].")]
    = None,
    s3_region: Annotated[str | None, typer.Option(
        "--s3-region", metavar="REGION",
        help="AWS_REGION for the pods [default: $AWS_REGION].")] = None,
    gpus_per_pod: Annotated[int, typer.Option("--gpus-per-pod", min=0,
                                              help="nvidia.com/gpu per pod (0: CPU only).")] = 1,
    cpu: Annotated[str, typer.Option("--cpu", metavar="CPUS", help="CPU request per pod.")] = "4",
    cpu_limit: Annotated[str | None, typer.Option("--cpu-limit", metavar="CPUS",
                                                  help="CPU limit per pod.")]
    = None,
    memory: Annotated[str, typer.Option("--memory", metavar="BYTES",
                                        help="Memory request and limit.")] = "16Gi",
    node_selector: Annotated[list[str] | None, typer.Option(
        "--node-selector", metavar="KEY=VALUE", help="Node label to require (repeatable).")]
    = None,
    toleration: Annotated[list[str] | None, typer.Option(
        "--toleration", metavar="TOLERATION", help="KEY[=VALUE][:EFFECT] (repeatable), added "
        "to nvidia.com/gpu:NoSchedule, which GPU pods always have.")] = None,
    priority_class: Annotated[str | None, typer.Option(
        "--priority-class", metavar="NAME", help="PriorityClass of the pods (preemption order "
        "on a shared cluster).")] = None,
    service_account: Annotated[str | None, typer.Option(
        "--service-account", metavar="NAME", help="ServiceAccount of the pods (for S3 access "
        "through a pod identity; the workers need no Kubernetes API access) [default: the "
        "namespace's default].")] = None,
    queue: Annotated[str | None, typer.Option("--queue", metavar="NAME",
                                              help="Kueue LocalQueue name.")] = None,
    backoff_limit_per_index: Annotated[int, typer.Option("--backoff-limit-per-index", min=0,
                                                         help="Retries of each index.")] = 3,
    max_failed_indexes: Annotated[int | None, typer.Option(
        "--max-failed-indexes", min=0, help="Stop the Job early past this many failed "
        "indexes (one index that fails for good already makes it end Failed, reason "
        "FailedIndexes, once the others are done) [default: a tenth of the shards].")] = None,
    ttl: Annotated[int | None, typer.Option("--ttl", min=0, show_default=False,
                                            help="Seconds the finished Job is kept [default: "
                                            "a week, 604800].")] = 7 * 24 * 3600,
    grace_period: Annotated[int, typer.Option("--grace-period", min=1, help="Pod termination "
                                              "grace period, seconds.")] = 120,
    image_pull_policy: Annotated[str, typer.Option(
        "--image-pull-policy", metavar="POLICY",
        help="When the nodes pull --image: Always, IfNotPresent or Never.")] = "IfNotPresent",
    image_pull_secret: Annotated[str | None, typer.Option(
        "--image-pull-secret", metavar="NAME", help="Secret with the credentials of a private "
        "registry.")] = None,
    cache_host_path: Annotated[str | None, typer.Option(
        "--cache-host-path", metavar="DIR", help="Opt-in: a node directory as the model cache "
        "shared by the pods of a node (a hostPath volume: the baseline and restricted Pod "
        "Security Standards forbid it, and manifests/base enforces restricted, so use a "
        "namespace that allows it; submit refuses it where it can read the namespace's "
        "labels).")] = None,
    runtime_class: Annotated[str | None, typer.Option(
        "--runtime-class", metavar="NAME", help="runtimeClassName of the pods: nvidia where "
        "the NVIDIA runtime is not the nodes' default (k3s, RKE2, some GPU Operator set-ups) "
        "[default: the nodes' default].")] = None,
    no_fixed_ids: Annotated[bool, typer.Option(
        "--no-fixed-ids", help="Leave the pods' uid/gid (10001 otherwise) to the cluster: on "
        "OpenShift, whose restricted-v2 SCC picks the uid (the image runs as any uid).")]
    = False,
    active_deadline: Annotated[str | None, typer.Option(
        "--active-deadline", metavar="DURATION", help="A hard stop: the Job fails (reason "
        "DeadlineExceeded) and its pods are stopped this long after it starts, e.g. 6h, 90m, "
        "1h30m [default: none].")] = None,
    fmt: Annotated[str | None, typer.Option("-o", "--format", metavar="yaml|json",
                                            help="Print the Job as YAML or JSON.")] = None,
):
    """Run on Kubernetes: write the manifest and create one Indexed Job (with leases,
    --parallelism workers claiming shards; with static shards, one index per shard)."""
    from .kube.job import JobSettings, parse_duration

    manifest = _make_plan(_plan_settings(
        input=input, refs=refs, output=output, normals=normals, iterations=iterations,
        seed=seed, img_pattern=img_pattern, ref_pattern=ref_pattern, img_formats=img_formats,
        ref_formats=ref_formats, relighter=relighter, option=option, ddim_steps=ddim_steps,
        new_decoder=new_decoder, shards=shards, run_id=run_id, batch_size=batch_size,
        max_pixels=max_pixels, workers=parallelism, balance=balance, keep_top=keep_top),
        dry_run=dry_run)
    job_settings = JobSettings.from_flags(
        node_selector=node_selector, toleration=toleration, image=image, namespace=namespace,
        parallelism=parallelism, gpus_per_pod=gpus_per_pod, cpu=cpu, cpu_limit=cpu_limit,
        memory=memory, s3_secret=s3_secret, s3_endpoint=s3_endpoint, s3_region=s3_region,
        backoff_limit_per_index=backoff_limit_per_index, max_failed_indexes=max_failed_indexes,
        ttl_seconds_after_finished=ttl, termination_grace_seconds=grace_period,
        priority_class=priority_class, service_account=service_account, queue=queue,
        image_pull_policy=image_pull_policy, image_pull_secret=image_pull_secret,
        cache_host_path=cache_host_path, runtime_class=runtime_class, fixed_ids=not no_fixed_ids,
        active_deadline_seconds=parse_duration(
            active_deadline, "--active-deadline") if active_deadline else None)
    _submit(manifest, job_settings, context, dry_run, fmt, allow_mixed=allow_mixed)


def _submit(manifest, job_settings, context: str | None, dry_run: bool, fmt: str | None,
            title: str = "Submit", allow_mixed: bool = False) -> None:
    from . import console
    from .kube.runs import plan_job, submit

    if fmt not in (None, "yaml", "json"):
        raise ConfigError(f"-o {fmt!r}: use yaml or json")
    if dry_run:
        _check_maker(manifest, allow_mixed)
        job = plan_job(manifest, job_settings)
        if fmt:
            console.print_objects([job], fmt)
            return
        console.plan_summary(manifest, f"{title} (dry run: nothing written or created)")
        console.job_summary(job)
        return
    created, record = submit(manifest, job_settings, context, allow_mixed=allow_mixed,
                             warn=console.warning)
    if fmt:
        console.print_objects([created], fmt)
        return
    console.submitted(record, manifest, created)


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
    max_streams: Annotated[int, typer.Option(
        "--max-streams", min=1, max=1000, help="With --follow: logs streamed at once, each an "
        "open connection to a kubelet; the other pods' logs follow as these end.")] = 16,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
):
    """Print the logs of a run's pods: the newest attempt of each index, prefixed by index.

    A pod that has not started yet (pulling its image, no node, a missing Secret) shows its
    waiting reason on stderr instead; with --follow the command waits for it (one watch of the
    run's pods, whatever their number). A pod whose log cannot be read does not stop the
    others; the command then exits with that error's code."""
    from . import console
    from .kube.pods import stream_logs
    from .kube.runs import cluster_for, find_submission

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    record = find_submission(output, run, namespace)
    errors = stream_logs(cluster_for(record, context, namespace), run, emit, index, follow,
                         tail, all_attempts, note=console.note, max_streams=max_streams)
    if errors:
        raise typer.Exit(errors[0].exit_code)


@app.command("cancel")
@handles_errors
def cancel_cmd(
    run: Annotated[str, typer.Argument(help="Run id (the Job's name).")],
    output: OutputFindOpt = None,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
):
    """Delete a run's Job and its pods; workers save their reports as they stop."""
    from .kube.runs import cluster_for, find_submission

    cluster = cluster_for(find_submission(output, run, namespace), context, namespace)
    cluster.delete_job(run)
    out.print(f"Job {run} deleted in namespace {cluster.namespace} (pods stop in the "
              "background); outputs and reports stay. relit-k8s resume continues it.")


@app.command("scale")
@handles_errors
def scale_cmd(
    run: Annotated[str, typer.Argument(help="Run id (the Job's name).")],
    parallelism: Annotated[int, typer.Option(
        "--parallelism", min=1, max=100_000, help="Pods working at once from now on.")],
    output: OutputFindOpt = None,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
):
    """Add or remove pods of a running Job.

    With leases (the default balance) the Job has one index per worker, and both its
    parallelism and completions change (an elastic Indexed Job): new workers claim the shards
    that are left; removed ones stop and release theirs at once. With static shards only the
    number of pods at once changes.
    """
    from .kube.runs import cluster_for, find_submission, scale

    cluster = cluster_for(find_submission(output, run, namespace), context, namespace)
    before, after, elastic, warning = scale(cluster, run, parallelism)
    if warning:
        from .console import warning as warn

        warn(warning)
    what = ("workers (parallelism and completions: each claims shards until none is left)"
            if elastic else "pods at a time (parallelism; one shard per index)")
    out.print(f"Job {run} in namespace {cluster.namespace}: {before} -> {after} {what}",
              highlight=False)


@app.command("resume")
@handles_errors
def resume_cmd(
    run: Annotated[str | None, typer.Argument(help="Run id to finish [default: the newest "
                                              "run].")] = None,
    output: OutputOpt = ...,  # type: ignore[assignment]  # typer: required
    local: Annotated[bool, typer.Option("--local", help="Run the rest here, not as a Job.")]
    = False,
    image: Annotated[str | None, typer.Option(
        "--image", metavar="IMAGE",
        help="Container image of the new Job (cluster runs) [default: the run's].")]
    = None,
    parallelism: Annotated[int | None, typer.Option(
        "--parallelism", min=1, help="Pods of the new Job running at once (cluster runs) "
        "[default: the run's].")] = None,
    shards: ShardsOpt = None, dry_run: DryRunOpt = False,
    trust_reports: Annotated[bool, typer.Option(
        "--trust-reports", help="Skip shards reported done without listing their outputs "
        "(faster on huge runs; misses outputs deleted since).")] = False,
    fmt: Annotated[str | None, typer.Option(
        "-o", "--format", metavar="yaml|json", help="Print the new Job as YAML or JSON "
        "(cluster runs).")] = None,
    namespace: NamespaceOpt = None, context: ContextOpt = None,
    gpus: GpusOpt = None, workers: WorkersOpt = None, device: DeviceOpt = None,
    strict: StrictOpt = False, no_progress: NoProgressOpt = False, verbose: VerboseOpt = False,
):
    """A new run over only the units not yet written (or failed).

    It runs as a new Job when the run was submitted to Kubernetes, and here (like relit-k8s run)
    when the run was local or --local is given.
    """
    from . import console
    from .resume import plan_resume, resume_on_cluster
    from .run import Run

    the_run = Run.load(output, run)
    run = the_run.run_id
    record = resume_on_cluster(the_run, local)
    if record is not None:
        job_settings = record.settings.model_copy(update={
            k: v for k, v in {"image": image, "parallelism": parallelism,
                              "namespace": namespace}.items() if v is not None})
        slots, width = None, job_settings.parallelism
    else:
        slots = _slots(device, gpus, workers)
        width = len(slots)
    resumed = plan_resume(the_run, width, shards, trust_reports)
    _say_requests(verbose)
    if resumed is None:
        out.print(f"run {run}: every output is written; nothing to resume")
        return
    out.print(f"run {run}: {resumed.items} outputs in {resumed.units} units are missing; "
              f"new run {resumed.run_id}", highlight=False)
    if record is not None:
        _submit(resumed, job_settings, context or record.context, dry_run, fmt, "Resume",
                allow_mixed=True)  # it continues a run the folder already took
    elif dry_run:
        console.plan_summary(resumed, "Resume (dry run: nothing written)")
    else:
        _run_here(resumed, slots, not no_progress, strict, again=f"relit-k8s resume {run} --local",
                  allow_mixed=True)  # it continues a run the folder already took


@app.command("gallery")
@handles_errors
def gallery_cmd(
    run: Annotated[str | None, typer.Argument(help="Run id [default: the newest run].")] = None,
    output: OutputOpt = ...,  # type: ignore[assignment]  # typer: required
    samples: Annotated[int, typer.Option("--samples", min=1, help="Samples per pair.")] = 3,
    max_images: Annotated[int, typer.Option("--max-images", min=1,
                                            help="Input images shown (rows).")] = 12,
    max_refs: Annotated[int, typer.Option("--max-refs", min=1,
                                          help="References shown (columns).")] = 8,
    to: Annotated[str | None, typer.Option(
        "--to", metavar="DIR", help="Write the gallery to this folder instead, with copies of "
        "the samples it links to, so that it opens in a browser without the bucket [default: "
        "next to the run, <output>/_relit/<run>/gallery/].")] = None,
    verbose: VerboseOpt = False,
):
    """Write an HTML contact sheet and a PNG grid of a run's results (thumbnails)."""
    from . import console
    from .gallery import build

    result = build(output, run, samples, max_images, max_refs, to=to)
    _say_requests(verbose)
    console.where("gallery", result["html"])
    console.where("grid", result["png"])
    out.print(f"{result['images']} images x {result['references']} references, "
              f"{result['thumbnails']} thumbnails, {result['failed_pairs']} failed pairs marked",
              highlight=False)
    if result["html"].startswith("s3://"):
        console.command("a page in a bucket does not open in a browser as it is; for a copy "
                        "here, with the samples it links to:",
                        ["relit-k8s", "gallery", *([run] if run else []), "--output", output,
                         "--to", "gallery/"])


FormatOpt = Annotated[str, typer.Option("--format", "-o", metavar="table|json", help="A table, "
                                        "or JSON: one object per line, most similar first.")]


@app.command("score")
@handles_errors
def score_cmd(
    files: Annotated[list[str], typer.Argument(metavar="IMAGES...", help="Relit images: files "
                                               "or folders (searched for image files), local "
                                               "or s3://.")],
    reference: Annotated[str, typer.Option("--reference", metavar="FILE",
                                           help="The reference lighting image "
                                           "(8-bit, or .hdr/.exr: tone-mapped as LumiNet's "
                                           "loader does).")],
    weights: Annotated[str, typer.Option("--weights", metavar="FILE",
                                         help="LumiNet.ckpt (its selector keys), "
                                         "or the seed selection's last.pth.tar.")],
    config: Annotated[str | None, typer.Option("--config", metavar="YAML",
                                               help="The LumiNet YAML of a model "
                                               "of other sizes [default: the full-size "
                                               "model].")] = None,
    fmt: FormatOpt = "table",
    device: Annotated[str, typer.Option("--device", metavar="cpu|cuda", help="Where the "
                                        "selector runs (float32 either way).")] = "cpu",
):
    """Rank relit images by how close their lighting is to a reference: LumiNet's seed
    selection (seed_selection.py), most similar first."""
    from .scores import score_files

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: use table or json")
    ranked = score_files(files, reference, weights, config, device)
    if fmt == "json":
        import json

        for file, similarity in ranked:
            sys.stdout.write(json.dumps({"file": file, "similarity": similarity}) + "\n")
        return
    from rich.table import Table

    table = Table("rank", "similarity", "file", box=None)
    table.columns[2].overflow = "fold"  # a path to copy: folded, never cut
    for i, (file, similarity) in enumerate(ranked, 1):
        table.add_row(str(i), f"{similarity:.6f}", file)
    out.print(table)


@app.command("select")
@handles_errors
def select_cmd(
    run: Annotated[str | None, typer.Argument(help="Run id [default: the newest run].")] = None,
    output: OutputOpt = ...,  # type: ignore[assignment]  # typer: required
    top: Annotated[int, typer.Option("--top", min=1, help="Outputs kept per pair.")] = 5,
    fmt: FormatOpt = "table",
    to: Annotated[str | None, typer.Option("--to", metavar="DIR", help="Copy the selected "
                                           "outputs to this folder (local or s3://), under "
                                           "their own keys.")] = None,
    verbose: VerboseOpt = False,
):
    """List (or copy) the outputs of every pair whose lighting is closest to the reference,
    by the scores a luminet run records (LumiNet's seed selection)."""
    from . import console
    from .run import Run
    from .scores import copy_selected, select

    if fmt not in ("table", "json"):
        raise ConfigError(f"--format {fmt!r}: use table or json")
    the_run = Run.load(output, run)
    chosen = select(the_run, top)
    _say_requests(verbose)
    if to is not None:
        n = copy_selected(the_run, chosen, to)
        console.where(f"{n} outputs copied to", to)
        return
    if fmt == "json":
        for r in chosen:
            sys.stdout.write(r.model_dump_json() + "\n")
        return
    from rich.table import Table

    table = Table("image", "reference", "rank", "similarity", "output", box=None)
    table.columns[4].overflow = "fold"  # a key to copy: folded, never cut
    for r in chosen:
        table.add_row(r.image, r.ref, str(r.rank), f"{r.similarity:.6f}", r.key)
    out.print(table)


@app.command("make-model")
@handles_errors
def make_model_cmd(
    path: Annotated[str, typer.Argument(help="Directory to write the model to.")],
    kind: Annotated[str, typer.Option("--kind", metavar="diffusion|luminet",
                                      help="Which relighter the model is for.")] = "diffusion",
    size: Annotated[str | None, typer.Option(
        "--size", metavar="tiny|sd21|full", help="tiny (tests); sd21 (diffusion: the seed "
        "model's sizes) or full (luminet: the official checkpoint's sizes) [default: tiny]")]
    = None,
    distinct_uncond: Annotated[bool, typer.Option(
        "--distinct-uncond", help="diffusion: give the unconditional branch its own "
        "embedding (then guidance needs two passes per step).")] = False,
    new_decoder: Annotated[bool, typer.Option("--new-decoder",
                                              help="diffusion: also write vae_new_decoder/.")]
    = False,
    device: Annotated[str, typer.Option("--device", metavar="cpu|cuda",
                                        help="Where to initialise the weights "
                                        "(cuda is much faster for sd21 and full).")] = "cpu",
):
    """Write a random-weight model for the diffusion or luminet relighter (tests, benchmarks):
    nothing is downloaded, and its outputs are noise-like images."""
    from pathlib import Path

    from rich.markup import escape

    from . import console

    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{path} is a file: make-model writes a folder; give the path of a "
                          "new or empty folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot make the folder {path}: {e.strerror} (choose a writable "
                          "path)") from e
    examples = Path("examples")
    images, refs = ((str(examples / "images"), str(examples / "refs"))
                    if (examples / "images").is_dir() and (examples / "refs").is_dir()
                    else ("IMAGES", "REFS"))
    size = size or "tiny"
    if kind == "luminet":
        from .relighters.luminet.make import SIZES as LUMINET_SIZES
        from .relighters.luminet.make import make_luminet, run_options

        if size not in LUMINET_SIZES:
            raise ConfigError(f"--size {size!r}: use one of {', '.join(LUMINET_SIZES)} with "
                              "--kind luminet")
        folder = make_luminet(path, size, device=device)  # type: ignore[arg-type]  # checked
        out.print(f"model: {escape(str(folder))} (random weights, LumiNet {size}, in the "
                  "official files' format)", highlight=False)
        opts = [a for k, v in run_options(folder).items() for a in ("-O", f"{k}={v}")]
        console.command("try it:", ["relit-k8s", "run", "--input", images, "--refs", refs,
                                    "--output", f"out-{Path(folder).name}", "--relighter",
                                    "luminet", *opts, "--iterations", "1"])
        return
    if kind != "diffusion":
        raise ConfigError(f"--kind {kind!r}: use diffusion or luminet")
    from .modelkit import SIZES, make_model, native_resolution

    if size not in SIZES:
        raise ConfigError(f"--size {size!r}: use one of {', '.join(SIZES)} with --kind "
                          "diffusion")
    written = make_model(path, size,  # type: ignore[arg-type]  # one of SIZES, checked above
                         distinct_uncond=distinct_uncond, new_decoder=new_decoder, device=device)
    side = native_resolution(written)
    out.print(f"model: {escape(str(written))} (random weights, {size}; its native resolution, "
              f"{side} x {side} pixels, is in unet/config.json and is what the relighter uses "
              "unless -O resolution=N)", highlight=False)
    console.command("try it:", ["relit-k8s", "run", "--input", images, "--refs", refs,
                                "--output", f"out-{Path(written).name}", "--relighter",
                                "diffusion", "-O", f"model={written}", "--iterations", "1"])


@app.command("relighters")
@handles_errors
def relighters_cmd():
    """List the relighters that can be used, and their options."""
    from . import console
    from .relighters import available, describe_options, resolve

    rows = []
    for name, target in sorted(available().items()):
        try:
            rows.append((name, target, describe_options(resolve(name)), True))
        except RelitError as e:
            rows.append((name, target, f"cannot load: {e}", False))
    console.relighters_table(rows)


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


def _readable(command: Any) -> Any:
    """Help as users read it: square brackets in help texts stay as written (rich would take
    them for markup), and options show a short metavar instead of a type tag. (Typer carries
    its own click, so parameters are recognised by what they are, not by class.)"""
    from rich.markup import escape

    if command.help:
        command.help = escape(command.help)
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if param.param_type_name == "argument":
            if hasattr(param, "display_type_rich"):  # typer >= 0.16 tags arguments too
                param.display_type_rich = lambda ctx: None
        elif param.metavar is None:
            # typer >= 0.16 names the annotation (bare_type); older ones are click options
            kind = param.bare_type() if hasattr(param, "bare_type") else param.type.name
            param.metavar = ("" if param.is_flag else "N" if kind.startswith(("int", "integer"))
                             else "NUMBER" if kind.startswith("float") else "TEXT")
    help_option = command.get_help_option  # made when help is asked for: no tag either

    def get_help_option(ctx: Any) -> Any:
        option = help_option(ctx)
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values():
        _readable(sub)
    return command


def main() -> None:
    from typer import rich_utils

    rich_utils.RANGE_STRING = ""  # limits are in the help texts and checked on use
    _readable(typer.main.get_command(app))()


__all__ = ["app", "main"]
