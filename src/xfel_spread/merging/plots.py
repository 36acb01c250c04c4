"""Figure of the merge scores: CC of the mean intensities and of the anomalous differences by resolution."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xfel_spread.atomic import atomic_path


def plot_cc_by_resolution(path, dataset: str, comparisons: Sequence[dict]) -> None:
    """Two panels, CC and anomalous CC against resolution, one line per comparison; PNG, atomically.

    ``comparisons`` are :func:`xfel_spread.merging.scoring.score_merged_sets`'s results. The x axis
    is 1/d^2 (labelled in d), each point at its bin's centre; the legend gives the overall CC and its
    count, the text report the counts per bin.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import FuncFormatter

    figure, panels = pyplot.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    figure.suptitle(f"Merged intensities against the truth, dataset {dataset}")
    for comparison in comparisons:
        bins = comparison["bins"]
        centre = np.array([(result["d_max"] ** -2 + result["d_min"] ** -2) / 2 for result in bins])
        for panel, key, count in ((panels[0], "cc", "n_common"), (panels[1], "cc_anomalous", "n_anomalous")):
            values = np.array([result[key] for result in bins], dtype=float)
            panel.plot(centre, values, "o-", label=f"{comparison['name']} (overall {comparison[key]:.3f}, "
                                                   f"n = {comparison[count]})")
    for panel, title in zip(panels, ("mean intensities", "anomalous differences I(+) - I(-)")):
        panel.axhline(0, color="0.8", zorder=0)
        panel.set_title(title)
        panel.set_ylabel("Pearson CC")
        panel.set_xlabel("resolution, d (A)")
        panel.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x ** -0.5:.2f}" if x > 0 else ""))
        panel.set_ylim(-1.05, 1.05)
        panel.legend(fontsize="small", loc="lower left")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    pyplot.close(figure)
