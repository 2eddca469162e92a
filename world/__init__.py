"""The built-in world behind the main command: procedural scenes, data in the real formats, component pretraining,
the three stages, evaluation and the report."""
