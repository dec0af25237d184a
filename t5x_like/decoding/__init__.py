"""Decoding: greedy, sampling and beam search, and inference to files."""
