"""fusionserve: portrait generation and face-fusion edits served with Ray Serve."""

__version__ = "0.1.0"
