"""Reliability guarantees (docs/guarantees.md), one table of cases, each with the outcome it must have.

1. Training loses at most the epoch in progress: SIGKILL at any moment (mid-epoch, inside an fsync, between
   the renames of last/) or a full disk, then ``--resume``, ends bit-identical to an uninterrupted run;
   Ctrl-C finishes the save in progress, says how to resume and exits 130.
2. predict/embed lose no finished row: after SIGKILL or a full disk, ``--resume`` gives the very file an
   uninterrupted run writes, row order included.
3. One writer per run folder or output file; the second is refused naming the first's process id; a dead
   process's lock is taken over.
4. A failed write (full disk, forbidden, read-only) names the path in one line, keeps the previous file and
   leaves no temporary.
5. Hostile checkpoints, configs and Hub repos are refused in one line, nothing executed, nothing read beyond
   a bound.

Kill tests really kill: every run is a process forked from a "zygote" (a subprocess that imported torch and
cxrcae once, so each run starts in milliseconds instead of seconds), killed with SIGKILL/SIGINT by a hook at
an exact point (the n-th call of a function) or from outside. Runs use one torch thread: bit-exact across
runs, and fast on a crowded machine.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import pickle
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from conftest import FIXTURE_DATA, REPO
from cxrcae._atomic import WriteError, atomic_write_bytes
from cxrcae.errors import CheckpointError, CxrcaeError
from cxrcae.hub.resolve import download_checkpoint, load_checkpoint
from cxrcae.infer.embed import embed
from cxrcae.infer.writers import RowJournal, partial_path
from cxrcae.locking import LockedError, hold, holder, lock_file
from cxrcae.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_checkpoint
from cxrcae.tasks import build_model
from test_hub_server import start_hub

# -------------------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    guarantee: int
    what: str
    outcome: str
    run: Callable


CASES: dict[str, Case] = {}


def case(guarantee: int, what: str, outcome: str):
    """Register a test function as a row of the table (its fixtures are resolved by name)."""

    def register(fn: Callable) -> Callable:
        CASES[fn.__name__.removeprefix("case_")] = Case(guarantee, what, outcome, fn)
        return fn

    return register


def table() -> str:
    """The table of cases as Markdown (for the README / a resolution report)."""
    lines = ["| # | case | outcome |", "|---|---|---|"]
    lines += [f"| {c.guarantee} | {c.what} | {c.outcome} |" for c in CASES.values()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the zygote

ZYGOTE = r"""
import importlib, json, os, resource, signal, sys, threading, time, traceback
import torch
import cxrcae.cli.app, cxrcae.train, cxrcae.train.engine, cxrcae.infer.prediction, cxrcae.infer.embed
from cxrcae.cli.app import main

def act(spec):
    kind = spec["action"]
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif kind == "fsize":
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["bytes"], hard))
    elif kind == "wait":
        open(spec["path"], "w").close()
        time.sleep(spec["seconds"])

def hook(spec):
    module, _, attr = spec["target"].partition(":")
    owner = importlib.import_module(module)
    *parents, name = attr.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original, calls = getattr(owner, name), [0]
    def hooked(*args, **kwargs):
        calls[0] += 1
        if calls[0] == spec["n"]:
            act(spec)
        return original(*args, **kwargs)
    setattr(owner, name, hooked)

def child(job):
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    torch.set_num_threads(1)
    for spec in job["hooks"]:
        hook(spec)
    sys.argv = ["cxrcae", *job["argv"]]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)

def say(message):  # one write of a short line: atomic on a pipe, whichever thread writes
    os.write(1, (json.dumps(message) + "\n").encode())

def reap():  # a thread: reports each child's end while the main thread forks more
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(0.05)
            continue
        say({"pid": pid, "code": os.waitstatus_to_exitcode(status)})

