"""Evaluation: benchmark loaders, sampled generation with a resumable cache, Avg@n / Pass@k / maj@k, reports."""
