"""Training engine: a short loop on HF Accelerate, atomic checkpoints, teacher and teacher-logit caches."""