say({"ready": True})
threading.Thread(target=reap, daemon=True).start()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # fresh objects: no lock held by a thread
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            code = child(job)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    say({"pid": pid})
"""

JOB_TIMEOUT = 300  # seconds; a run that takes longer has hung


@dataclass
class Result:
    code: int
    output: str

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.output.splitlines() if ln.startswith("Error:")]


class Zygote:
    """A subprocess that has imported cxrcae; ``start(argv)`` forks a child that runs ``cxrcae ARGV``."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.env, self.workdir, self.jobs = env, workdir, 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO
        )
        self._buffer = b""
        self._ready = False
        self.codes: dict[int, int] = {}
        self.started: list[int] = []

    def _pump(self) -> None:
        """Read one message: a start (``pid``), an end (``pid`` and ``code``) or ``ready``."""
        deadline = time.monotonic() + JOB_TIMEOUT
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                raise AssertionError("the zygote did not answer (hung run or crash)")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        if "code" in message:
            self.codes[message["pid"]] = message["code"]
        elif "pid" in message:
            self.started.append(message["pid"])
        else:
            self._ready = True

    def start(self, *argv, hooks: tuple[dict, ...] = (), env: dict | None = None) -> Job:
        while not self._ready:
            self._pump()
        self.jobs += 1
        log = self.workdir / f"job{self.jobs}.log"
        job = {
            "argv": [str(a) for a in argv],
            "env": {**self.env, **(env or {})},
            "cwd": str(self.workdir),
            "log": str(log),
            "hooks": list(hooks),
        }
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        while not self.started:
            self._pump()
        return Job(self, self.started.pop(0), log)

    def run(self, *argv, **kwargs) -> Result:
        return self.start(*argv, **kwargs).wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(timeout=60)


