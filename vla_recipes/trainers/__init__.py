"""Trainers: the shared ``VLATrainer`` and one subclass per model family."""
