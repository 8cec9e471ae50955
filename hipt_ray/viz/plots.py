"""ROC and Kaplan–Meier plots of cross-validated predictions, as PNG files."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def roc_png(labels: np.ndarray, probs: np.ndarray, classes: list[str], path: str, title: str) -> str:
    """One-vs-rest ROC curves of pooled out-of-fold predictions."""
    from sklearn.metrics import auc, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    pairs = [(1, classes[1])] if len(classes) == 2 else list(enumerate(classes))
    for k, name in pairs:
        fpr, tpr, _ = roc_curve(labels == k, probs[:, k])
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {auc(fpr, tpr):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def km_png(km: dict, path: str, title: str) -> str:
    """Kaplan–Meier curves of the high- and low-risk groups with the log-rank p-value."""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, colour in (("high", "tab:red"), ("low", "tab:blue")):
        if f"km_{name}" in km:
            km[f"km_{name}"].plot_survival_function(ax=ax, color=colour, ci_show=True)
    ax.set(
        xlabel="months",
        ylabel="survival probability",
        ylim=(0, 1.02),
        title=f"{title}\nlog-rank p = {km['p_value']:.3g} (high n={km['n_high']}, low n={km['n_low']})",
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
