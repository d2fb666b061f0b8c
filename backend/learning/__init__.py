"""Learning from annotations: examples, their store and the prototypes fitted on them."""
