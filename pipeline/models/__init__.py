"""The reference models the pipeline is tested on: a small digits CNN, all-MiniLM-L6-v2 and MobileNetV2."""
