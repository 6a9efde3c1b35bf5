"""Images: datasets, dataset checks, the few-shot subset, preprocessing and reproducible augmented views."""