@dataclass
class Job:
    zygote: Zygote
    pid: int
    log: Path

    def wait(self) -> Result:
        try:
            while self.pid not in self.zygote.codes:
                self.zygote._pump()
        except AssertionError:
            os.kill(self.pid, signal.SIGKILL)
            raise
        return Result(self.zygote.codes.pop(self.pid), self.log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    home = tmp_path_factory.mktemp("zygote-home")
    env = {
        "CXRCAE_HOME": str(home / "cxrcae"),  # one decoded cache for every run
        "HF_HOME": str(home / "hf"),
        "HF_HUB_CACHE": str(home / "hf" / "hub"),
        "HF_HUB_OFFLINE": "1",
        "CXRCAE_PROBE": "off",
        "COLUMNS": "200",
    }
    z = Zygote(env, tmp_path_factory.mktemp("zygote-work"))
    yield z
    z.close()


def at(target: str, n: int, action: str, **extra) -> dict:
    """A hook: ``action`` (kill, int, fsize, wait) at the ``n``-th call of ``module:attr``."""
    return {"target": target, "n": n, "action": action, **extra}


STEP = "torch.optim:Adam.step"  # one optimiser step
SAVE_STATE = "cxrcae.train.engine:save_resume_state"  # OUT/last is written (first call: before epoch 1)
RENAME = "pathlib:Path.rename"  # last/ swapped in: last -> .last-old, then .last-tmp -> last
FSYNC = "os:fsync"  # an atomic file write, after its data and before its rename
RECORD = "cxrcae.infer.writers:RowJournal.record"  # a predict/embed row is kept for --resume


# ---------------------------------------------------------------------------------------------------- helpers


def _leftovers(folder: Path) -> list[str]:
    """Temporaries, half swaps, journals and locks under ``folder``."""
    bad = re.compile(r"(\.tmp$|^\.last-(tmp|old)$|\.partial$|\.lock$)")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if bad.search(p.name))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _epoch(out: Path) -> int:
    return json.loads((out / "last" / "state.json").read_text())["epoch"]


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv", newline="") as f:
        return [
            {k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in csv.DictReader(f)
        ]


def _assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical weights, optimizer and RNG state, the same history and the same files."""
    for name in ("best/model.safetensors", "last/model.safetensors", "last/state.safetensors"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert _history(run) == _history(reference)
    assert _files(run) == _files(reference)
    assert _leftovers(run) == []


def _one_line_error(result: Result, *needles: str) -> str:
    assert len(result.error_lines) == 1, result.output
    line = result.error_lines[0]
    assert "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def data12(tmp_path_factory, fixture_rows) -> Path:
    """12 real X-rays (4 per class) copied into ``CLASS/`` folders."""
    root = tmp_path_factory.mktemp("data12") / "data"
    per_class: dict[str, int] = {}
    for row in fixture_rows:
        label = row["label"]
        if label == "UNLABELED" or per_class.get(label, 0) >= 4:
            continue
        per_class[label] = per_class.get(label, 0) + 1
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURE_DATA / "cxr" / row["path"], root / label)
    return root


@pytest.fixture(scope="module")
def images(data12, tmp_path_factory) -> Path:
    """8 real X-rays, a broken PNG and a text file, flat: predict/embed inputs."""
    folder = tmp_path_factory.mktemp("inputs") / "imgs"
    folder.mkdir()
    for i, src in enumerate(sorted(data12.rglob("*.jpg"))[:8]):
        shutil.copy(src, folder / f"{i}_{src.name}")
    (folder / "3b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = {"kind": "classifier", "head": "dense5", "image_size": 32, "class_names": ["A", "B", "C"]}
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("clf") / "clf", config)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    config = {"kind": "encoder", "image_size": 32, "resize_mode": "pad"}
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("enc") / "enc", config)


TRAIN = ["--image-size", "32", "--batch-size", "4", "--limit-batches", "1", "--num-workers", "0"]
TRAIN += ["--precision", "fp32", "--no-channels-last", "--quiet"]


# ------------------------------------------------------------------------------------------------ 1. training


PRETRAIN_CHAIN = [
    # (hooks of that run, exit code, epoch of last/ afterwards, words of its one-line error)
    ((at(STEP, 2, "kill"),), -9, 1, ()),  # SIGKILL in epoch 2's optimiser step
    ((at(SAVE_STATE, 1, "int"),), 130, 2, ("--resume", "after epoch 2")),  # Ctrl-C while last/ is written
    ((at(RENAME, 2, "kill"),), -9, None, ()),  # SIGKILL between last/ -> .last-old and .last-tmp -> last/
    ((at(FSYNC, 1, "kill"),), -9, 3, ()),  # SIGKILL inside an fsync of the final best/ save
    ((), 0, 3, ()),
]


@case(
    1,
    "pretrain, 3 epochs: SIGKILL mid-step; Ctrl-C while last/ is written; SIGKILL between last/'s two "
    "renames; SIGKILL inside an fsync while best/ is written; each followed by `--resume`",
    "exit -9 / 130 (one line: `interrupted; the run is saved after epoch 2: continue it with `cxrcae "
    "pretrain --resume OUT``) / -9 (only a complete .last-tmp, of epoch 3) / -9; final best/ and last/ "
    "files, optimizer and RNG state and history bit-identical to an uninterrupted run; same files, no "
    "temporaries",
)
def case_pretrain_killed_and_resumed(zygote, data12, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "cut"
    args = ["pretrain", data12, *TRAIN, "--epochs", "3"]
    reference = zygote.start(*args, "--out", ref)  # runs while the first cut run starts
    for i, (hooks, code, epoch, words) in enumerate(PRETRAIN_CHAIN):
        argv = [*args, "--out", out] if i == 0 else ["pretrain", "--resume", out, "--quiet"]
        result = zygote.run(*argv, hooks=hooks)
        assert result.code == code, (i, result.output)
        if words:
            _one_line_error(result, "interrupted", *words)
        if epoch is None:  # killed mid-swap: the complete new state is .last-tmp, no last/
            assert not (out / "last").exists() and (out / ".last-tmp" / "state.json").is_file()
        else:
            assert _epoch(out) == epoch, i
    assert reference.wait().code == 0
    _assert_same_run(out, ref)


@case(
    1,
    "finetune head,all (2 epochs each): SIGKILL in the head stage; full disk (RLIMIT_FSIZE) while last/ is "
    "written; SIGKILL at the first step of stage all; each followed by `--resume`",
    "exit -9 / 1 (one line naming OUT/last, `File too large`, last/ still epoch 1, no temporaries) / -9; "
    "final weights and state bit-identical to an uninterrupted run",
)
def case_finetune_killed_and_resumed(zygote, data12, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "cut"
    args = ["finetune", data12, "--encoder", "none", "--stages", "head,all", "--lr-unfrozen", "1e-3"]
    args += [*TRAIN, "--epochs", "2", "--balance", "sampler"]
    reference = zygote.start(*args, "--out", ref)
    assert zygote.run(*args, "--out", out, hooks=(at(STEP, 2, "kill"),)).code == -9
    assert _epoch(out) == 1
    full = zygote.run("finetune", "--resume", out, hooks=(at(SAVE_STATE, 1, "fsize", bytes=65536),))
    _one_line_error(full, f"{out / 'last'}: cannot write", "File too large")
    assert full.code == 1 and _epoch(out) == 1 and _leftovers(out) == []
    # the resumed run starts in epoch 2 (head), so its second step is stage all's first
    assert zygote.run("finetune", "--resume", out, hooks=(at(STEP, 2, "kill"),)).code == -9
    assert _epoch(out) == 2
    assert zygote.run("finetune", "--resume", out, "--quiet").code == 0
    assert reference.wait().code == 0
    _assert_same_run(out, ref)


# ------------------------------------------------------------------------------------------ 2. predict, embed


def _predict_args(images: Path, model: Path, output: Path) -> list:
    return ["predict", images, "--model", model, "--output", output, "-b", "2", "--num-workers", "0", "-q"]


@case(
    2,
    "predict --output F.csv: SIGKILL after 4 rows; then a full disk (RLIMIT_FSIZE) during --resume; then "
    "--resume",
    "exit -9 (F absent, F.partial holds 4 rows) / 1 (one line naming F.partial, `--resume`; the previous F "
    "unchanged, F.partial complete rows only) / 3; F byte-identical to an uninterrupted run's; no "
    "journal, temporary or lock left",
)
def case_predict_killed_and_resumed(zygote, images, classifier, tmp_path):
    ref, out = tmp_path / "ref.csv", tmp_path / "out" / "preds.csv"
    reference = zygote.start(*_predict_args(images, classifier, ref))
    killed = zygote.run(*_predict_args(images, classifier, out), hooks=(at(RECORD, 5, "kill"),))
    assert killed.code == -9 and not out.exists()
    assert len(partial_path(out).read_text().splitlines()) == 1 + 4  # header + 4 rows
    out.write_text("previous\n")
    args = [*_predict_args(images, classifier, out), "--resume"]
    full = zygote.run(*args, hooks=(at(RECORD, 1, "fsize", bytes=partial_path(out).stat().st_size + 900),))
    _one_line_error(full, f"{partial_path(out)}: cannot write", "--resume")
    assert full.code == 1 and out.read_text() == "previous\n"
    lines = partial_path(out).read_bytes().splitlines(keepends=True)
    assert len(lines) > 5 and all(ln.endswith(b"\n") and json.loads(ln) for ln in lines)
    assert zygote.run(*args).code == 3  # the broken PNG
    assert reference.wait().code == 3
    assert out.read_bytes() == ref.read_bytes()
    assert _leftovers(out.parent) == []


@case(
    2,
    "embed --output F.npy: SIGKILL after 3 rows, then --resume",
    "exit -9 / 3; F.npy and F.index.csv byte-identical to an uninterrupted run's; nothing else left",
)
def case_embed_killed_and_resumed(zygote, images, encoder_dir, tmp_path):
    args = ["embed", images, "--model", encoder_dir, "-b", "3", "--num-workers", "0", "-q"]
    ref, out = tmp_path / "ref" / "f.npy", tmp_path / "out" / "f.npy"
    reference = zygote.start(*args, "--output", ref)
    assert zygote.run(*args, "--output", out, hooks=(at(RECORD, 4, "kill"),)).code == -9
    assert zygote.run(*args, "--output", out, "--resume").code == 3
    assert reference.wait().code == 3
    for name in ("f.npy", "f.index.csv"):
        assert (out.parent / name).read_bytes() == (ref.parent / name).read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.index.csv", "f.npy"]


@case(
    2,
    "embed to .parquet interrupted by Ctrl-C (in process), then resumed",
    "KeyboardInterrupt with a note (rows kept in F.partial, `--resume`); no output; resumed parquet and "
    "index byte-identical to an uninterrupted run's",
)
def case_embed_ctrl_c_parquet(images, encoder_dir, tmp_path):
    pytest.importorskip("pyarrow")
    ref, out = tmp_path / "ref" / "f.parquet", tmp_path / "out" / "f.parquet"
    embed([images], encoder_dir, ref, batch_size=2, device="cpu")

    def ctrl_c_at_batch_3(task, done, total=None, info=""):
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as err:
        embed([images], encoder_dir, out, batch_size=2, device="cpu", progress=ctrl_c_at_batch_3)
    assert "--resume" in " ".join(err.value.__notes__) and not out.exists()
    embed([images], encoder_dir, out, batch_size=2, device="cpu", resume=True)
    for name in ("f.parquet", "f.index.csv"):
        assert (out.parent / name).read_bytes() == (ref.parent / name).read_bytes()
    assert _leftovers(out.parent) == []


@case(
    2,
    "predict: an interrupted run's F.partial, then the same command without --resume, then --resume with "
    "another --top-k; a finished row whose file was touched since",
    "refused in one line (`--resume`) / refused in one line naming top_k; the touched file is computed "
    "again, the others reused",
)
def case_predict_partial_is_never_mixed(cli, images, classifier, tmp_path):
    out = tmp_path / "p.csv"
    settings = {"model": "x", "top_k": None}
    with pytest.raises(KeyboardInterrupt), RowJournal(out, settings) as journal:
        for path in sorted(images.glob("*.jpg"))[:2]:
            journal.record(str(path), {"row": {"path": str(path)}})
        raise KeyboardInterrupt
    fresh = cli(*_predict_args(images, classifier, out)[:6])
    assert fresh.exit_code == 1 and "--resume" in fresh.output and len(fresh.output.strip().splitlines()) == 1
    with pytest.raises(CxrcaeError, match="other settings \\(top_k\\)"):
        RowJournal(out, {**settings, "top_k": 2}, resume=True).__enter__()
    first, second = sorted(images.glob("*.jpg"))[:2]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    try:
        with RowJournal(out, settings, resume=True) as journal:
            assert journal.saved(str(first)) is None and journal.saved(str(second)) is not None
    finally:
        os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns - 10**9))
    assert not partial_path(out).exists()  # a run that ended normally removes its journal


# ---------------------------------------------------------------------------------------------- 3. one writer


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@case(
    3,
    "pretrain --resume OUT while another process trains in OUT; then that process is SIGKILLed (its lock "
    "file stays) and --resume runs again",
    "refused, exit 1, one line `OUT: in use by process PID (cxrcae pretrain ...)`; after the kill the "
    "stale lock is taken over and the run completes",
)
def case_run_folder_lock(zygote, cli, data12, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "training"
    first = zygote.start(
        "pretrain", data12, *TRAIN, "--epochs", "1", "--out", out,
        hooks=(at(STEP, 1, "wait", path=str(marker), seconds=JOB_TIMEOUT),),
    )  # fmt: skip
    _wait_for(marker)
    second = cli("pretrain", "--resume", out)
    assert second.exit_code == 1
    expected = rf"Error: {re.escape(str(out))}: in use by process {first.pid} \(cxrcae pretrain .*"
    assert re.fullmatch(expected, second.output.strip()), second.output
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait().code == -9
    assert holder(out, folder=True)["pid"] == first.pid  # the dead process's lock file is still there
    assert zygote.run("pretrain", "--resume", out, "--quiet").code == 0
    assert not lock_file(out, folder=True).exists()


@case(
    3,
    "predict --output F while another predict writes F; two holds of one lock in one process",
    "refused, exit 1, one line naming the first process's PID; LockedError naming this process",
)
def case_output_lock(zygote, cli, images, classifier, tmp_path):
    out, marker = tmp_path / "p.csv", tmp_path / "predicting"
    first = zygote.start(
        *_predict_args(images, classifier, out), hooks=(at(RECORD, 1, "wait", path=str(marker), seconds=60),)
    )
    _wait_for(marker)
    second = cli(*_predict_args(images, classifier, out))
    assert second.exit_code == 1 and f"in use by process {first.pid}" in second.output
    assert len(second.output.strip().splitlines()) == 1
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    with hold(tmp_path / "x", folder=True):
        with pytest.raises(LockedError, match=f"in use by process {os.getpid()}"):
            with hold(tmp_path / "x", folder=True):
                pass
    with hold(tmp_path / "x", folder=True):  # released: free again
        pass


# ------------------------------------------------------------------------------------------- 4. failed writes


@case(
    4,
    "save a checkpoint over an existing one with ENOSPC on the 2nd of its 3 files (injected)",
    "WriteError, one line naming that file and `No space left on device`; the previous checkpoint "
    "byte-identical and loadable; no temporary",
)
def case_checkpoint_disk_full(tmp_path, monkeypatch):
    import cxrcae._atomic as atomic

    config = {"kind": "encoder", "image_size": 32}
    folder = save_checkpoint(build_model(config), tmp_path / "ckpt", config, card="card")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real, calls = atomic.AtomicFile.commit, []

    def full_disk(self, rename=True):
        calls.append(self.path)
        if len(calls) == 2:
            self.discard()
            raise atomic.as_write_error(self.path, OSError(28, os.strerror(28)))
        return real(self, rename)

    monkeypatch.setattr(atomic.AtomicFile, "commit", full_disk)
    with pytest.raises(WriteError) as err:
        save_checkpoint(build_model(config), folder, config, card="new card")
    assert str(err.value).startswith(f"{folder / 'README.md'}: cannot write (No space left on device)")
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    load_checkpoint(folder)


@case(
    4,
    "predict --output into a folder where files cannot be created (EACCES, injected: root ignores modes)",
    "exit 1, one line naming F and `Permission denied`; nothing created (no F, journal, lock or temporary)",
)
def case_output_forbidden(cli, images, classifier, tmp_path, monkeypatch):
    import cxrcae._atomic as atomic

    def forbidden(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", forbidden)
    out = tmp_path / "ro" / "p.csv"
    result = cli(*_predict_args(images, classifier, out))
    assert result.exit_code == 1
    message = f"Error: {out}: cannot write (Permission denied); any previous version is unchanged"
    assert result.output.strip() == message
    assert list((tmp_path / "ro").iterdir()) == []


@case(
    4,
    "embed over an existing output on a read-only file system (EROFS on the final rename, injected), "
    "then the same run with --resume",
    "WriteError, one line naming F and `Read-only file system`; the previous F and index unchanged, no "
    "temporary; F.partial holds every row and --resume completes without recomputing",
)
def case_output_read_only(images, encoder_dir, tmp_path, monkeypatch):
    import cxrcae._atomic as atomic

    out = tmp_path / "f.npy"
    out.write_bytes(b"previous")
    (tmp_path / "f.index.csv").write_text("previous")

    def read_only(src, dst):
        raise OSError(30, "Read-only file system", src)

    monkeypatch.setattr(atomic.os, "replace", read_only)
    with pytest.raises(WriteError) as err:
        embed([images], encoder_dir, out, batch_size=4, device="cpu")
    assert str(err.value).splitlines()[0].startswith(f"{out}: cannot write (Read-only file system)")
    assert out.read_bytes() == b"previous" and (tmp_path / "f.index.csv").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.index.csv", "f.npy", "f.npy.partial"]
    monkeypatch.undo()
    result = embed([images], encoder_dir, out, batch_size=4, device="cpu", resume=True, progress=_no_work)
    assert result.n_ok == 8 and np.load(out).shape == (8, 512)


def _no_work(task, done, total=None, info=""):
    assert done == total, "a resumed run with every row saved computes nothing"


# ------------------------------------------------------------------------------------------- 5. hostile files

CLF = {"kind": "classifier", "head": "dense5", "image_size": 32, "class_names": ["A", "B", "C"]}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    return save_checkpoint(build_model(CLF), tmp_path_factory.mktemp("good") / "good", CLF)


def _config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


def _weights(folder: Path, blob: bytes) -> None:
    """Replace the weights by ``blob`` and record its sha256, as a hostile author would."""
    import hashlib

    (folder / WEIGHTS_NAME).write_bytes(blob)
    _config(folder, weights_sha256=hashlib.sha256(blob).hexdigest())


def _state(folder: Path) -> dict:
    from safetensors.torch import load

    return load((folder / WEIGHTS_NAME).read_bytes())


def _header_claims_terabytes(folder):
    _weights(folder, struct.pack("<Q", 2**40) + b"{}")


def _tensor_outside_file(folder):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
    _weights(folder, struct.pack("<Q", len(header)) + header + b"\0" * 16)


def _wrong_shape(folder):
    state = _state(folder)
    state["head.classifier.0.weight"] = torch.zeros(7, 7)
    _weights(folder, save(state))


def _wrong_dtype(folder):
    state = _state(folder)
    state["encoder.stages.conv1.weight"] = state["encoder.stages.conv1.weight"].to(torch.int64)
    _weights(folder, save(state))


def _extra_tensor(folder):
    _weights(folder, save({**_state(folder), "evil": torch.zeros(3)}))


def _sparse_terabyte(folder):
    with open(folder / WEIGHTS_NAME, "wb") as f:
        f.truncate(2**36)  # 64 GiB of holes: reading it would take minutes


MARKER = Path("/tmp/cxrcae-test-pickle-ran")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _pickle_only(folder):
    (folder / WEIGHTS_NAME).unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))


def _link_out(name):
    def change(folder):
        elsewhere = folder.parent / f"elsewhere-{name}"
        elsewhere.write_bytes((folder / name).read_bytes())
        (folder / name).unlink()
        (folder / name).symlink_to(elsewhere)

    return change


def _fifo_config(folder):
    (folder / CONFIG_NAME).unlink()
    os.mkfifo(folder / CONFIG_NAME)  # opening it would block for ever


def _deep_config(folder):
    (folder / CONFIG_NAME).write_text('{"kind": "classifier", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _huge_config(folder):
    cfg = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(cfg[:-2] + " " * (17 * 2**20) + cfg[-2:])


def _link_inside(folder):
    (folder / "sub").mkdir()
    (folder / CONFIG_NAME).rename(folder / "sub" / CONFIG_NAME)
    (folder / CONFIG_NAME).symlink_to(Path("sub") / CONFIG_NAME)


HOSTILE = {
    # name: (change to a good checkpoint folder, the one line it must give; None: it loads)
    "config kind unknown": (lambda f: _config(f, kind="transformer"), "field 'kind' must be one of"),
    "config kind missing": (lambda f: _config(f, kind=None) or _drop(f, "kind"), "no 'kind'"),
    "config image_size missing": (lambda f: _drop(f, "image_size"), "missing field 'image_size'"),
    "config image_size a string": (lambda f: _config(f, image_size="32"), "'image_size' must be a whole"),
    "config image_size 10^9": (lambda f: _config(f, image_size=10**9), "from 32 to 4096"),
    "config image_size 100": (lambda f: _config(f, image_size=100), "multiple of 32"),
    "config class_names a string": (lambda f: _config(f, class_names="ABC"), "'class_names' must list"),
    "config 5000 class_names": (lambda f: _config(f, class_names=[str(i) for i in range(5000)]), "2 to 1000"),
    "config head unknown": (lambda f: _config(f, head="os.system"), "'head' must be one of"),
    "config temperature a string": (lambda f: _config(f, temperature="hot"), "'temperature' must be"),
    "config std zero": (lambda f: _config(f, std=[0, 1, 1]), "'std' must be a list"),
    "config from a newer format": (lambda f: _config(f, format_version=99), "'format_version'"),
    "config 17 MiB": (_huge_config, "more than the 16,777,216 allowed"),
    "config nested 100,000 deep": (_deep_config, "nested too deeply"),
    "config not JSON": (lambda f: (f / CONFIG_NAME).write_text("{kind: classifier"), "invalid JSON"),
    "config is a FIFO": (_fifo_config, "not a regular file"),
    "config symlink out of the folder": (_link_out(CONFIG_NAME), "outside the checkpoint folder"),
    "weights symlink out of the folder": (_link_out(WEIGHTS_NAME), "outside the checkpoint folder"),
    "weights header claims 1 TiB": (_header_claims_terabytes, "header claims 1,099,511,627,776 bytes"),
    "weights tensor beyond the file": (_tensor_outside_file, "claims bytes 0-4398046511104"),
    "weights 64 GiB (sparse) file": (_sparse_terabyte, "more than"),
    "weights tensor of the wrong shape": (_wrong_shape, "head.classifier.0.weight F32[7, 7] vs F32["),
    "weights tensor of the wrong dtype": (_wrong_dtype, "encoder.stages.conv1.weight I64[64, 3, 3, 3]"),
    "weights extra tensor": (_extra_tensor, "unexpected keys: evil"),
    "pickle only (code in __reduce__)": (_pickle_only, "pickled/Keras weights are never loaded"),
    "config with an unknown field": (lambda f: _config(f, surprise={"x": 1}), None),
    "config symlink inside the folder": (_link_inside, None),
}


def _drop(folder: Path, key: str) -> None:
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    cfg.pop(key, None)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg))


@case(
    5,
    "a local checkpoint folder, each of: " + "; ".join(HOSTILE),
    "each refused with one CheckpointError line naming the file and the problem, before any tensor is "
    "read or built (the pickle never runs); an unknown config field is ignored and a symlink that stays "
    "in the folder is followed: both load",
)
def case_hostile_checkpoints(good_checkpoint, tmp_path):
    MARKER.unlink(missing_ok=True)
    for name, (change, message) in HOSTILE.items():
        folder = tmp_path / re.sub(r"\W+", "-", name) / "ckpt"
        shutil.copytree(good_checkpoint, folder)
        change(folder)
        if message is None:
            model, _ = load_checkpoint(folder)
            assert isinstance(model, torch.nn.Module), name
            continue
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(folder)
        text = str(err.value)
        assert message in text and "\n" not in text and str(folder) in text, (name, text)
    assert not MARKER.exists()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    server = start_hub({"token"}, lfs_threshold=None)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()


@case(
    5,
    "a Hub repo with pickle files only; a Hub config.json larger than the bound; Hub weights larger than "
    "the model its config.json describes",
    "each refused with one CheckpointError line before the file is downloaded (no GET of it reaches the "
    "server: only its size is asked)",
)
def case_hostile_hub_repos(hub, good_checkpoint, monkeypatch):
    import cxrcae.hub.resolve as resolve
    import cxrcae.models.checkpoint as checkpoint

    config = (good_checkpoint / CONFIG_NAME).read_bytes()
    weights = (good_checkpoint / WEIGHTS_NAME).read_bytes()
    hub.add_repo("u/pickled", {CONFIG_NAME: config, "pytorch_model.bin": pickle.dumps(_Evil())})
    hub.add_repo("u/bigconfig", {CONFIG_NAME: config + b" " * 5000, WEIGHTS_NAME: weights})
    hub.add_repo("u/bigweights", {CONFIG_NAME: config, WEIGHTS_NAME: weights + b"\0" * 5000})
    monkeypatch.setattr(resolve, "CONFIG_MAX_BYTES", len(config) + 100)
    (header_bytes,) = struct.unpack("<Q", weights[:8])  # the good weights fit, 5000 bytes more do not
    monkeypatch.setattr(checkpoint, "HEADER_MAX_BYTES", header_bytes + 100)
    expected = {
        "u/pickled": "only loads safetensors weights",
        "u/bigconfig": f"config.json is {len(config) + 5000:,} bytes",
        "u/bigweights": f"model.safetensors is {len(weights) + 5000:,} bytes",
    }
    for repo, message in expected.items():
        with pytest.raises(CheckpointError, match=re.escape(message)) as err:
            download_checkpoint(repo)
        assert "\n" not in str(err.value)
    gets = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert gets and not [p for p in gets if "pytorch_model.bin" in p or "bigconfig" in p]
    assert not [p for p in gets if "bigweights" in p and p.endswith(WEIGHTS_NAME)]
    assert not MARKER.exists()


# ------------------------------------------------------------------------------------------------- the runner


@pytest.mark.parametrize("name", list(CASES))
def test_guarantee(name, request):
    """Run one row of the table with the fixtures its function names."""
    fn = CASES[name].run
    fn(**{p: request.getfixturevalue(p) for p in inspect.signature(fn).parameters})


def test_atomic_helpers_leave_nothing_behind(tmp_path):
    """Unit checks of the pieces the table relies on: a WriteError is an OSError and a CxrcaeError, and a
    SIGINT inside ``uninterrupted`` is held back until the block is done."""
    from cxrcae._atomic import sweep_temporaries, uninterrupted

    err = WriteError(tmp_path / "f", OSError(28, "No space left on device"))
    assert isinstance(err, OSError) and isinstance(err, CxrcaeError) and err.errno == 28
    done = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            done.append("finished")
    assert done == ["finished"]
    atomic_write_bytes(tmp_path / "a", b"x")
    (tmp_path / ".a.abc123.tmp").write_bytes(b"half")
    assert sweep_temporaries(tmp_path, "a") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
