"""Bundled data: corpus, SentencePiece vocabulary and seqio task registrations."""
