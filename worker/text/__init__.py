"""Text: labels, prompt prototypes, captions."""
