"""The ``relit-k8s`` command line: parse, call, print. No logic of its own."""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Annotated, Any

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
    "(run), or as a Kubernetes Indexed Job (coming: submit).",
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
        except MemoryError as e:
            raise _fail(f"out of memory: {e}", exit_code_for(e)) from None

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
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Seeds per relighter call.")]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse images larger "
                                           "than this many pixels (checked before decoding).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; touch nothing.")]


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


def _settings(workers: int = 1, **kw):
    from pydantic import ValidationError

    from .planner import PlanSettings

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
    from .planner import summary

    table = Table(title=title, show_header=False, title_justify="left", box=None)
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in summary(manifest).items():
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
    shards: ShardsOpt = None, run_id: RunIdOpt = None, batch_size: BatchOpt = 8,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS, dry_run: DryRunOpt = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Workers the default shard "
                                         "count is made for.")] = 1,
):
    """List inputs and references and write the run's manifest (no relighting)."""
    settings = _settings(**{k: v for k, v in locals().items() if k != "dry_run"})  # the flags
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
    shards: ShardsOpt = None, run_id: RunIdOpt = None, batch_size: BatchOpt = 8,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS, dry_run: DryRunOpt = False,
    gpus: Annotated[str | None, typer.Option("--gpus", metavar="0,1",
                                             help="GPUs to use, one worker each.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Worker processes "
                                                "[default: one per GPU, or 1 on the CPU].")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="cpu|cuda",
                                               help="[default: cuda if available]")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any item failed.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress",
                                           help="Show the progress bar.")] = True,
):
    """Relight on this machine: one worker process per GPU (or on the CPU). No cluster needed."""
    selection = {k: v for k, v in locals().items()
                 if k not in ("gpus", "workers", "device", "strict", "progress", "dry_run")}
    from . import status as status_mod
    from .local import plan_slots, run_local
    from .planner import write_manifest

    gpu_list = None
    if gpus:
        try:
            gpu_list = [int(g) for g in gpus.replace(" ", "").split(",") if g]
        except ValueError:
            raise ConfigError(f"--gpus {gpus!r}: expected GPU numbers such as 0,1") from None
    slots = plan_slots(device, gpu_list, workers)
    settings = _settings(workers=len(slots), **selection)
    manifest = _make_plan(settings)
    if dry_run:
        _print_summary(manifest, "Plan (dry run: nothing written)")
        return
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
                  f"--output {output}")
    for msg in result.messages:
        err.print(f"[red]{msg}[/]", highlight=False)
    if result.interrupted:
        raise _fail("interrupted: run the same command again to continue", 130)
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
):
    """Run one shard (the pod entrypoint). Exit 0 done, 75 retry, 78 config error, 143 stopped."""
    from .worker import main

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    raise typer.Exit(main(manifest, index, device))


@app.command("status")
@handles_errors
def status_cmd(
    run: Annotated[str | None, typer.Argument(help="Run id [default: the newest run].")] = None,
    output: OutputOpt = ...,
    fmt: Annotated[str, typer.Option("-o", "--format", metavar="table|json")] = "table",
):
    """Show a run's progress and failures, from its shard reports."""
    from .status import collect

    if fmt not in ("table", "json"):
        raise ConfigError(f"-o {fmt!r}: use table or json")
    status = collect(output, run)
    if fmt == "json":
        out.print_json(json.dumps(status))
        return
    out.print(f"run [bold]{status['run_id']}[/] ({status['relighter']}), {status['state']}: "
              f"{status['items_done']} written, {status['items_skipped']} skipped, "
              f"{status['items_failed']} failed, of {status['items_total']}", highlight=False)
    table = Table("shard", "state", "done", "skipped", "failed", "total", "device", "updated (UTC)")
    colour = {"done": "green", "failed": "red", "running": "yellow", "pending": "dim"}
    for s in status["shards"]:
        table.add_row(str(s["index"]), f"[{colour[s['state']]}]{s['state']}[/]",
                      str(s["items_done"]), str(s["items_skipped"]), str(s["items_failed"]),
                      str(s["items_total"]), s.get("device", ""),
                      (s.get("updated_at") or "")[11:19])
    out.print(table)
    failures = [f for s in status["shards"] for f in s["failures"]]
    if failures:
        ft = Table("image", "reference", "iteration", "error", title="failures",
                   title_justify="left")
        for f in failures[:50]:
            ft.add_row(f["image"], f["ref"], str(f["iteration"]), f["error"])
        out.print(ft)
        if len(failures) > 50:
            out.print(f"... and {len(failures) - 50} more (-o json lists them all)")


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
