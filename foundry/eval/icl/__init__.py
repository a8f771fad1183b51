"""In-context-learning evaluation in llm-foundry's task formats, over any causal LM.

    tasks (foundry.config.icl.ICLTaskConfig) -> examples + seeded few-shot prompts -> token rows
    -> batched forwards of a callable `input_ids -> logits` -> per-task accuracy (+ gauntlet)

One module per task type (language_modeling, multiple_choice, schema, generation) builds its rows and
scores them; evaluator.ICLEvaluator runs them in one process or in lockstep over ranks. The definition of
every score is in docs/eval.md.
"""

from foundry.eval.icl.evaluator import ICLEvaluator, ICLResults, SettingResult

__all__ = ["ICLEvaluator", "ICLResults", "SettingResult"]
