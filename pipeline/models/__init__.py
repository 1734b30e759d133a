"""The reference models the pipeline is tested on: a small digits CNN and all-MiniLM-L6-v2."""
