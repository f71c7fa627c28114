"""tosi-tools: pull container images into a content-addressed cache and lay them out."""

__version__ = "0.1.0"
