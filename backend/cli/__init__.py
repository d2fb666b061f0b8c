"""Command-line tools that talk to a Label Studio project."""
