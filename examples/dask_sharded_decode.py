"""Decoding against a KV cache sharded across Dask workers.

The cache is made on the workers and persisted there, one shard of keys and
values per worker; it never moves.  Each decode step sends the new query
rows (a few KiB, inside the task graph) to every shard, each worker attends
to its own shard with fastattn and returns a partial output and its
log-sum-exp, and fastattn.merge combines the partials (fastattn.dask does
all of this).  The script prints the time per step and the bytes the workers
sent during the steps (partials and results) next to the size of the cache.

    python examples/dask_sharded_decode.py                       # a local cluster of 2 worker processes
    python examples/dask_sharded_decode.py --scheduler tcp://host:8786   # a running cluster
"""
import argparse
import time

import numpy as np

import dask.array as da
from distributed import Client, LocalCluster, wait

import fastattn
import fastattn.dask as fdask


def outgoing_bytes(client):
    """Bytes every worker has sent to other workers and to clients so far."""
    return sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_bytes_total).values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduler", help="address of a running dask scheduler (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the LocalCluster")
    parser.add_argument("--tokens", type=int, default=1 << 16, help="keys in the cache")
    parser.add_argument("--heads", type=int, nargs=2, default=(32, 8), metavar=("H", "G"),
                        help="query heads and key/value heads")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    h, g = args.heads
    if args.scheduler:
        client = Client(args.scheduler)
        cluster = None
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, worker_dashboard_address=None)
        client = Client(cluster)
    try:
        workers = len(client.scheduler_info()["workers"])
        shard = -(-args.tokens // workers)
        rng = da.random.default_rng(0)
        k = rng.standard_normal((g, args.tokens, args.dim), chunks=(g, shard, args.dim), dtype=np.float32)
        v = rng.standard_normal((g, args.tokens, args.dim), chunks=(g, shard, args.dim), dtype=np.float32)
        k, v = client.persist([k, v])
        wait([k, v])
        where = client.who_has([k, v])
        print(f"cache: {g} kv heads x {args.tokens} tokens x {args.dim}, float32, "
              f"{(k.nbytes + v.nbytes) / 2**20:.0f} MiB in {k.numblocks[1]} shards on "
              f"{len({w for ws in where.values() for w in ws})} workers")

        q_rng = np.random.default_rng(1)
        times = []
        before = outgoing_bytes(client)
        for step in range(args.steps):
            q = q_rng.standard_normal((h, 1, args.dim), dtype=np.float32)  # this step's query rows
            t0 = time.perf_counter()
            out = client.compute(fdask.attention(q, k, v, causal=True), sync=True)
            times.append(time.perf_counter() - t0)
        moved = outgoing_bytes(client) - before
        print(f"{args.steps} decode steps ({h} query heads over {g} kv heads): median "
              f"{np.median(times) * 1e3:.1f} ms per step; the workers sent {moved / args.steps / 2**10:.0f} KiB "
              f"per step (partial outputs and results; the cache is {(k.nbytes + v.nbytes) / 2**20:.0f} MiB)")

        # the last step against the whole cache in this process (which moves it here once)
        want = fastattn.attention(q, np.asarray(k), np.asarray(v), causal=True)
        err = float(np.max(np.abs(out - want)))
        print(f"last step against one-process fastattn.attention: max |difference| {err:.1e}")
        assert err < 1e-5
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    main()
