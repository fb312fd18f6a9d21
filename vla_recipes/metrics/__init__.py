"""Local ``evaluate`` metric modules (no network): ``evaluate.load(str(METRICS / "action_error.py"))``."""

from pathlib import Path

METRICS = Path(__file__).resolve().parent
