"""Command-line entry points: parse flags and gin, then call the library."""
