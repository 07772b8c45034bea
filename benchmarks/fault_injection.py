"""kill -9 the real run command during each pipeline stage group, rerun it, compare with an uninterrupted run.

One uninterrupted reference run of ``python -m causalimg.run --config CONFIG`` (or ``--reference
DIR``, a finished run of the same config) gives every output and each stage's duration. Then, per
stage group (data, flows, predictors, pretrain, finetune, evaluate, report) and per kill: the
reference is copied without that group's folders, ``--only GROUP`` is started and SIGKILLed (whole
process group) at a random fraction of the group's reference duration after its first
``[stage] running`` line, ``--only GROUP --resume`` finishes it, and the group's weight files
(safetensors, bit for bit), transform, ``metrics.json`` files and report results are compared with
the reference's. Upstream outputs are the reference's own, so each trial costs about twice the
group, not a whole run; tests/test_faults_pipeline.py kills whole runs end to end.

Usage:
  python benchmarks/fault_injection.py                       # every group, 1 kill each
  python benchmarks/fault_injection.py --kills 3 --seed 1    # 3 random points per group
  python benchmarks/fault_injection.py --groups pretrain finetune --reference /tmp/runs/tiny
Writes benchmarks/results/fault_injection.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from causalimg.testing.runs import command, compare, group_of, run_and_kill, run_to_end, stage_seconds

RESULTS = Path(__file__).resolve().parent / "results"


def inject(
    config: str,
    overrides: Sequence[str],
    groups: Sequence[str] | None,
    kills: int,
    seed: int,
    workdir: Path,
    timeout: float,
    reference: Path | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    reference_s = None
    if reference is None:
        reference = workdir / "reference"
        began = time.perf_counter()
        run_to_end(command(config, reference, overrides, resume=False), timeout)
        reference_s = round(time.perf_counter() - began, 1)
    durations = stage_seconds(reference)
    by_group: dict[str, float] = {}
    for stage, seconds in durations.items():
        by_group[group_of(stage)] = by_group.get(group_of(stage), 0.0) + seconds
    trials, calibrations = [], []

    def without_group(name: str, group: str) -> Path:
        run_dir = workdir / name
        shutil.copytree(reference, run_dir, ignore=lambda d, names: [group] if Path(d) == reference else [])
        return run_dir

    for group in groups or list(by_group):
        # An uninterrupted --only run first: the group's duration now (load changes it several-fold),
        # and a check that rerunning the group alone reproduces the reference.
        calibration = without_group(f"{group}-calibration", group)
        group_s = sum(run_to_end(command(config, calibration, overrides, False, group), timeout).values())
        calibrations.append(
            {"group": group, "seconds": round(group_s, 1), "problems": compare(reference, calibration, group)}
        )
        shutil.rmtree(calibration, ignore_errors=True)
        for k in range(kills):
            fraction = rng.uniform(0.05, 0.95)
            run_dir = without_group(f"{group}-{k}", group)
            landed = run_and_kill(command(config, run_dir, overrides, False, group), group, fraction * group_s, timeout)
            began = time.perf_counter()
            try:
                run_to_end(command(config, run_dir, overrides, True, group), timeout)
                problems = compare(reference, run_dir, group)
            except RuntimeError as err:  # the rerun failed: that is this trial's result
                problems = [f"rerun failed: {str(err)[-500:]}"]
            trials.append(
                {
                    "group": group,
                    "fraction": round(fraction, 3),
                    "killed_in": landed,
                    "group_s": round(group_s, 1),
                    "rerun_s": round(time.perf_counter() - began, 1),
                    "identical": not problems,
                    "problems": problems,
                }
            )
            print(
                f"{group:12s} kill at {fraction:.2f} of {group_s:.0f} s: landed in {landed}, "
                f"{problems if problems else 'identical'}",
                flush=True,
            )
            shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "config": config,
        "overrides": list(overrides),
        "seed": seed,
        "reference_s": reference_s,
        "stage_s": durations,
        "calibrations": calibrations,
        "trials": trials,
        "all_identical": all(t["identical"] for t in trials) and not any(c["problems"] for c in calibrations),
    }


def markdown(result: dict[str, Any], argv: Sequence[str]) -> str:
    lines = [
        "# Fault injection: kill -9 during each stage, rerun, compare",
        "",
        f"Command: `{' '.join(['python benchmarks/fault_injection.py', *argv])}` "
        f"(config `{result['config']}`, overrides {result['overrides'] or 'none'}, seed {result['seed']}).",
        "Each trial: the reference run copied without the group's folders, `--only GROUP` killed with SIGKILL "
        "at the given fraction of the group's duration in an uninterrupted `--only GROUP` run just before, "
        "`--only GROUP --resume` to the end. Compared with the reference: the group's weights files bit for bit "
        "(safetensors), data/transform.json, evaluate/*/metrics.json and report/results.json (wall-clock fields dropped).",
        "",
        "| group | group s (uninterrupted `--only`) | kill at (fraction) | kill landed in | resume s | result |",
        "|---|---|---|---|---|---|",
    ]
    for t in result["trials"]:
        verdict = "bit-identical" if t["identical"] else "; ".join(t["problems"])
        lines.append(
            f"| {t['group']} | {t['group_s']} | {t['fraction']} | {t['killed_in'] or '(ended first)'} | "
            f"{t['rerun_s']} | {verdict} |"
        )
    redo = [c for c in result["calibrations"] if c["problems"]]
    lines += [
        "",
        "Uninterrupted `--only GROUP` reruns reproduce the reference: "
        + ("all groups." if not redo else "; ".join(f"{c['group']}: {c['problems']}" for c in redo)),
    ]
    n = len(result["trials"])
    same = sum(t["identical"] for t in result["trials"])
    lines += ["", f"{same} of {n} interrupted stage groups ended bit-identical to the uninterrupted run."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE")
    parser.add_argument("--groups", nargs="*", help="stage groups to kill in (default: every group of the run)")
    parser.add_argument("--reference", type=Path, help="a finished run of the same config to compare with")
    parser.add_argument("--kills", type=int, default=1, help="random kill points per group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="causalimg-faults-") as tmp:
        result = inject(
            args.config, args.overrides, args.groups, args.kills, args.seed, Path(tmp), args.timeout, args.reference
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fault_injection.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fault_injection.md").write_text(markdown(result, sys.argv[1:] if argv is None else argv))
    print(f"wrote {args.out / 'fault_injection.md'}")
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
