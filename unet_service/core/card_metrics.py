"""The model card's validation metrics: the names `unet-eval` writes, older cards' names
read in today's terms, and the summary the service and the web page show.

One name means one thing. `pixel_error` is only the ISBI 2012 challenge's pixel error
(1 - the best pixel F-score over thresholds, in `metrics.challenge`), the scale of the U-Net
paper's 0.0611. The plain fraction of mismatched pixels of the mask at the card's threshold
is `mismatch`, and the Rand error of that mask's connected components is
`components_rand_error`, in the blocks measured at the threshold (`overall`, `per_image`,
`tta8.overall`, `precisions.*.overall`). Cards written before this naming called those
`pixel_error` and `rand_error`; `current_metrics` renames them when a card is read, so an
old card never shows its mismatch as a pixel error."""

from __future__ import annotations

import copy
from typing import Any

# Old name -> today's, in the blocks measured on the mask at the card's threshold.
AT_THRESHOLD_RENAMES = {
    "pixel_error": "mismatch",
    "rand_error": "components_rand_error",
    "rand_precision": "components_rand_precision",
    "rand_recall": "components_rand_recall",
}
# Old name -> today's, in the card's training record (and the records nested in `init`).
TRAINING_RENAMES = {"validation_pixel_error_at_best": "validation_mismatch_at_best"}

PIXEL_ERROR = (
    "the ISBI 2012 challenge's scale: 1 - the best F-score of pixel similarity over the "
    "thresholds 0.0, 0.1, ..., 1.0 (best at {threshold}); the U-Net paper's 0.0611 is on "
    "this scale"
)
INSTANCES_RAND_ERROR = (
    "1 - V_Rand of the served cell instances (output=instances, with the card's instance "
    "parameters); V_Rand is the ISBI 2012 leaderboard's foreground-restricted Rand F-score, "
    "scored after thinning the predicted membranes to one pixel"
)
MISMATCH = (
    "the fraction of pixels whose class differs from the label, for the mask at the card's "
    "threshold {threshold}; not the challenge's pixel error"
)


def _renamed(block: Any, renames: dict[str, str]) -> Any:
    """`block` with old names replaced in place of order (where both are there, as in cards
    that wrote `mismatch` beside `pixel_error`, the new one's value stays)."""
    if not isinstance(block, dict):
        return block
    out = {}
    for key, value in block.items():
        new = renames.get(key, key)
        if new != key and new in block:
            continue
        out[new] = value
    return out


def current_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A card's `metrics` with today's names (a copy; a current card comes back equal)."""
    metrics = copy.deepcopy(metrics)
    if "overall" in metrics:
        metrics["overall"] = _renamed(metrics["overall"], AT_THRESHOLD_RENAMES)
    if isinstance(metrics.get("per_image"), dict):
        metrics["per_image"] = {
            name: _renamed(row, AT_THRESHOLD_RENAMES) for name, row in metrics["per_image"].items()
        }
    blocks = [b for k, b in metrics.items() if k.startswith("tta") and isinstance(b, dict)]
    blocks += [b for b in (metrics.get("precisions") or {}).values() if isinstance(b, dict)]
    for block in blocks:
        if "overall" in block:
            block["overall"] = _renamed(block["overall"], AT_THRESHOLD_RENAMES)
    return metrics


def current_training(training: dict[str, Any]) -> dict[str, Any]:
    """A card's `training` record with today's names, its `init` records included."""
    training = _renamed(copy.deepcopy(training), TRAINING_RENAMES)
    init = training.get("init")
    if isinstance(init, dict) and isinstance(init.get("training"), dict):
        init["training"] = current_training(init["training"])
    return training


def slices_text(slices: list[str], validation: list[str]) -> str:
    """'validation slices 20-23 (held out from training)', or the slices as they are."""
    names = ", ".join(slices)
    if all(s.isdigit() for s in slices) and len(slices) > 2:
        numbers = [int(s) for s in slices]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            names = f"{slices[0]}-{slices[-1]}"
    if slices and set(slices) <= set(validation):
        return f"validation slices {names} (held out from training)"
    return f"slices {names}"


def metrics_summary(
    metrics: dict[str, Any], threshold: float, validation_slices: list[str]
) -> dict[str, dict[str, Any]]:
    """The card's headline figures, each with its definition, the slices it was measured on
    and the command that measured it: `pixel_error` (challenge scale), `instances_rand_error`
    (1 - V_Rand of the served instances) and `mismatch` (at the card's threshold). Figures
    the card lacks are left out; an empty dict for a card without metrics."""
    metrics = current_metrics(metrics)
    slices = [str(s) for s in metrics.get("slices", [])]
    where = {
        "slices": slices,
        "measured_on": slices_text(slices, validation_slices) if slices else "not recorded",
        "command": metrics.get("command"),
    }
    summary: dict[str, dict[str, Any]] = {}
    challenge = metrics.get("challenge") or {}
    if "pixel_error" in challenge:
        best = challenge.get("pixel_error_threshold")
        summary["pixel_error"] = {
            "label": "pixel error (ISBI 2012 challenge scale)",
            "value": challenge["pixel_error"],
            "definition": PIXEL_ERROR.format(threshold=best),
            "threshold": best,
            **where,
        }
    instances = metrics.get("instances") or {}
    if "rand_error" in instances:
        summary["instances_rand_error"] = {
            "label": "cell instances: Rand error (1 - V_Rand)",
            "value": instances["rand_error"],
            "definition": INSTANCES_RAND_ERROR,
            **{k: instances[k] for k in ("v_rand", "v_info", "params") if k in instances},
            **where,
        }
    overall = metrics.get("overall") or {}
    if "mismatch" in overall:
        threshold = metrics.get("threshold", threshold)  # the one it was measured at
        summary["mismatch"] = {
            "label": f"mismatch at threshold {threshold:g}",
            "value": overall["mismatch"],
            "definition": MISMATCH.format(threshold=f"{threshold:g}"),
            "threshold": threshold,
            **where,
        }
    return summary
