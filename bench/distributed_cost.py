"""What the collectives cost against the loss itself, at (ROWS, CLASSES) per rank: gloo ranks
spawned on this machine, forward+backward medians (each timed from a barrier).

    python bench/distributed_cost.py [--ranks 2 4] [--rows 8] [--classes 32768] [--dtype float32]

Per group size: the fused loss alone on one rank's (ROWS, CLASSES) (no communication); with
process_group= (data parallel: two scalar all-reduces); the vocab-parallel loss with a
(ROWS, CLASSES) shard per rank (one all-gather of 5 float32 per row); and that all-gather alone.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(args):
    import torch
    import torch.distributed as dist
    import weighted_loss as wl
    from weighted_loss.vocab_parallel import _all_gather

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(rank)
    n, c = args.rows, args.classes
    x = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, c * world, (n,), generator=torch.Generator().manual_seed(0))
    w = (torch.rand(c * world, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype)
    y_local, w_local = y % c, w[:c]

    def timed(fn, reps=args.reps):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    def alone():
        torch.autograd.grad(wl.cross_entropy(x, y_local, weight=w_local), x)

    def data_parallel():
        torch.autograd.grad(wl.cross_entropy(x, y_local, weight=w_local, process_group=group), x)

    def vocab_parallel():
        torch.autograd.grad(wl.vocab_parallel_cross_entropy(x, y, weight=w, process_group=group),
                            x)

    stats = torch.zeros(5, n)

    def gather_alone():
        _all_gather(stats, group).wait()

    out = {"ranks": world, "rows": n, "classes_per_rank": c, "dtype": args.dtype,
           "alone_ms": timed(alone), "data_parallel_ms": timed(data_parallel),
           "vocab_parallel_ms": timed(vocab_parallel), "all_gather_ms": timed(gather_alone)}
    if rank == 0:
        print(json.dumps(out))
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()
    # Functional collectives over gloo leave a thread that, now and then, aborts the interpreter
    # at exit ("terminate called without an active exception", 3 of 30 runs of an all-gather
    # loop with torch 2.13, never with the process group destroyed and os._exit): the results
    # are written and the group torn down, so skip the interpreter's teardown.
    sys.stdout.flush()
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--classes", type=int, default=32768)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for world in args.ranks:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + sys.argv[1:]
        procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE)
                 for r in range(world)]
        outs = [p.communicate(timeout=600)[0].decode() for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"a rank failed with {world} ranks")
        r = json.loads(outs[0].strip().splitlines()[-1])
        print(f"{world} ranks, ({r['rows']}, {r['classes_per_rank']}) {r['dtype']} per rank, "
              f"fwd+bwd ms: alone {r['alone_ms']:.3f}, data parallel {r['data_parallel_ms']:.3f}, "
              f"vocab parallel {r['vocab_parallel_ms']:.3f} (all-gather alone "
              f"{r['all_gather_ms']:.3f})")


if __name__ == "__main__":
    main()
