"""Trainers: the shared ``VLATrainer`` and the loss-kind trainers (flow matching); a family's own trainer lives in
its folder (``vla_recipes/models/<family>/trainer.py``)."""
