"""Action error: per-dimension and mean L1 / MSE between predicted and recorded action chunks.

A local ``evaluate`` metric module, loaded by path (no Hub, no network)::

    import evaluate
    from vla_recipes.metrics import METRICS

    action_error = evaluate.load(str(METRICS / "action_error.py"), keep_in_memory=True)
    action_error.compute(predictions=pred, references=true, action_is_pad=is_pad)

Chunk steps padded past an episode's end (``action_is_pad``: LeRobot repeats the last action there)
have no recorded action, so they are left out, as the training losses leave them out.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Mean absolute and mean squared error of predicted action chunks against recorded ones, in the units the actions are
given in (the dataset's units for `recipes/evaluate.py`), per action dimension, per chunk step and averaged.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per sample, an action chunk: `action_horizon` lists of `action_dim` floats.
    references: the recorded chunks, same shape.
    action_is_pad: per sample, `action_horizon` booleans: True where the step lies past the episode's end
        (left out of every average).
Returns:
    l1, mse: mean over every real (step, dim) element, i.e. the mean of `l1_per_dim` / `mse_per_dim`;
    l1_per_dim, mse_per_dim: `action_dim` values, averaged over real steps;
    l1_per_step, mse_per_step: `action_horizon` values, averaged over dims (NaN for a step that is always padded);
    num_steps: the number of real steps counted.
Example:
    >>> action_error.compute(predictions=[[[0.0, 1.0]], [[1.0, 1.0]]], references=[[[0.0, 0.0]], [[0.0, 3.0]]],
    ...                      action_is_pad=[[False], [True]])["l1_per_dim"]
    [0.0, 1.0]
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ActionError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "action_is_pad": datasets.Sequence(datasets.Value("bool")),
                }
            ),
        )

    def _compute(self, predictions, references, action_is_pad):
        error = np.asarray(predictions, dtype=np.float64) - np.asarray(references, dtype=np.float64)  # (N, H, D)
        real = ~np.asarray(action_is_pad, dtype=bool)  # (N, H)
        if error.ndim != 3 or real.shape != error.shape[:2]:
            raise ValueError(
                f"predictions / references must be (samples, horizon, dim) and action_is_pad (samples, horizon); "
                f"got {error.shape} and {real.shape}"
            )
        if not real.any():
            raise ValueError("every step is padded: there is no recorded action to compare with")
        abs_error, sq_error = np.abs(error), error**2
        steps = real.sum(0)  # real samples per chunk step
        with np.errstate(invalid="ignore", divide="ignore"):
            l1_per_step = (abs_error * real[..., None]).sum((0, 2)) / (steps * error.shape[2])
            mse_per_step = (sq_error * real[..., None]).sum((0, 2)) / (steps * error.shape[2])
        l1_per_dim, mse_per_dim = abs_error[real].mean(0), sq_error[real].mean(0)
        return {
            "l1": float(l1_per_dim.mean()),
            "mse": float(mse_per_dim.mean()),
            "l1_per_dim": l1_per_dim.tolist(),
            "mse_per_dim": mse_per_dim.tolist(),
            "l1_per_step": l1_per_step.tolist(),
            "mse_per_step": mse_per_step.tolist(),
            "num_steps": int(real.sum()),
        }
