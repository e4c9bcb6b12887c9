"""Control experiments (docs/method.md#interventions-and-controls): removal and steering of task features against honest
controls, every effect with a bootstrap confidence interval.

    tasks = study_eval_tasks(records)                       # evaluation tasks from task tags
    effects = removal_experiment(adapter, saes, task_sets, tasks, stats)
    steering = steering_experiment(adapter, saes, task_sets["spatial"], test, validation, stats, ...)
    run_removal(run_dir, adapter, records)                  # writes run_dir/eval/effects.{parquet,json}
    run_steering(run_dir, adapter, test, validation)        # writes run_dir/eval/steering.{parquet,json}
"""

from mmdiff.control.controls import (
    DEFAULT_MISMATCH,
    firing_frequencies,
    frequency_bins,
    matched_random_features,
    mismatched_pairs,
)
from mmdiff.control.removal import EFFECTS, removal_experiment, run_removal, write_effects
from mmdiff.control.steering import (
    DEFAULT_ALPHAS,
    STEERING,
    feature_steering_terms,
    run_steering,
    steering_experiment,
    typical_max_activation,
    write_steering,
)
from mmdiff.control.tasks import (
    AnswerFloor,
    answer_floor,
    relation_subsets,
    study_eval_tasks,
    task_of,
    unassigned_records,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_MISMATCH",
    "EFFECTS",
    "STEERING",
    "AnswerFloor",
    "answer_floor",
    "feature_steering_terms",
    "firing_frequencies",
    "frequency_bins",
    "matched_random_features",
    "mismatched_pairs",
    "relation_subsets",
    "removal_experiment",
    "run_removal",
    "run_steering",
    "steering_experiment",
    "study_eval_tasks",
    "task_of",
    "typical_max_activation",
    "unassigned_records",
    "write_effects",
    "write_steering",
]
