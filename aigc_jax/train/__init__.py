"""The training spine shared by every model family."""
