"""Project runs: background runs, their records, claims and resumption."""
