"""Running jobs: on RQ over Redis or in this process, with the result cache."""
