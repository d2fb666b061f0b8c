"""Research code that makes the project's models and data: the scene world (a generator of scenes, captions and
region masks), the tiny scene CLIP trainer and its compact text table, and the ClipCap captioner trainer.

``training`` imports ``worker`` (models, configs, engine) and is never imported by it or by ``backend``;
``benchmarks`` imports it for data and measures. Run the trainers as ``python -m training.<module>``.
"""
