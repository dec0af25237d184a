"""Evaluation: teacher-forced metrics, decoded task metrics, evaluating checkpoints."""
