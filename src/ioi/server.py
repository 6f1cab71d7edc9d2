"""Load once: one process per model holds the processed model; every workflow job is served by it.

Why (issue 11 item 2, measured on the 2-core development machine, see the helper's report): a job
that starts its own Python pays ``import torch`` (~2.5 s CPU), ``transformers`` + ``pandas``
(~3-5 s), TransformerLens, then builds the Hugging Face model and boots and processes the bridge
(``fold_ln``, centring: 1-5 s for GPT-2 small's shape) -- 8-18 s of every job, before any work.
Memory-mapping the processed weights would remove only the last part; the imports alone exceed the
3 s target. So the imports and the model are paid once, by a **model server**:

* the first job of a run, the workflow's ``load_model`` rule (workflow/rules/model.smk; kind
  ``load_model``, :func:`ioi.pipeline.run_load_model_job`), finds no server for its model and
  starts one (``python -m ioi.server``, detached, its output in ``logs/model-server/``), under a
  file lock so parallel jobs start exactly one; the server imports the library, loads the model
  once (:func:`ioi.pipeline.load_workflow_model`, every real loading path: hub, HF cache,
  model_path) and listens on a Unix socket. That start is the load job's own work: its
  ``model.json`` records how long it took (:data:`SERVER_INFO`, the client's wait), so the
  self-check and the experiments after it pay only their connection. Any job that finds no
  server (it idled out, or the load job ran in an earlier run) starts one the same way and says
  so on its stderr: that job then pays the load;
* each job sends its arguments and log path; on CPU the server **forks** a child per job (the
  child shares the loaded weights copy-on-write, sets the job's thread count, writes the job's
  log and results, and exits); on CUDA (no fork after CUDA initialisation) it runs the jobs one
  at a time in its own process (GPU jobs are serialised by the ``gpu`` resource anyway). The
  client waits and exits with the job's status, so Snakemake sees a normal job;
* the server's socket name is a hash of the model spec, device, seed, Python and the library's
  source files (path, size, mtime; the plotting code, which no model job imports, left out):
  editing ``src/ioi`` or changing the model starts a new server, never reuses a stale one. A
  server exits after ``IOI_MODEL_SERVER_IDLE_S`` seconds (default 120) without a job.

Figure and page jobs (kinds ``figure`` / ``page``) need no model: a **plot server** (one per
library version, ``python -m ioi.server --plots``) imports matplotlib, pandas, seaborn and every
registered plotter once and forks a child per job, which takes the client's environment (e.g.
``SOURCE_DATE_EPOCH``) and folder, draws, saves, and exits; its files are byte-identical to a job
run in its own process (tests/test_server.py). Measured on the 2-core machine (see the helper's
report): a figure job in its own Python pays ~1.3 s CPU of imports (matplotlib, pandas, seaborn,
the plot modules) before it draws; served, the client only starts Python and Snakemake's script
preamble. A separate server rather than the model server: a figure needs no model (re-drawing
after editing a plot would otherwise load the model, 8-18 s for GPT-2's shape), and on CUDA the
model server runs jobs one at a time in its own process, where figures would queue behind the
experiments and share one matplotlib state.

``IOI_MODEL_SERVER=0`` (or ``model_server: false`` in the config) runs every job in its own process
as before. Any failure to reach or start a server falls back to that, so a missing model still
ends with its one-paragraph message (given once, by the load job: every model job comes after it).

On a cluster (e.g. ``profiles/slurm``) every job runs on some node, and a Unix socket serves only
its own node (its folder, ``IOI_MODEL_SERVER_DIR`` or ``XDG_RUNTIME_DIR`` or ``/tmp``, should be
node-local: a socket file on a shared file system cannot be reached from another node, and the
job there then starts its own server). So each job on a node without a server starts one and
pays the load (a group job's later jobs reuse it); the load job's ``model.json`` names the host
it loaded on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_IDLE_S = 120.0
START_TIMEOUT_S = 900.0
MAX_SOCKET_PATH = 107  # bytes of a Unix socket's path on Linux (sun_path is 108, NUL included)
# What the running server knows of itself (filled in by :func:`serve`; read by the load job, kind
# ``load_model``, which a served child inherits): pid, host, socket, start time, its load's parts.
SERVER_INFO: dict[str, Any] = {}
_PROCESS_START = time.time()  # this process's start (the server's, when run as ``-m ioi.server``)


# ----------------------------------------------------------------------------------------------
# Identity of a server
# ----------------------------------------------------------------------------------------------


# What model jobs never import (the plotting code, the figures' model names, the gallery writer):
# the workflow's model jobs do not take them as inputs either (LIBRARY_SOURCES in
# workflow/rules/common.smk), so editing them neither re-runs the load job nor needs a new model server.
NOT_MODEL_SOURCES = ("plots", "gallery.py", "labels.py")


def library_fingerprint(model_jobs: bool = False) -> str:
    """Hash of every library source file's path, size and mtime (cheap: no file is read); with
    ``model_jobs``, of those the model jobs import (without :data:`NOT_MODEL_SOURCES`)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if model_jobs and (path.name in NOT_MODEL_SOURCES or NOT_MODEL_SOURCES[0] in path.relative_to(PACKAGE_DIR).parts):
            continue
        stat = path.stat()
        digest.update(f"{path.relative_to(PACKAGE_DIR)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resolved_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible (checked without importing torch), else ``cpu``."""
    if device != "auto":
        return device
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    return "cuda" if Path("/dev/nvidiactl").exists() else "cpu"


def server_key(model_spec: str, device: str, seed: int) -> str:
    spec_path = Path(model_spec).expanduser()
    where = str(spec_path.resolve()) if spec_path.exists() else model_spec
    text = json.dumps([where, resolved_device(device), int(seed), sys.executable,
                       library_fingerprint(model_jobs=True)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def plot_server_key() -> str:
    """The plot server's identity: the Python and the library's sources (no model)."""
    text = json.dumps(["plots", sys.executable, library_fingerprint()])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def socket_path(key: str, role: str = "model") -> Path:
    root = Path(os.environ.get("IOI_MODEL_SERVER_DIR") or os.environ.get("XDG_RUNTIME_DIR") or "/tmp")
    return root / f"ioi-{role}-{os.getuid()}-{key}.sock"


def enabled(setting: bool | None = True) -> bool:
    """Whether jobs go through a model server: the config's ``model_server`` and, overriding it,
    the environment variable ``IOI_MODEL_SERVER`` (``0`` / ``1``)."""
    env = os.environ.get("IOI_MODEL_SERVER")
    if env is not None:
        return env not in ("0", "false", "False", "")
    return bool(setting)


# ----------------------------------------------------------------------------------------------
# Running one job (in the server's child, in the server itself, or in the client as a fallback)
# ----------------------------------------------------------------------------------------------


PLOT_KINDS = ("figure", "page")  # jobs without a model, served by the plot server


def run_job(kind: str, kwargs: dict[str, Any], log_path: str | None, model=None,
            cwd: str | None = None, sent: float | None = None) -> int:
    """Run job ``kind`` (``load_model`` / ``selfcheck`` / ``experiment`` with the model;
    ``figure`` / ``page`` without) with ``kwargs`` in the folder ``cwd`` (the client's: its paths
    are relative to it); its output goes to ``log_path``. Returns the exit status (0 = done)."""
    from ioi import pipeline

    previous = os.getcwd()
    if cwd:
        os.chdir(cwd)
    try:
        return _run_job(pipeline, kind, kwargs, log_path, model, sent)
    finally:
        os.chdir(previous)


def _run_job(pipeline, kind: str, kwargs: dict[str, Any], log_path: str | None, model,
             sent: float | None = None) -> int:
    jobs = {"load_model": pipeline.run_load_model_job, "experiment": pipeline.run_experiment_job,
            "selfcheck": pipeline.run_selfcheck_job, "figure": pipeline.plot_figure_job,
            "page": pipeline.write_page_job}
    context = pipeline.log_to(log_path) if log_path else contextlib.nullcontext()
    with context:
        if sent is not None:
            server = "plot" if kind in PLOT_KINDS else "model"
            print(f"served by the {server} server (pid {os.getppid()}): started {time.time() - sent:.2f} s "
                  "after the job's request", flush=True)
        try:
            if kind not in jobs:
                raise ValueError(f"Unknown job kind {kind!r}; known: {', '.join(jobs)}.")
            if kind in PLOT_KINDS:
                jobs[kind](**kwargs)
            elif kind == "load_model" and model is not None:  # served: what the server did
                jobs[kind](**kwargs, model=model, server=dict(SERVER_INFO))
            else:
                jobs[kind](**kwargs, model=model)
        except SystemExit as exit_:
            code = exit_.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        except BaseException:  # noqa: BLE001 - reported in the job's log, as Python would
            traceback.print_exc()
            return 1
    return 0


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------


def _read_request(conn: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return json.loads(data.decode())


def _reply(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall((json.dumps(message) + "\n").encode())
    conn.close()


def warm_plain_weights(model) -> None:
    """Build the plain-tensor weights (:func:`ioi.plain_forward.weights`: the processed weights
    stacked per layer, 0.3-0.9 s at GPT-2 small's size) once here, before any fork: every job that
    runs a plain forward or path patching then finds them in the per-model cache (the same
    tensors, copied by reference: no arithmetic, so the values are those a job would build)
    instead of stacking them again. Skipped for models the plain engine does not support."""
    from ioi import plain_forward

    if plain_forward.unavailable_reason(model) is None:
        plain_forward.weights(model)


def serve(model_spec: str, device: str, seed: int, path: Path, idle_s: float = DEFAULT_IDLE_S) -> int:
    """Load the model, then serve jobs on the Unix socket ``path`` until idle for ``idle_s``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's threads and fork
    import torch

    from ioi import pipeline
    from ioi.registry import EXPERIMENTS, resolve

    torch.set_num_threads(1)  # no OpenMP pool in the parent: children set their own thread count
    t0 = time.perf_counter()
    imports_s = time.time() - _PROCESS_START  # Python's start, this module's and torch's imports
    model = pipeline.load_workflow_model(model_spec, device=device, seed=seed)
    t1 = time.perf_counter()
    for spec in EXPERIMENTS.values():  # import every runner's module once, here
        resolve(spec.runner)
    import ioi.selfcheck  # noqa: F401
    # What jobs import lazily (reading the datasets, TL's patching for the references), once here.
    import pyarrow.parquet  # noqa: F401
    import transformer_lens.patching  # noqa: F401
    warm_plain_weights(model)
    forking = next(model.parameters()).device.type == "cpu"
    SERVER_INFO.update(
        pid=os.getpid(), host=socket.gethostname(), socket=str(path),
        started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_PROCESS_START)),
        ready_s=round(time.time() - _PROCESS_START, 3),  # the whole start, as the server saw it
        parts_s={"python_and_torch_imports": round(imports_s, 3), "load_model": round(t1 - t0, 3),
                 "runner_imports_and_plain_weights": round(time.perf_counter() - t1, 3)},
        forking=forking, max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(f"model server: {model_spec} on {device} loaded in {time.perf_counter() - t0:.1f} s; "
          f"{'forking a child per job' if forking else 'running jobs one at a time'}; {path}",
          flush=True)

    def after_job() -> None:  # a job run in this process (CUDA): leave no hooks, free the cache
        with contextlib.suppress(Exception):
            model.reset_hooks()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    return _serve_jobs(path, idle_s, model=model, forking=forking, after_job=after_job)


def serve_plots(path: Path, idle_s: float = DEFAULT_IDLE_S) -> int:
    """Import the plotting stack and every registered plotter and page writer, then serve figure and
    page jobs on the Unix socket ``path`` (a forked child each) until idle for ``idle_s``. Nothing
    is drawn here, so each child starts from the state a fresh process has after its imports."""
    t0 = time.perf_counter()
    from ioi import pipeline  # noqa: F401
    from ioi.registry import FIGURES, PAGES, resolve

    for spec in FIGURES.values():
        resolve(spec.plotter)
    for spec in PAGES.values():
        resolve(spec.writer)
    import pandas  # noqa: F401  (read_experiment_files)

    print(f"plot server: {len(FIGURES)} figures and {len(PAGES)} pages imported in "
          f"{time.perf_counter() - t0:.1f} s; forking a child per job; {path}", flush=True)
    return _serve_jobs(path, idle_s, model=None, forking=True)


def _serve_jobs(path: Path, idle_s: float, *, model, forking: bool, after_job=None) -> int:
    """Accept jobs on ``path``: each in a forked child (``forking``) or one at a time here."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener.bind(str(path))
    listener.listen(64)
    children: dict[int, socket.socket] = {}
    last_activity = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([listener], [], [], 0.2)
            if ready:
                conn, _ = listener.accept()
                request = _read_request(conn)
                last_activity = time.monotonic()
                if forking:
                    pid = os.fork()
                    if pid == 0:  # the child: one job, then exit
                        listener.close()
                        if request.get("env") is not None:  # the client's environment, as its own job
                            os.environ.clear()
                            os.environ.update(request["env"])
                        code = run_job(request["kind"], request["kwargs"], request.get("log"), model,
                                       request.get("cwd"), request.get("sent"))
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                    children[pid] = conn
                else:
                    code = run_job(request["kind"], request["kwargs"], request.get("log"), model,
                                   request.get("cwd"), request.get("sent"))
                    if after_job is not None:
                        after_job()
                    _reply(conn, {"returncode": code})
                    last_activity = time.monotonic()
            for pid in list(children):
                done, status, usage = os.wait4(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    _reply(children.pop(pid), {"returncode": code if code >= 0 else 128 - code,
                                               "max_rss_mb": round(usage.ru_maxrss / 1024, 1)})
                    last_activity = time.monotonic()
            if not children and time.monotonic() - last_activity > idle_s:
                print(f"{'model' if model is not None else 'plot'} server: idle for {idle_s:.0f} s, exiting",
                      flush=True)
                return 0
            if not path.exists():  # replaced or removed: stop serving
                return 0
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            if path.exists() and os.environ.get("IOI_MODEL_SERVER_KEEP_SOCKET") != "1":
                path.unlink()


# ----------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        conn.close()
        return None


def _start_server(arguments: list[str], path: Path, log_dir: Path) -> socket.socket | None:
    """Start a detached server and wait until it listens; None when it exits first."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{path.stem}.log", "a")  # noqa: SIM115 - handed to the detached server
    command = [sys.executable, "-m", "ioi.server", *arguments, "--socket", str(path)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, close_fds=True, env={**os.environ})
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = _connect(path)
        if conn is not None:
            return conn
        if process.poll() is not None:
            return None
        time.sleep(0.1)
    return None


def _server_connection(path: Path, arguments: list[str], log_dir: Path) -> tuple[socket.socket | None, float | None]:
    """A connection to the server at ``path`` (started if none runs) and, when this call started
    it, the seconds from starting it to its first answer (else None). (None, None) when ``path``
    is too long for a Unix socket (107 bytes on Linux): the server could never bind it, and each
    job would pay a server's failed start before running in its own process."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        print(f"model server off: its socket path {path} is longer than {MAX_SOCKET_PATH} bytes; set "
              "IOI_MODEL_SERVER_DIR to a shorter folder", file=sys.stderr)
        return None, None
    conn = _connect(path)
    if conn is not None:
        return conn, None
    with _locked(path.with_suffix(".lock")):
        conn = _connect(path)  # another job may have started it meanwhile
        if conn is not None:
            return conn, None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead server's socket
        t0 = time.perf_counter()
        conn = _start_server(arguments, path, log_dir)
        return conn, (time.perf_counter() - t0 if conn is not None else None)


def _connection_for(kind: str, kwargs: dict[str, Any], log_dir: Path) -> tuple[socket.socket | None, float | None]:
    """A connection to the server for job ``kind`` (the plot server, or the model's server) and the
    seconds this call spent starting it (None when it was running)."""
    if kind in PLOT_KINDS:
        return _server_connection(socket_path(plot_server_key(), "plots"), ["--plots"], log_dir)
    model_spec, device, seed = kwargs["model_spec"], str(kwargs["device"]), int(kwargs["seed"])
    return _server_connection(socket_path(server_key(model_spec, device, seed)),
                              ["--spec", model_spec, "--device", device, "--seed", str(seed)], log_dir)


def dispatch(kind: str, *, log: str, use_server: bool | None = True,
             server_log_dir: str = "logs/model-server", **kwargs: Any) -> None:
    """Run one workflow job through its server (the model's, or for figures and pages the plot
    server; started if need be), else in this process; exits with the job's status when it fails."""
    conn, started_s = None, None
    if enabled(use_server):
        conn, started_s = _connection_for(kind, kwargs, Path(server_log_dir))
    server = "plot" if kind in PLOT_KINDS else "model"
    if conn is not None and started_s is not None and kind not in ("load_model", *PLOT_KINDS):
        # The load job (workflow rule load_model) starts the run's server; a later job that finds
        # none (idle for IOI_MODEL_SERVER_IDLE_S, or the load job ran in an earlier run, or on a
        # cluster node of its own) starts one and pays the load in its overhead.
        print(f"{kind}: no model server was running for this model (idle longer than "
              f"IOI_MODEL_SERVER_IDLE_S, the load job ran in an earlier run, or another node); "
              f"this job started one ({started_s:.1f} s)", file=sys.stderr)
    if kind == "load_model":
        kwargs = {**kwargs, "started_s": None if started_s is None else round(started_s, 3),
                  "server_wanted": enabled(use_server)}
    if conn is None:
        code = run_job(kind, kwargs, log)
    else:
        with conn:
            request = {"kind": kind, "kwargs": kwargs, "log": str(Path(log).resolve()), "cwd": os.getcwd(),
                       "sent": time.time()}
            if kind in PLOT_KINDS:
                request["env"] = dict(os.environ)
            conn.sendall((json.dumps(request) + "\n").encode())
            try:
                code = int(_read_request(conn)["returncode"])
            except (ValueError, KeyError, OSError):
                print(f"the {server} server ended before answering; see {server_log_dir}/", file=sys.stderr)
                code = 1
        if code:
            print(f"{kind} failed (status {code}) in the {server} server's child; its log: {log}",
                  file=sys.stderr)
            with contextlib.suppress(OSError):
                sys.stderr.write(Path(log).read_text()[-4000:])
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ioi.server", description=__doc__.split("\n")[0])
    parser.add_argument("--plots", action="store_true", help="serve figure and page jobs (no model)")
    parser.add_argument("--spec")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--idle-s", type=float,
                        default=float(os.environ.get("IOI_MODEL_SERVER_IDLE_S", DEFAULT_IDLE_S)))
    args = parser.parse_args(argv)
    if args.plots:
        return serve_plots(args.socket, args.idle_s)
    if not args.spec:
        parser.error("--spec is required (or --plots)")
    return serve(args.spec, args.device, args.seed, args.socket, args.idle_s)


if __name__ == "__main__":
    sys.exit(main())
