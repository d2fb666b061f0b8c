"""/predict: tasks to predictions, and proposals for tasks nobody drew on."""
