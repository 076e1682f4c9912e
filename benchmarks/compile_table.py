"""Every recipe in configs/ compiled ahead of time for TPU slices: per-chip memory against HBM,
FLOPs per step and the XLA cost model's step time (`bert-jax compile`, which needs libtpu but
no TPU).

    python -m benchmarks.compile_table [--topology v5e:4x4 --topology v4:2x2x4]
        [--config configs/tiny-mlm.yaml ...] [--json out.json]

Each (recipe, topology) is one `bert-jax compile` process, so one compile's memory never
weighs on the next; a BERT-base step takes a few minutes to compile on a 2-core machine, the
whole table about an hour. A recipe whose `init_from` checkpoint is not on this machine is
compiled for the model it holds, named by `STAND_INS` (`--model`). Prints a markdown table;
the step time and MFU are the cost model's estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = ("v5e:4x4", "v4:2x2x4")
# The model an `init_from` checkpoint that is not here holds: the recipe's comments say which.
STAND_INS = {
    "runs/bert-base-cased-phase1/hf": "bert-base-cased",  # phase 1's export
    "models/nb-bert-base": "bert-base-multilingual-cased",  # NB-BERT-base's architecture
    "google-bert/bert-base-cased": "bert-base-cased",
    "runs/tiny-mlm/hf": "tiny",  # configs/tiny-mlm.yaml's export
}


def stand_in(config: Path) -> str | None:
    """`--model` for a recipe whose init_from is not a directory here, else None."""
    init_from = (yaml.safe_load(config.read_text()).get("model") or {}).get("init_from")
    if init_from is None or (ROOT / init_from).is_dir() or Path(init_from).is_dir():
        return None
    return STAND_INS.get(init_from)


def compile_one(config: Path, topology: str, timeout: float) -> dict:
    """The JSON report of one `bert-jax compile`, or {"error": its message}."""
    model = stand_in(config)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "bert_jax.cli", "compile", "--config", str(config),
                   "--topology", topology, "--json", str(out)]
        if model is not None:
            command += ["--model", model]
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"no result in {timeout:.0f} s"}
        if out.exists():
            return {**json.loads(out.read_text()), "stand_in": model}
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}


def row(config: Path, topology: str, report: dict) -> str:
    name = config.stem + (f" (as {report['stand_in']})" if report.get("stand_in") else "")
    if "recipe" not in report:
        return f"| {name} | {topology} | | | error: {report['error']} | | | | |"
    mesh = "x".join(str(v) for v in report["mesh"].values())
    memory = report["memory"]
    needed = re.search(r"temporaries \(([\d.]+)G\)", report.get("error") or "")
    used = (f"{memory['total'] / 2**30:.3g}" if memory is not None else
            f"{needed[1]} (temporaries)" if needed else "—")
    hbm = report["hbm_bytes"] / 2**30
    fits = {True: "FITS", False: "DOES NOT FIT"}.get(report["fits"], "?")
    flops = report["flops_per_chip"]
    hlo = "—" if flops is None else f"{flops * report['chips'] / 1e12:.3g}"
    step = report["optimal_seconds"]  # the cost model's; some programs get a value <= 0
    mfu = (report["model_flops"] / (step * report["chips"] * report["peak_flops"])
           if step is not None and step > 0 else None)
    step = f"{step * 1e3:.3g} ms" if step is not None and step > 0 else "—"
    mfu = "—" if mfu is None else f"{100 * mfu:.2g}%"
    return (f"| {name} | {topology} | {mesh} | {used} / {hbm:.0f} | {fits} | {hlo} | "
            f"{report['model_flops'] / 1e12:.3g} | {step} | {mfu} |")


HEADER = ("| recipe | topology | mesh (data x fsdp x tensor) | per chip GiB / HBM | | "
          "TFLOP/step (compiled) | TFLOP/step (model) | step time (est.) | MFU ceiling (est.) |\n"
          "|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", action="append", help=f"default: {', '.join(TOPOLOGIES)}")
    parser.add_argument("--config", action="append", type=Path,
                        help="a recipe (repeatable; default: every configs/*.yaml)")
    parser.add_argument("--json", type=Path, help="write every report to this JSON file")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per compile")
    args = parser.parse_args(argv)
    configs = args.config or sorted((ROOT / "configs").glob("*.yaml"))
    reports = []
    print(HEADER, flush=True)
    for config in configs:
        for topology in args.topology or TOPOLOGIES:
            report = compile_one(config.resolve(), topology, args.timeout)
            reports.append({"config": config.stem, "topology": topology, **report})
            print(row(config, topology, report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
