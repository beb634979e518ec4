"""A worker process of the lease races in test_leases.py: once every racer is ready and ``go``
is set, it tries to claim every shard of the run and reports the ones it won."""

from __future__ import annotations


def race(uri: str, run_id: str, index: int, workers: int, shards: int, ready, go,
         results) -> None:
    from relit_k8s.leases import LeaseBook, claim_order
    from relit_k8s.storage import open_storage

    book = LeaseBook(open_storage(uri), run_id)
    book.read(0)  # connected (S3 client made, endpoint reached) before the start
    ready.put(index)
    go.wait(60)
    won = [c.shard for s in claim_order(index, workers, shards)
           if (c := book.try_claim(s)) is not None]
    results.put((index, won))
