"""Data: the embedded synthetic set and the Ray Data video and text pipelines.

Submodules import Ray lazily; importing this package starts nothing.
"""
