"""Sinks: they read a Report (or a StepRecord as it is recorded), never a model."""
