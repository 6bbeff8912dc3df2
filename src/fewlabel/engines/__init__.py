"""Ignite/MONAI engines: trainers, evaluators and the handlers they share."""
