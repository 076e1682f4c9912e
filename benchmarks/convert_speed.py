"""Checkpoint conversion speed: `bert-jax convert` against reading the checkpoint, in one run.

    python -m benchmarks.convert_speed [--model bert-large-cased] [--repeats 3] [--dir DIR]

Builds a random BertForMaskedLM of the preset's shape with transformers (fp32; bert-large-cased
is a 1.3 GB model.safetensors) in a temporary directory (or --dir), then times in this process,
--repeats times each: reading every tensor with safetensors (the baseline), copying the file
(the floor of any conversion, which reads and writes as many bytes), copying it and waiting for
the disk (`fsync`, as Orbax's writes do), and the `bert-jax convert` code path HF -> Orbax,
Orbax -> HF and HF -> HF in bf16. Each is timed twice: with the source in the page cache
("warm": reading is a memory copy) and with the source's pages dropped first ("cold": reading
comes from the disk, as for a checkpoint not read since boot). Only the benchmark's own files
are dropped (posix_fadvise), nothing else on the machine. Outside the timed part, the previous
output is deleted (so `--overwrite`'s delete is not counted) and written back to the disk
(`os.sync`, so its write-back does not land in the next timing). The table shows the best and
the worst run, as shared cores make wall times noisy, and the CPU seconds of the warm runs (all
threads): the work itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def evict(path: Path) -> None:
    """Drop the page-cache pages of a file, or of every file under a directory."""
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timings(fn, source: Path, output: Path, cold: bool, repeats: int) -> tuple[list, list]:
    """Wall-clock and CPU seconds of `repeats` calls of `fn`, which writes `output`."""
    wall, cpu = [], []
    for _ in range(repeats):
        if output.is_dir():
            shutil.rmtree(output)
        output.unlink(missing_ok=True)
        os.sync()
        if cold:
            evict(source)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def copy_durably(source: Path, target: Path) -> None:
    """Copy a file and wait until it is on the disk."""
    shutil.copyfile(source, target)
    with open(target, "rb") as f:
        os.fsync(f.fileno())


def build_checkpoint(model: str, out: Path) -> None:
    import torch
    import transformers

    from bert_jax.modeling.presets import preset

    config = preset(model)
    hf_config = getattr(transformers, f"{config.class_prefix}Config")(
        **{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(0)
    getattr(transformers, f"{config.class_prefix}ForMaskedLM")(hf_config).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert-large-cased", help="a BERT preset name")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="working directory (default: a temporary one)")
    args = parser.parse_args()

    import jax
    from safetensors.numpy import load_file

    from bert_jax.convert.weight_files import find_weights, read_state_dict
    from bert_jax.tools.convert import convert

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        hf, orbax, back, bf16 = (Path(tmp) / name for name in ("hf", "orbax", "back", "bf16"))
        build_checkpoint(args.model, hf)
        weights = find_weights(hf)
        copy = Path(tmp) / "copy.safetensors"
        convert(hf, orbax)  # the Orbax source for the other direction, and a warm-up
        steps = (("read all tensors (safetensors)", lambda: load_file(weights), weights, copy),
                 ("copy the file (shutil.copyfile)", lambda: shutil.copyfile(weights, copy),
                  weights, copy),
                 ("copy the file and fsync", lambda: copy_durably(weights, copy), weights, copy),
                 ("convert HF -> Orbax", lambda: convert(hf, orbax), weights, orbax),
                 ("convert Orbax -> HF", lambda: convert(orbax, back), orbax, back),
                 ("convert HF -> HF --dtype bf16", lambda: convert(hf, bf16, to="hf", dtype="bf16"),
                  weights, bf16))
        seconds = {(name, cold): timings(fn, source, output, cold, args.repeats)
                   for cold in (False, True) for name, fn, source, output in steps}
        original, written = read_state_dict(hf), read_state_dict(back)
        identical = original.keys() == written.keys() and all(
            np.array_equal(original[k], written[k]) for k in original)
        size = weights.stat().st_size

    print(f"# {args.model} MLM, fp32, {size / 1e9:.2f} GB {weights.name}; {args.repeats} runs, "
          f"best / worst; jax {jax.__version__}, {os.cpu_count()} CPUs ({platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| step | warm: s | x read | cold: s | x read | warm: CPU s | x read |")
    print("|---|---|---|---|---|---|---|")
    read = {cold: min(seconds[(steps[0][0], cold)][0]) for cold in (False, True)}
    read_cpu = min(seconds[(steps[0][0], False)][1])
    for name, *_ in steps:
        (warm, warm_cpu), (cold, _) = seconds[(name, False)], seconds[(name, True)]
        print(f"| {name} | {min(warm):.2f} / {max(warm):.2f} | {min(warm) / read[False]:.1f} | "
              f"{min(cold):.2f} / {max(cold):.2f} | {min(cold) / read[True]:.1f} | "
              f"{min(warm_cpu):.2f} | {min(warm_cpu) / read_cpu:.1f} |")
    print(f"\nHF -> Orbax -> HF bit-identical: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
