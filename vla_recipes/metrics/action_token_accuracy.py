"""Action-token accuracy: how often a predicted OpenVLA action token is the recorded action's token.

A local ``evaluate`` metric module, loaded by path (no Hub, no network)::

    import evaluate
    from vla_recipes.metrics import METRICS

    accuracy = evaluate.load(str(METRICS / "action_token_accuracy.py"), keep_in_memory=True)
    accuracy.compute(predictions=pred_ids, references=true_ids, action_is_pad=is_pad)

OpenVLA writes each action dimension as one of 256 bin tokens; this is the open-loop counterpart of the
``action_accuracy`` its fine-tuning logs (chance: 1/256). Padded chunk steps are left out.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Fraction of action tokens (one per action dimension and chunk step) that equal the recorded action's token, over
the chunk steps that have a recorded action.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per sample, `action_horizon` lists of `action_dim` token ids.
    references: the recorded actions' token ids, same shape.
    action_is_pad: per sample, `action_horizon` booleans: True where the step lies past the episode's end.
Returns:
    accuracy: over every real (step, dim) token;
    accuracy_per_dim: `action_dim` values.
Example:
    >>> accuracy.compute(predictions=[[[5, 6]], [[5, 5]]], references=[[[5, 7]], [[0, 0]]],
    ...                  action_is_pad=[[False], [True]])["accuracy"]
    0.5
"""

_CITATION = """\
@article{kim24openvla,
    title={OpenVLA: An Open-Source Vision-Language-Action Model},
    author={Kim, Moo Jin and Pertsch, Karl and Karamcheti, Siddharth and others},
    journal={arXiv preprint arXiv:2406.09246},
    year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ActionTokenAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "action_is_pad": datasets.Sequence(datasets.Value("bool")),
                }
            ),
        )

    def _compute(self, predictions, references, action_is_pad):
        correct = np.asarray(predictions) == np.asarray(references)  # (N, H, D)
        real = ~np.asarray(action_is_pad, dtype=bool)  # (N, H)
        if correct.ndim != 3 or real.shape != correct.shape[:2]:
            raise ValueError(
                f"predictions / references must be (samples, horizon, dim) and action_is_pad (samples, horizon); "
                f"got {correct.shape} and {real.shape}"
            )
        if not real.any():
            raise ValueError("every step is padded: there is no recorded action to compare with")
        per_dim = correct[real].mean(0)
        return {"accuracy": float(per_dim.mean()), "accuracy_per_dim": per_dim.tolist()}
