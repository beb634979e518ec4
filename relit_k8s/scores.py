"""Light-match scores: how close each output's lighting is to its reference's.

A relighter that can score (``luminet``: LumiNet's seed selector, see
:mod:`relit_k8s.relighters.luminet.selector`) has every output scored as it is written, from
the bytes written, so that ``relit-k8s score`` on the file gives the same number. A worker
keeps the scores of one work unit (one pair's seeds ``[start, stop)``) in one record,
``<output>/_relit/<run>/scores/<unit>.json``, written once the unit is finished; a rerun
completes the record (the outputs it skips are scored from their files when the record lacks
them). ``relit-k8s select`` reads the records and ranks a pair's outputs, most similar first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel

from . import images
from .errors import ConfigError, NotFoundError
from .manifest import Manifest, UnitScores, pair_seeds
from .run import Run
from .storage import LocalStorage, Storage, join_key, open_storage, split_uri

#: Files ``relit-k8s score`` takes from a folder (the original takes png, jpg, jpeg, bmp).
SCORED_FORMATS = (*images.LDR_FORMATS, *images.HDR_FORMATS)
#: Records read at once by ``select``.
READ_THREADS = 16


# --- relit-k8s score ---------------------------------------------------------------------------
def expand(sources: Sequence[str]) -> list[str]:
    """The files that ``sources`` name (files, or folders listed recursively for image
    files, sorted), local or ``s3://``, in order."""
    uris: list[str] = []
    for source in sources:
        store = open_storage(source)
        keys = store.list(extensions=SCORED_FORMATS) if _is_folder(store) else []
        if keys:
            uris.extend(store.uri_of(k) for k in keys)
            continue
        folder, name = split_uri(source)
        if not folder.exists(name):
            raise NotFoundError(f"no image file or folder of images at {source}")
        uris.append(folder.uri_of(name))
    return uris


def _is_folder(store: Storage) -> bool:
    return not isinstance(store, LocalStorage) or store.root.is_dir()


def read_picture(uri: str):
    from .relighters.luminet.selector import picture

    folder, name = split_uri(uri)
    return picture(folder.read(name), name)


def score_files(sources: Sequence[str], reference: str, weights: str,
                config: str | None = None, device: str = "cpu") -> list[tuple[str, float]]:
    """(file, similarity to ``reference``) for every image that ``sources`` name, most similar
    first (ties in the order given): LumiNet's seed selection."""
    from .relighters.luminet.selector import Selector

    files = expand(sources)
    if not files:
        raise ConfigError(f"no image files in {', '.join(sources)}")
    selector = Selector.load(weights, config, device)
    ref_code = selector.codes([read_picture(reference)])[0]
    similarities = selector.similarities([read_picture(f) for f in files], ref_code)
    return rank(zip(files, similarities, strict=True))


def rank(scored: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """Most similar first; equal scores keep their order."""
    return sorted(scored, key=lambda fs: -fs[1])


# --- relit-k8s select ------------------------------------------------------------------------
class Ranked(BaseModel):
    """One output of a pair in its rank (1: the most similar to the reference)."""

    image: str
    ref: str
    rank: int
    seed: int
    key: str
    file: str
    similarity: float


def _runs(run: Run) -> list[Run]:
    """The run and those it resumes (a resumed run's records are in its own folder)."""
    chain, seen = [run], {run.run_id}
    while chain[-1].manifest.resumed_from and chain[-1].manifest.resumed_from not in seen:
        try:
            earlier = Run.load(run.output, chain[-1].manifest.resumed_from)
        except ConfigError:
            break
        seen.add(earlier.run_id)
        chain.append(earlier)
    return chain


def read_scores(run: Run) -> dict[tuple[str, str], dict[int, float]]:
    """Every recorded score of the run (and of the runs it resumes), by pair: seed -> score
    (one listing of each run's records, then the records read in threads)."""
    records = [(r.output, join_key(r.paths.scores, name)) for r in _runs(run)
               for name in sorted(r.output.list_names(r.paths.scores)) if name.endswith(".json")]

    def read(item: tuple[Storage, str]) -> UnitScores:
        store, key = item
        return UnitScores.from_json(store.read(key), store.uri_of(key))

    out: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for rec in pool.map(read, records):
            out[(rec.image, rec.ref)].update(rec.by_seed())
    return out


def best_seeds(m: Manifest, image: str, ref: str, scores: dict[int, float],
               top: int) -> list[tuple[int, float]]:
    """The ``top`` best scored seeds of a pair, best first; a tie goes to the earlier
    iteration. ``select``, the gallery and ``--keep-top`` all rank this way."""
    order = {s: i for i, s in enumerate(pair_seeds(m.base_seed, image, ref, m.iterations))}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order.get(kv[0], 0)))[:top]


def select(run: Run, top: int) -> list[Ranked]:
    """The ``top`` most similar outputs of every scored pair, in the plan's pair order (a tie
    goes to the earlier iteration); at most the run's ``keep_top``."""
    if top < 1:
        raise ConfigError(f"--top {top}: keep at least one output per pair")
    m = run.manifest
    scored = read_scores(run)
    if not scored:
        raise ConfigError(f"run {m.run_id} has no scores: only a relighter that scores its "
                          "outputs (luminet) records them, as its units finish")
    if m.keep_top is not None and top > m.keep_top:
        top = m.keep_top  # the run deleted the others
    chosen: list[Ranked] = []
    for image in m.images:
        for ref in m.references:
            scores = scored.get((image, ref))
            if not scores:
                continue
            for rank_, (seed, value) in enumerate(best_seeds(m, image, ref, scores, top), 1):
                key = m.output_key(image, ref, seed)
                chosen.append(Ranked(image=image, ref=ref, rank=rank_, seed=seed, key=key,
                                     file=run.uri_of(key), similarity=value))
    return chosen


def copy_selected(run: Run, chosen: Sequence[Ranked], to: str) -> int:
    """Copy the chosen outputs to the folder ``to`` under their own keys; returns how many
    (an output deleted since it was scored is skipped with its key in the error)."""
    dest = open_storage(to)
    missing = []
    for r in chosen:
        try:
            dest.write(r.key, run.output.read(r.key))
        except NotFoundError:
            missing.append(r.key)
    if missing:
        raise NotFoundError(f"{len(missing)} scored outputs are gone from {run.output.uri} "
                            f"(e.g. {missing[0]}); the others were copied")
    return len(chosen)


__all__ = ["Ranked", "best_seeds", "copy_selected", "read_scores", "score_files", "select"]
