"""The ranks of the multi-process tests (tests/*_worker.py), started from a fork server that has
imported torch, weighted_loss, torch.distributed's tensor API and transformers once.

A worker run as `python worker.py CASE OUT_DIR` spends 2-5 s of CPU importing those before its
first collective; the suite starts about a hundred ranks, and on CI's two cores those imports
were minutes. Here each rank is a fork of one process that imported them (and has run no torch
op, so no thread pool is copied): its environment (RANK, WORLD_SIZE, MASTER_PORT, ...) set, its
intra-op threads set from OMP_NUM_THREADS, its output written to a log file, and the worker's
main run as `__main__` with its arguments, as the command line would run it.

    from ranks import run_ranks
    procs_ok, logs = run_ranks("dtensor_worker.py", "tp-head", 2, out_dir, env, timeout_s)
"""
import multiprocessing
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# what every worker imports; a module that is missing is skipped by the fork server
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "weighted_loss",
           "transformers", "ranks"]
_context = []


def _ctx():
    if not _context:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context.append(ctx)
    return _context[0]


def _rank_main(worker: str, args, env, log_path: str) -> None:
    """In the forked rank: the environment, the output, the threads, then the worker's main."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    import torch
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sys.argv = [worker, *args]
    sys.path.insert(0, os.path.dirname(worker))
    try:
        runpy.run_path(worker, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown (gloo's threads could abort it)


def run_ranks(worker: str, case: str, world: int, out_dir, env, timeout_s: float):
    """Runs ranks 0..world-1 of ``worker`` (a file in tests/) on ``case``; returns (exit codes,
    logs), an exit code None for a rank killed after ``timeout_s`` seconds."""
    ctx = _ctx()
    path = os.path.join(HERE, worker)
    logs = [os.path.join(str(out_dir), f"rank{r}.log") for r in range(world)]
    procs = [ctx.Process(target=_rank_main,
                         args=(path, [case, str(out_dir)], dict(env, RANK=str(r)), logs[r]))
             for r in range(world)]
    for p in procs:
        p.start()
    import time
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    texts = []
    for log in logs:
        with open(log, errors="replace") as f:
            texts.append(f.read())
    return codes, texts
