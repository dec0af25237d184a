"""Checkpointing: every Orbax call (save, restore by cause, integrity, data
positions) and initialising from another run or a Hugging Face directory."""
