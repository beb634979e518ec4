"""Leases in the output store (issue 15, the claiming): conditional writes on local folders and
S3 (SeaweedFS), claim races between processes, steals of stale leases, release, the probe for
stores that ignore conditional writes."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fault_proxy import FaultProxy

from relit_k8s.errors import StorageError, WriteConflict
from relit_k8s.leases import (
    MISSES_BEFORE_LISTING,
    Claim,
    Claimer,
    FinishedSummary,
    LeaseBook,
    LeaseLost,
    claim_order,
    conditional_writes_work,
)
from relit_k8s.storage import LocalStorage, S3Storage, make_s3_client, open_storage


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/out"


def test_conditional_writes_have_exactly_one_winner(store_uri):
    store = open_storage(store_uri)
    v1 = store.create("_relit/x.json", b"one")
    with pytest.raises(WriteConflict):
        store.create("_relit/x.json", b"two")
    assert store.read_versioned("_relit/x.json") == (b"one", v1)
    v2 = store.replace("_relit/x.json", b"three", v1)
    assert v2 != v1
    with pytest.raises(WriteConflict):  # a replace from a stale version loses
        store.replace("_relit/x.json", b"four", v1)
    assert store.read("_relit/x.json") == b"three"
    store.delete("_relit/x.json")
    with pytest.raises(WriteConflict):  # ... and so does one of an object that is gone
        store.replace("_relit/x.json", b"five", v2)
    assert conditional_writes_work(store)
    assert not store.exists("_relit/x.json")
    assert not [k for k in store.walk("_relit") if "probe" in k]  # the probe cleans up


def test_claim_races_between_processes_have_one_winner_per_shard(store_uri):
    ctx = mp.get_context("spawn")
    from lease_racers import race

    workers, shards = 4, 24
    for _ in range(3):  # a few rounds, each a new run
        run_id = f"relit-{uuid.uuid4().hex[:10]}"
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=race, args=(store_uri, run_id, i, workers, shards,
                                                ready, go, results)) for i in range(workers)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        go.set()  # all at once
        won = dict(results.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(60)
        claimed = [s for shards_won in won.values() for s in shards_won]
        assert sorted(claimed) == list(range(shards)), won  # each shard once, none lost
        book = LeaseBook(open_storage(store_uri), run_id)
        owners = {book.read(s)[0].owner for s in range(shards)}
        assert len(owners) <= workers


def test_a_stale_lease_is_stolen_once_and_its_old_holder_learns_it(store_uri, clock):
    store = open_storage(store_uri)
    # leases of 2 s (not less: on a loaded machine a fresh lease must stay fresh between
    # two requests)
    a = LeaseBook(store, "relit-r", seconds=2.0)
    b = LeaseBook(store, "relit-r", seconds=2.0)
    c = LeaseBook(store, "relit-r", seconds=2.0)
    held = a.try_claim(3)
    assert held is not None and b.try_claim(3) is None  # held and fresh: nobody takes it
    held = a.renew(held)
    clock.advance(2.2)  # a stops beating (killed, partitioned)
    stolen = b.try_claim(3)
    assert stolen is not None and stolen.lease.steals == 1
    assert stolen.lease.stolen_from == a.owner
    assert c.try_claim(3) is None  # the new holder is fresh
    with pytest.raises(LeaseLost):  # a comes back: its heartbeat fails, it must stop
        a.renew(held)
    a.release(held)  # and its release leaves the thief's lease alone
    assert b.read(3)[0].owner == b.owner


def test_release_frees_a_shard_at_once_and_done_is_never_claimed_again(store_uri):
    store = open_storage(store_uri)
    a, b = LeaseBook(store, "relit-q"), LeaseBook(store, "relit-q")
    first = a.try_claim(0)
    a.release(first)  # stopped by SIGTERM: another worker takes it now
    again = b.try_claim(0)
    assert again is not None and again.lease.steals == 0
    b.finish(again)
    assert a.try_claim(0) is None and b.try_claim(0) is None
    assert store.exists("_relit/relit-q/done/0")
    assert not store.exists("_relit/relit-q/leases/0.json")
    assert store.exists("_relit/relit-q/leases/0.free")  # b claimed it not knowing it was free
    # a worker that lists it as released finds it finished and drops the marker; and a
    # released shard claimed from its marker drops it too
    assert a.try_claim(0, released=True, check_first=True) is None
    assert not store.exists("_relit/relit-q/leases/0.free")
    c, d = LeaseBook(store, "relit-r"), LeaseBook(store, "relit-r")
    c.release(c.try_claim(1))
    claimed = d.try_claim(1, released=True)
    assert claimed is not None and not store.exists("_relit/relit-r/leases/1.free")
    d.release(claimed)
    d.finish(c.try_claim(1, released=True))
    assert not store.exists("_relit/relit-r/leases/1.free")
    # worker 0 of 2 claims its own shards (0, 2) first, then the others (1): 0 is finished
    claimer = Claimer(a, shards=3, index=0, workers=2, poll=0.05)
    assert claimer.state() == ({0}, {})
    nxt = claimer.next()
    assert nxt is not None and nxt.shard == 2
    assert claimer.next().shard == 1
    # a look within a poll interval of the summary its first look published reads that
    # summary (one read, no listing): it predates the claims of 1 and 2
    looks = claimer.summary_looks
    assert claimer.state() == ({0}, {}) and claimer.summary_looks == looks + 1
    assert set(a.leases().held) == {1, 2}  # held, by a
    a.finish(nxt)
    waiting = threading.Thread(target=lambda: setattr(claimer, "last", claimer.next()))
    waiting.start()  # shard 1 is held (by a itself, but fresh): the claimer waits ...
    time.sleep(0.3)
    assert waiting.is_alive()
    lease, version = a.read(1)
    a.finish(Claim(1, version, lease))
    waiting.join(10)  # ... until every shard is finished: then there is nothing more
    assert not waiting.is_alive() and claimer.last is None


def test_a_claimer_takes_stale_leases_before_free_shards_and_live_ones_not_at_all(store_uri,
                                                                                   clock):
    """A dead holder's shard is taken as soon as its lease is stale, before the free shards
    (taken at the end of the run instead, it would make the tail); a live lease is left."""
    store = open_storage(store_uri)
    # a lease of 3 s: the live lease must stay live (S3 times are to the second) while the
    # thief makes its claims on a loaded CI machine (with 0.5 s it went stale there)
    dead = LeaseBook(store, "relit-s", seconds=3.0)
    for shard in (0, 2):
        dead.try_claim(shard)  # a worker that then died
    clock.advance(3.1)
    live = LeaseBook(store, "relit-s", seconds=3.0)
    live.try_claim(3)  # a live worker's lease, just written
    thief = Claimer(LeaseBook(store, "relit-s", seconds=3.0), shards=5, index=0, workers=1,
                    poll=0.05)
    taken = [thief.next().shard for _ in range(4)]
    assert sorted(taken[:2]) == [0, 2] and taken[2:] == [1, 4]  # the stale ones first
    assert thief.steals == 2 and thief.claims == 4


class RequestCounter(LocalStorage):
    """A local folder that notes the last part of each folder listed (``listed``), of each
    object read with its version (``reads``) and of each one checked (``checked``)."""

    def __init__(self, root):
        super().__init__(root)
        self.listed: list[str] = []
        self.reads: list[str] = []
        self.checked: list[str] = []

    def list_modified(self, folder):
        self.listed.append(folder.rsplit("/", 1)[-1])
        return super().list_modified(folder)

    def read_versioned(self, key):
        self.reads.append(key.rsplit("/", 1)[-1])
        return super().read_versioned(key)

    def exists(self, key):
        self.checked.append(key.rsplit("/", 1)[-1])
        return super().exists(key)


def test_an_idle_worker_reads_the_published_picture_and_never_lists_every_finished_shard(
        tmp_path):
    """In the tail a worker with nothing to claim looks again and again. It never lists the
    ``done/`` folder (one marker per shard, millions of pairs' worth) again; while the
    ``finished.json`` its first look published is younger than a poll interval (2 s at
    least), a look reads it (the finished shards and the leases listed with them: one small
    read), and after that it lists the small ``leases/`` folder (a lease gone without a
    ``.free`` marker was finished). It sees a released shard (and deletes its marker when it
    claims it), and stops when every shard is finished. (Released shards seen from a summary
    that predates them: see test_the_next_shard_is_claimed_ahead_and_released_when_the_worker_
    stops, on S3 too.)"""
    store = RequestCounter(tmp_path / "out")
    listed = store.listed
    busy = LeaseBook(store, "relit-i")
    held = {s: busy.try_claim(s) for s in range(4)}
    busy.finish(held.pop(0))
    idle = Claimer(LeaseBook(store, "relit-i"), shards=4, index=1, workers=2, poll=0.02)
    assert idle.summary_seconds == 2.0
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(idle.next()))
    waiting.start()
    time.sleep(0.3)  # several looks, nothing to take: 1, 2 and 3 are held by a live worker
    assert waiting.is_alive() and idle.listings >= 4  # looks, all but the first from the
    assert idle.summary_looks == idle.listings - 1  # summary its first look published
    assert listed.count("done") == 1 and listed.count("leases") == 1
    assert busy.published() == {0} and busy.summary().held.keys() == {1, 2, 3}
    busy.finish(held.pop(2))
    busy.release(held.pop(1))  # stopped: shard 1 is free again
    assert store.exists("_relit/relit-i/leases/1.free")
    waiting.join(10)  # on a local folder a look reads the leases it was told are held
    assert got[0].shard == 1 and listed.count("done") == 1
    assert not store.exists("_relit/relit-i/leases/1.free")
    idle.book.finish(got[0])
    busy.finish(held.pop(3))
    assert idle.next() is None  # every shard finished: seen without listing done/ again
    # (from the done/ markers of the shards it was told are held, on a local folder, or from
    # the summary brought up to date: never a lease gone taken for finished unchecked)
    assert listed.count("done") == 1 and idle.done_listings == 1


def test_an_idle_worker_of_a_large_fleet_leaves_soon_after_the_run_ends_without_listing(
        store_uri):
    """Idle workers of a large fleet look seldom each (together about eight looks per poll
    interval, each once a lease time at least: here 256 workers, a look every 9 to 15 s each),
    so that they do not saturate the store; meanwhile each reads ``finished.json`` every half
    lease time, and leaves once it names every shard, without another listing."""
    store = open_storage(store_uri)
    busy = LeaseBook(store, "relit-e", seconds=12.0)
    held = [busy.try_claim(s) for s in range(2)]
    idle = Claimer(LeaseBook(store, "relit-e", seconds=12.0), shards=2, index=7, workers=256,
                   poll=0.5)
    # 0.5 s x 256 / 8 = 16 s, up to the lease time (12 s); checks every half lease
    assert idle.end_check_seconds == 6.0 and idle._idle_wait() == 12.0
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(idle.next()))
    began = time.monotonic()
    waiting.start()
    time.sleep(0.5)  # it looked (both shards held by a live worker) and waits
    assert waiting.is_alive() and idle.listings == 1
    for claim in held:
        busy.finish(claim)
    busy.publish({0, 1}, datetime.now(UTC))  # as the worker that finished the last shard does
    waiting.join(20)
    assert not waiting.is_alive() and got == [None]
    # at its first check (6 s), before its next look was due (9 s at the earliest)
    assert time.monotonic() - began < 8.5
    assert idle.listings == 1 and idle.end_checks == 1


def test_a_full_look_reads_the_finished_shards_another_worker_listed_a_moment_ago(store_uri,
                                                                                  clock):
    """Workers that need the full picture at about the same time (all out of their own shards
    at once) list ``done/`` (one object per finished shard) once between them: the first
    publishes ``leases/finished.json``, the others read it while it is younger than a poll
    interval (2 s at least). An old or unreadable one is listed anew. It only ever names
    finished shards."""
    store = open_storage(store_uri)
    book = LeaseBook(store, "relit-f", seconds=4.0)
    fresh = Claimer(LeaseBook(store, "relit-f", seconds=4.0), shards=8, index=0, workers=2)
    assert fresh.state()[0] == set() and fresh.done_listings == 1
    assert not store.exists("_relit/relit-f/leases/finished.json")  # nothing to tell yet
    for shard in (0, 1, 2, 5):
        book.finish(book.try_claim(shard))
    first = Claimer(LeaseBook(store, "relit-f", seconds=4.0), shards=8, index=0, workers=2)
    assert first.state()[0] >= {0, 1, 2, 5} and (first.done_listings, first.summaries) == (1, 0)
    assert store.exists("_relit/relit-f/leases/finished.json")
    # a worker's look, its first too, reads the summary (with the leases listed with it)
    # while it is younger than a poll interval: one read
    second = Claimer(LeaseBook(store, "relit-f", seconds=4.0), shards=8, index=1, workers=2)
    assert second.state()[0] >= {0, 1, 2, 5} and second.summary_looks == 1
    book.finish(book.try_claim(6))
    # and its next look too: 6, finished since, is not in it (a check if tried)
    assert 6 not in second.state()[0] and second.summary_looks == 2
    assert (second.listings, second.done_listings, second.summaries) == (2, 0, 0)
    clock.advance(3.1)  # older than 2 s (S3 times are to the second): not taken as it is
    # a worker on its own shards lists leases/ only: 6, claimed and finished between its
    # looks, was never seen held, so it is not known finished (a check when tried)
    assert 6 not in second.state()[0] and second.summary_looks == 2
    assert second.done_listings == 0
    # a first look lists done/ anew, and publishes what it found
    third = Claimer(LeaseBook(store, "relit-f", seconds=4.0), shards=8, index=1, workers=2)
    assert third.state()[0] >= {0, 1, 2, 5, 6}
    assert (third.done_listings, third.summaries) == (1, 0)
    assert book.published() == {0, 1, 2, 5, 6}
    store.write("_relit/relit-f/leases/finished.json", b"{not json")
    fourth = Claimer(LeaseBook(store, "relit-f", seconds=4.0), shards=8, index=1, workers=2)
    assert fourth.state()[0] >= {0, 1, 2, 5, 6} and fourth.done_listings == 1
    # a shard the summary does not name is checked: claimed if unfinished, never skipped
    clock.reset()  # a summary written now is fresh by the store's own time (LastModified)
    store.write("_relit/relit-f/leases/finished.json", FinishedSummary.of(
        {0, 1, 2, 5, 6}, datetime.now(UTC)).model_dump_json().encode())
    other = LeaseBook(store, "relit-f", seconds=4.0)
    other.finish(other.try_claim(4))  # finished since the summary
    store.write("_relit/relit-f/done/7", b"")  # so was 7 (its worker died before its lease
    # was deleted)
    last = Claimer(LeaseBook(store, "relit-f", seconds=4.0), shards=8, index=1, workers=2)
    got = last.next()
    assert got.shard == 3 and last.summaries == 1 and last.done_listings == 0
    last.book.finish(got)
    assert last.next() is None and last.claims == 1  # 4 and 7 were checked: finished
    assert FinishedSummary.of({0, 1, 2, 5, 6, 9}).ranges == [(0, 3), (5, 7), (9, 10)]


def test_an_old_summary_is_listed_anew_and_names_every_finished_shard_and_no_other(
        store_uri, clock):
    """A summary older than a poll interval is not taken as it is: the full look lists
    ``done/`` anew and publishes what it found, every finished shard and no other (a held
    shard is never named)."""
    store = open_storage(store_uri)
    book = LeaseBook(store, "relit-u", seconds=4.0)
    for shard in (0, 1, 2):
        book.finish(book.try_claim(shard))
    first = Claimer(LeaseBook(store, "relit-u", seconds=4.0), shards=9, index=0, workers=3)
    assert first.state()[0] == {0, 1, 2} and first.done_listings == 1
    for shard in (3, 4):  # finished after the summary
        book.finish(book.try_claim(shard))
    held = book.try_claim(5)  # held, not finished: never named
    clock.advance(2.2)  # older than a poll (2 s)
    second = Claimer(LeaseBook(store, "relit-u", seconds=4.0), shards=9, index=1, workers=3)
    assert second.state()[0] == {0, 1, 2, 3, 4}
    assert (second.done_listings, second.summaries) == (1, 0)
    assert book.published() == {0, 1, 2, 3, 4} and 5 in book.summary().held
    book.finish(held)
    for shard in (6, 7):
        book.finish(book.try_claim(shard))
    clock.advance(6.5)  # the summary is three polls old
    third = Claimer(LeaseBook(store, "relit-u", seconds=4.0), shards=9, index=2, workers=3)
    assert third.state()[0] == {0, 1, 2, 3, 4, 5, 6, 7}
    assert third.book.published() == {0, 1, 2, 3, 4, 5, 6, 7}
    got = third.next()  # 8, without a check of a finished shard
    assert got.shard == 8 and third.missed == 0


def test_in_the_tail_one_worker_lists_for_all_and_the_others_read_what_it_published(
        tmp_path, clock):
    """Past its own shards, a worker whose look finds ``finished.json`` older than a poll
    interval brings it up to date then (a listing of ``leases/`` and one of ``done/``), with
    the leases it listed; the others' looks read that (one small read each, no listing) while
    it is younger than a poll interval, and for a random part of a poll interval more (so that
    of the workers that find it old at once, one lists and the others read what it
    published). A worker still on its own shards does not bring it up to date."""
    store = RequestCounter(tmp_path / "out")
    listed = store.listed
    book = LeaseBook(store, "relit-t", seconds=60)
    for shard in (0, 1):
        book.finish(book.try_claim(shard))

    def claimer(index: int) -> Claimer:  # summary taken 2 s, a full look after 6 s
        return Claimer(LeaseBook(store, "relit-t", seconds=60), shards=8, index=index,
                       workers=2, poll=2.0)

    first = claimer(0)
    assert first.state()[0] == {0, 1} and first.done_listings == 1
    tail, busy = claimer(1), claimer(0)
    tail.state(), busy.state()  # both read the summary
    assert (tail.summary_looks, busy.summary_looks) == (1, 1)
    tail._beyond_own = True
    book.finish(book.try_claim(3))
    clock.advance(4.3)  # older than two polls (past its own shards, a worker waits a random
    # part of a poll more before it brings it up to date), younger than three
    del listed[:]
    # on its own shards: leases/ only (3 was never seen held: a check if it is tried)
    assert 3 not in busy.state()[0] and busy.done_listings == 0 and listed == ["leases"]
    held = book.try_claim(5)
    del listed[:]
    assert 3 in tail.state()[0] and tail.done_listings == 1
    assert sorted(listed) == ["done", "leases"]
    assert book.published() == {0, 1, 3}
    # with the leases it listed: the others' looks read that instead of each listing
    assert book.summary().held.keys() == {5} and book.summary().released == []
    del listed[:]
    done, seen_held = busy.state()
    assert busy.summary_looks == 2 and 3 in done and seen_held.keys() == {5}
    assert busy.state()[0] == done and busy.summary_looks == 3 and listed == []
    # a moment past a poll: the tail's worker goes on with it (its random part of a poll,
    # seeded by its index, is 0.85 of one now)
    clock.advance(2.1)
    book.finish(held)
    looks = tail.summary_looks
    assert 5 not in tail.state()[0] and listed == []  # the last summary: 5 is checked if tried
    assert (tail.deferred, tail.summary_looks, tail.done_listings) == (1, looks + 1, 1)


def test_a_shard_listed_free_that_another_worker_claimed_since_costs_no_read_of_its_lease(
        tmp_path):
    """A create that fails on a shard a look showed free means another worker claimed it
    since: its lease is new (neither stale nor a straggler's), so it is not read; the worker
    goes on to its next candidate."""
    store = RequestCounter(tmp_path / "out")
    reads = store.reads
    worker = Claimer(LeaseBook(store, "relit-l"), shards=4, index=0, workers=2)
    assert worker._refresh()  # its first look: every shard free, its own (0, 2) first
    other = LeaseBook(store, "relit-l")
    assert other.try_claim(0) and other.try_claim(2)  # claimed by another since
    claim = worker.next()
    assert claim.shard in (1, 3) and worker.collided == 2 and reads == []
    assert other.try_claim(claim.shard) is None and reads == [f"{claim.shard}.json"]


def test_a_shard_a_fresh_look_showed_free_is_claimed_without_a_check_first(tmp_path):
    """Another worker's shard that a look a moment ago showed free is seldom finished: it
    is claimed with a create and the check after it, not a check before too; a shard
    finished meanwhile all the same is found by that check, and not run."""
    store = RequestCounter(tmp_path / "out")
    checked = store.checked
    other = LeaseBook(store, "relit-f")
    assert all(other.try_claim(s) for s in (0, 2, 4))  # the worker's own, held by another
    worker = Claimer(LeaseBook(store, "relit-f"), shards=6, index=0, workers=2)
    assert worker._refresh()  # a look: 1, 3 and 5 free
    first, second = worker._candidates[0], worker._candidates[1]
    other.finish(other.try_claim(first))  # finished since, all the same
    del checked[:]
    assert worker.next().shard == second and (worker.missed, worker.claims) == (1, 1)
    assert checked == [str(first), str(second)]  # one check each, after the create
    assert not store.exists(f"_relit/relit-f/leases/{first}.json")  # not held: finished


def test_a_worker_does_not_try_again_the_shards_it_lost_while_its_picture_predates_that(
        tmp_path):
    """Shards a summary showed free that another worker claimed since cost a collision each;
    after a few, the worker looks again, a moment later: when that brings the same summary,
    it neither tries those shards again nor the rest of that list (in the tail of a large
    run, hundreds of workers went through it, a create that fails after another, on a
    saturated store), but waits for a newer summary; there a shard it found taken is a
    candidate again once the picture is newer than its try (here, released)."""
    store = LocalStorage(tmp_path / "out")
    other = LeaseBook(store, "relit-c", seconds=60)
    own = [other.try_claim(s) for s in range(0, 12, 2)]  # the worker's own shards are held
    worker = Claimer(LeaseBook(store, "relit-c", seconds=60), shards=12, index=0, workers=2,
                     poll=2.0)  # a summary is taken for 2 s
    worker.state()  # its first look
    other.publish(set(), datetime.now(UTC), other.leases())
    order = [s for s in worker.order if s % 2]
    lost = [other.try_claim(s) for s in order[:4]]  # claimed since the summary
    assert worker._round() == (None, "relist") and worker.collided == 4
    assert worker._round() == (None, "stale") and worker.collided == 4  # the same summary
    assert worker.summary_looks == 2 and worker.claims == 0
    other.publish(set(), datetime.now(UTC), other.leases())  # a newer one
    claim, outcome = worker._round()
    assert claim.shard == order[4] and outcome == "claimed" and worker.collided == 4
    assert worker._round()[0].shard == order[5]  # the last of its list
    other.release(lost[0])
    other.publish(set(), datetime.now(UTC), other.leases())  # newer than the tries
    assert worker._round()[0].shard == order[0] and worker.collided == 4
    assert all(own)


def test_a_worker_whose_list_is_used_up_looks_again_at_once(tmp_path):
    """A list tried to its end without a claim (each candidate taken since: fewer collisions
    than make a worker give a list up) is followed by another look at once, not by an idle
    worker's wait: only a look that finds nothing free makes a worker wait."""
    store = LocalStorage(tmp_path / "out")
    other = LeaseBook(store, "relit-u", seconds=60)
    assert other.try_claim(0) and other.try_claim(2)  # the worker's own shards
    worker = Claimer(LeaseBook(store, "relit-u", seconds=60), shards=4, index=0, workers=2)
    assert worker._refresh() and set(worker._candidates) == {1, 3}
    assert other.try_claim(1) and other.try_claim(3)  # claimed since
    assert worker._round() == (None, "relist") and worker.collided == 2
    assert worker._round() == (None, "idle")  # the next look: nothing free


def test_past_its_own_shards_a_worker_looks_again_before_it_claims_from_an_old_list(tmp_path):
    """After a shard (half a minute, say) the rest of the list a worker made before it is out
    of date: it looks again before it claims another worker's shard from it, rather than
    try shards that others took or finished meanwhile, one request or three each (at 256
    workers, 9 of 10 misses were that)."""
    store = LocalStorage(tmp_path / "out")
    other = LeaseBook(store, "relit-o", seconds=60)
    assert all(other.try_claim(s) for s in (0, 2, 4))  # the worker's own shards
    worker = Claimer(LeaseBook(store, "relit-o", seconds=60), shards=6, index=0, workers=2)
    assert worker._refresh() and set(worker._candidates) == {1, 3, 5}
    claim, _ = worker._round()  # from a look made a moment ago: no look again
    assert claim is not None and worker.listings == 1
    worker._looked_at -= 30  # the worker ran that shard
    assert other.try_claim(3) and other.try_claim(5)  # taken meanwhile
    assert worker._round() == (None, "relist")
    assert worker.collided == worker.missed == 0  # nothing tried from the old list
    assert worker._round() == (None, "idle")  # the look again: nothing free
    assert worker.looks["old list"] == 1 and worker.listings == 2


def test_a_worker_that_meets_many_finished_shards_it_believed_free_lists_again(tmp_path):
    """Shards claimed and finished by others between two looks (never seen held) are
    believed free: each costs one check, and after MISSES_BEFORE_LISTING of them the worker
    lists again instead of checking its whole list one by one."""
    store = LocalStorage(tmp_path / "out")
    busy = LeaseBook(store, "relit-m")
    held = [busy.try_claim(s) for s in range(0, 40, 2)]  # its own shards: held by another
    assert all(held)
    worker = Claimer(LeaseBook(store, "relit-m"), shards=40, index=0, workers=2)
    assert worker._refresh()  # its first look: nothing finished, the odd shards free
    worker._known_at -= timedelta(seconds=15)  # ... a while ago (a poll is 10 s)
    for shard in range(1, 40, 2):  # finished since, never seen held
        store.write(f"_relit/relit-m/done/{shard}", b"")
    claim, outcome = worker._round()
    assert claim is None and outcome == "relist"
    assert worker.missed == MISSES_BEFORE_LISTING and worker.claims == 0
    worker._round()
    assert worker.looks["misses"] == 1 and worker.missed == 20


def test_claim_order_takes_own_shards_first_then_the_rest_in_an_order_of_its_own():
    order = list(claim_order(1, 3, 8))
    assert order[:3] == [1, 4, 7] and sorted(order[3:]) == [0, 2, 3, 5, 6]
    assert order == list(claim_order(1, 3, 8))  # the same for the same worker
    # workers out of their own shards try the others in orders of their own, so that they
    # rarely race for the same shard
    others = [list(claim_order(i, 64, 4096))[64:] for i in range(8)]
    assert all(sorted(o) == sorted(set(range(4096)) - set(range(i, 4096, 64)))
               for i, o in enumerate(others))
    firsts = [o[0] for o in others]
    assert len(set(firsts)) == 8
    assert sorted(claim_order(0, 4, 10)) == list(range(10))


def test_the_probe_finds_each_conditional_write_a_store_gets_wrong(s3_endpoint, bucket):
    """Against the suite's real server through a proxy: all enforced (no problem); both
    headers ignored; only If-Match ignored; 501 NotImplemented. Each is named."""
    from s3_servers import ACCESS_KEY, SECRET_KEY

    from relit_k8s.leases import conditional_write_problem

    proxy = FaultProxy(s3_endpoint, credentials=(ACCESS_KEY, SECRET_KEY)).start()
    try:
        from relit_k8s.storage import S3Settings

        client = make_s3_client(S3Settings.from_env().model_copy(
            update={"endpoint_url": proxy.url}))
        store = S3Storage(bucket, "out", client=client)
        assert conditional_write_problem(store) is None and conditional_writes_work(store)
        proxy.conditional = "ignore"
        both = conditional_write_problem(store)
        assert "If-None-Match" in both and "no longer has (If-Match) won" in both
        assert not conditional_writes_work(store)
        proxy.conditional_headers = {"if-match"}
        only = conditional_write_problem(store)
        assert "If-None-Match" not in only and "no longer has (If-Match) won" in only
        proxy.conditional, proxy.conditional_headers = "501", {"if-none-match", "if-match"}
        assert "not implemented" in conditional_write_problem(store)
        proxy.conditional = None
        assert conditional_write_problem(store) is None
    finally:
        proxy.stop()
    assert not S3Storage(bucket, "").list()  # every probe object deleted


def test_a_live_holders_shard_is_never_taken_however_slow_it_is(store_uri, clock):
    """A live holder keeps its shard whatever its rate (the takeover of stragglers is gone:
    at 64 simulated workers one shard passed from thief to thief hundreds of times); only a
    holder silent for the lease time loses it, and its next heartbeat tells it."""
    store = open_storage(store_uri)
    slow = LeaseBook(store, "relit-t", seconds=60)
    held = slow.renew(slow.try_claim(0), done=1, total=1000, rate=0.01)  # a day to go
    idle = Claimer(LeaseBook(store, "relit-t", seconds=60), shards=1, index=1, workers=2,
                   poll=0.05)
    assert idle.book.try_claim(0) is None
    clock.advance(59)
    held = slow.renew(held, done=2, total=1000, rate=0.01)  # still beating
    clock.advance(59)
    assert idle.book.try_claim(0) is None
    clock.advance(2)  # 61 s without a heartbeat: presumed dead
    taken = idle.book.try_claim(0)
    assert taken is not None and taken.lease.stolen_from == slow.owner
    with pytest.raises(LeaseLost):
        slow.renew(held, done=3, total=1000, rate=0.01)


def test_a_lease_deleted_by_hand_leaves_no_shard_undone(tmp_path):
    """A lease gone without a ``.free`` marker is taken for finished; before a worker stops it
    checks that against ``done/``, so a shard whose lease someone deleted by hand is done."""
    store = LocalStorage(tmp_path / "out")
    busy = LeaseBook(store, "relit-h")
    held = {s: busy.try_claim(s) for s in range(2)}
    idle = Claimer(LeaseBook(store, "relit-h"), shards=2, index=1, workers=2, poll=0.02)
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(idle.next()))
    waiting.start()
    time.sleep(0.2)  # both held by a live worker: it waits
    store.delete(busy.key(0))  # by hand: shard 0 is not finished
    busy.finish(held[1])
    waiting.join(10)
    assert not waiting.is_alive() and got[0] is not None and got[0].shard == 0


class DoneHeldBack(LocalStorage):
    """A local folder whose ``done/`` markers are written only once ``go`` is set (or fail
    with ``fault`` then): a slow store, seen from a worker's bookkeeping thread."""

    def __init__(self, root):
        super().__init__(root)
        self.go = threading.Event()
        self.fault: Exception | None = None

    def create(self, key: str, data: bytes) -> str:
        if "/done/" in key:
            assert self.go.wait(10)
            if self.fault is not None:
                raise self.fault
        return super().create(key, data)


def test_a_finished_shard_is_recorded_while_the_worker_claims_and_runs_its_next(tmp_path):
    """``finish_soon``: the worker does not wait for a finished shard's requests; they are
    made in order, the worker's last one before it leaves; an error of one is raised by the
    next call, and the shard's lease is left to go stale (taken over, never lost)."""
    store = DoneHeldBack(tmp_path / "out")
    claimer = Claimer(LeaseBook(store, "relit-b"), shards=3, index=0, workers=1, poll=0.05)
    first = claimer.next()
    claimer.book.finish_soon(first)  # returns while done/0 is not written yet
    second = claimer.next()
    assert (first.shard, second.shard) == (0, 1)
    assert not store.exists("_relit/relit-b/done/0")
    assert store.exists("_relit/relit-b/leases/0.json")  # held until done/0 is written
    store.go.set()
    claimer.book.finish_soon(second)  # after the first, in order
    assert store.exists("_relit/relit-b/done/0")
    third = claimer.next()
    claimer.book.settle()  # done/1 written
    assert store.exists("_relit/relit-b/done/1")
    store.go.clear()
    claimer.book.finish_soon(third)
    releaser = threading.Timer(0.3, store.go.set)
    releaser.start()
    assert claimer.next() is None  # every shard finished, its last one written first
    assert [store.exists(f"_relit/relit-b/done/{s}") for s in range(3)] == [True] * 3
    assert not [n for n in store.list_names("_relit/relit-b/leases") if n[0].isdigit() and
                n.endswith(".json")]  # no shard's lease is left

    book = LeaseBook(store, "relit-c")
    store.fault = StorageError("disk full")
    book.finish_soon(book.try_claim(0))
    with pytest.raises(StorageError, match="disk full"):
        book.finish_soon(book.try_claim(1))
    assert book.read(0) is not None and book.read(1) is not None  # neither marked finished
    book.settle()  # the error was raised once


def test_the_published_finished_shards_are_taken_for_a_poll_interval_not_half_a_lease(
        tmp_path, clock):
    """In the tail of a large run hundreds of shards finish a minute: a summary kept for half a
    lease (30 s) made idle workers check shard after finished shard; it is brought up to date
    once it is older than the poll interval (see
    test_an_old_summary_is_listed_anew_and_names_every_finished_shard_and_no_other)."""
    store = LocalStorage(tmp_path / "out")
    book = LeaseBook(store, "relit-p", seconds=60)
    for shard in (0, 1):
        book.finish(book.try_claim(shard))
    first = Claimer(LeaseBook(store, "relit-p", seconds=60), shards=4, index=0, workers=2,
                    poll=2.0)
    assert first.state()[0] == {0, 1} and first.done_listings == 1  # and published it
    book.finish(book.try_claim(2))
    soon = Claimer(LeaseBook(store, "relit-p", seconds=60), shards=4, index=1, workers=2,
                   poll=2.0)
    # taken as it is (2 is not in it: checked if tried)
    assert (soon.state()[0], soon.summary_looks, soon.done_listings) == ({0, 1}, 1, 0)
    clock.advance(2.2)  # older than the poll interval, far younger than half a lease
    book.finish(book.try_claim(3))
    later = Claimer(LeaseBook(store, "relit-p", seconds=60), shards=4, index=1, workers=2,
                    poll=2.0)
    assert (later.state()[0], later.summaries, later.done_listings) == ({0, 1, 2, 3}, 0, 1)


def _wait_for_lease(book: LeaseBook, shard: int, timeout: float = 10) -> tuple:
    deadline = time.monotonic() + timeout
    while (found := book.read(shard)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert found is not None, f"shard {shard} was not claimed within {timeout} s"
    return found


def test_the_next_shard_is_claimed_ahead_and_released_when_the_worker_stops(store_uri):
    """Near the end of its shard a worker claims its next one in the background, so that it
    goes on without waiting for the store; a worker that stops (or fails) releases the shard
    it claimed ahead at once, for another worker to take."""
    store = open_storage(store_uri)
    claimer = Claimer(LeaseBook(store, "relit-a"), shards=4, index=0, workers=1, poll=0.05)
    first = claimer.next()
    claimer.near_end(60.0)  # far from the end: nothing claimed yet
    time.sleep(0.3)
    assert claimer.book.read(1) is None
    claimer.near_end(0.2)
    ahead = _wait_for_lease(claimer.book, 1)  # claimed while shard 0 is still running
    assert claimer.book.read(0)[1] == first.version  # its own shard was no candidate
    claimer.near_end(0.1)  # once per shard
    claimer.book.finish(first)
    second = claimer.next()
    assert (second.shard, second.version) == (1, ahead[1])  # the lease claimed ahead
    assert claimer.claims == 2

    claimer.near_end(0.0)
    _wait_for_lease(claimer.book, 2)
    claimer.stop.set()  # SIGTERM
    assert claimer.next() is None
    names = store.list_names("_relit/relit-a/leases")
    assert "2.free" in names and "2.json" not in names  # released at once
    assert "1.json" in names  # the current shard is the worker's to release or finish

    other = Claimer(LeaseBook(store, "relit-a"), shards=4, index=0, workers=1, poll=0.05)
    assert other.next().shard == 2  # the released shard, straight away
    other.near_end(0.0)
    _wait_for_lease(other.book, 3)
    other.close()  # a worker that fails releases it too
    assert "3.free" in store.list_names("_relit/relit-a/leases")
    assert claimer.book.read(3) is None


def test_a_shard_released_after_a_failure_can_be_claimed_again_by_the_same_worker(tmp_path):
    """A temporary failure frees the shard and the worker claims again: the same shard too
    (the last one left, with this worker alone on the run), not only the others."""
    claimer = Claimer(LeaseBook(LocalStorage(tmp_path / "out"), "relit-r"), shards=1, index=0,
                      workers=1, poll=0.05)
    first = claimer.next()
    claimer.book.release(first)
    give_up = threading.Timer(10, claimer.stop.set)  # instead of waiting for ever
    give_up.start()
    try:
        again = claimer.next()
    finally:
        give_up.cancel()
    assert again is not None and again.shard == 0
