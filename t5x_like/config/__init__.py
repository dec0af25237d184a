"""Configuration: gin parsing with readable errors, and argument type checks."""
