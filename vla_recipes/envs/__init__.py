"""Simulator environments for closed-loop work: LeRobot env configs as this kit collects and rolls out in them."""
