"""Side by side: causalimg's `paper` HVAE against the published HVAE it mirrors, on this machine.

The published model is xiat0616/tech_demo, ``causal_models/hvae2.py`` at commit 9e8358c. Its code is
not part of causalimg: check it out anywhere outside this repository and pass the folder that holds
``causal_models/hvae2.py``. This script copies that one file into a temporary folder with its one-line
wide-input fix (the decoder compares a tensor's width with the next stage's height when deciding to
upsample; the fix compares heights) and imports it from there.

Both models train at the same settings (batch 32, 9 parents, forward + backward + AdamW, 2 threads unless --threads)
with the published model's hyper-parameters mapped to our sizes (REFERENCE_ARCH below).
Every measurement runs in its own child process (peak RSS is per process); runs of the two models
alternate round by round, so load from other work on the machine falls on both alike. Each model
is measured in each of its execution modes, on glibc malloc (mmap/trim tuned as causalimg does) and
on tcmalloc (preloaded), and the ratio is taken between the BEST mode of each per allocator.

Usage:
  git clone https://github.com/xiat0616/tech_demo /tmp/tech_demo && git -C /tmp/tech_demo checkout 9e8358c
  python benchmarks/hvae_reference.py --reference /tmp/tech_demo          # -> results/hvae_reference.{json,md}
  python benchmarks/hvae_reference.py --reference /tmp/tech_demo --rounds 1 --steps 2 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hvae_speed import RESULTS, allocator, child_env, cpu_model

from causalimg.training.accelerator import tune_malloc

# the published decoder's upsampling test, as written and as fixed for wide (W > H) inputs
UNFIXED = "if h.size(-1) < res_h:"
FIXED = "if h.size(-2) < res_h:"
# the published hyper-parameters mapped to our two input sizes; parents: 9 variables
REFERENCE_ARCH = {
    (32, 192): dict(
        enc_arch="32_192b2d2_2,16_96b4d2_2,8_48b9d2_2,4_24b4d2_2,2_12b9d2_12,1_1b5",
        dec_arch="1_1b5,2_12b10,4_24b15,8_48b10,16_96b5,32_192b3",
        widths=[32, 64, 96, 128, 192, 512], z_dim=[48, 30, 18, 12, 6, 1], z_max_res=96, bias_max_res=96,
    ),
    (64, 384): dict(
        enc_arch="64_384b2d2_2,32_192b4d2_2,16_96b9d2_2,8_48b4d2_2,4_24b4d2_2,2_12b9d2_12,1_1b5",
        dec_arch="1_1b5,2_12b10,4_24b15,8_48b15,16_96b10,32_192b5,64_384b3",
        widths=[32, 64, 96, 128, 160, 192, 512], z_dim=[48, 30, 24, 18, 12, 6, 1], z_max_res=192, bias_max_res=192,
    ),
}  # fmt: skip
REFERENCE_COMMON = dict(
    bottleneck=4, embd_dim=32, cond_prior=True, q_correction=False, x_like="diag_dgauss", p_dropout=0.1,
    context_dim=9, input_channels=1, kl_free_bits=0.0, std_init=0.0,
)  # fmt: skip
# execution modes tried for each model; the best of each is compared
REFERENCE_MODES = ("fp32", "fp32-cl", "bf16", "bf16-cl")
CAUSALIMG_MODES = ("bf16-cl", "bf16")
ALLOCATORS = ("glibc", "tcmalloc")


def fixed_reference(checkout: Path) -> Path:
    """Copy hvae2.py with the wide-input fix into a fresh temporary folder; returns the folder."""
    source = checkout / "causal_models" / "hvae2.py"
    if not source.is_file():
        raise SystemExit(f"--reference {checkout}: no causal_models/hvae2.py there (a tech_demo checkout at 9e8358c)")
    text = source.read_text()
    if text.count(UNFIXED) != 1:
        raise SystemExit(f"{source}: expected the line {UNFIXED!r} once (commit 9e8358c); found {text.count(UNFIXED)}")
    folder = Path(tempfile.mkdtemp(prefix="hvae2_fixed_"))
    (folder / "hvae2_fixed.py").write_text(text.replace(UNFIXED, FIXED))
    return folder


def build_reference(folder: str, shape: tuple[int, int], mode: str, batch: int):
    """The published HVAE and its training step (AdamW lr 1e-3, wd 1e-3, betas (0.9, 0.9), as published)."""
    import torch

    sys.path.insert(0, folder)
    import hvae2_fixed  # the published model, fixed for wide inputs

    torch.manual_seed(0)
    args = types.SimpleNamespace(**REFERENCE_ARCH[shape], **REFERENCE_COMMON)
    fmt = torch.channels_last if "-cl" in mode else torch.contiguous_format
    model = hvae2_fixed.HVAE2(args).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3, betas=(0.9, 0.9))
    x = (torch.rand(batch, 1, *shape) * 2 - 1).contiguous(memory_format=fmt)
    pa = torch.rand(batch, 9, 1, 1) * 2 - 1  # the published code feeds parents as (B, P, 1, 1)
    bf16 = mode.startswith("bf16")

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, pa)["elbo"]
        loss.backward()
        opt.step()
        return loss.item()

    return model, step


def measure(run: str, folder: str, shape: tuple[int, int], steps: int, warmup: int, batch: int, threads: int) -> dict:
    """One child process: build the model named by ``run`` (model:mode:allocator), time its steps."""
    model_name, mode, alloc = run.split(":")
    if alloc == "glibc":
        tune_malloc()  # what causalimg's training does on glibc: no mmap per activation, rare trims
    import torch

    torch.set_num_threads(threads)
    if model_name == "reference":
        model, step = build_reference(folder, shape, mode, batch)
    else:
        from hvae_speed import build

        model, step = build("paper", shape, mode, batch)
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    dt = time.perf_counter() - t0
    return {
        "model": model_name, "mode": mode, "allocator": alloc, "allocator_loaded": allocator(),
        "input": f"{shape[0]}x{shape[1]}", "batch": batch, "steps": steps, "threads": threads,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "img_per_s": round(batch * steps / dt, 3),
        "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "final_loss": round(losses[-1], 4), "load_1m": round(os.getloadavg()[0], 1),
    }  # fmt: skip


def summarise(results: list[dict]) -> list[dict]:
    """Per allocator: each model's best mode (median img/s over rounds) and the ratio of the two."""
    rows = []
    for alloc in sorted({r["allocator"] for r in results}):
        best = {}
        for model in ("reference", "causalimg"):
            medians = {}
            for r in results:
                if r["allocator"] == alloc and r["model"] == model:
                    medians.setdefault(r["mode"], []).append(r)
            if not medians:
                continue
            scored = {m: statistics.median(x["img_per_s"] for x in rs) for m, rs in medians.items()}
            mode = max(scored, key=scored.get)
            best[model] = {"mode": mode, "img_per_s": scored[mode],
                           "peak_rss_GiB": max(x["peak_rss_GiB"] for x in medians[mode]),
                           "all_modes": scored}  # fmt: skip
        if len(best) == 2:
            rows.append({
                "allocator": alloc, "reference": best["reference"], "causalimg": best["causalimg"],
                "speed_ratio": round(best["causalimg"]["img_per_s"] / best["reference"]["img_per_s"], 3),
                "memory_ratio": round(best["causalimg"]["peak_rss_GiB"] / best["reference"]["peak_rss_GiB"], 3),
            })  # fmt: skip
    return rows


