"""RQ job functions and the process-wide runtime they share."""
