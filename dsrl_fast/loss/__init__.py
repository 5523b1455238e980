"""The policy loss: log-prob API, token loss, gradient-in-forward path and the loss config."""
