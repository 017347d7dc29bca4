"""Drop-in layers."""