def write(results: list[dict], summary: list[dict], args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpu": cpu_model(), "threads": args.threads, "cpus": os.cpu_count(), "input": args.input, "batch": args.batch,
            "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    out = {"meta": meta, "summary": summary, "results": results}
    (RESULTS / "hvae_reference.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# causalimg `paper` vs the published HVAE, side by side ({args.input}, batch {args.batch}, "
        f"{args.threads} threads)",
        "",
        f"`python benchmarks/hvae_reference.py --reference CHECKOUT --input {args.input} --rounds {args.rounds} "
        f"--steps {args.steps} --threads {args.threads}` on {meta['cpu']} ({meta['date']}); runs alternate between the models, "
        "medians over rounds, the best mode of each model per allocator.",
        "",
        "| allocator | published: best mode | img/s | peak RSS (GiB) | causalimg: best mode | img/s "
        "| peak RSS (GiB) | speed ratio | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        ref, ours = s["reference"], s["causalimg"]
        lines.append(
            f"| {s['allocator']} | {ref['mode']} | {ref['img_per_s']:.2f} | {ref['peak_rss_GiB']} | {ours['mode']} "
            f"| {ours['img_per_s']:.2f} | {ours['peak_rss_GiB']} | {s['speed_ratio']:.2f}x | {s['memory_ratio']:.2f}x |"
        )
    lines += ["", "Every run:", "", "| round | model | mode | allocator | img/s | peak RSS (GiB) | load (1 min) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(
            f"| {r['round']} | {r['model']} | {r['mode']} | {r['allocator_loaded']} | {r['img_per_s']:.2f} "
            f"| {r['peak_rss_GiB']} | {r['load_1m']} |"
        )
    (RESULTS / "hvae_reference.md").write_text("\n".join(lines) + "\n")


def plan(args: argparse.Namespace) -> list[str]:
    """One round: for each allocator, reference and causalimg modes interleaved."""
    runs = []
    for alloc in args.allocators:
        ref, ours = list(args.reference_modes), list(args.causalimg_modes)
        while ref or ours:
            if ref:
                runs.append(f"reference:{ref.pop(0)}:{alloc}")
            if ours:
                runs.append(f"causalimg:{ours.pop(0)}:{alloc}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="a tech_demo checkout at 9e8358c (outside this repository)")
    parser.add_argument("--input", default="32x192", choices=[f"{h}x{w}" for h, w in REFERENCE_ARCH])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every run")
    parser.add_argument("--allocators", nargs="+", default=list(ALLOCATORS), choices=ALLOCATORS)
    parser.add_argument("--reference-modes", nargs="+", default=list(REFERENCE_MODES), choices=REFERENCE_MODES)
    parser.add_argument("--causalimg-modes", nargs="+", default=list(CAUSALIMG_MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--fixed", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.input.split("x"))
    if args.child:
        print(json.dumps(measure(args.child, args.fixed, shape, args.steps, args.warmup, args.batch, args.threads)))
        return
    if args.reference is None:
        parser.error("--reference CHECKOUT is required")
    folder = fixed_reference(args.reference.resolve())
    results: list[dict] = []
    for rnd in range(args.rounds):
        for run in plan(args):
            cmd = [sys.executable, __file__, "--child", run, "--fixed", str(folder), "--input", args.input,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--threads", str(args.threads)]  # fmt: skip
            env = child_env("bf16-cl-tcmalloc" if run.endswith(":tcmalloc") else "bf16-cl")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"{run} failed:\n{out.stderr[-3000:]}")
            result = {"round": rnd, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(json.dumps(result), flush=True)
            results.append(result)
            summary = summarise(results)
            if not args.no_write:  # after every run: an interrupted comparison still leaves its rows
                write(results, summary, args)
    for s in summarise(results):
        print(f"{s['allocator']}: causalimg {s['causalimg']['img_per_s']:.2f} img/s ({s['causalimg']['mode']}) vs "
              f"published {s['reference']['img_per_s']:.2f} ({s['reference']['mode']}): {s['speed_ratio']:.2f}x, "
              f"peak memory {s['memory_ratio']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
