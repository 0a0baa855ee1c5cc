"""Distillation: the training loop, the teacher-output cache, and the registered loss methods."""
