"""The DSRL trainer: typed run configuration, the training loop, metrics logging and plots."""
