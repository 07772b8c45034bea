"""What the phantom's confounds do, measured: clean, half the preset's loadings, and the preset.

For each strength, on the train split's first N images (axial thirds): each third's marginals (they
must not move), the rank correlations of plaque between thirds, of each cue with the image's total
plaque, the attenuation gradient as measured in the images (HU per 10 mm), and how often plaque in
the distal third comes with plaque in both other thirds. Draws the preset's three least and three
most severe images side by side. Writes benchmarks/results/phantom_confounds.{json,md} and
docs/images/phantom_confounded_severity.png.

Usage:
  python benchmarks/phantom_confounds.py          # 2000 images per strength
  python benchmarks/phantom_confounds.py --n 500
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from causalimg.config.loader import load_config
from causalimg.data.phantom import PhantomConfig, PhantomSource
from causalimg.data.phantom_confounds import ConfoundConfig, attenuation_gradient
from causalimg.data.phantom_render import WINDOW_HU, soft_masks
from causalimg.regions.axial import AxialPartitioner

RESULTS = Path(__file__).parent / "results"
FIGURE = Path(__file__).parent.parent / "docs" / "images" / "phantom_confounded_severity.png"
THIRDS = ("proximal", "mid", "distal")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable")  # noqa: E731
    return round(float(np.corrcoef(rank(a), rank(b))[0, 1]), 3)


def measure(confounds: ConfoundConfig, n: int, root: Path) -> tuple[dict, PhantomSource, object]:
    source = PhantomSource(PhantomConfig(n_train=n, cache=False, confounds=confounds), AxialPartitioner(), root)
    r = source.render_indices("train", np.arange(n))
    exo = source.exogenous_batch("train", np.arange(n))
    pa = r.parents.astype(np.float64)  # (N, 9): cpa, ncpa, la per third
    cpa, ncpa, la = pa[:, 0:3], pa[:, 3:6], pa[:, 6:9]
    plaque = cpa + ncpa
    burden = plaque.sum(1)
    tag = attenuation_gradient(r.image[:, 0], soft_masks(r.fg)[:, 1], source.spacing_mm, WINDOW_HU)
    has = plaque > 1e-3
    low, high = exo.severity <= np.quantile(exo.severity, 0.25), exo.severity >= np.quantile(exo.severity, 0.75)
    row = {
        "loadings": confounds.model_dump(),
        "p_no_calcium": dict(zip(THIRDS, (cpa < 1e-3).mean(0).round(3).tolist())),
        "mean_cpa": dict(zip(THIRDS, cpa.mean(0).round(2).tolist())),
        "mean_ncpa": dict(zip(THIRDS, ncpa.mean(0).round(2).tolist())),
        "mean_la": dict(zip(THIRDS, la.mean(0).round(1).tolist())),
        "plaque_between_thirds": {
            f"{THIRDS[i]}-{THIRDS[j]}": spearman(plaque[:, i], plaque[:, j]) for i, j in ((0, 1), (0, 2), (1, 2))
        },
        "cue_vs_total_plaque": {
            "attenuation gradient measured in the image": spearman(tag, burden),
            "point-spread sigma": spearman(exo.sigma_mm, burden),
            "calcium HU": spearman(exo.hu_ca, burden),
            "distal lumen area (negated)": spearman(-la[:, 2], burden),
        },
        "tag_hu_per_10mm": {"mean": round(float(tag.mean()), 2), "sd": round(float(tag.std()), 2)},
        "p_proximal_and_mid_plaque_given_distal": round(float((has[:, 0] & has[:, 1])[has[:, 2]].mean()), 3),
        "p_distal_calcium_by_severity_quartile": {
            "lowest": round(float((cpa[low, 2] > 1e-3).mean()), 3),
            "highest": round(float((cpa[high, 2] > 1e-3).mean()), 3),
        },
        "tag_hu_per_10mm_by_severity_quartile": {
            "lowest": round(float(tag[low].mean()), 2),
            "highest": round(float(tag[high].mean()), 2),
        },
    }
    return row, source, (r, exo, tag)


def figure(source: PhantomSource, rendered, path: Path, count: int = 3) -> None:
    """The preset's ``count`` least and most severe images among the first 200, with their numbers."""
    r, exo, tag = rendered
    order = np.argsort(exo.severity[:200])
    picks = [("least severe", order[:count]), ("most severe", order[-count:][::-1])]
    h, w = source.image_shape
    extent = (0.0, w * source.spacing_mm, h * source.spacing_mm, 0.0)
    fig, axes = plt.subplots(count, 2, figsize=(12, 1.45 * count + 0.5), squeeze=False)
    for col, (title, rows) in enumerate(picks):
        for i, idx in enumerate(rows):
            ax = axes[i, col]
            ax.imshow(r.image[idx, 0], cmap="gray", vmin=-1, vmax=1, extent=extent, interpolation="nearest")
            plaque = r.parents[idx, :6].sum()
            ax.set_title(f"{title}: severity {exo.severity[idx]:+.2f}, plaque {plaque:.0f} mm^2, "
                         f"TAG {tag[idx]:.1f} HU/10 mm, PSF sigma {exo.sigma_mm[idx]:.2f} mm", fontsize=7)  # fmt: skip
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images per strength")
    args = parser.parse_args()
    preset = load_config("cpu-confounded").data.confounds
    half = ConfoundConfig(**{k: v / 2 for k, v in preset.model_dump().items()})
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for name, conf in (("clean", ConfoundConfig()), ("half preset", half), ("preset", preset)):
            rows[name], source, rendered = measure(conf, args.n, Path(root))
        figure(source, rendered, FIGURE)
    meta = {"images_per_strength": args.n, "split": "train", "partition": "axial-thirds", "cpus": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "phantom_confounds.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    names = list(rows)
    lines = [
        "# Phantom confounds: what each strength does",
        "",
        f"{args.n} train images per strength, axial thirds; rank (Spearman) correlations. Preset: "
        f"`cpu-confounded` ({', '.join(f'{k} {v:g}' for k, v in preset.model_dump().items())}).",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    keys = ("p_no_calcium", "mean_cpa", "mean_ncpa", "mean_la", "plaque_between_thirds", "cue_vs_total_plaque",
            "p_distal_calcium_by_severity_quartile", "tag_hu_per_10mm_by_severity_quartile")  # fmt: skip
    for key in keys:
        for sub in rows["clean"][key]:
            lines.append(f"| {key} {sub} | " + " | ".join(str(rows[n][key][sub]) for n in names) + " |")
    lines.append("| TAG HU/10 mm, mean (sd) | " + " | ".join(
        f"{rows[n]['tag_hu_per_10mm']['mean']} ({rows[n]['tag_hu_per_10mm']['sd']})" for n in names) + " |")  # fmt: skip
    lines.append("| P(proximal and mid plaque given distal plaque) | " + " | ".join(
        str(rows[n]["p_proximal_and_mid_plaque_given_distal"]) for n in names) + " |")  # fmt: skip
    lines += ["", f"Figure: {FIGURE.relative_to(FIGURE.parent.parent.parent)}"]
    (RESULTS / "phantom_confounds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
